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

A patch at position ``p`` of layer ``L`` changes nothing before ``p`` (attention is causal;
everything else acts per position) and nothing before layer ``L``. So cells are batched in
tiles of nearby layers x positions, and each batch resumes from the corrupted run's cache of
the tokens before its earliest position (``HFRuntime.resume``) and skips the layers before its
earliest layer, the corrupted run's output standing in for them (``HFBatch.skip_layers``,
nnsight's ``skip``). Models whose cache cannot be cut (sliding-window layers) feed the whole
prompt; models whose layers do not return one tensor run every layer.
"""

from __future__ import annotations

import math
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
    layer_outputs: tuple[HookPoint, ...] = (),
) -> SweepResult:
    """Every cell's metric, ``rows`` cells per forward pass (on the worker). ``layer_outputs``:
    every decoder layer's output (``resid_post``, in layer order), to let batches skip the
    layers before their cells (the module docstring); without them every layer runs.

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
    values.clear()  # the device's copies go now, not when the sweep ends
    skips = bool(layer_outputs) and getattr(runtime, "skips_layers", False)
    output_of = {point.layer: point for point in layer_outputs}  # layer -> its output's hook point
    outputs: dict[str, torch.Tensor] = {}  # the corrupted run's layer outputs, [1, P, d] each
    corrupted_group = RowGroup(corrupted_ids, reads=layer_outputs if skips else (), on_values=outputs.update)
    corrupted_run = runtime.start("served", [corrupted_group])
    corrupted = logit_difference(corrupted_run.forward(), correct, incorrect)[0]
    if corrupted_group.error is not None:
        raise corrupted_group.error
    resumes = getattr(runtime, "joins_running_batches", False) and hasattr(runtime, "resume")
    scores: list[float] = [0.0] * len(cells)
    forwards = 2
    for batch in _tiles(cells, rows, resumes, skips, len(corrupted_ids)):
        if stop():
            raise JobInterrupted
        groups = [_patched_row(runtime, corrupted_ids, cells[i], clean_rows) for i in batch]
        first = min(cells[i].position for i in batch) if resumes else 0
        run = runtime.resume(corrupted_run, first, groups) if first > 0 else runtime.start("served", groups)
        layer = min(cells[i].point.layer for i in batch)
        if skips and layer > 0 and layer - 1 in output_of:  # the layers before the batch's cells
            before = outputs[output_of[layer - 1].name][:, first:]  # the corrupted run's, [1, fed, d]
            run.skip_layers(runtime.layers_path, layer, before.expand(len(batch), -1, -1).contiguous())
        for i, score in zip(batch, logit_difference(run.forward(), correct, incorrect), strict=True):
            scores[i] = score
        forwards += 1
    return SweepResult(clean, corrupted, scores, forwards)


def _tiles(cells: list[Cell], rows: int, resumes: bool, skips: bool, positions: int) -> list[list[int]]:
    """The cells (indexes) in batches of at most ``rows``, each within one tile of nearby layers x
    positions (counted among those the sweep asks for), so a batch resumes at its tile's earliest
    position and skips the layers before its tile's earliest layer. Where only one of the two
    applies, a tile spans every layer or every position."""
    layer_rank = {layer: i for i, layer in enumerate(sorted({cell.point.layer for cell in cells}))}
    position_rank = {p: i for i, p in enumerate(sorted({cell.position for cell in cells}))}
    layers, wanted = len(layer_rank), len(position_rank)
    if resumes and skips:  # as large a share of each side as the other: tile_p / positions = tile_l / layers
        tile_p = max(1, min(wanted, round(math.sqrt(rows * wanted / layers))))
        tile_l = max(1, rows // tile_p)
    else:
        tile_p = 1 if resumes else wanted
        tile_l = max(1, rows // tile_p) if skips else layers
    tiles: dict[tuple[int, int], list[int]] = {}
    order = sorted(range(len(cells)), key=lambda i: (cells[i].point.layer, cells[i].position))
    for i in order:
        key = (layer_rank[cells[i].point.layer] // tile_l, position_rank[cells[i].position] // tile_p)
        tiles.setdefault(key, []).append(i)
    return [
        tile[start : start + rows] for _, tile in sorted(tiles.items()) for start in range(0, len(tile), rows)
    ]


def _patched_row(
    runtime, corrupted_ids: list[int], cell: Cell, clean_rows: dict[str, torch.Tensor]
) -> RowGroup:
    """One row of the corrupted prompt with ``cell`` patched in from the clean run (its source row
    on the model's device and dtype)."""
    position = cell.position
    source = clean_rows[cell.point.name][position : position + 1]  # [1, ...]
    edit = Edit(cell.point, "patch", (position,), steps=(0, 1), source=source, source_positions=(position,))
    return RowGroup(corrupted_ids, edits=runtime.place((edit,)))
