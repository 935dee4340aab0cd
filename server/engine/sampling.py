"""Choosing next tokens from logits, row by row, reproducibly.

The same warpers as HF ``generate``, in its order (temperature, then top-k, then
top-p; transformers' own classes), then one ``torch.multinomial`` draw per row.
Each row may bring its own ``torch.Generator``: a request seeded with ``s``
draws from a generator seeded with ``s`` (row ``i`` of a batch: ``s + i``), so
its tokens do not depend on the other rows in the batch, and a single seeded
row draws exactly what HF ``generate`` draws after ``torch.manual_seed(s)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from .generation import SamplingParams


def warp(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Float32 ``[rows, vocab]`` logits after temperature, top-k and top-p (HF semantics)."""
    if params.temperature != 1.0:
        logits = TemperatureLogitsWarper(params.temperature)(None, logits)
    if params.top_k:
        logits = TopKLogitsWarper(params.top_k)(None, logits)
    if params.top_p < 1.0:
        logits = TopPLogitsWarper(params.top_p)(None, logits)
    return logits


def row_generators(seed: int | None, rows: int, device: torch.device) -> list[torch.Generator | None]:
    """One generator per row (``seed + row``), or the global RNG for every row when unseeded."""
    if seed is None:
        return [None] * rows
    return [torch.Generator(device=device).manual_seed(seed + row) for row in range(rows)]


def choose_tokens(
    logits: torch.Tensor, params: SamplingParams, generators: Sequence[torch.Generator | None]
) -> torch.Tensor:
    """One token id per row of float32 ``[rows, vocab]`` logits: argmax when greedy, else a draw."""
    if params.greedy:
        return logits.argmax(dim=-1)
    probs = torch.softmax(warp(logits, params), dim=-1)
    draws = [
        torch.multinomial(probs[row : row + 1], num_samples=1, generator=generator)[0]
        for row, generator in enumerate(generators)
    ]
    return torch.cat(draws)
