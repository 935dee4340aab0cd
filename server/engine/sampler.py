"""The one sampler: a job's next tokens (and their logprobs) from its rows' logits.

Pure functions over float32 ``[rows, vocab]`` logits, called once per job per step by
the decode loop (``loop.py``) whatever runs the forward pass:

* :func:`process`: the request's logits processors, in HF ``generate``'s order: ``logit_bias``
  (added, as HF's ``SequenceBiasLogitsProcessor`` does for one-token sequences),
  ``repetition_penalty`` (HF's ``RepetitionPenaltyLogitsProcessor``: prompt and output,
  Keskar et al. 2019, "CTRL"), ``frequency_penalty`` and ``presence_penalty`` (OpenAI's
  formula as vLLM applies it: output tokens only), ``min_tokens`` (EOS and
  ``stop_token_ids`` at -inf, as HF's ``MinNewTokensLengthLogitsProcessor`` sets them);
* :func:`sample`: argmax when greedy; else HF ``generate``'s own warpers in its order
  (temperature, top-k, top-p, min-p; transformers' classes), softmax, and one
  ``torch.multinomial`` draw over the job's rows from the job's generator (seeded
  ``seed``), or the global RNG when unseeded. One draw over the rows, as HF draws for
  a batch, is what makes a seeded job equal HF ``generate`` after
  ``torch.manual_seed(seed)`` (tested), alone or in any batch;
* :func:`chosen_logprobs`: the log-softmax of the *raw* logits (before warpers) at the
  chosen tokens and the top ``k`` alternatives, as OpenAI's ``logprobs`` report them; a
  token the model rules out (logit -inf) reports :data:`LOGPROB_FLOOR`, as vLLM does (JSON
  has no infinity);
* :func:`finite_rows`: whether each row's logits hold a distribution (checked on the device;
  the loop reads the flags with the sampled tokens, in one transfer); an intervention that
  overflowed the dtype ends that job (:func:`non_finite`), not the batch.

Adding a sampling parameter means a field in :class:`~server.engine.job.SamplingParams`
(and the request model that fills it) and a step in :func:`process` (a logits processor)
or :func:`warp` (a warper): see docs/architecture.md for a worked example.
"""

from __future__ import annotations

import torch
from transformers import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

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


def finite_rows(logits: torch.Tensor) -> torch.Tensor:
    """``[rows]`` bool on the logits' device: each row of float ``[rows, vocab]`` logits holds a
    distribution (no NaN, no +inf, not all -inf). One reduction and no host sync: a row's max
    is NaN if it holds one, +inf if it holds one, -inf if all are."""
    return torch.isfinite(logits.max(dim=-1).values)


def non_finite(*, step: int, edits: tuple = (), side: str = "") -> NonFiniteLogits:
    """The error for a job whose logits went non-finite at generated token ``step``, naming its
    interventions (``edits``) as the likely cause where it has any; ``side``: LDA's "after" or
    "before", else empty."""
    where = f"the {side} side's " if side else "the "
    if edits:
        applied = "; ".join(f"{e.operation} at {e.point.name}" for e in edits)
        cause = (
            f"the request's interventions ({applied}) pushed the model's values past what its dtype "
            "holds: use a smaller scale, factor, value or vector"
        )
    else:
        cause = "the model itself produced them (no interventions in this request)"
    return NonFiniteLogits(
        f"{where}logits became non-finite (NaN or infinite) at generated token {step}: {cause}",
        step=step,
        edited=bool(edits),
    )


def generator_for(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """The job's own generator when it is seeded and samples; None: the global RNG."""
    if params.seed is None or params.greedy:
        return None
    return torch.Generator(device=device).manual_seed(params.seed)


def process(
    logits: torch.Tensor,
    params: SamplingParams,
    history: torch.Tensor | None,
    prompt_len: int,
    stop_ids: frozenset[int],
    generated: int,
) -> torch.Tensor:
    """Float32 ``[rows, vocab]`` logits after the request's logits processors (see the module
    docstring for the order and sources); a new tensor where any applies, ``logits`` itself
    where none does.

    ``history``: ``[rows, prompt_len + generated]`` token ids, needed where
    ``params.needs_history``; ``stop_ids``: what ``min_tokens`` holds back (EOS unless
    ``ignore_eos``, and ``stop_token_ids``); ``generated``: tokens so far per row."""
    if params.logit_bias:
        ids, bias = zip(*params.logit_bias, strict=True)
        logits = logits.clone()
        logits[:, list(ids)] += torch.tensor(bias, device=logits.device, dtype=logits.dtype)
    if params.repetition_penalty != 1.0:
        logits = RepetitionPenaltyLogitsProcessor(params.repetition_penalty)(history, logits)
    if params.frequency_penalty or params.presence_penalty:
        generated_ids = history[:, prompt_len:]
        ones = torch.ones_like(generated_ids, dtype=logits.dtype)
        counts = torch.zeros_like(logits).scatter_add_(1, generated_ids, ones)
        logits = logits - params.frequency_penalty * counts - params.presence_penalty * (counts > 0)
    if generated < params.min_tokens and stop_ids:  # as HF's MinNewTokensLengthLogitsProcessor
        logits = logits.clone()
        logits[:, sorted(stop_ids)] = float("-inf")
    return logits


def warp(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Float32 ``[rows, vocab]`` logits after temperature, top-k, top-p and min-p (HF semantics)."""
    if params.temperature != 1.0:
        logits = TemperatureLogitsWarper(params.temperature)(None, logits)
    if params.top_k:
        logits = TopKLogitsWarper(params.top_k)(None, logits)
    if params.top_p < 1.0:
        logits = TopPLogitsWarper(params.top_p)(None, logits)
    if params.min_p:
        logits = MinPLogitsWarper(params.min_p)(None, logits)
    return logits


def sample(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token id per row (``[rows]``, long) from float32 ``[rows, vocab]`` logits (after
    :func:`process`), and per row whether its distribution was finite (``[rows]``, bool; read
    back with the tokens, no extra sync). Finite logits can still overflow once warped (huge
    edited logits divided by a small temperature): such a row draws from a placeholder and is
    reported instead of making ``multinomial`` raise."""
    if params.greedy:
        return logits.argmax(dim=-1), finite_rows(logits)
    probs = torch.softmax(warp(logits, params), dim=-1)
    finite = finite_rows(probs)
    probs = torch.where(finite[:, None], probs, torch.ones_like(probs[:1]))
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1), finite


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
