#!/usr/bin/env python
"""Benchmark: a patching sweep run batched against the same sweep one cell per forward pass.

Run from the repository root (after ``bash scripts/install.sh --dev``)::

    .venv/bin/python scripts/bench_patching.py   # embedded model, CPU; about 3 minutes on 2 cores

Starts the real server and sends ``POST /v1/patching/sweep`` over HTTP: an indirect-object
prompt pair (Wang et al. 2022) whose only difference is the repeated name, the logit
difference of the two names, ``resid_post`` at every layer x every position. The same sweep
runs with ``batch_size`` 1 (one patched run per forward pass: what a client looping over
cells gets) and with ``--batch-size`` (default 32), alternated, ``--rounds`` times; the two
must agree cell by cell (1e-3). Prints both times and their ratio; writes a JSON file.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import httpx
from bench_common import ROOT, add_model_arguments, start_server, stop_process

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPTED = "When Mary and John went to the store, Mary gave a drink to"
METRIC = {"type": "logit_diff", "correct": " Mary", "incorrect": " John"}


def sweep(url: str, batch_size: int, layers) -> tuple[float, dict]:
    body = {
        "clean": CLEAN,
        "corrupted": CORRUPTED,
        "metric": METRIC,
        "layers": layers,
        "batch_size": batch_size,
        "heatmap": False,
    }
    started = time.perf_counter()
    response = httpx.post(f"{url}/v1/patching/sweep", json=body, timeout=3600)
    elapsed = time.perf_counter() - started
    response.raise_for_status()
    return elapsed, response.json()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--layers", default="all", help='"all" or comma-separated layer indexes')
    parser.add_argument("--out", type=Path, default=ROOT / "bench_results" / "patching.json")
    args = parser.parse_args()
    layers = "all" if args.layers == "all" else [int(layer) for layer in args.layers.split(",")]

    process, url = start_server(args, "--max-batch-size", str(args.batch_size))
    try:
        sweep(url, args.batch_size, [0])  # warm up both paths
        sweep(url, 1, [0])
        solo_times, batched_times = [], []
        for _ in range(args.rounds):
            solo_time, solo = sweep(url, 1, layers)
            batched_time, batched = sweep(url, args.batch_size, layers)
            solo_times.append(solo_time)
            batched_times.append(batched_time)
            for a, b in zip(solo["results"][0]["scores"], batched["results"][0]["scores"], strict=True):
                assert all(abs(x - y) < 1e-3 for x, y in zip(a, b, strict=True)), (
                    "batched and solo cells differ"
                )
    finally:
        stop_process(process)

    solo_s, batched_s = statistics.median(solo_times), statistics.median(batched_times)
    result = {
        "model": args.model,
        "cells": batched["cells"],
        "positions": len(batched["positions"]),
        "layers": len(batched["results"][0]["layers"]),
        "batch_size": batched["batch_size"],
        "forward_passes": {"solo": solo["forward_passes"], "batched": batched["forward_passes"]},
        "seconds": {"solo": solo_times, "batched": batched_times},
        "median_seconds": {"solo": solo_s, "batched": batched_s},
        "speedup": solo_s / batched_s,
        "clean_metric": batched["clean_metric"],
        "corrupted_metric": batched["corrupted_metric"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(
        f"{result['cells']} cells ({result['layers']} layers x {result['positions']} positions): "
        f"one per forward {solo_s:.1f} s, {result['batch_size']} per forward {batched_s:.1f} s: "
        f"{result['speedup']:.2f}x faster batched"
    )


if __name__ == "__main__":
    main()
