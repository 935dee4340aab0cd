"""Patching sweeps against plain PyTorch: each cell equals the corrupted run with that one value
replaced (by a forward hook on an independent copy of the model) by the clean run's value, and a
batched sweep equals the same sweep one cell per forward pass."""

from __future__ import annotations

import base64

import pytest
import torch

CLEAN = "The quick brown fox jumps"
CORRUPTED = "The quick brown dog jumps"
CORRECT, INCORRECT = 5, 9  # token ids: the metric is logit[5] - logit[9]


def sweep(client, **fields) -> dict:
    body = {
        "clean": CLEAN,
        "corrupted": CORRUPTED,
        "metric": {"type": "logit_diff", "correct": CORRECT, "incorrect": INCORRECT},
        **fields,
    }
    response = client.post("/v1/patching/sweep", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def metric(logits: torch.Tensor) -> float:
    return float(logits[0, -1, CORRECT] - logits[0, -1, INCORRECT])


def module_of(hook: str, layer: int) -> str:
    return {
        "resid_post": f"model.layers.{layer}",
        "attn_out": f"model.layers.{layer}.self_attn",
        "mlp_out": f"model.layers.{layer}.mlp",
    }[hook]


def first(output):
    return output[0] if isinstance(output, tuple) else output


def reference_cell(model, clean_ids, corrupted_ids, hook: str, layer: int, position: int) -> float:
    """The corrupted run with ``hook`` at ``layer``, ``position`` set to the clean run's value."""
    module = model.get_submodule(module_of(hook, layer))
    seen = {}

    def keep(_m, _a, out) -> None:  # a hook that returns something replaces the output
        seen["clean"] = first(out).detach().clone()

    handle = module.register_forward_hook(keep)
    with torch.no_grad():
        model(torch.tensor([clean_ids]))
    handle.remove()

    def patch(_m, _a, out):
        tensor = first(out).clone()
        tensor[:, position] = seen["clean"][:, position]
        return (tensor, *out[1:]) if isinstance(out, tuple) else tensor

    handle = module.register_forward_hook(patch)
    try:
        with torch.no_grad():
            return metric(model(torch.tensor([corrupted_ids])).logits)
    finally:
        handle.remove()


@pytest.fixture(scope="module")
def ids(tiny_tokenizer):
    clean, corrupted = tiny_tokenizer.encode(CLEAN), tiny_tokenizer.encode(CORRUPTED)
    assert len(clean) == len(corrupted) and clean != corrupted
    return clean, corrupted


def test_every_cell_equals_a_hooked_reference_run(client, reference_model, ids):
    clean_ids, corrupted_ids = ids
    data = sweep(client, hook_points=["resid_post", "attn_out", "mlp_out"], batch_size=5)
    with torch.no_grad():
        assert data["clean_metric"] == pytest.approx(
            metric(reference_model(torch.tensor([clean_ids])).logits), abs=1e-4
        )
        assert data["corrupted_metric"] == pytest.approx(
            metric(reference_model(torch.tensor([corrupted_ids])).logits), abs=1e-4
        )
    assert data["positions"] == list(range(len(clean_ids)))
    assert data["cells"] == 3 * 2 * len(clean_ids)
    assert data["forward_passes"] == 2 + -(-data["cells"] // 5)
    for result in data["results"]:
        assert result["layers"] == [0, 1]
        for layer, row in zip(result["layers"], result["scores"], strict=True):
            for position, score in zip(data["positions"], row, strict=True):
                expected = reference_cell(
                    reference_model, clean_ids, corrupted_ids, result["hook_point"], layer, position
                )
                assert score == pytest.approx(expected, abs=1e-4), (result["hook_point"], layer, position)
    resid = data["results"][0]
    # the last layer's residual at the last position carries everything the next token sees
    assert resid["scores"][-1][-1] == pytest.approx(data["clean_metric"], abs=1e-4)
    assert resid["normalized"][-1][-1] == pytest.approx(1.0, abs=1e-4)
    # positions before the first differing token change nothing
    differs = next(i for i, (a, b) in enumerate(zip(*ids, strict=True)) if a != b)
    for row in resid["scores"]:
        assert row[0] == pytest.approx(data["corrupted_metric"], abs=1e-4) or differs == 0


def test_a_batched_sweep_equals_one_cell_per_forward(client):
    batched = sweep(client, layers=[1, 0], positions=[4, 1, 3], batch_size=6, heatmap=False)
    solo = sweep(client, layers=[0, 1], positions=[1, 3, 4], batch_size=1, heatmap=False)
    assert batched["positions"] == solo["positions"] == [1, 3, 4]
    assert batched["forward_passes"] == 2 + 1 and solo["forward_passes"] == 2 + 6
    torch.testing.assert_close(
        torch.tensor(batched["results"][0]["scores"]),
        torch.tensor(solo["results"][0]["scores"]),
        rtol=0,
        atol=1e-5,
    )
    assert "heatmap_png_base64" not in batched["results"][0]


def test_the_heatmap_is_a_png_and_text_tokens_work_as_metric(client, tiny_tokenizer):
    messages = [{"role": "user", "content": CLEAN}]
    corrupted = [{"role": "user", "content": CORRUPTED}]
    body = {
        "clean": messages,
        "corrupted": corrupted,
        "metric": {
            "correct": tiny_tokenizer.decode([CORRECT]),
            "incorrect": tiny_tokenizer.decode([INCORRECT]),
        },
        "layers": [-1],
    }
    response = client.post("/v1/patching/sweep", json=body)
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["metric"] == {
        "type": "logit_diff",
        "correct_token_id": CORRECT,
        "incorrect_token_id": INCORRECT,
    }
    png = base64.b64decode(data["results"][0]["heatmap_png_base64"])
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000
    assert len(data["tokens"]) == len(data["positions"])


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"corrupted": "The quick"}, "corrupted"),
        ({"metric": {"correct": "The quick brown", "incorrect": INCORRECT}}, "metric.correct"),
        ({"metric": {"correct": CORRECT, "incorrect": 10**7}}, "metric.incorrect"),
        ({"layers": [7]}, "layers[0]"),
        ({"hook_points": ["nowhere"]}, "hook_points[0]"),
        ({"positions": [99]}, "positions"),
        ({"clean": ""}, "clean"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_bad_sweeps_are_400s_naming_the_field(client, change, param):
    body = {
        "clean": CLEAN,
        "corrupted": CORRUPTED,
        "metric": {"correct": CORRECT, "incorrect": INCORRECT},
        **change,
    }
    response = client.post("/v1/patching/sweep", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
