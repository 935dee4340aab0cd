"""examples/sae_features/steer_a_feature.py against the real server on the embedded model: it
trains an SAE through the server, saves it in SAELens' format, loads it with POST /v1/saes,
reads its features and steers with one (a short training run: the point is the whole path)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_sae_example_trains_loads_reads_and_steers(server_process, tmp_path):
    saes = tmp_path / "saes"
    flags = [
        "--saes-dir",
        str(saes),
        "--activations-dir",
        str(tmp_path / "a"),
        "--vectors-dir",
        str(tmp_path / "v"),
    ]
    with server_process(flags, tmp_path / "server.log") as server:
        run = subprocess.run(
            [
                sys.executable,
                str(ROOT / "examples" / "sae_features" / "steer_a_feature.py"),
                "--server",
                server.url,
                "--saes-dir",
                str(saes),
                "--num-samples",
                "8",
                "--sae-steps",
                "40",
                "--out",
                str(tmp_path / "report"),
            ],
            capture_output=True,
            text=True,
            timeout=900,
            cwd=ROOT,
        )
        listed = [sae["name"] for sae in server_listing(server.url)]
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    config = json.loads((saes / "layer15-example" / "cfg.json").read_text())
    assert (config["architecture"], config["metadata"]["hook_name"]) == (
        "standard",
        "blocks.15.hook_resid_post",
    )
    assert listed == ["layer15-example"]
    lines = {
        line.split(":", 1)[0].strip(): line.split(":", 1)[1]
        for line in run.stdout.splitlines()
        if ":" in line
    }
    assert "loaded layer15-example" in run.stdout and "the feature most particular to it" in lines
    assert lines["clamped high"] != lines["as is"]  # the same seed: only the steering differs


def server_listing(url: str) -> list[dict]:
    import httpx

    return httpx.get(f"{url}/v1/saes").json()["data"]
