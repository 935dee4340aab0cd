"""Prompt scoring: the log-probability of each prompt token given the tokens before it.

This is what ``echo`` with ``logprobs`` on ``/v1/completions`` returns, and what
evaluation harnesses (lm-evaluation-harness's loglikelihood tasks, for one) are
built on. One forward pass over the prompt on the served weights; the
log-softmax is taken a chunk of positions at a time, so the float32 copy of
the logits never exceeds ``chunk x vocab`` on top of the logits themselves.
Runs on the engine's worker thread.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .interrupt import JobInterrupted
from .job import TokenLogprob
from .sampler import LOGPROB_FLOOR


@torch.no_grad()
def score_prompt(
    hf_model: torch.nn.Module,
    prompt_ids: list[int],
    top_k: int,
    cancelled: Callable[[], bool] = lambda: False,
    chunk: int = 256,
) -> list[TokenLogprob]:
    """One entry per prompt token; the first has ``logprob=None`` (nothing precedes it).

    Raises JobInterrupted once ``cancelled()`` is true (checked between chunks; the engine also
    checks it between layers of the forward pass)."""
    device = next(hf_model.parameters()).device
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    logits = hf_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]  # [pos, vocab]
    scored = [TokenLogprob(prompt_ids[0], None)]
    for start in range(0, len(prompt_ids) - 1, chunk):
        if cancelled():
            raise JobInterrupted
        stop = min(start + chunk, len(prompt_ids) - 1)
        # predicts tokens start+1..stop; -inf (a token the model rules out) as vLLM reports it
        logprobs = torch.log_softmax(logits[start:stop].float(), dim=-1).clamp(min=LOGPROB_FLOOR)
        targets = ids[0, start + 1 : stop + 1]
        chosen = logprobs.gather(1, targets[:, None])[:, 0].tolist()
        if top_k:
            top = logprobs.topk(top_k, dim=-1)
            alternatives = [
                tuple(zip(i, v, strict=True))
                for i, v in zip(top.indices.tolist(), top.values.tolist(), strict=True)
            ]
        else:
            alternatives = [()] * len(chosen)
        scored += [
            TokenLogprob(t, lp, alt)
            for t, lp, alt in zip(targets.tolist(), chosen, alternatives, strict=True)
        ]
    return scored
