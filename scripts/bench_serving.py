#!/usr/bin/env python
"""Benchmark: the server's chat path over HTTP vs raw HF ``generate`` on the same weights, and memory.

Run from the repository root (after ``bash scripts/install.sh --dev``)::

    .venv/bin/python scripts/bench_serving.py            # embedded model, CPU, 64 greedy tokens

What it measures, side by side in one run (these machines are noisy, so only
ratios measured together mean anything):

1. Speed. For each prompt and repeat, in alternation: raw ``model.generate``
   in this process on the same weights (greedy, exactly N new tokens); the
   server's one decode loop (``DecodeLoop.run`` on a job alone)
   in this process on the same module; then the same chat prompt through
   ``POST /v1/chat/completions`` on a server started by this script
   (``temperature=0``, ``max_tokens=N``, ``ignore_eos=true``). Reports tokens/s
   of each, the time ratios to raw (total and median over repeats), and checks
   that all three produced the same text.
2. Memory. The server process's resident memory (RSS) right after load,
   after the first request, and after a mix of requests (plain, streamed,
   n=4, logprobs, completions, a 1,500-token prompt), against the weights'
   byte size and against a baseline process that imports the same libraries
   but loads no model. Weights load as a memory map of the safetensors file,
   paged in by the server's start-up pass over the model (which measures the
   hook points' execution order); one copy of the weights shows as
   (server RSS - baseline RSS) / weight bytes a little above 1 (activations
   and allocator caches come on top); two copies would be 2 or more. The
   file-backed part of RSS (the mapped weights and shared libraries) is
   reported separately from the anonymous part.

Writes a JSON file (``--out``) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_common import add_model_arguments, start_server  # noqa: E402

PROMPTS = [
    "Explain what a residual stream is in a transformer.",
    "Write a short poem about the sea.",
    "List five facts about the planet Mars.",
    "What are steering vectors used for in interpretability research?",
]

BASELINE_SNIPPET = (
    "import psutil, server.app, server.engine.loading, nnsight, transformers, torch, uvicorn;"
    "print(psutil.Process().memory_info().rss)"
)


def rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


def rss_file_backed(pid: int) -> int:
    return psutil.Process(pid).memory_info().shared  # Linux: resident pages backed by files


def baseline_rss() -> int:
    out = subprocess.run(
        [sys.executable, "-c", BASELINE_SNIPPET], cwd=ROOT, check=True, capture_output=True, text=True
    )
    return int(out.stdout.strip().splitlines()[-1])


def load_reference(args):
    """The same weights the server loads, loaded the same way (one nnsight-wrapped module)."""
    from server.engine.loading import load_model

    return load_model(args.model, dtype=args.dtype, device=args.device)


def chat_ids(tokenizer, prompt: str) -> list[int]:
    messages = [{"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


def synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def raw_generate(loaded, prompt: str, max_tokens: int) -> tuple[float, str]:
    """Plain HF generate. The served module's generation config holds no EOS, so exactly N tokens."""
    tokenizer, device = loaded.tokenizer, loaded.device
    ids = torch.tensor([chat_ids(tokenizer, prompt)], device=device)
    started = time.perf_counter()
    with torch.no_grad():
        out = loaded.hf_model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=max_tokens,
            pad_token_id=tokenizer.pad_token_id,
        )
    synchronize(device)
    elapsed = time.perf_counter() - started
    new = out[0, ids.shape[1] :]
    assert len(new) == max_tokens
    return elapsed, tokenizer.decode(new, skip_special_tokens=True)


def engine_generate(loaded, prompt: str, max_tokens: int) -> tuple[float, str]:
    """The server's own decode loop, in this process: its cost without HTTP and scheduling."""
    from server.engine.hf_runtime import decode_loop
    from server.engine.job import GenerationJob, SamplingParams

    ids = chat_ids(loaded.tokenizer, prompt)
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    loop = decode_loop(loaded)
    started = time.perf_counter()
    (result,) = loop.run([GenerationJob(ids, params)])
    synchronize(loaded.device)
    return time.perf_counter() - started, result.choices[0].text


def server_generate(client: httpx.Client, url: str, prompt: str, max_tokens: int) -> tuple[float, str]:
    body = {
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
    }
    started = time.perf_counter()
    response = client.post(f"{url}/v1/chat/completions", json=body)
    elapsed = time.perf_counter() - started
    response.raise_for_status()
    data = response.json()
    assert data["usage"]["completion_tokens"] == max_tokens
    return elapsed, data["choices"][0]["message"]["content"]


def request_mix(client: httpx.Client, url: str) -> None:
    """A bit of everything the serving core does, to see whether memory stays put."""
    chat = f"{url}/v1/chat/completions"
    hello = [{"role": "user", "content": "Hello! Tell me about transformers."}]
    client.post(chat, json={"messages": hello, "max_tokens": 32}).raise_for_status()
    client.post(chat, json={"messages": hello, "max_tokens": 16, "n": 4, "seed": 1}).raise_for_status()
    client.post(
        chat, json={"messages": hello, "max_tokens": 16, "logprobs": True, "top_logprobs": 5}
    ).raise_for_status()
    with client.stream("POST", chat, json={"messages": hello, "max_tokens": 32, "stream": True}) as r:
        for _ in r.iter_lines():
            pass
    client.post(
        f"{url}/v1/completions", json={"prompt": ["Once upon", "A cat"], "max_tokens": 16, "n": 2}
    ).raise_for_status()
    long_prompt = [{"role": "user", "content": "Summarise this. " + "The model reads text. " * 300}]
    client.post(chat, json={"messages": long_prompt, "max_tokens": 8}).raise_for_status()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench_results" / "serving.json")
    args = parser.parse_args()

    baseline = baseline_rss()
    process, url = start_server(args)
    try:
        with httpx.Client(timeout=600) as client:
            structure = client.get(f"{url}/v1/model/structure").json()
            rss_after_load = rss(process.pid)
            loaded = load_reference(args)
            # Warm every path once (first-call allocations), then measure in alternation.
            raw_generate(loaded, PROMPTS[0], 8)
            engine_generate(loaded, PROMPTS[0], 8)
            server_generate(client, url, PROMPTS[0], 8)
            rss_after_first = rss(process.pid)
            triples, same_text = [], True
            for _ in range(args.repeats):
                for prompt in PROMPTS:
                    raw_s, raw_text = raw_generate(loaded, prompt, args.max_tokens)
                    eng_s, eng_text = engine_generate(loaded, prompt, args.max_tokens)
                    srv_s, srv_text = server_generate(client, url, prompt, args.max_tokens)
                    triples.append((raw_s, eng_s, srv_s))
                    same_text &= raw_text == eng_text == srv_text
            del loaded
            request_mix(client, url)
            rss_after_mix = rss(process.pid)
            file_backed_after_mix = rss_file_backed(process.pid)
    finally:
        process.terminate()
        process.wait(timeout=60)

    tokens = args.max_tokens * len(triples)
    raw_total = sum(t[0] for t in triples)
    eng_total = sum(t[1] for t in triples)
    srv_total = sum(t[2] for t in triples)
    weights = structure["parameter_bytes"]
    result = {
        "machine": {
            "platform": platform.platform(),
            "cpus": psutil.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "device": structure["device"],
        },
        "model": structure["model"],
        "dtype": structure["dtype"],
        "max_tokens": args.max_tokens,
        "requests": len(triples),
        "raw_tokens_per_s": tokens / raw_total,
        "engine_tokens_per_s": tokens / eng_total,
        "server_tokens_per_s": tokens / srv_total,
        "engine_time_ratio_total": eng_total / raw_total,
        "time_ratio_total": srv_total / raw_total,
        "time_ratio_median": statistics.median(s / r for r, _, s in triples),
        "same_text_as_raw_generate": same_text,
        "weight_bytes": weights,
        "baseline_rss_bytes": baseline,
        "server_rss_after_load_bytes": rss_after_load,
        "server_rss_after_first_request_bytes": rss_after_first,
        "server_rss_after_mix_bytes": rss_after_mix,
        "server_rss_file_backed_after_mix_bytes": file_backed_after_mix,
        "weight_copies_after_first_request": (rss_after_first - baseline) / weights,
        "weight_copies_after_mix": (rss_after_mix - baseline) / weights,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    mib = 2**20
    print(
        f"\n{result['model']} ({result['dtype']}, {result['machine']['device']}, "
        f"{result['machine']['cpus']} CPUs, torch {torch.__version__}), greedy, "
        f"{args.max_tokens} tokens x {len(triples)} requests\n"
    )
    print("| measure | value |\n| --- | --- |")
    print(f"| raw HF generate | {result['raw_tokens_per_s']:.1f} tokens/s |")
    print(f"| server generation function in-process | {result['engine_tokens_per_s']:.1f} tokens/s |")
    print(f"| server chat path over HTTP | {result['server_tokens_per_s']:.1f} tokens/s |")
    engine_ratio = result["engine_time_ratio_total"]
    print(f"| time ratio in-process generation function/raw (total) | {engine_ratio:.3f}x |")
    print(f"| time ratio server/raw (total) | {result['time_ratio_total']:.3f}x |")
    print(f"| time ratio server/raw (median over requests) | {result['time_ratio_median']:.3f}x |")
    print(f"| same text from all three | {'yes' if same_text else 'NO'} |")
    print(f"| weights | {weights / mib:.0f} MiB |")
    print(f"| baseline process (libraries, no model) | {baseline / mib:.0f} MiB |")
    print(f"| server RSS right after load | {rss_after_load / mib:.0f} MiB |")
    print(
        f"| server RSS after the first request | {rss_after_first / mib:.0f} MiB "
        f"({result['weight_copies_after_first_request']:.2f} x weights above baseline) |"
    )
    print(
        f"| server RSS after the request mix | {rss_after_mix / mib:.0f} MiB "
        f"({result['weight_copies_after_mix']:.2f} x weights above baseline; "
        f"{file_backed_after_mix / mib:.0f} MiB file-backed) |"
    )
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
