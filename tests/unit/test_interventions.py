"""Per-request interventions, checked against plain PyTorch forward hooks on an independent copy."""

from __future__ import annotations

import pytest
import torch
from reference import hooked_greedy

HELLO = [{"role": "user", "content": "Hello there"}]
STEPS = 8


def prompt_ids(tokenizer) -> list[int]:
    text = tokenizer.apply_chat_template(HELLO, add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


def reference_greedy(
    model, ids: list[int], module_path: str, edit, prompt_only_len: int | None = None
) -> list[int]:
    """Greedy decoding by full forward passes, with ``edit`` applied by a plain forward hook."""
    return hooked_greedy(model, ids, module_path, edit, STEPS, prompt_only_len)


def served(client, interventions, **extra) -> dict:
    body = {
        "messages": HELLO,
        "max_tokens": STEPS,
        "temperature": 0,
        "ignore_eos": True,
        "interventions": interventions,
        **extra,
    }
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def text(client, interventions, **extra) -> str:
    return served(client, interventions, **extra)["choices"][0]["message"]["content"]


@pytest.fixture(scope="module")
def direction() -> torch.Tensor:
    generator = torch.Generator().manual_seed(7)
    return torch.randn(64, generator=generator)


def test_add_with_scale_zero_changes_nothing(client, direction):
    plain = text(client, None)
    assert (
        text(
            client,
            [
                {
                    "type": "add",
                    "layer": 0,
                    "hook_point": "resid_post",
                    "vector": direction.tolist(),
                    "scale": 0.0,
                }
            ],
        )
        == plain
    )


CASES = {
    "add": (
        "model.layers.0",
        {"type": "add", "layer": 0, "hook_point": "resid_post", "scale": 2.0},
        lambda h, v: h + 2.0 * v,
    ),
    "ablate": (
        "model.layers.1.mlp",
        {"type": "ablate", "layer": 1, "hook_point": "mlp_out"},
        lambda h, v: torch.zeros_like(h),
    ),
    "ablate_to_mean": (
        "model.layers.1.mlp",
        {"type": "ablate", "layer": -1, "hook_point": "mlp_out", "vector": True},
        lambda h, v: v.expand_as(h),
    ),
    "project_out": (
        "model.layers.0",
        {"type": "project_out", "layer": 0, "hook_point": "resid_post"},
        lambda h, v: h - (h @ (v / v.norm()))[..., None] * (v / v.norm()),
    ),
    "clamp": (
        "model.layers.0",
        {"type": "clamp", "layer": 0, "hook_point": "resid_post", "value": 3.0},
        lambda h, v: h + (3.0 - h @ (v / v.norm()))[..., None] * (v / v.norm()),
    ),
    "scale_attention": (
        "model.layers.0.self_attn",
        {"type": "scale", "layers": [0], "hook_point": "attn_out", "factor": 0.25},
        lambda h, v: h * 0.25,
    ),
    "module_path": (
        "model.layers.1",
        {"type": "add", "module": "model.layers.1.output", "scale": -1.5},
        lambda h, v: h - 1.5 * v,
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_interventions_equal_a_plain_forward_hook(client, tiny_tokenizer, reference_model, direction, case):
    module_path, item, edit = CASES[case]
    item = dict(item)
    if item["type"] in ("add", "project_out", "clamp") or item.pop("vector", False):
        item["vector"] = direction.tolist()
    expected = reference_greedy(
        reference_model, prompt_ids(tiny_tokenizer), module_path, lambda h: edit(h, direction)
    )
    steered = served(client, [item], logprobs=True)
    assert steered["choices"][0]["message"]["content"] == tiny_tokenizer.decode(
        expected, skip_special_tokens=True
    )
    plain = served(client, None, logprobs=True)
    # the intervention really changed the model's distribution (the greedy tokens may survive it)
    first_steered = steered["choices"][0]["logprobs"]["content"][0]["logprob"]
    first_plain = plain["choices"][0]["logprobs"]["content"][0]["logprob"]
    assert first_steered != first_plain


def test_prompt_positions_only(client, tiny_tokenizer, reference_model, direction):
    ids = prompt_ids(tiny_tokenizer)
    expected = reference_greedy(
        reference_model, ids, "model.layers.0", lambda h: h + 3 * direction, prompt_only_len=len(ids)
    )
    got = text(
        client,
        [
            {
                "type": "add",
                "layer": 0,
                "hook_point": "resid_post",
                "vector": direction.tolist(),
                "scale": 3.0,
                "positions": "prompt",
            }
        ],
    )
    assert got == tiny_tokenizer.decode(expected, skip_special_tokens=True)


def test_interventions_do_not_leak_into_the_next_request(client, direction):
    plain = text(client, None)
    steered = text(
        client,
        [{"type": "add", "layer": 0, "hook_point": "resid_post", "vector": direction.tolist(), "scale": 4.0}],
    )
    assert steered != plain
    assert text(client, None) == plain


def test_streamed_steered_answer_equals_the_non_streamed_one(client, direction):
    item = [
        {"type": "add", "layer": 0, "hook_point": "resid_post", "vector": direction.tolist(), "scale": 2.0}
    ]
    whole = text(client, item)
    body = {
        "messages": HELLO,
        "max_tokens": STEPS,
        "temperature": 0,
        "ignore_eos": True,
        "interventions": item,
        "stream": True,
    }
    import json

    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        chunks = [
            json.loads(line[6:])
            for line in response.iter_lines()
            if line.startswith("data: ") and line != "data: [DONE]"
        ]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == whole


@pytest.mark.parametrize("mode", ["trace", "generate"])
def test_capture_records_values_after_the_interventions(client, direction, mode):
    from safetensors.torch import load

    capture = {"mode": mode, "layers": [0], "hook_points": ["resid_post"]}
    add = [
        {
            "type": "add",
            "layer": 0,
            "hook_point": "resid_post",
            "vector": direction.tolist(),
            "scale": 0.5,
            "positions": "prompt",
        }
    ]
    plain = served(client, None, capture=capture)
    steered = served(client, add, capture=capture)

    def stored(data):
        raw = client.get(f"/v1/activations/{data['activations']['id']}/layers.0.resid_post").content
        return load(raw)["layers.0.resid_post"]

    n_prompt = steered["usage"]["prompt_tokens"]  # the edit touched the prompt positions only
    before, after = stored(plain)[:n_prompt], stored(steered)[:n_prompt]
    assert after.shape[0] == n_prompt
    torch.testing.assert_close(after, before + 0.5 * direction)


@pytest.mark.parametrize(
    ("item", "param"),
    [
        ({"type": "steer", "layer": 0, "hook_point": "resid_post"}, "interventions[0].type"),
        ({"type": "scale", "layer": 5, "hook_point": "resid_post", "factor": 2.0}, "interventions[0].layer"),
        (
            {"type": "scale", "layer": 0, "hook_point": "resid_mid", "factor": 2.0},
            "interventions[0].hook_point",
        ),
        ({"type": "scale", "module": "model.nowhere.output", "factor": 2.0}, "interventions[0].module"),
        (
            {"type": "add", "layer": 0, "hook_point": "resid_post", "vector": [1.0, 2.0]},
            "interventions[0].vector",
        ),
        ({"type": "add", "layer": 0, "hook_point": "resid_post"}, "interventions[0].vector"),
        (
            {"type": "project_out", "layer": 0, "hook_point": "resid_post", "vector": [0.0] * 64},
            "interventions[0].vector",
        ),
        ({"type": "scale", "layer": 0, "hook_point": "resid_post"}, "interventions[0].factor"),
        ({"type": "scale", "hook_point": "resid_post", "factor": 2.0}, "interventions[0].layer"),
        (
            {
                "type": "scale",
                "layer": 0,
                "hook_point": "resid_post",
                "module": "model.norm.output",
                "factor": 2.0,
            },
            "interventions[0]",
        ),
    ],
)
def test_bad_interventions_name_the_field(client, item, param):
    response = client.post("/v1/chat/completions", json={"messages": HELLO, "interventions": [item]})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_non_finite_vectors_are_refused(client):
    body = (
        b'{"messages": [{"role": "user", "content": "Hi"}], "interventions": [{"type": "add", "layer": 0, '
        b'"hook_point": "resid_post", "vector": [NaN]}]}'
    )
    response = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["param"].startswith("interventions[0].vector")


def test_scale_by_zero_is_applied(client, tiny_tokenizer, reference_model):
    expected = reference_greedy(
        reference_model, prompt_ids(tiny_tokenizer), "model.layers.0.mlp", lambda h: h * 0
    )
    got = text(client, [{"type": "scale", "layer": 0, "hook_point": "mlp_out", "factor": 0}])
    assert got == tiny_tokenizer.decode(expected, skip_special_tokens=True)


@pytest.mark.parametrize(
    ("item", "param"),
    [
        ({"type": "scale", "module": "model.embed_tokens.input", "factor": 2.0}, "interventions[0].module"),
        (
            {"type": "scale", "layer": 0, "hook_point": "resid_post", "factor": 2.0, "steps": [3, 1]},
            "interventions[0]",
        ),
        (
            {"type": "scale", "layer": 0, "hook_point": "resid_post", "factor": 2.0, "positions": [-1]},
            "interventions[0].positions",
        ),
    ],
)
def test_more_refusals(client, item, param):
    response = client.post("/v1/chat/completions", json={"messages": HELLO, "interventions": [item]})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


# -- values past the dtype ---------------------------------------------------------------

OVERFLOW = [{"type": "scale", "module": "lm_head.output", "factor": 3e38}]  # finite, but the logits overflow


@pytest.mark.parametrize("sampling", [{"temperature": 0, "logprobs": True}, {"temperature": 1.0, "seed": 3}])
def test_an_intervention_that_overflows_is_a_400_naming_interventions(client, sampling):
    body = {"messages": HELLO, "max_tokens": 3, "interventions": OVERFLOW, **sampling}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "interventions" and error["code"] == "non_finite_values"
    assert "generated token 0" in error["message"] and "scale at lm_head.output" in error["message"]
    assert text(client, []) != ""  # the server keeps serving


def test_logits_that_overflow_only_once_warped_are_a_400_not_a_500(client):
    """Edited logits that are finite (about 1e36) but overflow when divided by a small
    temperature: the sampler reports the row instead of torch.multinomial raising."""
    scaled = [{"type": "scale", "module": "lm_head.output", "factor": 1e35}]
    body = {"messages": HELLO, "max_tokens": 3, "interventions": scaled, "temperature": 1e-3, "seed": 1}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "interventions" and error["code"] == "non_finite_values"


def test_a_stream_that_overflows_ends_with_one_valid_error_event(client):
    import json

    body = {"messages": HELLO, "max_tokens": 3, "logprobs": True, "stream": True, "interventions": OVERFLOW}
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"

    def strict(constant):  # JSON has no NaN or Infinity; Python's parser would take them
        raise ValueError(f"not JSON: {constant}")

    parsed = [json.loads(e, parse_constant=strict) for e in events[:-1]]
    assert parsed[-1]["error"]["param"] == "interventions"


def test_lda_that_overflows_names_the_before_sides_interventions(client):
    body = {"prompt": "Hello", "before": {"interventions": OVERFLOW}, "alpha": 1.0, "max_tokens": 2}
    response = client.post("/v1/lda", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "before.interventions"


@pytest.mark.parametrize(
    ("item", "param"),
    [
        (
            {"type": "add", "layer": 0, "hook_point": "resid_post", "vector": [0.0] * 64, "value": 2.0},
            "value",
        ),
        (
            {"type": "scale", "layer": 0, "hook_point": "resid_post", "factor": 2.0, "vector": [1.0] * 64},
            "vector",
        ),
        (
            {"type": "clamp", "layer": 0, "hook_point": "resid_post", "vector": [1.0] * 64, "factor": 3.0},
            "factor",
        ),
        ({"type": "ablate", "layer": 0, "hook_point": "resid_post", "scale": 2.0}, "scale"),
        (
            {
                "type": "patch",
                "layer": 0,
                "hook_point": "resid_post",
                "activation_id": "act-x",
                "tensor": "t",
                "value": 1.0,
            },
            "value",
        ),
    ],
)
def test_a_field_the_operation_does_not_use_is_refused_unless_at_its_default(client, item, param):
    body = {"messages": HELLO, "max_tokens": 1, "interventions": [item]}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == f"interventions[0].{param}"
    at_default = {**item, param: {"value": 0.0, "vector": None, "factor": None, "scale": 1.0}[param]}
    if item["type"] != "patch":  # (its activation id is made up)
        ok = client.post("/v1/chat/completions", json={**body, "interventions": [at_default]})
        assert ok.status_code == 200, ok.text
