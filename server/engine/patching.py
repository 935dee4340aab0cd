"""Activation-patching sweeps, run as batched forward passes on the engine's worker.

Denoising activation patching (Meng et al. 2022, "Locating and Editing Factual Associations
in GPT", causal tracing; Heimersheim & Nanda 2024, "How to use and interpret activation
patching"): run the *corrupted* prompt with one value -- one hook point, one layer, one
position -- replaced by the value the *clean* prompt had there, and measure the logit
difference ``logit[correct] - logit[incorrect]`` of the next token. A sweep does this for
every cell of hook points x layers x positions.

Each cell is one row of a batch: the rows are all the corrupted prompt, each with its own
``patch`` edit (``interventions.Edit``, applied by the runtime to that row only, as any
request's edits are), so a forward pass measures ``rows`` cells at once. The clean values
come from one forward over the clean prompt. Clean and corrupted prompts have the same
number of tokens (the positions line up).

A patch at position ``p`` changes nothing before ``p`` (attention is causal; everything else
acts per position), so cells are batched by position and each batch resumes from the
corrupted run's cache of the tokens before that position ``p`` (``HFRuntime.resume``),
feeding only positions ``p`` onward: about half the work of running every cell over the
whole prompt.
Models whose cache cannot be cut there (sliding-window layers) run every cell in full.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from interventions import Edit

from .hooks import HookPoint
from .interrupt import JobInterrupted
from .runtime import RowGroup


@dataclass(frozen=True)
class Cell:
    """One patched value: ``point`` (a hook point of one layer) at absolute ``position``."""

    point: HookPoint
    position: int


@dataclass(frozen=True)
class SweepResult:
    """The metric (``logit[correct] - logit[incorrect]``, float32 logits of the last position)
    of the clean run, the corrupted run and each cell, in the cells' order; ``forwards``: the
    forward passes run (the clean and corrupted ones included)."""

    clean: float
    corrupted: float
    cells: list[float]
    forwards: int


def logit_difference(logits: torch.Tensor, correct: int, incorrect: int) -> list[float]:
    """``[rows, vocab]`` -> per row ``logits[correct] - logits[incorrect]`` (float32)."""
    logits = logits.float()
    return (logits[:, correct] - logits[:, incorrect]).tolist()


def run_sweep(
    runtime,
    clean_ids: list[int],
    corrupted_ids: list[int],
    cells: list[Cell],
    correct: int,
    incorrect: int,
    rows: int,
    stop: Callable[[], bool] = lambda: False,
) -> SweepResult:
    """Every cell's metric, ``rows`` cells per forward pass (on the worker).

    Raises:
        JobInterrupted: ``stop()`` became true (checked between forward passes and layers).
        ValueError: the prompts differ in length."""
    if len(clean_ids) != len(corrupted_ids):
        raise ValueError("the clean and corrupted prompts must have the same number of tokens")
    points = tuple({cell.point.name: cell.point for cell in cells}.values())
    values: dict[str, torch.Tensor] = {}
    clean_group = RowGroup(clean_ids, reads=points, on_values=values.update)
    clean = logit_difference(runtime.start("served", [clean_group]).forward(), correct, incorrect)[0]
    if clean_group.error is not None:
        raise clean_group.error
    # [P, ...] each, kept on the CPU: each batch places only its own cells' rows on the device
    clean_rows = {name: value[0].to("cpu", copy=True) for name, value in values.items()}
    corrupted_run = runtime.start("served", [RowGroup(corrupted_ids)])
    corrupted = logit_difference(corrupted_run.forward(), correct, incorrect)[0]
    resumes = getattr(runtime, "joins_running_batches", False) and hasattr(runtime, "resume")
    order = sorted(range(len(cells)), key=lambda i: cells[i].position) if resumes else list(range(len(cells)))
    batches: list[list[int]] = []  # indexes into cells, at most ``rows`` a batch, one position each
    for i in order:
        last = batches[-1] if batches else None
        if (
            last is not None
            and len(last) < rows
            and (not resumes or cells[last[0]].position == cells[i].position)
        ):
            last.append(i)
        else:
            batches.append([i])
    scores: list[float] = [0.0] * len(cells)
    forwards = 2
    for batch in batches:
        if stop():
            raise JobInterrupted
        groups = [_patched_row(runtime, corrupted_ids, cells[i], clean_rows) for i in batch]
        position = cells[batch[0]].position
        run = (
            runtime.resume(corrupted_run, position, groups)
            if resumes and position > 0
            else runtime.start("served", groups)
        )
        for i, score in zip(batch, logit_difference(run.forward(), correct, incorrect), strict=True):
            scores[i] = score
        forwards += 1
    return SweepResult(clean, corrupted, scores, forwards)


def _patched_row(
    runtime, corrupted_ids: list[int], cell: Cell, clean_rows: dict[str, torch.Tensor]
) -> RowGroup:
    """One row of the corrupted prompt with ``cell`` patched in from the clean run (its source row
    on the model's device and dtype)."""
    position = cell.position
    source = clean_rows[cell.point.name][position : position + 1]  # [1, ...]
    edit = Edit(cell.point, "patch", (position,), steps=(0, 1), source=source, source_positions=(position,))
    return RowGroup(corrupted_ids, edits=runtime.place((edit,)))
