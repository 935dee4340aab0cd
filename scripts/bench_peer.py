#!/usr/bin/env python
"""Benchmark: a short request behind a long one, and closed-loop throughput against HF's own server.

Run from the repository root (after ``bash scripts/install.sh --dev``)::

    .venv/bin/python scripts/bench_peer.py      # embedded model, CPU; a few minutes on 2 cores

Both parts run on the same weights, the same machine and in one run; only one server is driven
at a time (part 1 runs with ours alone; in part 2 the servers are up side by side, idle when
not driven).

1. Head-of-line blocking. On our server (``python -m server``): a short chat request
   (``--short-tokens`` 8, greedy, ``ignore_eos``) alone, a few times: its solo time. Then a
   long request (``--long-tokens`` 200) and, ``--delay`` 1 s later, the short one; the short
   one's latency over its solo time says how long it waited behind the long one. Four
   variants: neither request captures, the long one does, the short one does, both do
   (capture: every layer's ``resid_post`` in ``generate`` mode, the ``capture`` extension
   field). A request that captures is compared with its own solo time with capture.
   Target: within 2x. A server that runs one request at a time makes the short one wait
   for all of the long one; a batching server lets it join the running batch.
2. Closed loop and time to first token, servers side by side. Our server and
   ``transformers serve --continuous-batching`` (paged attention, ``--cb-num-blocks 32
   --cb-max-batch-tokens 1024``, from the same virtual environment, with the dtype and
   device our server resolved, run as ``python -m transformers.cli.transformers`` by this
   interpreter, so that it needs no console script; with ``--run-plain-peer`` also ``transformers serve``
   without continuous batching) are up at once, and only one is driven at a time: an idle
   server costs nothing, and alternating them round by round cancels the drift of a
   shared machine (which moved single-server runs by 20% within minutes). Each of
   ``--rounds`` rounds runs, in an order rotated per round, one closed loop per variant:
   ``--clients`` 8 clients, each sending its next chat request when its last one
   returns, ``--requests`` 2 each, ``--max-tokens`` 64, greedy, tokens counted from
   ``usage.completion_tokens`` (the peer refuses ``ignore_eos``, so the prompts are ones
   that run to the limit); the variants are (a) our server, (b) our server with every
   request capturing every layer's ``resid_post``, (c) the peer. Ratios are the median
   over rounds of each round's ratio. Targets: ours at least 1.2x the peer's tokens per
   second; with all-layer capture at least 0.9x of plain. Then ``--ttft-repeats`` streamed
   requests alone to each server in turn: time to the first content token, median; target:
   ours no slower than the peer.

Writes a JSON file (``--out``) with every raw number and the ratios, and prints a table. Part 1's
figures are written to it as soon as they are measured (``"partial": true``), so a run stopped by
a time limit keeps them.
"""

from __future__ import annotations

import argparse
import contextlib
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
    "ttft_over_peer_at_most": 1.0,
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
    parser.add_argument(
        "--requests", type=int, default=2, help="closed loop: requests per client in each round"
    )
    parser.add_argument("--rounds", type=int, default=3, help="closed loop: rounds over every server")
    parser.add_argument("--ttft-repeats", type=int, default=5, help="streamed requests alone per server")
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


def warm_up(client: httpx.Client, server: Server, capture: bool = False) -> None:
    chat(client, server, loop_prompt(0, 0), 8, capture=capture)


def closed_loop(client: httpx.Client, server: Server, args, capture: bool = False) -> dict:
    """``args.clients`` clients, each sending its next request when its last one returns."""
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
    return {
        "wall_seconds": wall,
        "completion_tokens": sum(tokens),
        "tokens_per_s": sum(tokens) / wall,
        "latencies": [r["seconds"] for r in results],
        "requests_short_of_max_tokens": sum(t < args.max_tokens for t in tokens),
    }


def first_token_seconds(client: httpx.Client, server: Server, max_tokens: int = 8) -> float:
    """Seconds from sending a streamed chat request alone to its first chunk with content."""
    body = {
        "model": server.model,
        "messages": [{"role": "user", "content": SHORT_PROMPT}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }
    started = time.perf_counter()
    first = None
    with client.stream("POST", f"{server.url}/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise SystemExit(f"{server.name}: HTTP {response.status_code}: {response.read()[:500]!r}")
        for line in response.iter_lines():
            if first is None and line.startswith("data: {"):
                choices = json.loads(line[len("data: ") :]).get("choices") or [{}]
                if choices[0].get("delta", {}).get("content"):
                    first = time.perf_counter() - started
    if first is None:
        raise SystemExit(f"{server.name}: a streamed request sent no content")
    return first


def side_by_side(servers: dict[str, tuple[Server, bool]], args) -> tuple[dict, dict]:
    """Closed-loop rounds over every variant (``name -> (server, captures)``), alternated, then
    streamed requests alone to every server in turn; the per-variant figures and the TTFTs."""
    limits = httpx.Limits(max_connections=args.clients + 1)
    names = list(servers)
    rounds: dict[str, list[dict]] = {name: [] for name in names}
    with httpx.Client(timeout=TIMEOUT_S, limits=limits) as client:
        for server, capture in servers.values():
            warm_up(client, server, capture)
        for r in range(args.rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:  # rotated each round
                server, capture = servers[name]
                row = closed_loop(client, server, args, capture)
                rounds[name].append(row)
                progress(f"closed loop, round {r + 1}, {name}: {row['tokens_per_s']:.1f} tokens/s")
        ttft: dict[str, list[float]] = {}
        plain = {name: server for name, (server, capture) in servers.items() if not capture}
        for _ in range(args.ttft_repeats):
            for name, server in plain.items():
                ttft.setdefault(name, []).append(first_token_seconds(client, server))
    loops = {}
    for name, rows in rounds.items():
        tokens = sum(row["completion_tokens"] for row in rows)
        wall = sum(row["wall_seconds"] for row in rows)
        latencies = [s for row in rows for s in row["latencies"]]
        loops[name] = {
            "requests": len(latencies),
            "wall_seconds": wall,
            "completion_tokens": tokens,
            "tokens_per_s": tokens / wall,
            "tokens_per_s_by_round": [row["tokens_per_s"] for row in rows],
            "latency_p50": statistics.median(latencies),
            "latency_max": max(latencies),
            "requests_short_of_max_tokens": sum(row["requests_short_of_max_tokens"] for row in rows),
        }
    first_tokens = {
        name: {"seconds": times, "median": statistics.median(times)} for name, times in ttft.items()
    }
    for name, times in first_tokens.items():
        progress(f"time to first token alone, {name}: {times['median'] * 1000:.0f} ms")
    return loops, first_tokens


def round_ratio(loops: dict, over: str, under: str) -> dict:
    """The median over rounds of ``over``'s tokens/s over ``under``'s in the same round, and the spread."""
    ratios = [
        a / b
        for a, b in zip(
            loops[over]["tokens_per_s_by_round"], loops[under]["tokens_per_s_by_round"], strict=True
        )
    ]
    return {"median": statistics.median(ratios), "by_round": ratios}


# -- the servers -------------------------------------------------------------------


def our_command(args, port: int, log_dir: Path) -> list[str]:
    return [
        sys.executable, "-m", "server", "--port", str(port), *model_flags(args),
        "--log-level", "warning", "--activations-dir", str(log_dir / "activations"),
    ]  # fmt: skip


def peer_command(args, model: str, structure: dict, port: int, continuous: bool) -> list[str]:
    """``transformers serve`` from this interpreter, on the weights, dtype and device ours loaded (its
    console script's entry point as a module: no script needed where packages come by ``PYTHONPATH``)."""
    command = [
        sys.executable, "-m", "transformers.cli.transformers", "serve",
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


def peer_model(args, structure: dict) -> str:
    """The weights our server loaded, as `transformers serve` should load them."""
    if structure.get("source"):
        return structure["source"]
    if args.model == "embedded":
        from server.engine.loading import embedded_model_dir

        return str(embedded_model_dir())
    return args.model


def run(args, log_dir: Path) -> tuple[dict, str, dict, dict, dict, dict]:
    """Head-of-line on our server alone, then the side-by-side part with the peers started beside it."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = our_command(args, port, log_dir)
    progress(f"starting our server: {' '.join(command[1:])}")
    with contextlib.ExitStack() as servers:
        servers.enter_context(running_server(command, url, "/health"))  # --log-level warning: quiet
        structure = httpx.get(f"{url}/v1/model/structure", timeout=60).json()
        model_id = httpx.get(f"{url}/v1/models", timeout=60).json()["data"][0]["id"]
        ours = Server("ours", url, model_id)
        hol = head_of_line(ours, args)
        args.out.parent.mkdir(parents=True, exist_ok=True)  # part 1 kept, should part 2 not end
        args.out.write_text(json.dumps({"partial": True, "head_of_line": hol}, indent=2) + "\n")
        model = peer_model(args, structure)
        variants = {"ours": (ours, False), "ours_capture": (ours, True)}
        commands = {}
        for name, continuous in (("peer_cb", True), ("peer_plain", False)):
            if name == "peer_plain" and not args.run_plain_peer:
                continue
            peer_port = free_port()
            commands[name] = peer_command(args, model, structure, peer_port, continuous)
            progress(f"starting {' '.join(commands[name][1:])}")
            peer_url = f"http://127.0.0.1:{peer_port}"
            servers.enter_context(
                running_server(commands[name], peer_url, "/health", log_dir / f"{name}.log")
            )
            # Pinned to its FORCE_MODEL, it answers only requests naming exactly that string.
            variants[name] = (Server(name, peer_url, model), False)
        loops, ttft = side_by_side(variants, args)
    return structure, model, hol, loops, ttft, commands


# -- the report --------------------------------------------------------------------


def report(args, structure: dict, model: str, hol: dict, loops: dict, ttft: dict, commands: dict) -> dict:
    by_round = {
        "ours_over_peer": round_ratio(loops, "ours", "peer_cb"),
        "capture_over_plain": round_ratio(loops, "ours_capture", "ours"),
    }
    if "peer_plain" in loops:
        by_round["ours_over_plain_peer"] = round_ratio(loops, "ours", "peer_plain")
    ratios = {"short_behind_long_worst": hol["worst_ratio"]} | {k: v["median"] for k, v in by_round.items()}
    ratios["ttft_ours_over_peer"] = ttft["ours"]["median"] / ttft["peer_cb"]["median"]
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
        | {
            "requests_per_client": args.requests,
            "rounds": args.rounds,
            "max_tokens": args.max_tokens,
            "ttft_repeats": args.ttft_repeats,
        },
        "head_of_line": hol,
        "closed_loop": loops,
        "time_to_first_token": ttft,
        "ratios": ratios,
        "ratios_by_round": {k: v["by_round"] for k, v in by_round.items()},
        "targets": TARGETS,
        "meets_targets": {
            "short_behind_long": ratios["short_behind_long_worst"] <= TARGETS["short_behind_long_at_most"],
            "ours_over_peer": ratios["ours_over_peer"] >= TARGETS["ours_over_peer_at_least"],
            "capture_over_plain": ratios["capture_over_plain"] >= TARGETS["capture_over_plain_at_least"],
            "ttft": ratios["ttft_ours_over_peer"] <= TARGETS["ttft_over_peer_at_most"],
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
        f"{sizes['max_tokens']} tokens, {sizes['rounds']} rounds alternating the servers\n"
    )
    print("| server | tokens/s | by round | latency p50 | requests short of max_tokens |")
    print("| --- | --- | --- | --- | --- |")
    names = {
        "ours": "ours",
        "ours_capture": "ours, every layer's resid_post captured",
        "peer_cb": "transformers serve --continuous-batching",
        "peer_plain": "transformers serve",
    }
    for key, row in loops.items():
        rounds = " / ".join(f"{t:.1f}" for t in row["tokens_per_s_by_round"])
        print(
            f"| {names[key]} | {row['tokens_per_s']:.1f} | {rounds} | {row['latency_p50']:.2f} s "
            f"| {row['requests_short_of_max_tokens']} |"
        )
    spread = result["ratios_by_round"]

    def line(label: str, key: str, target: str) -> None:
        rounds = " / ".join(f"{r:.2f}" for r in spread[key])
        print(f"{label}: {ratios[key]:.2f}x, median of rounds {rounds} ({target})")

    print()
    line(
        "ours / transformers serve --continuous-batching",
        "ours_over_peer",
        f"target >= {TARGETS['ours_over_peer_at_least']:g}x",
    )
    line(
        "ours with capture / plain",
        "capture_over_plain",
        f"target >= {TARGETS['capture_over_plain_at_least']:g}x",
    )
    if "ours_over_plain_peer" in ratios:
        line("ours / transformers serve (no continuous batching)", "ours_over_plain_peer", "no target")
    ttft = result["time_to_first_token"]
    print(
        f"time to first token alone, ours / peer: {ttft['ours']['median'] * 1000:.0f} / "
        f"{ttft['peer_cb']['median'] * 1000:.0f} ms = {ratios['ttft_ours_over_peer']:.2f}x "
        f"(target <= {TARGETS['ttft_over_peer_at_most']:g}x)"
    )


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_peer_") as tmp:
        log_dir = Path(tmp)  # server logs and captured activations, removed at the end
        structure, model, hol, loops, ttft, commands = run(args, log_dir)
    result = report(args, structure, model, hol, loops, ttft, commands)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
