"""The emotion-prefix workflow end to end on the embedded model, in miniature: 3 problems x 7
variants, then the report checked against the per-sample files it was made from."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "emotion_prefix_gsm8k" / "deploy_and_evaluate.py"
LAYERS = [29, 0, 15]  # the plan keeps them in the order the server returns them: ascending


@pytest.fixture(scope="module")
def run(embedded_server, tmp_path_factory):
    folder = tmp_path_factory.mktemp("emotion")
    config = folder / "config.yaml"
    config.write_text(
        f"server: {{url: '{embedded_server.url}'}}\n"
        "data: {source: bundled, limit: 3, seed: 1}\n"
        "generation: {max_tokens: 24}\n"
        f"capture: {{layers: {LAYERS}}}\n"
        "run: {out_dir: out, concurrency: 4}\n"
        "analysis: {bootstrap_resamples: 500}\n"
    )

    def stages(*names: str) -> subprocess.CompletedProcess:
        command = [sys.executable, str(SCRIPT), "--config", str(config), "--stages", *names]
        return subprocess.run(command, capture_output=True, text=True, timeout=900)

    first = stages("configure", "generate", "analyze")
    assert first.returncode == 0, first.stderr[-3000:]
    return folder / "out", stages, first.stderr


def samples(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "samples").glob("*/*.json"))]


def test_every_variant_and_problem_has_a_graded_sample_with_its_residuals(run):
    out, _, _ = run
    records = samples(out)
    plan = json.loads((out / "plan.json").read_text())
    assert len(plan["problems"]) == 3 and plan["layers"] == sorted(LAYERS)
    assert len(records) == 21
    assert {r["variant"] for r in records} == {
        "control", "frustration", "impatience", "anxiety", "collaborative", "patience", "calm",
    }  # fmt: skip
    for record in records:
        assert 0 < record["completion_tokens"] <= 24 and record["request_id"]
        assert record["efficiency_reward"] == 1 - record["completion_tokens"] / 24
        residual = load_file(out / "samples" / record["variant"] / record["activations"]["file"])["residual"]
        assert residual.shape == (3, 576) and torch.isfinite(residual).all()
    control = {r["problem_id"]: r for r in records if r["variant"] == "control"}
    calm = {r["problem_id"]: r for r in records if r["variant"] == "calm"}
    assert all(calm[p]["prompt_tokens"] > control[p]["prompt_tokens"] for p in control)  # the prefix is there


def test_a_stored_residual_is_hf_s_hidden_state_at_the_last_prompt_token(run):
    """Independent reference: plain HF on the same chat, rendered as the server renders it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from server.engine.loading import embedded_model_dir

    sys.path.insert(0, str(SCRIPT.parent))
    from variants import messages

    out, _, _ = run
    record = next(r for r in samples(out) if r["variant"] == "frustration")
    folder = embedded_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = tokenizer.apply_chat_template(
        messages("frustration", record["question"]), add_generation_prompt=True, tokenize=False
    )
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) == record["prompt_tokens"]
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        hidden = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
    stored = load_file(out / "samples" / "frustration" / record["activations"]["file"])["residual"]
    for row, layer in enumerate(sorted(LAYERS)[:2]):  # the last layer's HF state is after the final norm
        torch.testing.assert_close(stored[row], hidden[layer + 1][0, -1], rtol=1e-4, atol=1e-4)


def test_the_report_agrees_with_the_per_sample_files(run):
    out, _, _ = run
    report = json.loads((out / "report.json").read_text())
    records = samples(out)
    for variant, row in report["variants"].items():
        mine = [r for r in records if r["variant"] == variant]
        assert row["n"] == len(mine) == 3
        assert row["correct"] == sum(r["correct"] for r in mine)
        assert row["accuracy"] == pytest.approx(row["correct"] / 3)
        assert row["format_rate"] == pytest.approx(sum(r["format_reward"] for r in mine) / 3)
        assert row["efficiency_mean"] == pytest.approx(sum(r["efficiency_reward"] for r in mine) / 3)
        assert row["accuracy_ci"][0] <= row["accuracy"] <= row["accuracy_ci"][1]
    # The residual shift, recomputed from the tensors for one variant and layer.
    by_problem = {}
    for record in records:
        tensor = load_file(out / "samples" / record["variant"] / record["activations"]["file"])["residual"]
        by_problem[(record["variant"], record["problem_id"])] = tensor
    problems = sorted({r["problem_id"] for r in records})
    control = torch.stack([by_problem[("control", p)] for p in problems])
    anxiety = torch.stack([by_problem[("anxiety", p)] for p in problems])
    expected = (anxiety - control).mean(0).norm(dim=-1) / control.norm(dim=-1).mean(0)
    reported = report["residual"]["variants"]["anxiety"]["mean_difference_norm"]
    assert reported == pytest.approx(expected.tolist(), rel=1e-5)
    assert reported[2] > 0  # the prefix moves the last layer's residual stream
    assert (out / "report.md").read_text().count("\n| ") >= 7 + 6
    for plot in ("accuracy_by_variant.png", "residual_difference_by_layer.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_progress_bar_moves_with_every_streamed_token(run):
    """Requests decoded in one batch end together, so a bar of samples would jump by the batch:
    the generate stage's bar counts tokens as they stream (24 per sample), and the samples done."""
    _, _, stderr = run
    shown = [int(n) for n in re.findall(r"\| *(\d+)/504 \[", stderr)]
    assert shown[0] == 0 and shown[-1] == 504 and shown == sorted(shown)
    assert len(set(shown)) > 21  # it moved within requests, not once per sample (or batch)
    assert "21/21 samples" in stderr


def test_rerunning_redoes_only_unfinished_samples(run):
    out, stages, _ = run
    before = {p: p.stat().st_mtime_ns for p in (out / "samples").glob("*/*")}
    sorted((out / "samples" / "calm").glob("*.json"))[0].unlink()  # no record
    sorted((out / "samples" / "anxiety").glob("*.safetensors"))[0].unlink()  # a record without its tensors
    again = stages("generate")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "2 of 21 samples to do (19 already done)" in again.stderr
    after = {p: p.stat().st_mtime_ns for p in (out / "samples").glob("*/*")}
    changed = sorted(p.parent.name for p in after if after[p] != before.get(p))
    assert changed == ["anxiety", "anxiety", "calm", "calm"]  # those two, record and tensors; nothing else


@pytest.mark.parametrize("stage", ["configure", "generate", "analyze"])
def test_a_changed_config_is_refused_rather_than_mixed(run, tmp_path, stage):
    out, _, _ = run
    config = tmp_path / "config.yaml"
    config.write_text(
        f"server: {{url: '{_url(out)}'}}\n"
        "data: {source: bundled, limit: 3, seed: 1}\n"
        "generation: {max_tokens: 25}\n"  # was 24
        f"capture: {{layers: {LAYERS}}}\n"
        f"run: {{out_dir: '{out}'}}\n"
    )
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--config", str(config), "--stages", stage],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2 and "generation" in result.stderr
    assert "another plan" in result.stderr or "differs from" in result.stderr


def _url(out: Path) -> str:
    config = (out.parent / "config.yaml").read_text()
    return config.split("url: '")[1].split("'")[0]
