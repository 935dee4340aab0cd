"""scripts/run_full_analysis.py on the embedded model: in process and through the server, checked
against plain HF hidden states and against each other; the SAE run; the out-of-memory advice."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import run_full_analysis as survey  # noqa: E402

COMMON = ["--num-samples", "6", "--layers", "0,14,29", "--batch-size", "4", "--skip-sae"]


@pytest.fixture(scope="module")
def in_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("survey-local")
    assert survey.main([*COMMON, "--out", str(out)]) == 0
    return json.loads((out / "analysis.json").read_text()), out


def test_norms_equal_those_of_plain_hf_hidden_states(in_process):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from server.engine.loading import embedded_model_dir

    result, out = in_process
    folder = embedded_model_dir()
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    norms: dict[int, list[float]] = {0: [], 14: []}
    for text in survey.BUILT_IN_TEXTS[:6]:
        with torch.no_grad():
            hidden = model(torch.tensor([tokenizer.encode(text)]), output_hidden_states=True).hidden_states
        for layer in norms:  # hidden_states[l + 1] is layer l's output (the last one is normed: not compared)
            norms[layer] += hidden[layer + 1][0, 1:].norm(dim=-1).tolist()
    for layer, values in norms.items():
        summary = result["per_layer"][str(layer)]
        assert summary["tokens"] == len(values)
        assert summary["norm_mean"] == pytest.approx(sum(values) / len(values), rel=1e-4)
        assert summary["norm_max"] == pytest.approx(max(values), rel=1e-4)
    for plot in ("norms_by_layer.png", "outliers_by_layer.png"):
        assert (out / plot).read_bytes()[:4] == b"\x89PNG"
    assert result["sae"] is None and not (out / "sae_training.png").exists()


def test_through_the_server_gives_the_same_survey(in_process, embedded_server, tmp_path):
    local, _ = in_process
    assert survey.main([*COMMON, "--server", embedded_server.url, "--out", str(tmp_path)]) == 0
    remote = json.loads((tmp_path / "analysis.json").read_text())
    assert remote["layers"] == local["layers"] == [0, 14, 29]
    for layer in ("0", "14", "29"):
        mine, theirs = local["per_layer"][layer], remote["per_layer"][layer]
        assert theirs["tokens"] == mine["tokens"]
        for key in ("norm_mean", "norm_median", "norm_max", "first_token_norm_mean"):
            assert theirs[key] == pytest.approx(mine[key], rel=1e-3), key
    assert [o["unit"] for o in remote["outlier_features"]] == [o["unit"] for o in local["outlier_features"]]


def test_the_sae_run_reports_error_l0_and_dead_features(tmp_path):
    args = ["--num-samples", "8", "--layers", "5,10", "--sae-steps", "30", "--sae-expansion", "1"]
    assert survey.main([*args, "--out", str(tmp_path)]) == 0
    sae = json.loads((tmp_path / "analysis.json").read_text())["sae"]
    assert sae["layer"] == 10 and sae["features"] == 576 and sae["steps"] == 30
    assert sae["train_tokens"] + sae["eval_tokens"] > 50
    assert 0 < sae["eval_fraction_of_variance_unexplained"] < 2
    assert 0 <= sae["eval_l0"] <= 576 and 0 <= sae["dead_features"] <= 576
    assert sae["eval_tokens"] < sae["train_tokens"]  # whole texts held out
    assert sae["curve"][-1]["mse"] < sae["curve"][0]["mse"]  # it learned something
    assert (tmp_path / "sae_training.png").read_bytes()[:4] == b"\x89PNG"


def test_running_out_of_memory_prints_what_to_reduce(monkeypatch, capsys, tmp_path):
    def exhausted(args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(survey, "run", exhausted)
    assert survey.main(["--out", str(tmp_path)]) == 3
    advice = capsys.readouterr().err
    assert "--batch-size" in advice and "--skip-sae" in advice and "docs/memory.md" in advice
    assert not (tmp_path / "analysis.json").exists()


def test_an_outlier_feature_needs_two_layers_at_the_least():
    def layer(units):
        return {"units_over_threshold": units}

    found = survey.outlier_features({0: layer([5, 7]), 10: layer([7]), 20: layer([])}, layer_share=0.25)
    assert [o["unit"] for o in found] == [7]  # 5 is over threshold in one layer of three only


@pytest.mark.parametrize(
    "args, complaint",
    [
        (["--layers", "a,b"], "comma-separated"),
        (["--num-samples", "0"], "at least 1"),
        (["--num-samples", "999"], "only"),
        (["--server", "http://127.0.0.1:9", "--dtype", "bfloat16"], "the server's own settings apply"),
    ],
)
def test_bad_arguments_are_refused(args, complaint, capsys, tmp_path):
    with pytest.raises(SystemExit) as caught:
        survey.main([*args, "--skip-sae", "--out", str(tmp_path)])
    assert complaint in f"{caught.value.code} {capsys.readouterr().err}"
