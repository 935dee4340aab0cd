"""The vector store, vectors by name in interventions, and contrastive vectors against HF references."""

from __future__ import annotations

import base64

import pytest
import torch
from safetensors.torch import save

HELLO = [{"role": "user", "content": "Hello there"}]


def make(client, name: str, values, **extra):
    return client.post("/v1/vectors", json={"name": name, "values": values, **extra})


def test_register_list_read_delete(client):
    values = [float(i) / 64 for i in range(64)]
    created = make(client, "ramp", values, layer=0, hook_point="resid_post", description="a ramp")
    assert created.status_code == 200, created.text
    meta = created.json()
    assert meta["name"] == "ramp" and meta["size"] == 64 and meta["layer"] == 0 and meta["model"]
    assert meta["norm"] == pytest.approx(torch.tensor(values).norm().item())
    assert "ramp" in [v["name"] for v in client.get("/v1/vectors").json()["data"]]
    read = client.get("/v1/vectors/ramp").json()
    assert read["values"] == pytest.approx(values) and read["method"] == "values"
    assert client.delete("/v1/vectors/ramp").json() == {"name": "ramp", "deleted": True}
    for response in (client.get("/v1/vectors/ramp"), client.delete("/v1/vectors/ramp")):
        assert response.status_code == 404 and response.json()["error"]["param"] == "name"


def test_register_from_base64_safetensors_and_survive_a_restart(client, settings):
    from server.storage import VectorStore

    tensor = torch.linspace(-1, 1, 64)
    encoded = base64.b64encode(save({"direction": tensor})).decode()
    response = client.post("/v1/vectors", json={"name": "from-file", "safetensors_base64": encoded})
    assert response.status_code == 200, response.text
    reopened = VectorStore(settings.vectors_dir)  # a new process would see the same
    assert "from-file" in reopened.names()
    torch.testing.assert_close(reopened.vector("from-file"), tensor)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"name": "../escape", "values": [1.0]}, "name"),
        ({"name": ".hidden", "values": [1.0]}, "name"),
        ({"name": "both", "values": [1.0], "safetensors_base64": "AAAA"}, "values"),
        ({"name": "neither"}, "values"),
        ({"name": "short", "values": [1.0, 2.0], "layer": 0, "hook_point": "resid_post"}, "values"),
        ({"name": "badhook", "values": [1.0], "layer": 0, "hook_point": "resid_mid"}, "hook_point"),
        ({"name": "badlayer", "values": [1.0] * 64, "layer": 9, "hook_point": "resid_post"}, "layer"),
        ({"name": "notb64", "safetensors_base64": "%%%"}, "safetensors_base64"),
        (
            {
                "name": "two",
                "safetensors_base64": base64.b64encode(
                    save({"a": torch.ones(2), "b": torch.ones(2)})
                ).decode(),
            },
            "safetensors_base64",
        ),
        (
            {
                "name": "inf",
                "safetensors_base64": base64.b64encode(
                    save({"a": torch.tensor([1.0, float("inf")])})
                ).decode(),
            },
            "safetensors_base64",
        ),
    ],
)
def test_bad_vectors_are_refused(client, body, param):
    response = client.post("/v1/vectors", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_nan_values_are_refused(client):
    response = client.post(
        "/v1/vectors",
        content=b'{"name": "nan", "values": [1.0, NaN]}',
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 400 and response.json()["error"]["param"].startswith("values")


def test_interventions_use_stored_vectors_by_name(client, settings):
    direction = torch.randn(64, generator=torch.Generator().manual_seed(3)).tolist()
    make(client, "steer", direction)
    body = {"messages": HELLO, "max_tokens": 6, "temperature": 0, "ignore_eos": True, "logprobs": True}

    def first_logprob(vector):
        item = {"type": "add", "layer": 0, "hook_point": "resid_post", "vector": vector, "scale": 2.0}
        response = client.post("/v1/chat/completions", json={**body, "interventions": [item]})
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["logprobs"]["content"][0]["logprob"]

    assert first_logprob("steer") == pytest.approx(first_logprob(direction), abs=1e-5)
    for vector, message in (("missing", "no stored vector"), ("foreign", "was made for model")):
        if vector == "foreign":
            store = client.app.state.vectors.vectors  # as another server would have made it
            store.put("foreign", torch.tensor(direction), model="some-other-model", layer=0)
        item = {"type": "add", "layer": 0, "hook_point": "resid_post", "vector": vector}
        response = client.post("/v1/chat/completions", json={"messages": HELLO, "interventions": [item]})
        assert response.status_code == 400 and message in response.json()["error"]["message"]
        assert response.json()["error"]["param"] == "interventions[0].vector"


def last_token_states(model, tokenizer, texts, layer: int) -> torch.Tensor:
    rows = []
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tokenizer.encode(text)])
            rows.append(model(ids, output_hidden_states=True).hidden_states[layer + 1][0, -1])
    return torch.stack(rows)


POSITIVE = ["The quick brown fox", "What is the capital of France?", "Count from one to ten"]
NEGATIVE = ["Steering vectors change things", "Interpretability research", "Numbers 0 1 2 3"]


@pytest.mark.parametrize("method", ["mean_diff", "pca"])
def test_contrastive_vectors_match_hf_hidden_states(client, tiny_tokenizer, reference_model, method):
    response = client.post(
        "/v1/vectors/contrastive",
        json={
            "name": f"contrast-{method}",
            "positive": POSITIVE,
            "negative": NEGATIVE,
            "layers": [0],
            "hook_point": "resid_post",
            "position": "last",
            "method": method,
        },
    )
    assert response.status_code == 200, response.text
    (meta,) = response.json()["data"]
    assert meta["name"] == f"contrast-{method}-layer0" and meta["method"] == f"contrastive:{method}"
    stored = torch.tensor(client.get(f"/v1/vectors/{meta['name']}").json()["values"])
    pos = last_token_states(reference_model, tiny_tokenizer, POSITIVE, 0)
    neg = last_token_states(reference_model, tiny_tokenizer, NEGATIVE, 0)
    mean_diff = pos.mean(0) - neg.mean(0)
    if method == "mean_diff":
        torch.testing.assert_close(stored, mean_diff, rtol=1e-4, atol=1e-5)
    else:
        direction = torch.linalg.svd(pos - neg, full_matrices=False).Vh[0]
        torch.testing.assert_close(stored, direction * torch.dot(mean_diff, direction), rtol=1e-3, atol=1e-4)
        assert torch.dot(stored, mean_diff) > 0


def test_contrastive_with_messages_and_mean_over_all_layers(client):
    positive = [
        [{"role": "user", "content": "Say something kind."}],
        [{"role": "user", "content": "Be nice."}],
    ]
    negative = [
        [{"role": "user", "content": "Say something rude."}],
        [{"role": "user", "content": "Be mean."}],
    ]
    response = client.post(
        "/v1/vectors/contrastive",
        json={
            "name": "kind",
            "positive": positive,
            "negative": negative,
            "layers": "all",
            "position": "mean",
        },
    )
    assert response.status_code == 200, response.text
    assert [m["name"] for m in response.json()["data"]] == ["kind-layer0", "kind-layer1"]
    assert all(m["size"] == 64 and m["position"] == "mean" for m in response.json()["data"])


def test_contrastive_refusals(client):
    base = {"name": "c", "positive": ["a"], "negative": ["b"], "layers": [0]}
    for body, param in (
        ({**base, "method": "pca"}, "method"),
        ({**base, "layers": [7]}, "layers"),
        ({**base, "hook_point": "nowhere"}, "hook_point"),
        ({**base, "positive": [""]}, "positive[0]"),
    ):
        response = client.post("/v1/vectors/contrastive", json=body)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == param


def test_the_store_has_a_limit(client, monkeypatch):
    monkeypatch.setattr(
        client.app.state.vectors.settings, "max_vectors", client.app.state.vectors.vectors.count()
    )
    response = make(client, "one-too-many", [1.0])
    assert response.status_code == 400 and "--max-vectors" in response.json()["error"]["message"]


def test_names_with_a_trailing_newline_are_refused(client):
    response = make(client, "abc\n", [1.0, 2.0])
    assert response.status_code == 400 and response.json()["error"]["param"] == "name"
