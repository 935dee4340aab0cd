"""Logit difference amplification (LDA): a two-sided, batched decode loop over the served wrapper.

Each next token is drawn from ``after + alpha * (after - before)``, the logits of
an "after" side and a "before" side at the same point of the same completion
(alpha = 0 is the after side alone, alpha = -1 the before side alone). Both
sides are :class:`~server.engine.decode.DecodeBatch` objects over nnsight
wrappers, each with its own prompts (they differ when the sides differ by
system prompt), its own KV cache, and optionally its own interventions or the
served adapter switched off. The before side's wrapper is the served one unless
a second checkpoint was loaded for it.

Rows are sampled independently (:mod:`~server.engine.sampling`: per-row seeded
generators), end independently (EOS unless ``ignore_eos``, a stop string, or
``max_tokens``), and leave both batches when they end. Completions hold
generated tokens only; tokens become text in
:class:`~server.engine.text.CompletionText`, as for every other endpoint.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

import torch

from .decode import DecodeBatch
from .generation import FINISH_LENGTH, FINISH_STOP, SamplingParams
from .sampling import choose_tokens, row_generators
from .text import CompletionText

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LdaSide:
    """How one side runs: which wrapper, which prompt per row, which edits, adapter on or off."""

    wrapper: object
    prompts: tuple[tuple[int, ...], ...]
    edits: tuple = ()
    adapter_enabled: bool = True


@dataclass
class LdaJob:
    after: LdaSide
    before: LdaSide
    alpha: float
    params: SamplingParams  # max_tokens, temperature, top_p, top_k, stop, seed, ignore_eos
    token_stats: bool = False
    cancelled: threading.Event = field(default_factory=threading.Event)
    steps: int = 0  # decode steps run so far (written by the worker)

    @property
    def rows(self) -> int:
        return len(self.after.prompts)


@dataclass(frozen=True)
class TokenStats:
    """How the two sides differed at one generated token (raw logits, temperature 1)."""

    token_id: int
    kl: float  # KL(after || before) of the next-token distributions, in nats
    logit_diff_norm: float  # || after - before ||_2 over the vocabulary
    logprob_after: float  # the chosen token's log-probability under each side
    logprob_before: float


@dataclass
class LdaRow:
    text: CompletionText
    token_ids: list[int] = field(default_factory=list)
    stats: list[TokenStats] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass
class LdaResult:
    rows: list[LdaRow]
    steps: int


def amplify(after: torch.Tensor, before: torch.Tensor, alpha: float) -> torch.Tensor:
    """The LDA logits: ``after + alpha * (after - before)``."""
    return after + alpha * (after - before)


def token_stats(after: torch.Tensor, before: torch.Tensor, tokens: torch.Tensor) -> list[tuple]:
    """Per row: (KL(after || before), ||after - before||, logprob_after, logprob_before) of ``tokens``."""
    log_after = torch.log_softmax(after, dim=-1)
    log_before = torch.log_softmax(before, dim=-1)
    kl = (log_after.exp() * (log_after - log_before)).sum(-1)
    norm = (after - before).norm(dim=-1)
    chosen_after = log_after.gather(1, tokens[:, None])[:, 0]
    chosen_before = log_before.gather(1, tokens[:, None])[:, 0]
    return list(zip(*(t.tolist() for t in (kl, norm, chosen_after, chosen_before)), strict=True))


def run_lda(job: LdaJob, tokenizer, eos_ids: frozenset[int]) -> LdaResult:
    """Run one LDA job to completion on the calling (worker) thread."""
    params = job.params
    if len(job.before.prompts) != job.rows:
        raise ValueError("both sides need one prompt per row")
    pad = tokenizer.pad_token_id
    sides = [
        DecodeBatch(
            side.wrapper,
            [list(p) for p in side.prompts],
            pad,
            edits=side.edits,
            adapter_enabled=side.adapter_enabled,
        )
        for side in (job.after, job.before)
    ]
    device = sides[0].mask.device
    eos = frozenset() if params.ignore_eos else eos_ids
    rows = [LdaRow(CompletionText(tokenizer, params.stop)) for _ in range(job.rows)]
    generators = row_generators(None if params.greedy else params.seed, job.rows, device)
    active = list(range(job.rows))  # batch row b is job row active[b]
    while active and job.steps < params.max_tokens and not job.cancelled.is_set():
        after, before = (side.forward() for side in sides)
        before = before.to(after.device)
        tokens = choose_tokens(amplify(after, before, job.alpha), params, [generators[r] for r in active])
        stats = token_stats(after, before, tokens) if job.token_stats else None
        job.steps += 1
        still = []
        for b, (r, token) in enumerate(zip(active, tokens.tolist(), strict=True)):
            row = rows[r]
            row.token_ids.append(token)
            if stats is not None:
                row.stats.append(TokenStats(token, *stats[b]))
            if token in eos or row.text.append(token):
                row.finish_reason = FINISH_STOP
            elif len(row.token_ids) >= params.max_tokens:
                row.finish_reason = FINISH_LENGTH
            if row.finish_reason is None:
                still.append(b)
            else:
                row.text.finish()
        active = [active[b] for b in still]
        if active:
            for side in sides:
                side.keep(still)
                side.append(tokens[still] if len(still) < len(tokens) else tokens)
    if job.cancelled.is_set():
        logger.info("LDA cancelled after %d step(s) of %d", job.steps, params.max_tokens)
    for row in rows:
        if row.finish_reason is None:
            row.finish_reason = FINISH_LENGTH
            row.text.finish()
    return LdaResult(rows=rows, steps=job.steps)
