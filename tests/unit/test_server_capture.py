"""Server-wide capture settings (/v1/interventions), the ndif overrides, and per-request capture winning."""

from __future__ import annotations

import pytest

HELLO = [{"role": "user", "content": "Hello there"}]


def chat(client, **extra) -> dict:
    response = client.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 2, **extra})
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture
def enabled(client):
    response = client.post(
        "/v1/interventions",
        json={"enabled": True, "layers": [0], "hook_points": ["resid_post"], "save_dir": "legacy"},
    )
    assert response.status_code == 200, response.text
    yield response.json()
    client.post("/v1/interventions", json={"enabled": False})


def test_defaults_are_off(client):
    body = client.get("/v1/interventions").json()
    assert body["ok"] is True and body["config"]["enabled"] is False
    assert chat(client)["activations"] is None


def test_enabled_settings_capture_every_request(client, enabled):
    assert enabled["ok"] and enabled["config"]["hook_points"] == ["resid_post"]
    assert client.get("/v1/interventions").json() == enabled
    data = chat(client)
    assert data["activations"] == data["ndif"]
    assert data["activations"]["tensors"] == ["layers.0.resid_post"]
    assert data["activations"]["directory"].startswith("legacy/act-")
    completion = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 2}).json()
    assert completion["ndif"]["tensors"] == ["layers.0.resid_post"]


def test_request_capture_and_ndif_override_the_server_settings(client, enabled):
    own = chat(client, capture={"layers": [1], "hook_points": ["mlp_out"]})
    assert own["activations"]["tensors"] == ["layers.1.mlp_out"]
    assert not own["activations"]["directory"].startswith("legacy/")
    moved = chat(client, ndif={"save_dir": "mine"})
    assert moved["activations"]["directory"].startswith("mine/act-")
    for ndif, param in (
        ({"save_dir": "../out"}, "ndif.save_dir"),
        ({"per_request_subdir": False}, "ndif.per_request_subdir"),
    ):
        response = client.post("/v1/chat/completions", json={"messages": HELLO, "ndif": ndif})
        assert response.status_code == 400 and response.json()["error"]["param"] == param


@pytest.mark.parametrize(
    ("config", "param"),
    [
        ({"enabled": True, "hook_points": ["resid_nowhere"]}, "hook_points[0]"),
        ({"enabled": True, "layers": [7]}, "layers[0]"),
        ({"enabled": True, "save_dir": "../../etc"}, "save_dir"),
        ({"enabled": True, "per_request_subdir": False}, "per_request_subdir"),
        ({"enabled": True, "include_metadata_json": False}, "include_metadata_json"),
        ({"enabled": "yes"}, "enabled"),
        ({"enabled": True, "save_format": "pickle"}, "save_format"),
    ],
)
def test_bad_settings_are_refused_and_change_nothing(client, config, param):
    before = client.get("/v1/interventions").json()
    response = client.post("/v1/interventions", json=config)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    assert client.get("/v1/interventions").json() == before


def test_server_wide_generate_mode(client):
    client.post("/v1/interventions", json={"enabled": True, "mode": "generate", "hook_points": ["resid_pre"]})
    try:
        data = chat(client, max_tokens=3, ignore_eos=True)
        manifest = client.get(data["activations"]["manifest"]).json()
        assert manifest["mode"] == "generate"
        assert len(manifest["tensors"]) == 2  # layers "all" of a 2-layer model
        assert len(manifest["token_positions"]) == data["usage"]["total_tokens"]
        response = client.post("/v1/chat/completions", json={"messages": HELLO, "n": 2})
        assert response.status_code == 400 and response.json()["error"]["param"] == "n"
    finally:
        client.post("/v1/interventions", json={"enabled": False})
