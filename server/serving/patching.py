"""``POST /v1/patching/sweep``: an activation-patching sweep as one request.

Checks everything against the served model before any work (400 naming the field): the two
prompts tokenize to the same length, each metric token is one token, hook points and layers
resolve, positions lie inside the prompt, the batch fits ``--memory-budget``. The sweep runs
on the engine's worker (``server/engine/patching.py``), within the request timeout and
cancelled with its client; heatmaps are drawn in a thread.

The response gives, per hook point, the metric of every layer x position (``scores``) and the
same normalised so that 0 is the corrupted run and 1 the clean one (``normalized``:
``(patched - corrupted) / (clean - corrupted)``; null where the two runs agree), with the
positions' tokens, and a PNG heatmap of the normalised scores (base64) unless ``heatmap`` is
false.
"""

from __future__ import annotations

import asyncio
import base64
import functools

from ..engine.hooks import HookError
from ..engine.memory import estimate
from ..engine.patching import Cell, run_sweep
from ..errors import APIError
from ..protocol_analysis import PatchingSweepRequest
from .base import (
    ENGINE_FAILURES,
    aligned_example,
    engine_error,
    example_ids,
    require_feature,
    single_token,
)
from .heatmap import heatmap_png
from .parts import ServingParts


class PatchingServing:
    """Patching sweeps over HTTP."""

    def __init__(self, parts: ServingParts) -> None:
        self.engine = parts.engine
        self.admission = parts.admission

    async def sweep(self, body: PatchingSweepRequest) -> dict:
        engine = self.engine
        require_feature(engine, "patching", None)
        self.admission.check_model(body.model)
        clean = await example_ids(engine, body.clean, "clean")
        corrupted = await aligned_example(engine, body.corrupted, "corrupted", clean, "clean")
        correct = await single_token(engine, body.metric.correct, "metric.correct")
        incorrect = await single_token(engine, body.metric.incorrect, "metric.incorrect")
        try:
            layers = engine.hooks.layer_indexes(body.layers)
            points = engine.hooks.resolve(layers=layers, hook_points=body.hook_points, modules=None)
        except HookError as exc:
            raise APIError(str(exc), param=exc.param) from exc
        for point in points:
            if not point.floating:
                raise APIError(f"{point.name} holds integers, not activations", param="hook_points")
        positions = list(range(len(clean))) if body.positions == "all" else sorted(set(body.positions))
        if positions[-1] >= len(clean):
            raise APIError(
                f"position {positions[-1]} is past the prompt ({len(clean)} tokens)", param="positions"
            )
        rows = self._rows(body.batch_size, len(clean))
        self.admission.check_queue()
        by_point = {point.name: point for point in points}
        cells = [
            Cell(by_point[f"layers.{layer}.{hook}"], p)
            for hook in body.hook_points
            for layer in layers
            for p in positions
        ]
        # every layer's output, for batches that skip the layers before their cells (where the
        # runtime can: it decides on the worker)
        try:
            outputs = tuple(engine.hooks.resolve(layers="all", hook_points=["resid_post"], modules=None))
        except HookError:  # a layer output that is no [batch, pos, ...] tensor: run every layer
            outputs = ()
        try:
            sweep = functools.partial(run_sweep, layer_outputs=outputs)  # ``stop`` comes last
            result = await engine.run_analysis(
                sweep, engine.runtime, clean, corrupted, cells, correct, incorrect, rows
            )
        except ENGINE_FAILURES as exc:
            raise engine_error(exc) from exc
        tokens = [engine.token_text(corrupted[p]) for p in positions]
        span = result.clean - result.corrupted
        results, scores = [], iter(result.cells)
        for hook in body.hook_points:
            grid = [[next(scores) for _ in positions] for _ in layers]
            normalized = [[(v - result.corrupted) / span if span else None for v in row] for row in grid]
            entry = {"hook_point": hook, "layers": layers, "scores": grid, "normalized": normalized}
            if body.heatmap:
                title = f"{hook}: patched logit difference, normalised (1 = clean)"
                png = await asyncio.to_thread(
                    heatmap_png, normalized, layers, tokens, title, "normalised metric"
                )
                entry["heatmap_png_base64"] = base64.b64encode(png).decode()
            results.append(entry)
        return {
            "object": "patching.sweep",
            "model": engine.model_id,
            "metric": {"type": "logit_diff", "correct_token_id": correct, "incorrect_token_id": incorrect},
            "clean_metric": result.clean,
            "corrupted_metric": result.corrupted,
            "positions": positions,
            "tokens": tokens,
            "results": results,
            "cells": len(cells),
            "forward_passes": result.forwards,
            "batch_size": rows,
        }

    def _rows(self, wanted: int, prompt_tokens: int) -> int:
        """The rows per forward pass: ``batch_size``, fewer where ``--memory-budget`` needs it.

        Raises:
            APIError: not even one row fits."""
        room = self.engine.scheduler.memory_room
        rows = wanted
        while room is not None and rows >= 1:
            # the batch's rows, the corrupted run whose cache every batch resumes from (and the
            # batch's copy of it), and the corrupted run's layer outputs that skipped layers stand for
            need = estimate(self.engine.shape, prompt_tokens=prompt_tokens, max_tokens=1, n=rows + 2)
            shape = self.engine.shape
            outputs = shape.layers * prompt_tokens * shape.hidden * shape.dtype_bytes
            if need.total - need.weights + outputs <= room:
                break
            rows //= 2
        if rows < 1:
            raise APIError(
                "one patched run of this prompt does not fit --memory-budget: shorten it", param="clean"
            )
        return rows
