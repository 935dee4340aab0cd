"""The one sampler: a job's next tokens (and their logprobs) from its rows' logits.

Pure functions over float32 ``[rows, vocab]`` logits, called once per job per step by
the decode loop (``loop.py``) whatever runs the forward pass:

* :func:`sample`: argmax when greedy; else HF ``generate``'s own warpers in its order
  (temperature, top-k, top-p; transformers' classes), softmax, and one
  ``torch.multinomial`` draw over the job's rows from the job's generator (seeded
  ``seed``), or the global RNG when unseeded. One draw over the rows, as HF draws for
  a batch, is what makes a seeded job equal HF ``generate`` after
  ``torch.manual_seed(seed)`` (tested), alone or in any batch;
* :func:`chosen_logprobs`: the log-softmax of the *raw* logits (before warpers) at the
  chosen tokens and the top ``k`` alternatives, as OpenAI's ``logprobs`` report them; a
  token the model rules out (logit -inf) reports :data:`LOGPROB_FLOOR`, as vLLM does (JSON
  has no infinity);
* :func:`check_finite`: a job's logits must hold a distribution per row; an intervention that
  overflowed the dtype ends that job (:class:`NonFiniteLogits`), not the batch.

Adding a sampling parameter means a field in :class:`~server.engine.job.SamplingParams`
(and the request model that fills it) and a step in :func:`sample`: see
docs/architecture.md for a worked example.
"""

from __future__ import annotations

import torch
from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from .job import SamplingParams, TokenLogprob

LOGPROB_FLOOR = -9999.0  # reported for a logprob of -inf (vLLM's value)


class NonFiniteLogits(ArithmeticError):
    """A job's logits hold NaN or +inf (or only -inf) in some row: nothing can be sampled.

    ``step``: the generated token it happened at (0: the first); ``edited``: whether the job
    had interventions (then they are the likely cause, and the request is at fault)."""

    def __init__(self, message: str, *, step: int, edited: bool) -> None:
        super().__init__(message)
        self.step = step
        self.edited = edited


def check_finite(logits: torch.Tensor, *, step: int, edits: tuple = (), side: str = "") -> None:
    """Raise :class:`NonFiniteLogits` unless every row of float ``[rows, vocab]`` logits has
    no NaN, no +inf and at least one finite value (one reduction: a row's max is NaN if it
    holds one, +inf if it holds one, -inf if all are)."""
    if bool(torch.isfinite(logits.max(dim=-1).values).all()):
        return
    where = f"the {side} side's " if side else "the "
    if edits:
        applied = "; ".join(f"{e.operation} at {e.point.name}" for e in edits)
        cause = (
            f"the request's interventions ({applied}) pushed the model's values past what its dtype "
            "holds: use a smaller scale, factor, value or vector"
        )
    else:
        cause = "the model itself produced them (no interventions in this request)"
    raise NonFiniteLogits(
        f"{where}logits became non-finite (NaN or infinite) at generated token {step}: {cause}",
        step=step,
        edited=bool(edits),
    )


def generator_for(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """The job's own generator when it is seeded and samples; None: the global RNG."""
    if params.seed is None or params.greedy:
        return None
    return torch.Generator(device=device).manual_seed(params.seed)


def warp(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Float32 ``[rows, vocab]`` logits after temperature, top-k and top-p (HF semantics)."""
    if params.temperature != 1.0:
        logits = TemperatureLogitsWarper(params.temperature)(None, logits)
    if params.top_k:
        logits = TopKLogitsWarper(params.top_k)(None, logits)
    if params.top_p < 1.0:
        logits = TopPLogitsWarper(params.top_p)(None, logits)
    return logits


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """One token id per row (``[rows]``, long) from float32 ``[rows, vocab]`` logits.

    Raises RuntimeError when the logits hold no valid distribution (NaN or inf from an
    intervention that overflowed)."""
    if params.greedy:
        return logits.argmax(dim=-1)
    probs = torch.softmax(warp(logits, params), dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)


def chosen_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top_k: int) -> list[TokenLogprob]:
    """Per row: the raw log-probability of ``tokens[row]`` and the ``top_k`` likeliest tokens."""
    logprobs = torch.log_softmax(logits.float(), dim=-1).clamp(min=LOGPROB_FLOOR)
    chosen = logprobs.gather(1, tokens[:, None])[:, 0].tolist()
    ids = tokens.tolist()
    if not top_k:
        return [TokenLogprob(t, lp) for t, lp in zip(ids, chosen, strict=True)]
    top = logprobs.topk(top_k, dim=-1)
    values, indices = top.values.tolist(), top.indices.tolist()
    return [
        TokenLogprob(t, lp, tuple(zip(idx, val, strict=True)))
        for t, lp, idx, val in zip(ids, chosen, indices, values, strict=True)
    ]
