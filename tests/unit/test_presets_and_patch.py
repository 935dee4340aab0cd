"""Intervention presets, step ranges, and patching values from an earlier capture."""

from __future__ import annotations

import pytest
import torch

HELLO = [{"role": "user", "content": "Hello there"}]


def answer(client, **extra) -> dict:
    body = {"messages": HELLO, "max_tokens": 8, "temperature": 0, "ignore_eos": True, **extra}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def text(data: dict) -> str:
    return data["choices"][0]["message"]["content"]


@pytest.fixture(scope="module")
def steer() -> dict:
    direction = torch.randn(64, generator=torch.Generator().manual_seed(11)) * 2
    return {"type": "add", "layer": 0, "hook_point": "resid_post", "vector": direction.tolist(), "scale": 2.0}


def test_presets_round_trip_and_apply(client, steer):
    created = client.post("/v1/interventions/presets", json={"name": "push", "items": [steer]})
    assert created.status_code == 200, created.text
    assert client.get("/v1/interventions/presets/push").json()["items"][0]["type"] == "add"
    assert "push" in [p["name"] for p in client.get("/v1/interventions/presets").json()["data"]]
    assert text(answer(client, presets=["push"])) == text(answer(client, interventions=[steer]))
    assert text(answer(client, presets=["push"])) != text(answer(client))
    assert client.delete("/v1/interventions/presets/push").json() == {"name": "push", "deleted": True}
    response = client.post("/v1/chat/completions", json={"messages": HELLO, "presets": ["push"]})
    assert response.status_code == 400 and response.json()["error"]["param"] == "presets[0]"
    assert client.get("/v1/interventions/presets/push").status_code == 404


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (
            {
                "name": "../x",
                "items": [{"type": "scale", "layer": 0, "hook_point": "resid_post", "factor": 2.0}],
            },
            "name",
        ),
        (
            {
                "name": "bad",
                "items": [{"type": "add", "layer": 0, "hook_point": "resid_post", "vector": [1.0]}],
            },
            "items[0].vector",
        ),
        ({"name": "empty", "items": []}, "items"),
    ],
)
def test_bad_presets_are_refused(client, body, param):
    response = client.post("/v1/interventions/presets", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_a_step_range_limits_an_edit(client, steer):
    prompt_only = text(answer(client, interventions=[{**steer, "positions": "prompt"}]))
    first_step_only = text(answer(client, interventions=[{**steer, "steps": [0, 1]}]))
    assert first_step_only == prompt_only  # step 0 is the prompt forward
    assert text(answer(client, interventions=[{**steer, "steps": [50, 60]}])) == text(answer(client))


def test_patching_a_capture_of_the_same_prompt_reproduces_the_output(client):
    plain = answer(client, capture={"layers": [1], "hook_points": ["resid_post"]})
    patch = {
        "type": "patch",
        "layer": 1,
        "hook_point": "resid_post",
        "activation_id": plain["activations"]["id"],
        "tensor": "layers.1.resid_post",
    }
    assert text(answer(client, interventions=[patch])) == text(plain)


def test_patching_a_steered_capture_reproduces_the_steered_answer(client, steer):
    steered = answer(
        client,
        interventions=[steer],
        capture={"mode": "generate", "layers": [0], "hook_points": ["resid_post"]},
    )
    assert text(steered) != text(answer(client))
    patch = {
        "type": "patch",
        "layer": 0,
        "hook_point": "resid_post",
        "activation_id": steered["activations"]["id"],
        "tensor": "layers.0.resid_post",
    }
    # every position's layer-0 output replaced by the steered run's: the rest of the model follows
    assert text(answer(client, interventions=[patch])) == text(steered)


def test_patch_refusals(client):
    resid = answer(client, capture={"layers": [0], "hook_points": ["resid_post"]})["activations"]["id"]
    sampled = answer(client, capture={"layers": [0], "hook_points": ["resid_post"], "sample_hidden": 8})
    base = {"type": "patch", "layer": 0, "hook_point": "resid_post"}
    cases = [
        ({**base}, "interventions[0].activation_id"),
        (
            {**base, "activation_id": "act-" + "0" * 32, "tensor": "layers.0.resid_post"},
            "interventions[0].activation_id",
        ),
        ({**base, "activation_id": resid, "tensor": "layers.9.resid_post"}, "interventions[0].activation_id"),
        (
            {
                **base,
                "hook_point": "mlp.gate_proj.output",
                "activation_id": resid,
                "tensor": "layers.0.resid_post",
            },
            "interventions[0].tensor",
        ),
        (
            {**base, "activation_id": sampled["activations"]["id"], "tensor": "layers.0.resid_post"},
            "interventions[0].tensor",
        ),
        (
            {
                **base,
                "layers": [0, 1],
                "layer": None,
                "activation_id": resid,
                "tensor": "layers.0.resid_post",
            },
            "interventions[0].layers",
        ),
    ]
    for item, param in cases:
        item = {k: v for k, v in item.items() if v is not None}
        response = client.post("/v1/chat/completions", json={"messages": HELLO, "interventions": [item]})
        assert response.status_code == 400, (item, response.text)
        assert response.json()["error"]["param"] == param
