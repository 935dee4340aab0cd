"""The logit lens against the model itself: the last layer's lens is the model's own next-token
distribution, and an earlier layer's is its ``resid_post`` through the final norm and head,
computed here with plain PyTorch on an independent copy of the model."""

from __future__ import annotations

import pytest
import torch
from stored import chat_prompt_ids, stored_tensor

HELLO = [{"role": "user", "content": "Hello there"}]


def lens_capture(client, capture: dict, **extra) -> tuple[dict, dict]:
    body = {"messages": HELLO, "max_tokens": 1, "temperature": 0, "capture": capture, **extra}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    data = response.json()
    return data, client.get(data["activations"]["manifest"]).json()


def test_the_last_layers_lens_is_the_models_own_prediction(client, tiny_tokenizer, reference_model):
    data, manifest = lens_capture(client, {"logit_lens": [-1], "logit_lens_top_k": 4})
    ref = data["activations"]
    assert ref["tensors"] == ["logit_lens.layers.1.indices", "logit_lens.layers.1.logprobs"]
    ids = chat_prompt_ids(tiny_tokenizer, HELLO)
    with torch.no_grad():
        expected = reference_model(torch.tensor([ids])).logits[0].float().log_softmax(-1).topk(4, dim=-1)
    indices = stored_tensor(client, ref["id"], "logit_lens.layers.1.indices")
    logprobs = stored_tensor(client, ref["id"], "logit_lens.layers.1.logprobs")
    assert indices.shape == logprobs.shape == (len(ids), 4)
    assert indices.tolist() == expected.indices.tolist()
    torch.testing.assert_close(logprobs, expected.values, rtol=1e-5, atol=1e-5)
    assert manifest["token_ids"] == ids
    assert {t["name"]: t["kind"] for t in manifest["tensors"]}[
        "logit_lens.layers.1.logprobs"
    ] == "lens_logprobs"


def test_an_earlier_layers_lens_is_its_residual_through_norm_and_head(
    client, tiny_tokenizer, reference_model
):
    data, _ = lens_capture(
        client, {"logit_lens": "all", "logit_lens_top_k": 3, "layers": [0], "hook_points": ["resid_post"]}
    )
    ref = data["activations"]
    assert set(ref["tensors"]) == {
        "layers.0.resid_post",
        *(f"logit_lens.layers.{layer}.{kind}" for layer in (0, 1) for kind in ("indices", "logprobs")),
    }
    ids = chat_prompt_ids(tiny_tokenizer, HELLO)
    with torch.no_grad():
        hidden = reference_model(torch.tensor([ids]), output_hidden_states=True).hidden_states[1]
        lens = reference_model.lm_head(reference_model.model.norm(hidden))[0].log_softmax(-1).topk(3, dim=-1)
    assert stored_tensor(client, ref["id"], "logit_lens.layers.0.indices").tolist() == lens.indices.tolist()
    torch.testing.assert_close(
        stored_tensor(client, ref["id"], "logit_lens.layers.0.logprobs"), lens.values, rtol=1e-5, atol=1e-5
    )
    # the two layers predict differently (a check that could fail)
    assert not torch.equal(
        stored_tensor(client, ref["id"], "logit_lens.layers.0.indices"),
        stored_tensor(client, ref["id"], "logit_lens.layers.1.indices"),
    )


def test_generate_mode_lens_matches_the_logprobs_of_each_generated_token(client):
    body = {
        "messages": HELLO,
        "max_tokens": 5,
        "temperature": 0,
        "ignore_eos": True,
        "logprobs": True,
        "top_logprobs": 3,
        "capture": {"mode": "generate", "logit_lens": [1], "logit_lens_top_k": 3, "positions": "all"},
    }
    data = client.post("/v1/chat/completions", json=body).json()
    ref = data["activations"]
    manifest = client.get(ref["manifest"]).json()
    logprobs = stored_tensor(client, ref["id"], "logit_lens.layers.1.logprobs")
    assert logprobs.shape[0] == len(manifest["token_ids"])
    prompt_len = data["usage"]["prompt_tokens"]
    content = data["choices"][0]["logprobs"]["content"]
    # the lens at position p predicts token p + 1: the prompt's last position predicts the first
    # generated token, and so on
    for i, token in enumerate(content):
        best = [alternative["logprob"] for alternative in token["top_logprobs"]]
        torch.testing.assert_close(logprobs[prompt_len - 1 + i], torch.tensor(best), rtol=1e-4, atol=1e-4)


def test_lens_and_edits_together_see_the_edited_residual(client):
    plain, _ = lens_capture(client, {"logit_lens": [0]})
    steered, _ = lens_capture(
        client,
        {"logit_lens": [0]},
        interventions=[{"type": "scale", "layer": 0, "hook_point": "resid_post", "factor": -3.0}],
    )
    a = stored_tensor(client, plain["activations"]["id"], "logit_lens.layers.0.logprobs")
    b = stored_tensor(client, steered["activations"]["id"], "logit_lens.layers.0.logprobs")
    assert not torch.allclose(a, b)


@pytest.mark.parametrize(
    ("capture", "param"),
    [
        ({"logit_lens": [5]}, "capture.logit_lens[0]"),
        ({"logit_lens": []}, "capture.logit_lens"),
        ({"logit_lens": [0], "logit_lens_top_k": 0}, "capture.logit_lens_top_k"),
    ],
)
def test_bad_lens_requests_name_the_field(client, capture, param):
    response = client.post(
        "/v1/chat/completions", json={"messages": HELLO, "max_tokens": 1, "capture": capture}
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
