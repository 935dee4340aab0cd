"""The OpenAI-compatible API on a tiny random model, checked against plain HF references."""

from __future__ import annotations

import asyncio
import logging

import pytest
import torch

HELLO = [{"role": "user", "content": "Hello there"}]


def prompt_ids(tokenizer, messages) -> list[int]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


def reference_greedy(model, tokenizer, ids: list[int], max_new_tokens: int) -> list[int]:
    """Plain HF greedy generation, cut after the first EOS."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )[0, len(ids) :].tolist()
    if tokenizer.eos_token_id in out:
        out = out[: out.index(tokenizer.eos_token_id) + 1]
    return out


def test_health_and_models(client, served_model):
    assert client.get("/health").json()["status"] == "ok"
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    assert models["data"][0]["id"] == served_model
    assert models["data"][0]["max_model_len"] == 256


def test_structure_reports_layers_and_hook_points(client):
    structure = client.get("/v1/model/structure").json()
    assert structure["num_layers"] == 2
    assert structure["hidden_size"] == 64
    assert structure["vocab_size"] == 400
    assert structure["context_length"] == 256
    assert structure["dtype"] == "float32" and structure["device"] == "cpu"
    assert structure["layers_path"] == "model.layers"
    assert structure["hook_points"]["aliases"] == {
        "resid_pre": "input",
        "resid_post": "output",
        "attn_out": "self_attn.output",
        "mlp_out": "mlp.output",
    }
    assert "mlp.down_proj.input" in structure["hook_points"]["per_layer"]
    modules = {m["path"]: m["type"] for m in structure["modules"]}
    assert modules["model.layers.1.mlp"] == "LlamaMLP"
    assert modules["lm_head"] == "Linear"


def test_greedy_chat_equals_hf_generate(openai_client, served_model, tiny_tokenizer, reference_model):
    expected = reference_greedy(reference_model, tiny_tokenizer, prompt_ids(tiny_tokenizer, HELLO), 24)
    response = openai_client.chat.completions.create(
        model=served_model, messages=HELLO, max_tokens=24, temperature=0
    )
    choice = response.choices[0]
    expected_text = tiny_tokenizer.decode(expected, skip_special_tokens=True)
    assert choice.message.content == expected_text
    assert response.usage.completion_tokens == len(expected)
    assert response.usage.prompt_tokens == len(prompt_ids(tiny_tokenizer, HELLO))
    ended_on_eos = expected[-1] == tiny_tokenizer.eos_token_id
    assert choice.finish_reason == ("stop" if ended_on_eos else "length")
    assert response.object == "chat.completion" and response.id.startswith("chatcmpl-")


def manual_greedy_logprobs(model, ids: list[int], steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """Argmax decoding by full forward passes (no cache, no generate): an independent reference."""
    ids = list(ids)
    chosen, rows = [], []
    with torch.no_grad():
        for _ in range(steps):
            row = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), dim=-1)
            token = int(row.argmax())
            chosen.append(token)
            rows.append(row)
            ids.append(token)
    return chosen, rows


def test_logprobs_match_a_plain_forward_pass(openai_client, served_model, tiny_tokenizer, reference_model):
    response = openai_client.chat.completions.create(
        model=served_model,
        messages=HELLO,
        max_tokens=8,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        extra_body={"ignore_eos": True},
    )
    content = response.choices[0].logprobs.content
    tokens, rows = manual_greedy_logprobs(reference_model, prompt_ids(tiny_tokenizer, HELLO), 8)
    assert len(content) == 8
    for entry, token, row in zip(content, tokens, rows, strict=True):
        assert entry.token == tiny_tokenizer.decode([token])
        assert entry.logprob == pytest.approx(row[token].item(), abs=1e-4)
        top = row.topk(3)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)
        assert [t.token for t in entry.top_logprobs] == [tiny_tokenizer.decode([i]) for i in top.indices]
    # `bytes` are each token's raw bytes: joined, they rebuild characters split across tokens.
    joined = b"".join(bytes(entry.bytes) for entry in content)
    assert joined.decode("utf-8", errors="replace") == tiny_tokenizer.decode(tokens)


def test_streamed_text_equals_non_streamed(openai_client, served_model):
    kwargs = dict(model=served_model, messages=HELLO, max_tokens=30, temperature=0)
    whole = openai_client.chat.completions.create(**kwargs)
    chunks = list(
        openai_client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == whole.choices[0].message.content
    assert finish == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_streamed_n_choices_each_end_once(openai_client, served_model):
    chunks = list(
        openai_client.chat.completions.create(
            model=served_model, messages=HELLO, max_tokens=10, n=3, seed=7, stream=True
        )
    )
    whole = openai_client.chat.completions.create(
        model=served_model, messages=HELLO, max_tokens=10, n=3, seed=7
    )
    for index in range(3):
        mine = [c.choices[0] for c in chunks if c.choices[0].index == index]
        assert "".join(c.delta.content or "" for c in mine) == whole.choices[index].message.content
        assert sum(1 for c in mine if c.finish_reason) == 1


def test_seed_reproduces_and_differs(openai_client, served_model):
    def sample(seed):
        response = openai_client.chat.completions.create(
            model=served_model,
            messages=HELLO,
            max_tokens=16,
            n=2,
            seed=seed,
            temperature=1.0,
            extra_body={"ignore_eos": True},
        )
        return [c.message.content for c in response.choices]

    first = sample(1234)
    assert sample(1234) == first
    assert sample(4321) != first
    assert first[0] != first[1]  # n choices are independent samples


def test_top_k_one_is_greedy(openai_client, served_model):
    kwargs = dict(model=served_model, messages=HELLO, max_tokens=12)
    greedy = openai_client.chat.completions.create(**kwargs, temperature=0)
    top1 = openai_client.chat.completions.create(**kwargs, temperature=1.0, seed=5, extra_body={"top_k": 1})
    assert top1.choices[0].message.content == greedy.choices[0].message.content


def test_a_vanishing_temperature_is_greedy(openai_client, served_model):
    kwargs = dict(model=served_model, messages=HELLO, max_tokens=12)
    greedy = openai_client.chat.completions.create(**kwargs, temperature=0)
    tiny = openai_client.chat.completions.create(**kwargs, temperature=1e-40)
    assert tiny.choices[0].message.content == greedy.choices[0].message.content


def test_ignore_eos_and_length_finish(openai_client, served_model):
    response = openai_client.chat.completions.create(
        model=served_model,
        messages=HELLO,
        max_completion_tokens=20,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert response.usage.completion_tokens == 20
    assert response.choices[0].finish_reason == "length"


def test_text_parts_and_developer_role(openai_client, served_model):
    text_parts = [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]
    parts = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": text_parts}]
    plain = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello\nthere"}]
    a = openai_client.chat.completions.create(model=served_model, messages=parts, max_tokens=8, temperature=0)
    b = openai_client.chat.completions.create(model=served_model, messages=plain, max_tokens=8, temperature=0)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage.prompt_tokens == b.usage.prompt_tokens


def test_unknown_fields_are_accepted_and_logged(client, caplog):
    with caplog.at_level(logging.INFO, logger="server.protocol"):
        response = client.post(
            "/v1/chat/completions",
            json={"messages": HELLO, "max_tokens": 2, "parallel_tool_calls": False, "foo": 1},
        )
    assert response.status_code == 200
    assert "foo" in caplog.text and "parallel_tool_calls" not in caplog.text  # in the spec: no effect


def test_chat_template_errors_are_400_naming_messages(tiny_model_dir, settings, tmp_path):
    from server.engine.engine import Engine
    from server.engine.loading import load_model
    from server.errors import APIError
    from server.protocol import ChatCompletionRequest
    from server.serving import ChatServing, ServingParts
    from server.storage import ActivationStore, PresetStore, VectorStore

    engine = Engine(load_model(str(tiny_model_dir), device="cpu"))
    try:
        stores = (ActivationStore(tmp_path), VectorStore(tmp_path / "v"), PresetStore(tmp_path / "p"))
        chat = ChatServing(ServingParts.build(engine, settings, *stores))
        request = ChatCompletionRequest(messages=HELLO)
        engine.prompt_tokenizer.chat_template = "{{ raise_exception('roles must alternate') }}"
        with pytest.raises(APIError) as caught:
            asyncio.run(chat.prepare(request))
        assert caught.value.param == "messages" and "roles must alternate" in caught.value.message
        engine.prompt_tokenizer.chat_template = None
        with pytest.raises(APIError, match="no chat template; use /v1/completions"):
            asyncio.run(chat.prepare(request))
    finally:
        engine.close()
