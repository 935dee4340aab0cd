"""SAEs: SAELens' format and equations, /v1/saes, feature captures and feature steering.

References: the published encoder equations written out here in float64 numpy (SAELens v6,
``sae_lens/saes/{standard,jumprelu,topk}_sae.py``; sae-lens itself pulls transformer-lens and
does not fit CI), HF ``output_hidden_states`` for the activations the SAE reads, and plain
PyTorch forward hooks for the steered generations.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from reference import hooked_greedy
from safetensors.torch import save_file
from stored import chat_prompt_ids, stored_tensor

from server.engine.sae import SaeError, read_sae

HELLO = [{"role": "user", "content": "Hello there"}]
D_IN, D_SAE = 64, 96  # the tiny model's hidden size; the SAE's features
STEPS = 6


def sae_tensors(architecture: str, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tensors = {
        "W_enc": torch.randn(D_IN, D_SAE, generator=generator) * 0.3,
        "b_enc": torch.randn(D_SAE, generator=generator) * 0.1,
        "W_dec": torch.randn(D_SAE, D_IN, generator=generator) * 0.3,
        "b_dec": torch.randn(D_IN, generator=generator) * 0.1,
    }
    if architecture == "jumprelu":
        tensors["threshold"] = torch.rand(D_SAE, generator=generator) * 0.5
    return tensors


def write_sae(folder: Path, architecture: str = "standard", seed: int = 0, **cfg) -> Path:
    """An SAE folder as SAELens 6 writes it (``hook_name`` under ``metadata``)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "architecture": architecture,
        "d_in": D_IN,
        "d_sae": D_SAE,
        "dtype": "float32",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "metadata": {"hook_name": "blocks.1.hook_resid_post"},
        **({"k": 8} if architecture == "topk" else {}),
        **cfg,
    }
    (folder / "cfg.json").write_text(json.dumps(config))
    save_file(sae_tensors(architecture, seed), str(folder / "sae_weights.safetensors"))
    return folder


def reference_encode(tensors: dict, x: np.ndarray, architecture: str, apply_b_dec: bool = True, k: int = 8):
    """The published equations in float64: x -> feature activations [pos, d_sae]."""
    t = {name: value.double().numpy() for name, value in tensors.items()}
    pre = (x - t["b_dec"] if apply_b_dec else x) @ t["W_enc"] + t["b_enc"]
    if architecture == "standard":
        return np.maximum(pre, 0)
    if architecture == "jumprelu":
        return np.maximum(pre, 0) * (pre > t["threshold"])
    out = np.zeros_like(pre)
    top = np.argsort(-pre, axis=-1)[:, :k]
    np.put_along_axis(out, top, np.maximum(np.take_along_axis(pre, top, -1), 0), -1)
    return out


def reference_decode(tensors: dict, features: np.ndarray) -> np.ndarray:
    return features @ tensors["W_dec"].double().numpy() + tensors["b_dec"].double().numpy()


# -- the format and the equations --------------------------------------------------------


@pytest.mark.parametrize("architecture", ["standard", "jumprelu", "topk"])
@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_encode_and_decode_follow_the_published_equations(tmp_path, architecture, apply_b_dec):
    folder = write_sae(tmp_path / "sae", architecture, apply_b_dec_to_input=apply_b_dec)
    sae = read_sae((folder / "cfg.json").read_bytes(), (folder / "sae_weights.safetensors").read_bytes())
    tensors = sae_tensors(architecture)
    x = torch.randn(20, D_IN)
    expected = reference_encode(tensors, x.double().numpy(), architecture, apply_b_dec)
    features = sae.encode(x)
    np.testing.assert_allclose(features.double().numpy(), expected, rtol=1e-5, atol=1e-5)
    assert (expected > 0).any() and (expected == 0).any()  # a check that could fail
    np.testing.assert_allclose(
        sae.decode(features).double().numpy(), reference_decode(tensors, expected), rtol=1e-4, atol=1e-4
    )
    for feature in (0, 5, D_SAE - 1):
        np.testing.assert_allclose(
            sae.feature_activation(x, feature).double().numpy(), expected[:, feature], rtol=1e-5, atol=1e-5
        )
    top = sae.top_features(x, 4)
    order = np.argsort(-expected, axis=-1, kind="stable")[:, :4]
    np.testing.assert_allclose(
        top.values.double().numpy(), np.take_along_axis(expected, order, -1), atol=1e-5
    )
    np.testing.assert_allclose(
        np.take_along_axis(expected, top.indices.numpy(), -1),
        np.take_along_axis(expected, order, -1),
        atol=1e-5,
    )
    error = np.linalg.norm(x.double().numpy() - reference_decode(tensors, expected), axis=-1)
    np.testing.assert_allclose(top.error_norm.double().numpy(), error, rtol=1e-4)


def test_older_saelens_configs_still_load(tmp_path):
    """SAELens 5: hook_name at the top level; a topk SAE as a standard one with a topk activation."""
    folder = write_sae(tmp_path / "old", "standard", metadata=None, hook_name="blocks.0.hook_resid_pre")
    config = json.loads((folder / "cfg.json").read_text())
    config.update(activation_fn_str="topk", activation_fn_kwargs={"k": 3})
    sae = read_sae(json.dumps(config).encode(), (folder / "sae_weights.safetensors").read_bytes())
    assert (sae.architecture, sae.k, sae.hook_name) == ("topk", 3, "blocks.0.hook_resid_pre")
    assert int((sae.encode(torch.randn(5, D_IN)) > 0).sum(-1).max()) <= 3


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"architecture": "gated"}, "architecture"),
        ({"normalize_activations": "expected_average_only_in"}, "normalize_activations"),
        ({"rescale_acts_by_decoder_norm": True}, "rescale_acts_by_decoder_norm"),
        ({"hook_head_index": 2}, "hook_head_index"),
        ({"metadata": {}}, "hook_name"),
        ({"d_in": 65}, "d_in"),
        ({"architecture": "topk", "k": 0}, "k"),
        ({"architecture": "jumprelu"}, "threshold"),  # written as standard: no threshold tensor
    ],
)
def test_what_cannot_be_served_is_refused_naming_the_field(tmp_path, change, field):
    folder = write_sae(tmp_path / "sae", "standard")
    config = {**json.loads((folder / "cfg.json").read_text()), **change}
    with pytest.raises(SaeError) as caught:
        read_sae(json.dumps(config).encode(), (folder / "sae_weights.safetensors").read_bytes())
    assert caught.value.field == field


def test_weights_of_the_wrong_shape_are_refused(tmp_path):
    folder = write_sae(tmp_path / "sae")
    tensors = sae_tensors("standard")
    tensors["W_dec"] = tensors["W_dec"].T.contiguous()  # [d_in, d_sae]: written the other way round
    save_file(tensors, str(folder / "sae_weights.safetensors"))
    with pytest.raises(SaeError, match="W_dec"):
        read_sae((folder / "cfg.json").read_bytes(), (folder / "sae_weights.safetensors").read_bytes())


# -- the served set ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saes_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("saes")
    write_sae(root / "resid1", "standard")
    write_sae(root / "topk", "topk", seed=1, metadata={"hook_name": "layers.0.mlp_out"})
    write_sae(root / "jump", "jumprelu", seed=2, metadata={"hook_name": "model.layers.0"})
    write_sae(root / "wide", "standard", d_in=D_IN, metadata={"hook_name": "blocks.0.hook_resid_pre"})
    save_file(
        {**sae_tensors("standard"), "W_enc": torch.randn(32, D_SAE)},
        str(root / "wide" / "sae_weights.safetensors"),
    )
    return root


@pytest.fixture(scope="module")
def client(tiny_model_dir, activations_dir, saes_dir):
    from fastapi.testclient import TestClient

    from server.app import create_app
    from server.config import Settings

    settings = Settings(
        model=str(tiny_model_dir),
        max_tokens_cap=64,
        activations_dir=activations_dir,
        vectors_dir=activations_dir.parent / f"{activations_dir.name}-vectors",
        saes_dir=saes_dir,
        sae=[f"resid1={saes_dir / 'resid1'}"],
    )
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def load_sae(client, name: str, folder: str) -> dict:
    response = client.post("/v1/saes", json={"name": name, "folder": folder})
    assert response.status_code == 200, response.text
    return response.json()


def test_saes_load_list_and_unload(client):
    listed = client.get("/v1/saes").json()["data"]
    assert [(s["name"], s["hook_point"], s["d_in"], s["d_sae"], s["architecture"]) for s in listed] == [
        ("resid1", "layers.1.resid_post", D_IN, D_SAE, "standard")
    ]
    loaded = load_sae(client, "topk-mlp", "topk")
    assert (loaded["hook_point"], loaded["architecture"], loaded["k"]) == ("layers.0.mlp_out", "topk", 8)
    assert load_sae(client, "jump", "jump")["module"] == "model.layers.0.output"  # a bare module path
    assert client.get("/v1/saes/jump").json()["architecture"] == "jumprelu"
    assert client.delete("/v1/saes/jump").json() == {"name": "jump", "deleted": True}
    assert client.get("/v1/saes/jump").status_code == 404
    assert client.delete("/v1/saes/jump").status_code == 404
    assert {s["name"] for s in client.get("/v1/saes").json()["data"]} == {"resid1", "topk-mlp"}
    client.delete("/v1/saes/topk-mlp")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"name": "x", "folder": "../saes"}, "folder"),
        ({"name": "x", "folder": "/etc"}, "folder"),
        ({"name": "x", "folder": "nothing-here"}, "folder"),
        ({"name": "x", "folder": "wide"}, "folder"),  # d_in 32 on a 64-wide hook point
        ({"name": "resid1", "folder": "resid1"}, "name"),  # loaded already
        ({"name": ".hidden", "folder": "resid1"}, "name"),
        ({"name": "x", "folder": "link"}, "folder"),
    ],
)
def test_bad_loads_are_400s_naming_the_field(client, saes_dir, body, param):
    if not (saes_dir / "link").exists():
        os.symlink(saes_dir / "resid1", saes_dir / "link")
    response = client.post("/v1/saes", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    assert "/etc" not in response.json()["error"]["message"] or body["folder"] == "/etc"
    assert "x" not in {s["name"] for s in client.get("/v1/saes").json()["data"]}


# -- captures ------------------------------------------------------------------------------


def test_feature_capture_equals_the_equations_on_hf_hidden_states(client, tiny_tokenizer, reference_model):
    body = {
        "messages": HELLO,
        "max_tokens": 1,
        "temperature": 0,
        "capture": {"saes": ["resid1"], "sae_top_k": 5},
    }
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    ref = response.json()["activations"]
    assert ref["tensors"] == ["saes.resid1.indices", "saes.resid1.values", "saes.resid1.error_norm"]
    ids = chat_prompt_ids(tiny_tokenizer, HELLO)
    with torch.no_grad():  # layer 1 is the last: its output is hidden_states[2] before the final norm
        out = reference_model.model.layers[1]
        captured = {}
        handle = out.register_forward_hook(
            lambda _m, _a, o: captured.setdefault("x", o[0] if isinstance(o, tuple) else o)
        )
        reference_model(torch.tensor([ids]))
        handle.remove()
    x = captured["x"][0].double().numpy()
    expected = reference_encode(sae_tensors("standard"), x, "standard")
    indices, values = (
        stored_tensor(client, ref["id"], "saes.resid1.indices"),
        stored_tensor(client, ref["id"], "saes.resid1.values"),
    )
    assert indices.shape == values.shape == (len(ids), 5) and indices.dtype == torch.long
    best = -np.sort(-expected, axis=-1)[:, :5]
    np.testing.assert_allclose(values.double().numpy(), best, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.take_along_axis(expected, indices.numpy(), -1), best, rtol=1e-4, atol=1e-5)
    error = np.linalg.norm(x - reference_decode(sae_tensors("standard"), expected), axis=-1)
    np.testing.assert_allclose(
        stored_tensor(client, ref["id"], "saes.resid1.error_norm").double().numpy(), error, rtol=1e-4
    )
    manifest = client.get(ref["manifest"]).json()
    entries = {t["name"]: t for t in manifest["tensors"]}
    assert entries["saes.resid1.indices"]["kind"] == "sae_indices"
    assert entries["saes.resid1.values"]["sae"] == "resid1" and entries["saes.resid1.values"]["layer"] == 1


def test_generate_mode_features_cover_every_token_with_raw_values_beside(client):
    body = {
        "messages": HELLO,
        "max_tokens": 4,
        "temperature": 0,
        "ignore_eos": True,
        "capture": {
            "mode": "generate",
            "saes": ["resid1"],
            "sae_top_k": 3,
            "layers": [1],
            "hook_points": ["resid_post"],
        },
    }
    data = client.post("/v1/chat/completions", json=body).json()
    ref = data["activations"]
    raw = stored_tensor(client, ref["id"], "layers.1.resid_post")
    indices = stored_tensor(client, ref["id"], "saes.resid1.indices")
    values = stored_tensor(client, ref["id"], "saes.resid1.values")
    assert indices.shape[0] == raw.shape[0] == len(client.get(ref["manifest"]).json()["token_ids"])
    expected = reference_encode(sae_tensors("standard"), raw.double().numpy(), "standard")
    np.testing.assert_allclose(
        values.double().numpy(), -np.sort(-expected, axis=-1)[:, :3], rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize(
    ("capture", "param"),
    [
        ({"saes": ["missing"]}, "capture.saes[0]"),
        ({"saes": ["resid1"], "sae_top_k": D_SAE + 1}, "capture.sae_top_k"),
        ({"saes": []}, "capture.saes"),
    ],
)
def test_bad_feature_captures_name_the_field(client, capture, param):
    response = client.post(
        "/v1/chat/completions", json={"messages": HELLO, "max_tokens": 1, "capture": capture}
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


# -- steering --------------------------------------------------------------------------------


def steered(client, interventions) -> list[int]:
    body = {
        "messages": HELLO,
        "max_tokens": STEPS,
        "temperature": 0,
        "ignore_eos": True,
        "interventions": interventions,
        "logprobs": True,
    }
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def reference_text(tokenizer, model, edit) -> str:
    ids = chat_prompt_ids(tokenizer, HELLO)
    return tokenizer.decode(
        hooked_greedy(model, ids, "model.layers.1", edit, STEPS), skip_special_tokens=True
    )


def test_sae_add_adds_the_decoder_row(client, tiny_tokenizer, reference_model):
    row = sae_tensors("standard")["W_dec"][7]
    got = steered(client, [{"type": "sae_add", "sae": "resid1", "feature": 7, "strength": 40.0}])
    assert got == reference_text(tiny_tokenizer, reference_model, lambda h: h + 40.0 * row)
    assert got != steered(client, None)


def clamp_reference(feature: int, value: float):
    tensors = sae_tensors("standard")

    def edit(h):
        pre = (h.double() - tensors["b_dec"].double()) @ tensors["W_enc"][:, feature].double() + tensors[
            "b_enc"
        ][feature]
        active = pre.clamp(min=0)
        return (h.double() + (value - active)[..., None] * tensors["W_dec"][feature].double()).float()

    return edit


@pytest.mark.parametrize(("operation", "value"), [("sae_clamp", 30.0), ("sae_ablate", 0.0)])
def test_sae_clamp_and_ablate_set_the_feature_along_its_decoder_row(
    client, tiny_tokenizer, reference_model, operation, value
):
    feature = 3
    item = {"type": operation, "sae": "resid1", "feature": feature}
    if operation == "sae_clamp":
        item["value"] = value
    got = steered(client, [item])
    assert got == reference_text(tiny_tokenizer, reference_model, clamp_reference(feature, value))


def test_sae_clamp_sets_the_encoded_feature_where_the_encoder_and_decoder_agree():
    """With W_enc[:, f] . W_dec[f] = 1 (a tied, unit-norm feature) re-encoding gives the value."""
    from interventions import apply_operation
    from server.engine.sae import SparseAutoencoder

    direction = torch.nn.functional.normalize(torch.randn(D_IN), dim=0)
    W_dec = torch.randn(D_SAE, D_IN) * 0.1
    W_dec[4] = direction
    W_enc = W_dec.T.clone()
    sae = SparseAutoencoder(
        architecture="standard",
        hook_name="layers.0.resid_post",
        W_enc=W_enc,
        b_enc=torch.zeros(D_SAE),
        W_dec=W_dec,
        b_dec=torch.zeros(D_IN),
    )
    h = torch.randn(3, 5, D_IN) + 2 * direction
    clamped = apply_operation("sae_clamp", h, sae=sae, feature=4, value=7.5)
    torch.testing.assert_close(sae.feature_activation(clamped, 4), torch.full((3, 5), 7.5))
    ablated = apply_operation("sae_ablate", h, sae=sae, feature=4)
    torch.testing.assert_close(sae.feature_activation(ablated, 4), torch.zeros(3, 5), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("item", "param"),
    [
        ({"type": "sae_add", "sae": "missing", "feature": 0}, "interventions[0].sae"),
        ({"type": "sae_add", "sae": "resid1", "feature": D_SAE}, "interventions[0].feature"),
        ({"type": "sae_add", "sae": "resid1"}, "interventions[0].feature"),
        ({"type": "sae_clamp", "feature": 1}, "interventions[0].sae"),
        ({"type": "sae_add", "sae": "resid1", "feature": 1, "layer": 0}, "interventions[0].layer"),
        ({"type": "add", "sae": "resid1", "feature": 1}, "interventions[0].sae"),
        ({"type": "sae_add", "sae": "resid1", "feature": 1, "strength": 1e39}, "interventions[0].strength"),
    ],
)
def test_bad_feature_steering_is_a_400_naming_the_field(client, item, param):
    body = {"messages": HELLO, "max_tokens": 1, "interventions": [item]}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_the_analysis_scripts_sae_saves_in_saelens_format_with_the_same_features(tmp_path, monkeypatch):
    """scripts/run_full_analysis.py trains on x / scale; the saved SAE reads x itself."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "scripts" / "run_full_analysis.py"
    spec = importlib.util.spec_from_file_location("run_full_analysis", path)
    analysis = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, analysis)  # its dataclasses look themselves up there
    spec.loader.exec_module(analysis)
    trained = analysis.SparseAutoencoder(D_IN, D_SAE, torch.Generator().manual_seed(3))
    with torch.no_grad():
        trained.encoder_bias.uniform_(-0.2, 0.2)
        trained.decoder_bias.uniform_(-0.5, 0.5)
    scale = 3.7
    analysis.save_saelens(trained, scale, 1, tmp_path / "saved")
    sae = read_sae(
        (tmp_path / "saved" / "cfg.json").read_bytes(),
        (tmp_path / "saved" / "sae_weights.safetensors").read_bytes(),
    )
    assert (sae.hook_name, sae.d_in, sae.d_sae) == ("blocks.1.hook_resid_post", D_IN, D_SAE)
    x = torch.randn(10, D_IN) * scale
    with torch.no_grad():
        reconstruction, features = trained(x / scale)
    torch.testing.assert_close(sae.encode(x), features, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sae.decode(sae.encode(x)), reconstruction * scale, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "tensors",
    [
        {"encoder.weight": torch.zeros(D_SAE, D_IN)},  # another library's names
        {**sae_tensors("standard"), "W_enc": torch.zeros(D_IN)},  # 1-D
    ],
)
def test_weights_without_a_usable_encoder_are_refused_not_a_crash(tmp_path, tensors):
    folder = write_sae(tmp_path / "sae")
    save_file(tensors, str(folder / "sae_weights.safetensors"))
    with pytest.raises(SaeError) as caught:
        read_sae((folder / "cfg.json").read_bytes(), (folder / "sae_weights.safetensors").read_bytes())
    assert caught.value.field == "W_enc"


def test_a_malformed_sae_folder_is_a_400_naming_folder(client, saes_dir):
    folder = write_sae(saes_dir / "malformed")
    save_file({"encoder.weight": torch.zeros(D_SAE, D_IN)}, str(folder / "sae_weights.safetensors"))
    response = client.post("/v1/saes", json={"name": "malformed", "folder": "malformed"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "folder" and "W_enc" in response.json()["error"]["message"]


def test_loaded_saes_count_as_resident_weights(client, saes_dir):
    engine = client.app.state.engine
    before = engine.resident_weight_bytes
    load_sae(client, "counted", "topk")
    try:
        assert engine.resident_weight_bytes == before + client.get("/v1/saes/counted").json()["bytes"]
    finally:
        client.delete("/v1/saes/counted")
    assert engine.resident_weight_bytes == before


@pytest.mark.parametrize(
    ("item", "param"),
    [
        ({"type": "sae_add", "sae": "resid1", "feature": 1, "scale": 3.0}, "interventions[0].scale"),
        ({"type": "sae_clamp", "sae": "resid1", "feature": 1, "strength": 3.0}, "interventions[0].strength"),
        ({"type": "sae_ablate", "sae": "resid1", "feature": 1, "value": 3.0}, "interventions[0].value"),
        (
            {"type": "add", "layer": 0, "hook_point": "resid_post", "vector": [0.0] * D_IN, "strength": 2.0},
            "interventions[0].strength",
        ),
    ],
)
def test_fields_an_operation_does_not_use_are_refused(client, item, param):
    response = client.post(
        "/v1/chat/completions", json={"messages": HELLO, "max_tokens": 1, "interventions": [item]}
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_top_k_without_what_it_counts_is_refused(client):
    for capture, param in (
        ({"sae_top_k": 3, "layers": [0], "hook_points": ["resid_post"]}, "capture.sae_top_k"),
        ({"logit_lens_top_k": 3, "layers": [0], "hook_points": ["resid_post"]}, "capture.logit_lens_top_k"),
    ):
        response = client.post(
            "/v1/chat/completions", json={"messages": HELLO, "max_tokens": 1, "capture": capture}
        )
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == param
