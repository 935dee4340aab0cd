#!/usr/bin/env python
"""Benchmark: a patching sweep as the server runs it, against the same cells one by one.

Run from the repository root (after ``bash scripts/install.sh --dev``)::

    .venv/bin/python scripts/bench_patching.py   # embedded model, CPU; about 3 minutes on 2 cores

In one process, on the server's own runtime (what ``POST /v1/patching/sweep`` runs on the
worker; HTTP left out): an indirect-object prompt pair (Wang et al. 2022) whose only
difference is the repeated name, the logit difference of the two names, ``resid_post`` at
every layer x every position. Alternated, ``--rounds`` times:

* **cell by cell**: each cell one forward pass over the whole corrupted prompt with that one
  value patched in (``interventions.Edit`` ``patch``), as a client looping over cells gets;
* **the sweep, one cell per pass** (``batch_size`` 1): the sweep's shortcuts without batching
  (each pass resumes after the cached prefix before its position and skips the layers before
  its layer);
* **the sweep** (``batch_size`` ``--batch-size``, default 32).

All three must agree cell by cell (1e-3). Prints the times and ratios; writes a JSON file.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from bench_common import ROOT, add_model_arguments

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPTED = "When Mary and John went to the store, Mary gave a drink to"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "bench_results" / "patching.json")
    args = parser.parse_args()

    from server.engine.hf_runtime import HFRuntime
    from server.engine.hooks import HookResolver
    from server.engine.loading import load_model
    from server.engine.patching import Cell, _patched_row, logit_difference, run_sweep
    from server.engine.structure import find_layers

    loaded = load_model(args.model, dtype=args.dtype, device=args.device)
    runtime = HFRuntime(loaded)
    resolver = HookResolver(loaded.hf_model, find_layers(loaded.hf_model))
    tokenizer = loaded.tokenizer
    clean, corrupted = tokenizer.encode(CLEAN), tokenizer.encode(CORRUPTED)
    assert len(clean) == len(corrupted)
    (correct,), (incorrect,) = (
        tokenizer.encode(" Mary", add_special_tokens=False),
        tokenizer.encode(" John", add_special_tokens=False),
    )
    outputs = tuple(resolver.resolve(layers="all", hook_points=["resid_post"], modules=None))
    cells = [Cell(point, p) for point in outputs for p in range(len(corrupted))]

    def cell_by_cell() -> list[float]:
        values: dict = {}
        from server.engine.runtime import RowGroup

        runtime.start("served", [RowGroup(clean, reads=outputs, on_values=values.update)]).forward()
        rows = {name: value[0].to("cpu", copy=True) for name, value in values.items()}
        scores = []
        for cell in cells:
            group = _patched_row(runtime, corrupted, cell, rows)
            scores += logit_difference(runtime.start("served", [group]).forward(), correct, incorrect)
        return scores

    def sweep(rows: int) -> list[float]:
        return run_sweep(
            runtime, clean, corrupted, cells, correct, incorrect, rows, layer_outputs=outputs
        ).cells

    runs = {
        "cell_by_cell": cell_by_cell,
        "sweep_one_per_pass": lambda: sweep(1),
        "sweep": lambda: sweep(args.batch_size),
    }
    with torch.no_grad():
        sweep(args.batch_size)  # warm up
        times: dict[str, list[float]] = {name: [] for name in runs}
        results: dict[str, list[float]] = {}
        for _ in range(args.rounds):
            for name, run in runs.items():
                started = time.perf_counter()
                results[name] = run()
                times[name].append(time.perf_counter() - started)
    for name in ("sweep_one_per_pass", "sweep"):
        worst = max(abs(a - b) for a, b in zip(results[name], results["cell_by_cell"], strict=True))
        assert worst < 1e-3, f"{name} differs from cell by cell by {worst}"
    median = {name: statistics.median(values) for name, values in times.items()}
    result = {
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "device": str(loaded.device),
        },
        "model": loaded.model_id,
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "cells": len(cells),
        "layers": len(outputs),
        "positions": len(corrupted),
        "batch_size": args.batch_size,
        "rounds": args.rounds,
        "seconds": times,
        "median_seconds": median,
        "speedup_over_cell_by_cell": median["cell_by_cell"] / median["sweep"],
        "speedup_of_batching_alone": median["sweep_one_per_pass"] / median["sweep"],
        "speedup_of_shortcuts_alone": median["cell_by_cell"] / median["sweep_one_per_pass"],
        "per_round_speedup": [a / b for a, b in zip(times["cell_by_cell"], times["sweep"], strict=True)],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(
        f"{len(cells)} cells ({len(outputs)} layers x {len(corrupted)} positions), median of {args.rounds}: "
        f"cell by cell {median['cell_by_cell']:.1f} s, the sweep one cell per pass "
        f"{median['sweep_one_per_pass']:.1f} s, the sweep ({args.batch_size} per pass) "
        f"{median['sweep']:.1f} s: "
        f"{result['speedup_over_cell_by_cell']:.2f}x faster than cell by cell "
        f"(batching alone {result['speedup_of_batching_alone']:.2f}x, "
        f"the shortcuts alone {result['speedup_of_shortcuts_alone']:.2f}x)"
    )


if __name__ == "__main__":
    main()
