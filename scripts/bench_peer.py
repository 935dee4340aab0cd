#!/usr/bin/env python
"""Benchmark: a short request behind a long one, and closed-loop throughput against HF's own server.

Run from the repository root (after ``bash scripts/install.sh --dev``)::

    .venv/bin/python scripts/bench_peer.py      # embedded model, CPU; a few minutes on 2 cores

Both parts run on the same weights, the same machine and in one run; only one server runs at
a time (each is started, waited for, measured and stopped before the next one starts).

1. Head-of-line blocking. On our server (``python -m server``): a short chat request
   (``--short-tokens`` 8, greedy, ``ignore_eos``) alone, a few times: its solo time. Then a
   long request (``--long-tokens`` 200) and, ``--delay`` 1 s later, the short one; the short
   one's latency over its solo time says how long it waited behind the long one. Four
   variants: neither request captures, the long one does, the short one does, both do
   (capture: every layer's ``resid_post`` in ``generate`` mode, the ``capture`` extension
   field). A request that captures is compared with its own solo time with capture.
   Target: within 2x. A server that runs one request at a time makes the short one wait
   for all of the long one; a batching server lets it join the running batch.
2. Closed loop. ``--clients`` 8 clients, each sending its next chat request when its last
   one returns, ``--requests`` 4 each, ``--max-tokens`` 64, greedy; tokens counted from each
   response's ``usage.completion_tokens`` (the peer refuses ``ignore_eos``, so the prompts
   are ones that run to the limit). Against (a) our server, (b) our server with every
   request capturing every layer's ``resid_post``, (c) ``transformers serve
   --continuous-batching`` (paged attention, ``--cb-num-blocks 32 --cb-max-batch-tokens
   1024``) from the same virtual environment, with the dtype and device our server
   resolved, and with ``--run-plain-peer`` (d) ``transformers serve`` without continuous
   batching. Targets: ours at least 1.2x the peer's tokens per second; with all-layer
   capture at least 0.9x of plain.

Writes a JSON file (``--out``) with every raw number and the ratios, and prints a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from bench_common import add_model_arguments, free_port, model_flags, running_server  # noqa: E402

CAPTURE = {"layers": "all", "hook_points": ["resid_post"], "mode": "generate"}
SHORT_PROMPT = "What is the capital of France?"
LONG_PROMPT = "Write a long story about a lighthouse keeper."
# Prompts a small instruct model answers at length, so every request runs to max_tokens
# without ignore_eos (which the peer refuses).
LOOP_PROMPTS = [
    "Count from 1 to 500, one number per line.",
    "Write a long story about {topic}, at least a thousand words.",
    "List two hundred facts about {topic}, numbered.",
]
TOPICS = ["volcanoes", "the moon", "jazz", "bridges", "whales", "clocks", "maps", "kites", "honey", "rain"]
# (long request captures, short request captures)
HOL_VARIANTS = {
    "neither": (False, False),
    "long_captures": (True, False),
    "short_captures": (False, True),
    "both": (True, True),
}
TARGETS = {
    "short_behind_long_at_most": 2.0,
    "ours_over_peer_at_least": 1.2,
    "capture_over_plain_at_least": 0.9,
}
TIMEOUT_S = 600


@dataclass(frozen=True)
class Server:
    name: str
    url: str
    model: str  # the request's `model` field


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_arguments(parser)
    parser.add_argument("--short-tokens", type=int, default=8)
    parser.add_argument("--long-tokens", type=int, default=200)
    parser.add_argument(
        "--delay", type=float, default=1.0, help="seconds between the long and the short request"
    )
    parser.add_argument("--solo-repeats", type=int, default=3, help="short requests alone, for the solo time")
    parser.add_argument("--hol-repeats", type=int, default=2, help="long+short pairs per variant")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=4, help="closed loop: requests per client")
    parser.add_argument("--max-tokens", type=int, default=64, help="closed loop: max_tokens per request")
    parser.add_argument("--cb-num-blocks", type=int, default=32)
    parser.add_argument("--cb-max-batch-tokens", type=int, default=1024)
    parser.add_argument(
        "--run-plain-peer", action="store_true", help="also `transformers serve` without continuous batching"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench_results" / "peer.json")
    return parser.parse_args()


def progress(message: str) -> None:
    print(f"[bench_peer] {message}", flush=True)


# -- requests ----------------------------------------------------------------------


def chat(
    client: httpx.Client,
    server: Server,
    text: str,
    max_tokens: int,
    *,
    capture: bool = False,
    ignore_eos: bool = False,
) -> dict:
    """One non-streamed greedy chat request; its timing and token count."""
    body = {
        "model": server.model,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    if ignore_eos:
        body["ignore_eos"] = True
    if capture:
        body["capture"] = CAPTURE
    started = time.perf_counter()
    response = client.post(f"{server.url}/v1/chat/completions", json=body)
    ended = time.perf_counter()
    if response.status_code != 200:
        raise SystemExit(f"{server.name}: HTTP {response.status_code}: {response.text[:500]}")
    data = response.json()
    if capture and "activations" not in data:
        raise SystemExit(f"{server.name}: a capturing request came back without `activations`")
    return {
        "started": started,
        "ended": ended,
        "seconds": ended - started,
        "completion_tokens": data["usage"]["completion_tokens"],
    }


def loop_prompt(client: int, request: int) -> str:
    template = LOOP_PROMPTS[(client + request) % len(LOOP_PROMPTS)]
    return template.format(topic=TOPICS[(client * 3 + request) % len(TOPICS)])


# -- 1. head-of-line blocking -----------------------------------------------------


def short_request(client: httpx.Client, server: Server, args, capture: bool) -> dict:
    return chat(client, server, SHORT_PROMPT, args.short_tokens, capture=capture, ignore_eos=True)


def behind_long(
    client: httpx.Client, server: Server, args, long_captures: bool, short_captures: bool
) -> dict:
    """The long request, then ``args.delay`` seconds later the short one."""
    with ThreadPoolExecutor(1) as pool:
        long = pool.submit(
            chat, client, server, LONG_PROMPT, args.long_tokens, capture=long_captures, ignore_eos=True
        )
        time.sleep(args.delay)
        short = short_request(client, server, args, short_captures)
        done = long.result()
    return {
        "short_seconds": short["seconds"],
        "long_seconds": done["seconds"],
        # the short request arrived while the long one still ran (else nothing was measured)
        "overlapped": short["started"] < done["ended"],
    }


def head_of_line(server: Server, args) -> dict:
    with httpx.Client(timeout=TIMEOUT_S) as client:
        for capture in (False, True):  # warm-up: first-call allocations, capture paths
            short_request(client, server, args, capture)
        solo = {
            kind: [
                short_request(client, server, args, kind == "capture")["seconds"]
                for _ in range(args.solo_repeats)
            ]
            for kind in ("plain", "capture")
        }
        solo_median = {kind: statistics.median(times) for kind, times in solo.items()}
        progress(
            f"short request alone: {solo_median['plain']:.2f} s, with capture {solo_median['capture']:.2f} s"
        )
        variants = {}
        for name, (long_captures, short_captures) in HOL_VARIANTS.items():
            runs = [
                behind_long(client, server, args, long_captures, short_captures)
                for _ in range(args.hol_repeats)
            ]
            short_median = statistics.median(run["short_seconds"] for run in runs)
            solo_s = solo_median["capture" if short_captures else "plain"]  # like for like
            variants[name] = {
                "runs": runs,
                "short_seconds_median": short_median,
                "solo_seconds": solo_s,
                "ratio": short_median / solo_s,
                "all_overlapped": all(run["overlapped"] for run in runs),
            }
            progress(f"short behind long, {name}: {short_median:.2f} s ({variants[name]['ratio']:.2f}x solo)")
    return {
        "solo_seconds": solo,
        "solo_seconds_median": solo_median,
        "variants": variants,
        "worst_ratio": max(v["ratio"] for v in variants.values()),
    }


# -- 2. closed loop ----------------------------------------------------------------


def closed_loop(server: Server, args, capture: bool = False) -> dict:
    """``args.clients`` clients, each sending its next request when its last one returns."""
    limits = httpx.Limits(max_connections=args.clients + 1)
    with httpx.Client(timeout=TIMEOUT_S, limits=limits) as client:
        chat(client, server, loop_prompt(0, 0), 8, capture=capture)  # warm-up
        start = threading.Barrier(args.clients)

        def one_client(c: int) -> list[dict]:
            start.wait()
            return [
                chat(client, server, loop_prompt(c, r), args.max_tokens, capture=capture)
                for r in range(args.requests)
            ]

        began = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            results = [r for rs in pool.map(one_client, range(args.clients)) for r in rs]
        wall = time.perf_counter() - began
    tokens = [r["completion_tokens"] for r in results]
    latencies = sorted(r["seconds"] for r in results)
    row = {
        "requests": len(results),
        "wall_seconds": wall,
        "completion_tokens": sum(tokens),
        "tokens_per_s": sum(tokens) / wall,
        "latency_p50": statistics.median(latencies),
        "latency_max": latencies[-1],
        "requests_short_of_max_tokens": sum(t < args.max_tokens for t in tokens),
    }
    progress(
        f"closed loop, {server.name}: {row['tokens_per_s']:.1f} tokens/s ({row['completion_tokens']} tokens)"
    )
    return row


# -- the servers -------------------------------------------------------------------


def run_ours(args, log_dir: Path) -> tuple[dict, dict, dict]:
    """Our server: head-of-line, closed loop plain and with capture; and what it loaded."""
    port = free_port()
    command = [
        sys.executable, "-m", "server", "--port", str(port), *model_flags(args),
        "--log-level", "warning", "--activations-dir", str(log_dir / "activations"),
    ]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    progress(f"starting our server: {' '.join(command[1:])}")
    with running_server(command, url, "/health"):  # --log-level warning: quiet enough to show
        structure = httpx.get(f"{url}/v1/model/structure", timeout=60).json()
        model_id = httpx.get(f"{url}/v1/models", timeout=60).json()["data"][0]["id"]
        server = Server("ours", url, model_id)
        hol = head_of_line(server, args)
        loops = {
            "ours": closed_loop(server, args),
            "ours_capture": closed_loop(Server("ours with capture", url, model_id), args, capture=True),
        }
    return structure, hol, loops


def peer_command(args, model: str, structure: dict, port: int, continuous: bool) -> list[str]:
    """``transformers serve`` from this virtual environment, on the weights, dtype and device ours loaded."""
    command = [
        str(Path(sys.executable).with_name("transformers")), "serve",
        "--host", "127.0.0.1", "--port", str(port),
        "--dtype", structure["dtype"], "--device", structure["device"],
    ]  # fmt: skip
    if continuous:
        command += [
            "--continuous-batching",
            "--cb-num-blocks", str(args.cb_num_blocks),
            "--cb-max-batch-tokens", str(args.cb_max_batch_tokens),
        ]  # fmt: skip
    return [*command, model]


def run_peer(args, model: str, structure: dict, log_dir: Path, continuous: bool) -> tuple[dict, list[str]]:
    port = free_port()
    command = peer_command(args, model, structure, port, continuous)
    url = f"http://127.0.0.1:{port}"
    name = "peer_cb" if continuous else "peer_plain"
    progress(f"starting {' '.join(command[1:])}")
    with running_server(command, url, "/health", log_dir / f"{name}.log"):
        # Pinned to its FORCE_MODEL, it answers only requests naming exactly that string.
        return closed_loop(Server(name, url, model), args), command


def peer_model(args, structure: dict) -> str:
    """The weights our server loaded, as `transformers serve` should load them."""
    if structure.get("source"):
        return structure["source"]
    if args.model == "embedded":
        from server.engine.loading import embedded_model_dir

        return str(embedded_model_dir())
    return args.model


# -- the report --------------------------------------------------------------------


def report(args, structure: dict, model: str, hol: dict, loops: dict, commands: dict) -> dict:
    ratios = {
        "short_behind_long_worst": hol["worst_ratio"],
        "ours_over_peer": loops["ours"]["tokens_per_s"] / loops["peer_cb"]["tokens_per_s"],
        "capture_over_plain": loops["ours_capture"]["tokens_per_s"] / loops["ours"]["tokens_per_s"],
    }
    if "peer_plain" in loops:
        ratios["ours_over_plain_peer"] = loops["ours"]["tokens_per_s"] / loops["peer_plain"]["tokens_per_s"]
    return {
        "machine": {
            "platform": platform.platform(),
            "cpus": psutil.cpu_count(),
            "python": platform.python_version(),
            "device": structure["device"],
        },
        "versions": {pkg: version(pkg) for pkg in ("torch", "transformers", "nnsight")},
        "model": structure["model"],
        "dtype": structure["dtype"],
        "peer_model": model,
        "peer_commands": commands,
        "sizes": {
            key: getattr(args, key)
            for key in ("short_tokens", "long_tokens", "delay", "solo_repeats", "hol_repeats", "clients")
        }
        | {"requests_per_client": args.requests, "max_tokens": args.max_tokens},
        "head_of_line": hol,
        "closed_loop": loops,
        "ratios": ratios,
        "targets": TARGETS,
        "meets_targets": {
            "short_behind_long": ratios["short_behind_long_worst"] <= TARGETS["short_behind_long_at_most"],
            "ours_over_peer": ratios["ours_over_peer"] >= TARGETS["ours_over_peer_at_least"],
            "capture_over_plain": ratios["capture_over_plain"] >= TARGETS["capture_over_plain_at_least"],
        },
    }


def print_table(result: dict) -> None:
    sizes, hol, loops, ratios = (result[k] for k in ("sizes", "head_of_line", "closed_loop", "ratios"))
    print(
        f"\n{result['model']} ({result['dtype']}, {result['machine']['device']}, "
        f"{result['machine']['cpus']} CPUs), transformers {result['versions']['transformers']}\n"
    )
    print(
        f"Short request ({sizes['short_tokens']} tokens) {sizes['delay']:g} s after a long one "
        f"({sizes['long_tokens']} tokens), median of {sizes['hol_repeats']}; target within "
        f"{TARGETS['short_behind_long_at_most']:g}x of solo\n"
    )
    print("| capturing | short request | solo | ratio | arrived while the long one ran |")
    print("| --- | --- | --- | --- | --- |")
    for name, v in hol["variants"].items():
        print(
            f"| {name} | {v['short_seconds_median']:.2f} s | {v['solo_seconds']:.2f} s | {v['ratio']:.2f}x "
            f"| {'yes' if v['all_overlapped'] else 'NO'} |"
        )
    print(
        f"\nClosed loop: {sizes['clients']} clients x {sizes['requests_per_client']} requests x "
        f"{sizes['max_tokens']} tokens\n"
    )
    print("| server | tokens/s | latency p50 | requests short of max_tokens |")
    print("| --- | --- | --- | --- |")
    names = {
        "ours": "ours",
        "ours_capture": "ours, every layer's resid_post captured",
        "peer_cb": "transformers serve --continuous-batching",
        "peer_plain": "transformers serve",
    }
    for key, row in loops.items():
        print(
            f"| {names[key]} | {row['tokens_per_s']:.1f} | {row['latency_p50']:.2f} s "
            f"| {row['requests_short_of_max_tokens']} |"
        )
    print(
        f"\nours / transformers serve --continuous-batching: {ratios['ours_over_peer']:.2f}x "
        f"(target >= {TARGETS['ours_over_peer_at_least']:g}x)"
    )
    print(
        f"ours with capture / plain: {ratios['capture_over_plain']:.2f}x "
        f"(target >= {TARGETS['capture_over_plain_at_least']:g}x)"
    )
    if "ours_over_plain_peer" in ratios:
        print(f"ours / transformers serve (no continuous batching): {ratios['ours_over_plain_peer']:.2f}x")


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_peer_") as tmp:
        log_dir = Path(tmp)  # server logs and captured activations, removed at the end
        structure, hol, loops = run_ours(args, log_dir)
        model = peer_model(args, structure)
        loops["peer_cb"], command = run_peer(args, model, structure, log_dir, continuous=True)
        commands = {"peer_cb": command}
        if args.run_plain_peer:
            loops["peer_plain"], commands["peer_plain"] = run_peer(args, model, structure, log_dir, False)
    result = report(args, structure, model, hol, loops, commands)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
