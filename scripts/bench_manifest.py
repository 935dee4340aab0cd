"""A capture of hundreds of hook points: how large its manifest is, and what a download costs.

Captures, in trace mode, the input and the output of every leaf module inside every layer (600
hook points on the embedded model) over a prompt of ``--tokens`` tokens, through the server's
own engine and activation store; then prints, side by side in one run, the manifest's size
and the size the same manifest had in version 1 (positions and tokens repeated in every
tensor's entry), and the time a download takes to find and open one tensor's file (the
store's index of tensor -> file) against the time to parse each manifest, which is what every
download did before. ::

    .venv/bin/python scripts/bench_manifest.py [--tokens 256] [--model embedded]

docs/capture.md quotes its output.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_common import add_model_arguments, print_figures  # noqa: E402


async def main(args) -> dict:
    from server.config import Settings
    from server.engine.capture import CapturePlan, CaptureSpec
    from server.engine.engine import Engine
    from server.engine.job import GenerationJob, SamplingParams
    from server.storage import ActivationStore
    from server.storage.activations import MANIFEST

    engine = await asyncio.to_thread(Engine.from_settings, Settings(model=args.model, dtype=args.dtype))
    model = engine.loaded.hf_model
    prefix = engine.layout.path + "."
    modules = [
        f"{name}.{kind}"
        for name, module in model.named_modules()
        if name.startswith(prefix)
        and name.count(".") > prefix.count(".")
        and not list(module.children())
        and "rotary" not in name
        for kind in ("input", "output")
    ]
    points = tuple(engine.hooks.resolve(layers=None, hook_points=None, modules=modules))
    prompt = [(i * 7919) % (engine.vocab_size - 10) + 5 for i in range(args.tokens)]
    with tempfile.TemporaryDirectory() as root:
        store = ActivationStore(Path(root))
        spec = CaptureSpec(CapturePlan(points=points, mode="trace", dtype=None), store, "bench")
        result = await engine.generate(GenerationJob(prompt, SamplingParams(max_tokens=1), capture=spec))
        capture_id = result.capture.id
        manifest_path = result.capture.directory / MANIFEST
        names = list(result.capture.tensors)

        def timed(work, repeats: int = 20) -> float:
            times = []
            for i in range(repeats):
                started = time.perf_counter()
                work(names[i % len(names)])
                times.append(time.perf_counter() - started)
            return statistics.median(times) * 1000

        def open_as_download(name: str) -> None:
            handle, _ = store.open_tensor(capture_id, name)
            handle.close()

        manifest = result.capture.manifest
        rows = {key: manifest[key] for key in ("token_positions", "token_ids", "tokens")}
        version_1 = json.dumps(  # every entry with its own copy of the rows, as version 1 wrote it
            {
                **manifest,
                "tensors": [
                    {**entry, "positions": rows["token_positions"], "token_ids": rows["token_ids"],
                     "tokens": rows["tokens"], "unit_indices": None}
                    for entry in manifest["tensors"]
                ],
            }
        ).encode()  # fmt: skip
        figures = {
            "hook_points": len(points),
            "tokens": len(prompt),
            "tensor_bytes": sum(e["bytes"] for e in manifest["tensors"]),
            "manifest_bytes": manifest_path.stat().st_size,
            "manifest_v1_bytes": len(version_1),
            "open_tensor_ms": timed(open_as_download),
            "parse_manifest_ms": timed(lambda _: json.loads(manifest_path.read_bytes())),
            "parse_manifest_v1_ms": timed(lambda _: json.loads(version_1), repeats=5),
        }
    engine.close()
    return figures


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_arguments(parser)
    parser.add_argument("--tokens", type=int, default=256)
    figures = asyncio.run(main(parser.parse_args()))
    print_figures(figures)
