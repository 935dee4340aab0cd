"""The GPU check's dry run on a CPU: tiny sizes, the same code, so the script cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_the_dry_run_passes_every_check(tmp_path):
    out = tmp_path / "gpu_check.json"
    command = [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--device", "cpu", "--dry-run"]
    done = subprocess.run(
        [*command, "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert summary["ok"] and summary["dry_run"]
    assert summary["a_capture_alone"]["tensors"] == 2 * 2  # 2 layers x resid_post, mlp_out
    assert summary["b_eight_at_once"]["statuses"] == [200] * 8
    assert summary["c_lda"]["status"] == 200
    assert summary["g_sampling_fields"]["ok"]
    assert summary["d_out_of_memory"]["skipped"]
    assert summary["e_speed"]["server_alone_tokens_per_s"] > 0
    quantized = summary["f_bnb_4bit"]  # bitsandbytes computes on a CPU too
    assert quantized["weight_bytes"] == pytest.approx(quantized["predicted_weight_bytes"], rel=0.1)
    assert quantized["capture_status"] == quantized["lda_status"] == 200
    assert quantized["steering_changed_the_answer"]


def test_help_documents_the_check():
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--help"], capture_output=True, text=True
    )
    assert done.returncode == 0 and "16 GB" in done.stdout and "--dry-run" in done.stdout
