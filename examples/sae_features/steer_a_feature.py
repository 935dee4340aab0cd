#!/usr/bin/env python
"""Train a small SAE on the served model, serve it, find a feature, and steer with it.

1. ``scripts/run_full_analysis.py --server`` reads layer ``--layer``'s residuals through the
   server and trains a ReLU SAE on them, saved in SAELens' format under ``--saes-dir``;
2. ``POST /v1/saes`` loads it into the server (no restart);
3. chat requests capture the SAE's top features at every token (``capture.saes``); the
   feature most active over the answer to ``--topic-prompt`` beyond what an answer to
   ``--neutral-prompt`` uses is picked;
4. the same neutral prompt is answered three times with the same seed: as is, with the
   feature clamped high (``sae_clamp``, to ``--clamp-multiple`` x its largest activation seen)
   and with the feature ablated (``sae_ablate``).

Start the server with the SAE root this script writes to, then run it::

    ./start_server.sh start --saes-dir runs/saes
    .venv/bin/python examples/sae_features/steer_a_feature.py --saes-dir runs/saes

About 4 minutes on 2 CPU cores with the embedded model (most of it the SAE's training).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import httpx
from safetensors.torch import load

ROOT = Path(__file__).resolve().parents[2]


def chat(client: httpx.Client, prompt: str, **extra) -> dict:
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 40, "seed": 0, **extra}
    response = client.post("/v1/chat/completions", json=body)
    response.raise_for_status()
    return response.json()


def tensor(client: httpx.Client, activation_id: str, name: str):
    response = client.get(f"/v1/activations/{activation_id}/{name}")
    response.raise_for_status()
    return load(response.content)[name]


def feature_totals(client: httpx.Client, name: str, prompt: str) -> tuple[str, dict, dict]:
    """A greedy answer to ``prompt``, and per feature of SAE ``name``: the sum of its top-8
    activations over the answer's tokens, and its largest one."""
    captured = chat(
        client,
        prompt,
        temperature=0,
        capture={"mode": "generate", "positions": "generated", "saes": [name], "sae_top_k": 8},
    )
    activations = captured["activations"]["id"]
    indices = tensor(client, activations, f"saes.{name}.indices")  # [answer tokens, 8]
    values = tensor(client, activations, f"saes.{name}.values")
    totals: dict[int, float] = {}
    peaks: dict[int, float] = {}
    for row_indices, row_values in zip(indices.tolist(), values.tolist(), strict=True):
        for feature, value in zip(row_indices, row_values, strict=True):
            totals[feature] = totals.get(feature, 0.0) + value
            peaks[feature] = max(peaks.get(feature, 0.0), value)
    return captured["choices"][0]["message"]["content"], totals, peaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--server", default="http://127.0.0.1:8000")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--saes-dir", type=Path, required=True, help="the server's --saes-dir")
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument(
        "--num-samples", type=int, default=32, help="texts the SAE is trained on (32 built in)"
    )
    parser.add_argument("--topic-prompt", default="Describe the ocean: waves, fish, salt water and ships.")
    parser.add_argument("--neutral-prompt", default="Write one sentence about your day.")
    parser.add_argument("--clamp-multiple", type=float, default=4.0)
    parser.add_argument("--sae-steps", type=int, default=400, help="the SAE's training steps")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "sae-example", help="the survey's report")
    args = parser.parse_args()
    name = f"layer{args.layer}-example"
    folder = args.saes_dir / name

    subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "run_full_analysis.py"),
            "--server",
            args.server,
            "--layers",
            str(args.layer),
            "--sae-layer",
            str(args.layer),
            "--num-samples",
            str(args.num_samples),
            "--sae-steps",
            str(args.sae_steps),
            "--sae-save",
            str(folder),
            "--out",
            str(args.out),
        ],
        check=True,
        env={**os.environ, **({"NNSIGHT_SERVER_API_KEY": args.api_key} if args.api_key else {})},
    )
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    with httpx.Client(base_url=args.server, headers=headers, timeout=600) as client:
        client.delete(f"/v1/saes/{name}")  # a copy from an earlier run, if any
        loaded = client.post("/v1/saes", json={"name": name, "folder": name})
        loaded.raise_for_status()
        print(f"loaded {name}: {loaded.json()['d_sae']} features at {loaded.json()['hook_point']}")

        topic, topic_totals, peaks = feature_totals(client, name, args.topic_prompt)
        _, neutral_totals, _ = feature_totals(client, name, args.neutral_prompt)
        # the feature the topic's answer uses most beyond what a neutral answer uses
        feature = max(topic_totals, key=lambda f: topic_totals[f] - neutral_totals.get(f, 0.0))
        peak = peaks[feature]
        print(f"answer: {topic!r}")
        print(f"the feature most particular to it: {feature} (largest activation {peak:.2f})")

        clamp = {"type": "sae_clamp", "sae": name, "feature": feature, "value": args.clamp_multiple * peak}
        ablate = {"type": "sae_ablate", "sae": name, "feature": feature}
        for label, interventions in (("as is", None), ("clamped high", [clamp]), ("ablated", [ablate])):
            answer = chat(client, args.neutral_prompt, temperature=0.7, interventions=interventions)
            print(f"{label:>13}: {answer['choices'][0]['message']['content']!r}")


if __name__ == "__main__":
    main()
