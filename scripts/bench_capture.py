#!/usr/bin/env python
"""Benchmark: what capturing activations during generation costs, in time, memory and disk.

Run from the repository root (after ``bash scripts/install.sh --dev``)::

    .venv/bin/python scripts/bench_capture.py      # embedded model, CPU; about 4 minutes on 2 cores

1. Time. In one process, in alternation: a greedy generation of 128 tokens
   (``ignore_eos``) with nothing captured, then the same with every layer's
   ``resid_post`` captured in ``generate`` mode (prompt and every generated
   token, written to disk step by step). The server's own engine and
   activation store do the work, as they do behind the API (HTTP left out).
   Reports the time ratio capture/plain (total and median over repeats).
2. Memory and disk as max_tokens grows (64, 256, 1024). For each size, two
   fresh processes: one generating with that capture, one without. Each
   samples its resident memory every 5 ms during the generation and reports
   the peak above the level just before it (loading the model, which
   dominates a process's lifetime peak, is left out), the bytes the capture
   wrote, the bytes its manifest records, and the bytes expected
   (layers x positions x hidden x 4).

Writes a JSON file (``--out``) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import add_model_arguments, model_flags  # noqa: E402

PROMPT = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]


def build(args, root: Path):
    from server.engine.engine import Engine
    from server.engine.loading import load_model
    from server.storage import ActivationStore

    engine = Engine(load_model(args.model, dtype=args.dtype, device=args.device))
    return engine, ActivationStore(root)


def run_once(engine, store, max_tokens: int, capture: bool) -> tuple[float, dict | None]:
    from server.engine.capture import CapturePlan, CaptureSpec
    from server.engine.job import GenerationJob, SamplingParams

    prompt_ids = asyncio.run(engine.render_chat(PROMPT))
    spec = None
    if capture:
        points = engine.hooks.resolve(layers="all", hook_points=["resid_post"], modules=None)
        spec = CaptureSpec(CapturePlan(points=tuple(points), mode="generate"), store, "bench")
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    job = GenerationJob(prompt_ids, params, capture=spec)
    started = time.perf_counter()
    result = asyncio.run(engine.generate(job))
    elapsed = time.perf_counter() - started
    assert len(result.choices[0].token_ids) == max_tokens
    return elapsed, result.capture and result.capture.manifest


class RssSampler:
    """The process's peak resident memory while a block runs, sampled every 5 ms."""

    def __enter__(self) -> RssSampler:
        self.process = psutil.Process()
        self.before = self.process.memory_info().rss
        self.peak = self.before
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.done.wait(0.005):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def child(args) -> None:
    """One generation in a fresh process; prints what it cost."""
    from server.storage import ActivationStore

    with tempfile.TemporaryDirectory() as warm_root, tempfile.TemporaryDirectory() as root:
        engine, warm_store = build(args, Path(warm_root))
        run_once(engine, warm_store, 4, args.capture)  # first-call allocations happen before measuring
        store = ActivationStore(Path(root))
        with RssSampler() as rss:
            elapsed, manifest = run_once(engine, store, args.max_tokens, args.capture)
        written = sum(f.stat().st_size for f in Path(root).rglob("*") if f.is_file() and f.suffix != ".json")
        report = {
            "seconds": elapsed,
            "rss_before_bytes": rss.before,
            "peak_rss_increase_bytes": rss.peak - rss.before,
            "bytes_written": written,
            "manifest_bytes": sum(t["bytes"] for t in manifest["tensors"]) if manifest else 0,
            "positions": len(manifest["token_positions"]) if manifest else 0,
            "layers": engine.layout.count,
            "hidden": engine.shape.hidden,
        }
        engine.close()
    print(json.dumps(report))


def spawn(args, max_tokens: int, capture: bool) -> dict:
    cmd = [sys.executable, __file__, "--child", *model_flags(args), "--max-tokens", str(max_tokens)]
    out = subprocess.run(cmd + (["--capture"] if capture else []), check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timing-tokens", type=int, default=128)
    parser.add_argument("--sizes", default="64,256,1024")
    parser.add_argument("--out", type=Path, default=ROOT / "bench_results" / "capture.json")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--capture", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--max-tokens", type=int, default=64, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    with tempfile.TemporaryDirectory() as root:
        engine, store = build(args, Path(root))
        run_once(engine, store, 8, False)  # warm both paths
        run_once(engine, store, 8, True)
        pairs = []
        for _ in range(args.repeats):
            plain, _ = run_once(engine, store, args.timing_tokens, False)
            captured, _ = run_once(engine, store, args.timing_tokens, True)
            pairs.append((plain, captured))
        model_id, dtype, device = engine.model_id, engine.loaded.dtype, engine.loaded.device
        engine.close()

    sizes = []
    for size in (int(s) for s in args.sizes.split(",")):
        with_capture, without = spawn(args, size, True), spawn(args, size, False)
        expected = with_capture["layers"] * with_capture["positions"] * with_capture["hidden"] * 4
        sizes.append(
            {"max_tokens": size, "capture": with_capture, "plain": without, "expected_bytes": expected}
        )

    result = {
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "device": str(device),
        },
        "model": model_id,
        "dtype": str(dtype).removeprefix("torch."),
        "timing_tokens": args.timing_tokens,
        "repeats": args.repeats,
        "plain_seconds": [p for p, _ in pairs],
        "capture_seconds": [c for _, c in pairs],
        "time_ratio_total": sum(c for _, c in pairs) / sum(p for p, _ in pairs),
        "time_ratio_median": statistics.median(c / p for p, c in pairs),
        "sizes": sizes,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))

    mib = 2**20
    print(
        f"\n{model_id} ({result['dtype']}, {device}, torch {torch.__version__}), greedy, all "
        f"{sizes[0]['capture']['layers'] if sizes else '?'} layers' resid_post, capture mode generate\n"
    )
    print("| measure | value |\n| --- | --- |")
    plain_total, capture_total = sum(p for p, _ in pairs), sum(c for _, c in pairs)
    print(f"| plain generation, {args.timing_tokens} tokens | {plain_total / len(pairs):.2f} s |")
    print(f"| with capture, {args.timing_tokens} tokens | {capture_total / len(pairs):.2f} s |")
    print(f"| time ratio capture/plain (total) | {result['time_ratio_total']:.3f}x |")
    print(f"| time ratio capture/plain (median over repeats) | {result['time_ratio_median']:.3f}x |")
    print(
        "\n| max_tokens | peak RSS increase, plain | peak RSS increase, with capture | bytes written | "
        "manifest bytes | expected (layers x positions x hidden x 4) |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for row in sizes:
        cap, plain = row["capture"], row["plain"]
        print(
            f"| {row['max_tokens']} | {plain['peak_rss_increase_bytes'] / mib:.1f} MiB | "
            f"{cap['peak_rss_increase_bytes'] / mib:.1f} MiB | {cap['bytes_written'] / mib:.2f} MiB | "
            f"{cap['manifest_bytes'] / mib:.2f} MiB | {row['expected_bytes'] / mib:.2f} MiB |"
        )
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
