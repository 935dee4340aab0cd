#!/usr/bin/env python
"""Every benchmark in one command: runs each script, then writes one JSON and one markdown table.

    .venv/bin/python scripts/bench.py            # the README's figures: about 21 minutes on 2 CPU cores
    .venv/bin/python scripts/bench.py --quick    # every script with small sizes: a smoke run (~4 minutes)
    .venv/bin/python scripts/bench.py --only serving lda --model Qwen/Qwen3-0.6B --dtype bfloat16

The benchmarks (each its own script, each measuring its ratios side by side in one run):

    serving   bench_serving.py   the server's chat path over HTTP vs raw HF generate; resident
                                 memory vs the weights' bytes
    capture   bench_capture.py   generation with every layer's resid_post captured vs without;
                                 peak memory and bytes written as max_tokens grows
    lda       bench_lda.py       LDA in batches vs one prompt at a time; memory per extra row
    batching  bench_batching.py  8 concurrent clients, batching vs one request at a time;
                                 latency against a request served alone
    peer      bench_peer.py      a short request behind a long one (with and without capture)
                                 vs alone; 8 closed-loop clients against `transformers serve
                                 --continuous-batching` on the same weights, and with capture
    patching  bench_patching.py  a patching sweep vs its cells one by one (and batching alone)

Each writes ``<out-dir>/<name>.json``; this script reads them back and writes
``<out-dir>/summary.json`` and ``<out-dir>/summary.md`` (the table the README shows), with
the machine, the model, the dtype, the library versions and the git commit.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"

# name -> (script, arguments for the README's figures, arguments for --quick)
BENCHMARKS: dict[str, tuple[str, list[str], list[str]]] = {
    "serving": ("bench_serving.py", ["--repeats", "5"], ["--repeats", "1", "--max-tokens", "16"]),
    "capture": ("bench_capture.py", [], ["--repeats", "1", "--timing-tokens", "16", "--sizes", "16,64"]),
    "lda": (
        "bench_lda.py",
        ["--repeats", "3"],
        ["--repeats", "1", "--prompts", "8", "--batch-size", "4", "--max-new-tokens", "8"],
    ),
    "batching": (
        "bench_batching.py",
        [],
        ["--clients", "4", "--requests", "2", "--max-tokens", "16", "--batch-size", "4"],
    ),
    "peer": (
        "bench_peer.py",
        [],
        (
            "--clients 2 --requests 1 --rounds 1 --ttft-repeats 1 --max-tokens 16 --long-tokens 64 "
            "--solo-repeats 1 --hol-repeats 1"
        ).split(),
    ),
    "patching": ("bench_patching.py", ["--rounds", "3"], ["--rounds", "1"]),
}
MIB = 2**20
README_START, README_END = "<!-- bench.py table: start -->", "<!-- bench.py table: end -->"


def run_benchmark(name: str, args: argparse.Namespace) -> tuple[dict, float]:
    script, full, quick = BENCHMARKS[name]
    out = args.out_dir / f"{name}.json"
    out.unlink(missing_ok=True)  # an earlier run's figures must not pass for this one's
    command = [sys.executable, str(SCRIPTS / script), "--out", str(out), *(quick if args.quick else full)]
    command += ["--model", args.model, "--dtype", args.dtype, "--device", args.device]
    print(f"\n=== {name}: {' '.join(command[1:])}", flush=True)
    started = time.monotonic()
    subprocess.run(command, check=True, cwd=ROOT)
    return json.loads(out.read_text()), time.monotonic() - started


def git_commit() -> str | None:
    try:
        return subprocess.run(
            ["git", "describe", "--always", "--dirty"], capture_output=True, text=True, cwd=ROOT, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def rows(name: str, r: dict) -> list[tuple[str, str]]:
    """The figures of one benchmark: (what, value) pairs for the table."""
    if name == "serving":
        return [
            ("chat over HTTP vs raw HF `generate`, time (total)", f"{r['time_ratio_total']:.3f}x"),
            ("server generation function in-process vs raw, time", f"{r['engine_time_ratio_total']:.3f}x"),
            (
                "raw / server tokens per second",
                f"{r['raw_tokens_per_s']:.1f} / {r['server_tokens_per_s']:.1f}",
            ),
            ("same text as raw `generate`", "yes" if r["same_text_as_raw_generate"] else "**no**"),
            (
                "resident memory above baseline after the first request, in weight copies",
                f"{r['weight_copies_after_first_request']:.2f} "
                f"({r['weight_bytes'] / MIB:.0f} MiB of weights)",
            ),
            ("the same after a request mix", f"{r['weight_copies_after_mix']:.2f}"),
        ]
    if name == "capture":
        out = [
            (
                f"generation with every layer's `resid_post` captured vs without, "
                f"{r['timing_tokens']} tokens",
                f"{r['time_ratio_total']:.3f}x",
            )
        ]
        for size in r["sizes"]:
            capture, plain = size["capture"], size["plain"]
            out.append(
                (
                    f"peak memory increase at max_tokens {size['max_tokens']}: plain / with capture",
                    f"{plain['peak_rss_increase_bytes'] / MIB:.1f} / "
                    f"{capture['peak_rss_increase_bytes'] / MIB:.1f} MiB",
                )
            )
            out.append(
                (
                    f"capture bytes at max_tokens {size['max_tokens']}: written / manifest / expected",
                    f"{capture['bytes_written'] / MIB:.2f} / {capture['manifest_bytes'] / MIB:.2f} / "
                    f"{size['expected_bytes'] / MIB:.2f} MiB",
                )
            )
        return out
    if name == "lda":
        return [
            (
                f"LDA in batches of {r['batch_size']} vs one at a time, tokens per second",
                f"{r['throughput_ratio']:.2f}x",
            ),
            ("same tokens in both modes", "yes" if r["same_tokens"] else "**no**"),
            (
                "memory per extra batch row: measured / estimated",
                f"{r['memory_per_extra_row'] / MIB:.1f} / "
                f"{r['estimated_memory_per_extra_row'] / MIB:.1f} MiB",
            ),
        ]
    if name == "batching":
        on, off, alone = r["batching"], r["one_at_a_time"], r["single_client"]
        return [
            (
                f"{r['clients']} clients, batching vs one at a time, tokens per second",
                f"{r['throughput_ratio']:.2f}x",
            ),
            ("latency p95 under load vs a request alone (p50)", f"{r['p95_over_single_p50']:.2f}x"),
            (
                "the machine's floor: a batch step vs a single step, in process",
                f"{r['in_process_batch_vs_alone']['ratio']:.2f}x",
            ),
            (
                "time to first token p50: batching / one at a time",
                f"{on['ttft_p50']:.2f} / {off['ttft_p50']:.2f} s",
            ),
            (
                "latency p50: batching / one at a time / alone",
                f"{on['latency_p50']:.2f} / {off['latency_p50']:.2f} / {alone['latency_p50']:.2f} s",
            ),
            ("same answers with and without batching", "yes" if r["same_answers"] else "**no**"),
        ]
    if name == "patching":
        return [
            (
                f"patching sweep ({r['cells']} cells, {r['batch_size']} per pass) vs cell by cell, time",
                f"{r['speedup_over_cell_by_cell']:.2f}x faster",
            ),
            (
                "the same, batching alone (vs the sweep one cell per pass)",
                f"{r['speedup_of_batching_alone']:.2f}x",
            ),
        ]
    if name == "peer":
        sizes, hol, loops, ratios = r["sizes"], r["head_of_line"], r["closed_loop"], r["ratios"]
        variants = [hol["variants"][v] for v in ("neither", "long_captures", "short_captures", "both")]
        behind_long = " / ".join(f"{v['ratio']:.2f}" for v in variants) + "x"
        if not all(v["all_overlapped"] for v in variants):
            behind_long += " (**the long one ended first**)"
        out = [
            (
                f"a request for {sizes['short_tokens']} tokens sent {sizes['delay']:g} s after one for "
                f"{sizes['long_tokens']}, latency vs alone, capturing: neither / long / short / both "
                f"(target at most {r['targets']['short_behind_long_at_most']:g}x)",
                behind_long,
            ),
            (
                f"{sizes['clients']} closed-loop clients, {sizes['rounds']} rounds alternating the servers, "
                "tokens per second: ours / ours capturing every layer's `resid_post` / "
                "`transformers serve --continuous-batching`",
                f"{loops['ours']['tokens_per_s']:.1f} / {loops['ours_capture']['tokens_per_s']:.1f} / "
                f"{loops['peer_cb']['tokens_per_s']:.1f}",
            ),
            (
                "closed loop, ours vs `transformers serve --continuous-batching` "
                f"(target at least {r['targets']['ours_over_peer_at_least']:g}x), median of rounds",
                f"{ratios['ours_over_peer']:.2f}x",
            ),
            (
                "closed loop, every layer's `resid_post` captured vs plain "
                f"(target at least {r['targets']['capture_over_plain_at_least']:g}x), median of rounds",
                f"{ratios['capture_over_plain']:.2f}x",
            ),
            (
                "time to first token alone, ours vs `transformers serve --continuous-batching` "
                f"(target at most {r['targets']['ttft_over_peer_at_most']:g}x)",
                f"{ratios['ttft_ours_over_peer']:.2f}x",
            ),
        ]
        if "ours_over_plain_peer" in ratios:
            out.append(
                (
                    "closed loop, ours vs `transformers serve` (no continuous batching)",
                    f"{ratios['ours_over_plain_peer']:.2f}x",
                )
            )
        return out
    raise KeyError(name)


def markdown(summary: dict) -> str:
    machine = summary["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in summary["versions"].items())
    lines = [
        f"Model {summary['model']} ({summary['dtype']}, device {summary['device']}); {machine['platform']}, "
        f"{machine['cpus']} CPUs{', ' + machine['gpu'] if machine['gpu'] else ''}, "
        f"Python {machine['python']}; "
        f"{versions}; commit {summary['commit']}; "
        f"{'--quick sizes' if summary['quick'] else 'full sizes'}.",
        "",
        "| benchmark | figure | value |",
        "| --- | --- | --- |",
    ]
    for name, entry in summary["benchmarks"].items():
        if "error" in entry:
            lines.append(f"| {name} | **failed** | {entry['error']} |")
            continue
        for what, value in rows(name, entry["result"]):
            lines.append(f"| {name} | {what} | {value} |")
    lines.append("")
    lines.append(
        "Wall time: "
        + ", ".join(
            f"{name} {entry['seconds'] / 60:.1f} min" for name, entry in summary["benchmarks"].items()
        )
        + "."
    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS), default=list(BENCHMARKS))
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run, not figures to quote")
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "bench_results")
    parser.add_argument(
        "--update-readme",
        action="store_true",
        help="put the table into README.md (between its bench markers)",
    )
    args = parser.parse_args(argv)
    if args.update_readme:
        if args.quick or set(args.only) != set(BENCHMARKS):
            parser.error("--update-readme takes a full run of every benchmark (no --quick, no --only)")
        text = (ROOT / "README.md").read_text()
        if README_START not in text or README_END not in text:
            parser.error(f"README.md has no {README_START} ... {README_END} markers")
    args.out_dir.mkdir(parents=True, exist_ok=True)

    import psutil
    import torch

    benchmarks = {}
    for name in args.only:
        started = time.monotonic()
        try:
            result, seconds = run_benchmark(name, args)
            benchmarks[name] = {"seconds": round(seconds, 1), "result": result}
        except (subprocess.CalledProcessError, OSError, ValueError) as exc:  # the others still run
            print(f"=== {name} FAILED: {exc}", flush=True)
            benchmarks[name] = {"seconds": round(time.monotonic() - started, 1), "error": str(exc)}
    results = [entry["result"] for entry in benchmarks.values() if "result" in entry]
    summary = {
        # what the benchmarks themselves report having loaded (not what was asked for)
        "model": next((r["model"] for r in results if "dtype" in r), args.model),
        "dtype": next((r["dtype"] for r in results if "dtype" in r), args.dtype),
        "device": next(
            (r["machine"]["device"] for r in results if "device" in r.get("machine", {})), args.device
        ),
        "quick": args.quick,
        "machine": {
            "platform": platform.platform(),
            "cpus": psutil.cpu_count(),
            "python": platform.python_version(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
        "versions": {pkg: version(pkg) for pkg in ("torch", "transformers", "nnsight", "fastapi", "uvicorn")},
        "commit": git_commit(),
        "benchmarks": benchmarks,
    }
    (args.out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    table = markdown(summary)
    (args.out_dir / "summary.md").write_text(table)
    print("\n" + table)
    print(f"written to {args.out_dir / 'summary.json'} and {args.out_dir / 'summary.md'}")
    failed = [name for name, entry in benchmarks.items() if "error" in entry]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    if args.update_readme:
        update_readme(table)
    return 0


def update_readme(table: str) -> None:
    """Replace the README's table (between its markers) with this run's."""
    readme = ROOT / "README.md"
    text = readme.read_text()
    start, end = text.index(README_START) + len(README_START), text.index(README_END)
    readme.write_text(text[:start] + "\n" + table + text[end:])
    print(f"updated the table in {readme}")


if __name__ == "__main__":
    sys.exit(main())
