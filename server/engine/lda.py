"""Logit difference amplification (LDA): the formula, and a request's rows as decode-loop jobs.

Each next token is drawn from ``after + alpha * (after - before)``, the logits of an
"after" side and a "before" side at the same point of the same completion (alpha = 0
is the after side alone, alpha = -1 the before side alone); method of Aranguri &
McGrath, "Discovering undesired rare behaviors via model diff amplification" (2025).

An :class:`LdaJob` is one request: ``rows`` prompts, each with its after-side prompt
and edits and its before-side prompt and weights (``job.LdaPlan``). The engine runs it
as one :class:`~server.engine.job.GenerationJob` per row through the one decode loop
(``loop.py``), which runs the before side as a second forward pass of the same step
with its own cache. Row ``i`` of a request seeded ``s`` is a job seeded ``s + i``, so
each row draws the same tokens whatever else shares the batch.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace

import torch

from .job import Choice, GenerationJob, LdaPlan, SamplingParams


@dataclass
class LdaJob:
    """One LDA request: per row an after prompt and a before prompt; the edits apply to the
    after side; ``weights``: the before side's weights (see ``job.LdaPlan``)."""

    after_prompts: tuple[tuple[int, ...], ...]
    before_prompts: tuple[tuple[int, ...], ...]
    alpha: float
    params: SamplingParams  # max_tokens, temperature, top_p, top_k, stop, seed, ignore_eos (n = 1)
    weights: str = "served"
    edits: tuple = ()
    token_stats: bool = False
    cancelled: threading.Event = field(default_factory=threading.Event)
    jobs: list[GenerationJob] = field(init=False)  # one per row, built from the above

    def __post_init__(self) -> None:
        if len(self.before_prompts) != len(self.after_prompts):
            raise ValueError("both sides need one prompt per row")
        seed = self.params.seed
        self.jobs = [
            GenerationJob(
                prompt_ids=list(after),
                params=replace(self.params, n=1, seed=None if seed is None else seed + i),
                edits=self.edits,
                lda=LdaPlan(tuple(before), self.alpha, self.weights, self.token_stats),
                cancelled=self.cancelled,
            )
            for i, (after, before) in enumerate(zip(self.after_prompts, self.before_prompts, strict=True))
        ]

    @property
    def rows(self) -> int:
        return len(self.after_prompts)

    @property
    def steps(self) -> int:
        """Decode steps run so far (the longest row's)."""
        return max((job.steps for job in self.jobs), default=0)


@dataclass
class LdaResult:
    rows: list[Choice]  # one per prompt: text, token_ids, finish_reason, stats (with token_stats)
    steps: int


def amplify(after: torch.Tensor, before: torch.Tensor, alpha: float) -> torch.Tensor:
    """The LDA logits: ``after + alpha * (after - before)`` (float32 ``[rows, vocab]`` each)."""
    return after + alpha * (after - before)


def token_stats(after: torch.Tensor, before: torch.Tensor, tokens: torch.Tensor) -> list[tuple]:
    """Per row: (KL(after || before) in nats, ||after - before||_2, logprob_after, logprob_before)
    of ``tokens``, from float32 ``[rows, vocab]`` raw logits."""
    log_after = torch.log_softmax(after, dim=-1)
    log_before = torch.log_softmax(before, dim=-1)
    kl = (log_after.exp() * (log_after - log_before)).sum(-1)
    norm = (after - before).norm(dim=-1)
    chosen_after = log_after.gather(1, tokens[:, None])[:, 0]
    chosen_before = log_before.gather(1, tokens[:, None])[:, 0]
    return list(zip(*(t.tolist() for t in (kl, norm, chosen_after, chosen_before)), strict=True))
