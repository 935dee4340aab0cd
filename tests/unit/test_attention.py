"""Attention patterns against HF's own ``output_attentions`` with eager attention, on an
independent copy of the model; the served model keeps its own (sdpa) attention throughout."""

from __future__ import annotations

import asyncio

import pytest
import torch
from stored import chat_prompt_ids, stored_tensor

HELLO = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def eager_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager").eval()


def eager_patterns(model, ids: list[int]) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return model(torch.tensor([ids]), output_attentions=True).attentions  # per layer [1, heads, q, k]


def test_trace_mode_patterns_equal_hf_output_attentions(client, tiny_tokenizer, eager_model):
    body = {"messages": HELLO, "max_tokens": 1, "temperature": 0, "capture": {"attention": "all"}}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    ref = response.json()["activations"]
    assert ref["tensors"] == ["attention.layers.0.pattern", "attention.layers.1.pattern"]
    ids = chat_prompt_ids(tiny_tokenizer, HELLO)
    expected = eager_patterns(eager_model, ids)
    for layer in range(2):
        pattern = stored_tensor(client, ref["id"], f"attention.layers.{layer}.pattern")
        assert pattern.shape == (len(ids), 4, len(ids))  # [query, head, key]
        torch.testing.assert_close(pattern, expected[layer][0].transpose(0, 1), rtol=1e-5, atol=1e-6)
    manifest = client.get(ref["manifest"]).json()
    entry = {t["name"]: t for t in manifest["tensors"]}["attention.layers.1.pattern"]
    assert (entry["kind"], entry["layout"], entry["heads"]) == ("attention_pattern", "query, head, key", None)


def test_generate_mode_patterns_cover_each_token_fed_in(client, eager_model):
    body = {
        "messages": HELLO,
        "max_tokens": 5,
        "temperature": 0,
        "ignore_eos": True,
        "capture": {"mode": "generate", "attention": [1], "attention_heads": [3, 1]},
    }
    data = client.post("/v1/chat/completions", json=body).json()
    ref = data["activations"]
    token_ids = client.get(ref["manifest"]).json()["token_ids"]
    pattern = stored_tensor(client, ref["id"], "attention.layers.1.pattern")
    assert pattern.shape == (len(token_ids), 2, len(token_ids))  # keys: prompt + max_tokens
    expected = eager_patterns(eager_model, token_ids)[1][0][[1, 3]].transpose(0, 1)  # heads kept in order
    torch.testing.assert_close(pattern, expected, rtol=1e-5, atol=1e-6)
    assert torch.all(pattern.transpose(0, 1).triu(1) == 0)  # nothing after each query's own position


def test_a_padded_row_in_a_batch_gets_its_solo_pattern(tiny_model_dir, tmp_path, eager_model):
    """Two jobs of different prompt lengths decoded together: the shorter one's left padding
    never shows in its pattern, which equals HF's for its tokens alone."""
    from server.engine.attention import PatternPoint
    from server.engine.capture import CapturePlan, CaptureSpec
    from server.engine.engine import Engine
    from server.engine.job import GenerationJob, SamplingParams
    from server.engine.loading import load_model
    from server.storage import ActivationStore

    loaded = load_model(str(tiny_model_dir))
    store = ActivationStore(tmp_path / "store")
    point = PatternPoint("attention.layers.0.pattern", "model.layers.0.self_attn", 0)
    spec = CaptureSpec(
        CapturePlan(points=(), mode="generate", patterns=(point,), pattern_heads=4), store, "t"
    )
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    short, long = loaded.tokenizer.encode("Count"), loaded.tokenizer.encode("What is the capital of France?")
    engine = Engine(loaded, max_batch_size=4, batch_window_s=0.5)

    async def together():
        return await asyncio.gather(
            *(engine.generate(GenerationJob(p, params, capture=spec)) for p in (short, long))
        )

    try:
        results = asyncio.run(together())
    finally:
        engine.close()
    assert engine.scheduler.stats.largest == 2
    for prompt, result in zip((short, long), results, strict=True):
        ids = prompt + result.choices[0].token_ids
        stored = store.load_tensor(result.capture.id, "attention.layers.0.pattern", "safetensors")
        expected = eager_patterns(eager_model, ids)[0][0].transpose(0, 1)
        torch.testing.assert_close(stored, expected, rtol=1e-5, atol=1e-6)


def test_reading_patterns_leaves_the_answer_unchanged(client):
    body = {"messages": HELLO, "max_tokens": 6, "temperature": 0, "ignore_eos": True, "logprobs": True}
    plain = client.post("/v1/chat/completions", json=body).json()["choices"][0]
    body["capture"] = {"mode": "generate", "attention": "all"}
    tapped = client.post("/v1/chat/completions", json=body).json()["choices"][0]
    assert tapped["message"] == plain["message"]
    assert [t["logprob"] for t in tapped["logprobs"]["content"]] == [
        t["logprob"] for t in plain["logprobs"]["content"]
    ]


@pytest.mark.parametrize(
    ("capture", "param"),
    [
        ({"attention": [4]}, "capture.attention[0]"),
        ({"attention": [0], "attention_heads": [4]}, "capture.attention_heads"),
        ({"attention_heads": [0], "layers": [0], "hook_points": ["resid_post"]}, "capture.attention_heads"),
    ],
)
def test_bad_pattern_requests_name_the_field(client, capture, param):
    response = client.post(
        "/v1/chat/completions", json={"messages": HELLO, "max_tokens": 1, "capture": capture}
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


@pytest.mark.parametrize(
    ("mode", "positions"), [("trace", "last"), ("generate", "prompt"), ("generate", "generated")]
)
def test_only_the_kept_rows_are_computed_and_stored(client, mode, positions):
    """Each kept row equals the same row of an all-positions capture (checked against HF above);
    keys run to the last position a kept row can see."""

    def captured(chosen: str) -> tuple[torch.Tensor, dict]:
        body = {
            "messages": HELLO,
            "max_tokens": 3,
            "temperature": 0,
            "ignore_eos": True,
            "capture": {"mode": mode, "positions": chosen, "attention": [0]},
        }
        data = client.post("/v1/chat/completions", json=body).json()
        ref = data["activations"]
        return stored_tensor(client, ref["id"], "attention.layers.0.pattern"), client.get(
            ref["manifest"]
        ).json()

    pattern, manifest = captured(positions)
    every, _ = captured("all")
    kept = manifest["token_positions"]
    prompt_len = len(client.post("/tokenize", json={"messages": HELLO}).json()["tokens"])
    keys = prompt_len if positions == "prompt" or mode == "trace" else prompt_len + 3
    assert pattern.shape == (len(kept), 4, keys)
    if positions == "last":
        assert kept == [prompt_len - 1]
    else:
        assert kept == [p for p in range(every.shape[0]) if (p < prompt_len) == (positions == "prompt")]
    torch.testing.assert_close(pattern, every[kept][..., :keys], rtol=1e-5, atol=1e-7)
