#!/usr/bin/env python
"""Benchmark: LDA over N prompts one at a time vs in batches, same tokens, in one run.

Run from the repository root (after ``bash scripts/install.sh --dev``)::

    .venv/bin/python scripts/bench_lda.py        # embedded model, CPU; about 3 minutes on 2 cores

1. Throughput. In one process, in alternation (``--repeats`` rounds): the N
   prompts through the server's LDA loop one at a time, then the same prompts in
   batches of ``--batch-size``. Greedy with ``ignore_eos``, so both modes generate
   exactly N x ``--max-new-tokens`` tokens; the script checks that every row's
   tokens are the same in both modes. The before side is the served model under
   another system prompt (no second checkpoint or adapter needed; every before
   kind costs the same two forwards per step). Reports tokens/s of each mode and
   their ratio (median over rounds).
2. Memory per extra batch row. Fresh processes run one LDA batch of 1 and one of
   ``--batch-size`` rows; each reports its peak memory above the level just before
   the run (CUDA: peak allocated bytes; CPU: resident memory sampled every 5 ms).
   (peak(batch) - peak(1)) / (batch - 1) is the cost of one more row, printed next
   to what ``memory.estimate_lda`` budgets for it.

Writes a JSON file (``--out``) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_common import add_model_arguments, model_flags  # noqa: E402

TOPICS = ["volcanoes", "the moon", "jazz", "bridges", "whales", "clocks", "maps", "kites", "honey", "rain"]
SYSTEM_AFTER = "You are a helpful assistant."
SYSTEM_BEFORE = "You are a pirate. Answer like one."


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_arguments(parser)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--alpha", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "bench_results" / "lda.json")
    parser.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args()


def prompt_texts(count: int) -> list[str]:
    forms = ["Tell me about {}.", "Write two sentences about {}.", "What is surprising about {}?"]
    return [forms[i % len(forms)].format(TOPICS[i % len(TOPICS)]) for i in range(count)]


def render(tokenizer, system: str, text: str) -> tuple[int, ...]:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": text}]
    formatted = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tuple(tokenizer.encode(formatted, add_special_tokens=False))


def lda_rows(loaded, after, before, args) -> list[list[int]]:
    from server.engine.hf_runtime import decode_loop
    from server.engine.job import SamplingParams
    from server.engine.lda import LdaJob

    job = LdaJob(
        after_prompts=tuple(after),
        before_prompts=tuple(before),
        alpha=args.alpha,
        params=SamplingParams(max_tokens=args.max_new_tokens, temperature=0, ignore_eos=True),
    )
    return [result.choices[0].token_ids for result in decode_loop(loaded).run(job.jobs)]


def run_mode(loaded, after, before, args, batch: int) -> tuple[float, list[list[int]]]:
    started = time.perf_counter()
    rows = []
    for start in range(0, len(after), batch):
        rows += lda_rows(loaded, after[start : start + batch], before[start : start + batch], args)
    return time.perf_counter() - started, rows


def memory_child(args) -> None:
    """One LDA batch of ``--memory-child`` rows in this fresh process; prints its peak above baseline."""
    from server.engine.loading import load_model

    loaded = load_model(args.model, dtype=args.dtype, device=args.device)
    texts = prompt_texts(args.memory_child)
    after = [render(loaded.tokenizer, SYSTEM_AFTER, t) for t in texts]
    before = [render(loaded.tokenizer, SYSTEM_BEFORE, t) for t in texts]
    # Warm-up (first-call allocations are not the batch's), kept small: the allocator keeps what
    # it held, which would hide the first row's own memory from the measurement.
    lda_rows(
        loaded, [after[0][:8]], [before[0][:8]], argparse.Namespace(**{**vars(args), "max_new_tokens": 1})
    )
    cuda = loaded.device.type == "cuda"
    process = psutil.Process()
    if cuda:
        torch.cuda.synchronize()
        baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        baseline = process.memory_info().rss
    peak = [baseline]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.005)

    sampler = None if cuda else threading.Thread(target=sample, daemon=True)
    if sampler:
        sampler.start()
    lda_rows(loaded, after, before, args)
    done.set()
    if sampler:
        sampler.join()
    if cuda:
        peak[0] = torch.cuda.max_memory_allocated()
    print(json.dumps({"rows": args.memory_child, "peak_above_baseline": peak[0] - baseline}))


def measure_memory(args, rows: int) -> int:
    command = [
        sys.executable,
        __file__,
        "--memory-child",
        str(rows),
        *model_flags(args),
        "--max-new-tokens",
        str(args.max_new_tokens),
    ]
    output = subprocess.run(command, capture_output=True, text=True, check=True, cwd=ROOT).stdout
    return json.loads(output.strip().splitlines()[-1])["peak_above_baseline"]


def main() -> None:
    args = parse_args()
    if args.memory_child is not None:
        memory_child(args)
        return
    from server.engine.loading import load_model
    from server.engine.memory import ModelShape, estimate_lda
    from server.engine.structure import find_layers

    loaded = load_model(args.model, dtype=args.dtype, device=args.device)
    texts = prompt_texts(args.prompts)
    after = [render(loaded.tokenizer, SYSTEM_AFTER, t) for t in texts]
    before = [render(loaded.tokenizer, SYSTEM_BEFORE, t) for t in texts]
    lda_rows(loaded, after[:2], before[:2], args)  # warm-up
    single_times, batched_times = [], []
    same = True
    for _ in range(args.repeats):
        seconds, single_rows = run_mode(loaded, after, before, args, 1)
        single_times.append(seconds)
        seconds, batched_rows = run_mode(loaded, after, before, args, args.batch_size)
        batched_times.append(seconds)
        same = same and single_rows == batched_rows
    tokens = args.prompts * args.max_new_tokens
    single, batched = statistics.median(single_times), statistics.median(batched_times)

    peak_one = measure_memory(args, 1)
    peak_batch = measure_memory(args, args.batch_size)
    per_row = (peak_batch - peak_one) / (args.batch_size - 1)
    shape = ModelShape.of(loaded.hf_model, find_layers(loaded.hf_model).count)
    width_after, width_before = max(map(len, after)), max(map(len, before))

    def budget(rows: int) -> int:
        return estimate_lda(
            shape,
            shape,
            rows=rows,
            after_prompt=width_after,
            before_prompt=width_before,
            max_tokens=args.max_new_tokens,
            resident_weights=0,
        ).total

    estimated_per_row = (budget(args.batch_size) - budget(1)) / (args.batch_size - 1)
    import nnsight
    import transformers

    result = {
        "machine": {
            "platform": platform.platform(),
            "cpus": psutil.cpu_count(),
            "device": str(loaded.device),
        },
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "nnsight": nnsight.__version__,
        },
        "model": loaded.model_id,
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "prompts": args.prompts,
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "alpha": args.alpha,
        "repeats": args.repeats,
        "same_tokens": same,
        "one_at_a_time_seconds": single_times,
        "batched_seconds": batched_times,
        "one_at_a_time_tokens_per_s": tokens / single,
        "batched_tokens_per_s": tokens / batched,
        "throughput_ratio": single / batched,
        "peak_memory_batch_1": peak_one,
        f"peak_memory_batch_{args.batch_size}": peak_batch,
        "memory_per_extra_row": per_row,
        "estimated_memory_per_extra_row": estimated_per_row,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    mib = 2**20
    print(
        f"LDA, {loaded.model_id} ({result['dtype']}, {loaded.device}), {args.prompts} prompts x "
        f"{args.max_new_tokens} tokens, greedy, alpha {args.alpha:g}, median of {args.repeats}\n"
    )
    print("| mode | tokens/s | ratio |")
    print("| --- | --- | --- |")
    print(f"| one at a time | {tokens / single:.1f} | 1.00x |")
    print(f"| batches of {args.batch_size} | {tokens / batched:.1f} | {single / batched:.2f}x |")
    print(f"\nsame tokens in both modes: {'yes' if same else 'NO'}")
    print(
        f"memory per extra batch row: {per_row / mib:.1f} MiB measured "
        f"(peak above baseline: batch 1 {peak_one / mib:.1f} MiB, batch {args.batch_size} "
        f"{peak_batch / mib:.1f} MiB); the budget estimate allows {estimated_per_row / mib:.1f} MiB"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
