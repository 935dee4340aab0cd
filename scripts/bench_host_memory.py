"""Host memory after a large request: what glibc keeps, and what handing it back costs.

Loads the served model in this process (as the server does), then runs one long echo-scoring
request and one long trace capture (``--tokens`` prompt tokens each, 7,000 by default), and
prints the resident set size (RSS) before, right after (the engine's idle hook switched off),
and after ``malloc_trim(0)`` (what the engine does whenever its worker runs out of work), with
the time the trim took. One run, side by side::

    .venv/bin/python scripts/bench_host_memory.py [--tokens 7000] [--model embedded]

docs/operations.md ("Memory after a large request") quotes its output.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_common import add_model_arguments, print_figures  # noqa: E402


def rss_gib() -> float:
    return psutil.Process().memory_info().rss / 2**30


async def main(args) -> dict:
    from server.config import Settings
    from server.engine.capture import CapturePlan, CaptureSpec
    from server.engine.engine import Engine
    from server.engine.job import GenerationJob, SamplingParams
    from server.storage import ActivationStore

    settings = Settings(model=args.model, dtype=args.dtype, device=args.device)
    engine = await asyncio.to_thread(Engine.from_settings, settings)
    engine.scheduler.bind(engine._run_batch, engine._batch_memory, on_idle=None)  # measure without it
    vocab = engine.vocab_size
    prompt = [(i * 7919) % (vocab - 10) + 5 for i in range(min(args.tokens, engine.context_length - 2))]
    figures: dict[str, float] = {"tokens": len(prompt)}
    await engine.score_prompt(prompt[:16], 0)  # warm
    engine.host_memory.release()
    figures["rss_before_gib"] = rss_gib()

    await engine.score_prompt(prompt, 0)
    with tempfile.TemporaryDirectory() as root:
        store = ActivationStore(Path(root))
        points = tuple(engine.hooks.resolve(layers="all", hook_points=["resid_post"], modules=None))
        spec = CaptureSpec(CapturePlan(points=points, mode="trace"), store, "bench")
        job = GenerationJob(prompt, SamplingParams(max_tokens=1, temperature=0), capture=spec)
        await engine.generate(job)
    figures["rss_after_gib"] = rss_gib()
    started = time.perf_counter()
    released = await asyncio.wrap_future(engine.scheduler.submit_call(engine.host_memory.release))
    figures["trim_ms"] = (time.perf_counter() - started) * 1000
    figures["trim_released"] = released
    figures["rss_after_trim_gib"] = rss_gib()
    await engine.score_prompt(prompt[:64], 0)  # a small request: what a forced trim costs then
    started = time.perf_counter()
    await asyncio.wrap_future(engine.scheduler.submit_call(engine.host_memory.release, True))
    figures["trim_after_small_request_ms"] = (time.perf_counter() - started) * 1000
    engine.close()
    return figures


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_arguments(parser)
    parser.add_argument("--tokens", type=int, default=7000)
    figures = asyncio.run(main(parser.parse_args()))
    print_figures(figures)
