"""Gradient attribution against ``torch.autograd`` on an independent copy of the model: the
values a plain forward hook keeps (``retain_grad``), one ``backward`` from the same metric."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load

PROMPT = "The quick brown fox jumps"
REFERENCE = "The quick brown dog jumps"  # as many tokens (tests/unit/test_patching.py)
MODULES = {
    "resid_post": "model.layers.{}",
    "attn_out": "model.layers.{}.self_attn",
    "mlp_out": "model.layers.{}.mlp",
}


def first(output):
    return output[0] if isinstance(output, tuple) else output


def autograd_reference(model, ids: list[int], metric, hooks: list[str]):
    """Per (hook, layer): the value ``[positions, d]`` and the metric's gradient there; the metric."""
    kept = {}
    handles = []
    for hook in hooks:
        for layer in range(2):

            def keep(_m, _a, out, key=(hook, layer)) -> None:
                value = first(out)
                value.retain_grad()
                kept[key] = value

            handles.append(model.get_submodule(MODULES[hook].format(layer)).register_forward_hook(keep))
    try:
        with torch.enable_grad():
            logits = model(torch.tensor([ids])).logits[0, -1].float()
            value = metric(logits)
            value.backward()
    finally:
        for handle in handles:
            handle.remove()
        model.zero_grad(set_to_none=True)
    return {key: (v[0].detach(), v.grad[0]) for key, v in kept.items()}, float(value.detach())


def attribute(client, **fields) -> dict:
    response = client.post("/v1/attribution", json={"prompt": PROMPT, **fields})
    assert response.status_code == 200, response.text
    return response.json()


def test_logprob_gradients_equal_autograd(client, tiny_tokenizer, reference_model):
    hooks = ["resid_post", "attn_out", "mlp_out"]
    data = attribute(client, target={"type": "logprob", "token": 7}, hook_points=hooks, save_tensors=True)
    ids = tiny_tokenizer.encode(PROMPT)
    expected, metric = autograd_reference(
        reference_model, ids, lambda logits: logits.log_softmax(-1)[7], hooks
    )
    assert data["method"] == "activation_x_gradient"
    assert data["metric"] == pytest.approx(metric, abs=1e-5)
    assert len(data["tokens"]) == len(ids)
    capture = data["activations"]
    for result in data["results"]:
        hook = result["hook_point"]
        for layer, scores, norms in zip(
            result["layers"], result["scores"], result["gradient_norms"], strict=True
        ):
            value, grad = expected[(hook, layer)]
            torch.testing.assert_close(torch.tensor(scores), (value * grad).sum(-1), rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(torch.tensor(norms), grad.norm(dim=-1), rtol=1e-4, atol=1e-6)
            name = f"layers.{layer}.{hook}"
            stored = load(client.get(f"/v1/activations/{capture['id']}/grad.{name}").content)[f"grad.{name}"]
            torch.testing.assert_close(stored, grad, rtol=1e-4, atol=1e-7)
    manifest = client.get(capture["manifest"]).json()
    assert manifest["mode"] == "attribution" and manifest["token_ids"] == ids
    assert {t["kind"] for t in manifest["tensors"]} == {"activation", "gradient", "attribution_scores"}


def test_attribution_patching_uses_the_reference_runs_values(client, tiny_tokenizer, reference_model):
    target = {"type": "logit_diff", "correct": 5, "incorrect": 9}
    data = attribute(client, target=target, reference_prompt=REFERENCE, layers=[1])
    ids, reference_ids = tiny_tokenizer.encode(PROMPT), tiny_tokenizer.encode(REFERENCE)
    metric = lambda logits: logits[5] - logits[9]  # noqa: E731
    expected, value = autograd_reference(reference_model, ids, metric, ["resid_post"])
    reference, reference_value = autograd_reference(reference_model, reference_ids, metric, ["resid_post"])
    assert data["method"] == "attribution_patching"
    assert (data["metric"], data["reference_metric"]) == (
        pytest.approx(value, abs=1e-5),
        pytest.approx(reference_value, abs=1e-5),
    )
    activation, grad = expected[("resid_post", 1)]
    estimate = ((reference[("resid_post", 1)][0] - activation) * grad).sum(-1)
    torch.testing.assert_close(torch.tensor(data["results"][0]["scores"][0]), estimate, rtol=1e-4, atol=1e-6)
    assert data["activations"] is None
    # the last layer's residual at the last position: the linear estimate is exact there up to the
    # head's nonlinearity (the final norm), so it has the sign of the true change
    true_change = reference_value - value
    assert data["results"][0]["scores"][0][-1] * true_change > 0


def test_no_weight_gradient_is_left_behind(client):
    attribute(client, target={"type": "logprob", "token": 3})
    engine = client.app.state.engine
    assert all(p.grad is None and not p.requires_grad for p in engine.loaded.hf_model.parameters())


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"target": {"type": "logprob", "token": "The quick"}}, "target.token"),
        ({"target": {"type": "logit_diff", "correct": 5, "incorrect": 10**7}}, "target.incorrect"),
        ({"target": {"type": "logprob", "token": 1}, "reference_prompt": "The quick"}, "reference_prompt"),
        ({"target": {"type": "logprob", "token": 1}, "layers": [2]}, "layers[0]"),
        ({"target": {"type": "logprob", "token": 1}, "hook_points": ["nowhere"]}, "hook_points[0]"),
        ({"target": {"type": "entropy"}}, "target"),
    ],
)
def test_bad_attribution_requests_are_400s_naming_the_field(client, change, param):
    response = client.post("/v1/attribution", json={"prompt": PROMPT, **change})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
