#!/usr/bin/env python
"""Benchmark: concurrent clients against the server with request batching on vs off, in one run.

Run from the repository root (after ``bash scripts/install.sh --dev``)::

    .venv/bin/python scripts/bench_batching.py      # embedded model, CPU; about 4 minutes on 2 cores

Starts two servers on the same model: one with batching (``--max-batch-size 8``, the
default) and one serving one request at a time (``--max-batch-size 1``). Against each,
8 concurrent clients (threads, the official ``openai`` client, streaming so that the time
to the first token is seen) each send 4 chat requests in turn, 64 greedy tokens each
(``ignore_eos``, so every request costs the same). Then one client alone sends the same
4 requests to the batching server: the latency of a request served alone. Last, in this
process and without HTTP, the server's batched decode path runs 8 requests together and
the single-request path runs one alone: the machine's own cost of a batch-8 step against
a batch-1 step, which bounds how close batched latency can come to solo latency. Reports
throughput (generated tokens per second of wall time), latency p50/p95, time to first
token p50/p95, and checks that both servers gave every request the same answer.

Writes a JSON file (``--out``) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_common import add_model_arguments, start_server  # noqa: E402

TOPICS = ["volcanoes", "the moon", "jazz", "bridges", "whales", "clocks", "maps", "kites", "honey", "rain"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_arguments(parser)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8, help="--max-batch-size of the batching server")
    parser.add_argument("--out", type=Path, default=ROOT / "bench_results" / "batching.json")
    return parser.parse_args()


def prompt(client: int, request: int) -> str:
    topic = TOPICS[(client * 3 + request) % len(TOPICS)]
    return f"Tell me something interesting about {topic} (#{client}.{request})."


def one_request(oai, model: str, text: str, max_tokens: int) -> dict:
    started = time.perf_counter()
    first = None
    pieces = []
    stream = oai.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": text}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            if first is None:
                first = time.perf_counter() - started
            pieces.append(chunk.choices[0].delta.content)
    return {"prompt": text, "text": "".join(pieces), "latency": time.perf_counter() - started, "ttft": first}


def load(url: str, clients: int, requests: int, max_tokens: int) -> dict:
    """``clients`` threads, each sending ``requests`` requests in turn; all start together."""
    import openai

    oai = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
    model = oai.models.list().data[0].id
    results: list[dict] = []
    lock = threading.Lock()
    start = threading.Barrier(clients)

    def client(c: int) -> None:
        start.wait()
        for r in range(requests):
            outcome = one_request(oai, model, prompt(c, r), max_tokens)
            with lock:
                results.append(outcome)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - began
    latencies = sorted(r["latency"] for r in results)
    ttfts = sorted(r["ttft"] for r in results)
    return {
        "requests": len(results),
        "wall_seconds": wall,
        "tokens_per_s": len(results) * max_tokens / wall,
        "latency_p50": percentile(latencies, 50),
        "latency_p95": percentile(latencies, 95),
        "ttft_p50": percentile(ttfts, 50),
        "ttft_p95": percentile(ttfts, 95),
        "answers": {r["prompt"]: r["text"] for r in results},
    }


def percentile(values: list[float], p: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1] if len(values) > 1 else values[0]


def in_process_batch_cost(args) -> dict:
    """Seconds for ``--clients`` requests decoded together vs one alone, same code as the server."""
    from server.engine.hf_runtime import decode_loop
    from server.engine.job import GenerationJob, SamplingParams
    from server.engine.loading import load_model

    loaded = load_model(args.model, dtype=args.dtype, device=args.device)
    tokenizer = loaded.tokenizer
    loop = decode_loop(loaded)

    def ids(text: str) -> list[int]:
        messages = [{"role": "user", "content": text}]
        rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tokenizer.encode(rendered, add_special_tokens=False)

    prompts = [ids(prompt(c, 0)) for c in range(args.clients)]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)

    def together() -> None:
        loop.run([GenerationJob(p, params) for p in prompts])

    def alone() -> None:
        loop.run([GenerationJob(prompts[0], params)])

    times = {"together": [], "alone": []}
    alone()  # warm-up
    for _ in range(2):
        for name, work in (("together", together), ("alone", alone)):
            started = time.perf_counter()
            work()
            times[name].append(time.perf_counter() - started)
    together_s, alone_s = min(times["together"]), min(times["alone"])
    return {"batch_seconds": together_s, "alone_seconds": alone_s, "ratio": together_s / alone_s}


def main() -> None:
    args = parse_args()
    batching, batching_url = start_server(args, "--max-batch-size", str(args.batch_size))
    serial, serial_url = start_server(args, "--max-batch-size", "1")
    try:
        load(batching_url, 2, 1, 8)  # warm-up both
        load(serial_url, 2, 1, 8)
        on = load(batching_url, args.clients, args.requests, args.max_tokens)
        off = load(serial_url, args.clients, args.requests, args.max_tokens)
        alone = load(batching_url, 1, args.requests, args.max_tokens)
    finally:
        for process in (batching, serial):
            process.terminate()
            process.wait(timeout=30)
    cost = in_process_batch_cost(args)
    same = on.pop("answers") == off.pop("answers")
    alone.pop("answers")
    import nnsight
    import torch
    import transformers

    result = {
        "machine": {"platform": platform.platform(), "cpus": psutil.cpu_count()},
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "nnsight": nnsight.__version__,
        },
        "model": args.model,
        "clients": args.clients,
        "requests_per_client": args.requests,
        "max_tokens": args.max_tokens,
        "batching": on,
        "one_at_a_time": off,
        "single_client": alone,
        "throughput_ratio": on["tokens_per_s"] / off["tokens_per_s"],
        "p95_over_single_p50": on["latency_p95"] / alone["latency_p50"],
        "same_answers": same,
        "in_process_batch_vs_alone": cost,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"{args.clients} clients x {args.requests} requests x {args.max_tokens} greedy tokens, {args.model}\n"
    )
    print("| server | tokens/s | latency p50 | latency p95 | first token p50 | first token p95 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, row in (
        (f"batching (--max-batch-size {args.batch_size})", on),
        ("one at a time", off),
        ("one client alone (batching server)", alone),
    ):
        print(
            f"| {name} | {row['tokens_per_s']:.1f} | {row['latency_p50']:.2f} s | {row['latency_p95']:.2f} s "
            f"| {row['ttft_p50']:.2f} s | {row['ttft_p95']:.2f} s |"
        )
    print(f"\nthroughput ratio batching / one at a time: {result['throughput_ratio']:.2f}x")
    print(f"batching p95 latency / single-request p50: {result['p95_over_single_p50']:.2f}x")
    print(f"same answers from both servers: {'yes' if same else 'NO'}")
    print(
        f"in process: {args.clients} requests decoded together take {cost['batch_seconds']:.2f} s, "
        f"one alone {cost['alone_seconds']:.2f} s ({cost['ratio']:.2f}x): the floor for batched latency here"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
