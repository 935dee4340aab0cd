"""``/tokenize``, ``/detokenize`` (vLLM's shapes) and ``GET /v1/models/{model}``.

The reference for a chat's tokens is the prompt a chat request really ran on: its
``usage.prompt_tokens`` and its trace-mode capture's token ids.
"""

from __future__ import annotations

import pytest

HELLO = [{"role": "user", "content": "Hello there"}]


def test_a_chat_tokenizes_to_the_prompt_a_chat_request_runs_on(client):
    fields = {"messages": HELLO, "chat_template_kwargs": {"unused": 1}}
    tokenized = client.post("/tokenize", json={**fields, "return_token_strs": True}).json()
    chat = client.post(
        "/v1/chat/completions",
        json={
            **fields,
            "max_tokens": 1,
            "capture": {"mode": "trace", "layers": [0], "hook_points": ["resid_post"]},
        },
    ).json()
    manifest = client.get(f"/v1/activations/{chat['activations']['id']}").json()
    assert tokenized["tokens"] == manifest["token_ids"]
    assert tokenized["count"] == chat["usage"]["prompt_tokens"] == len(tokenized["tokens"])
    assert tokenized["max_model_len"] == 256
    tokenizer = client.app.state.engine.loaded.tokenizer
    assert tokenized["token_strs"] == tokenizer.convert_ids_to_tokens(tokenized["tokens"])


def test_prefill_and_generation_prompt_shape_the_tokens(client):
    prefill = [*HELLO, {"role": "assistant", "content": "Hi,"}]
    continued = client.post(
        "/tokenize",
        json={"messages": prefill, "continue_final_message": True, "add_generation_prompt": False},
    ).json()
    tokenizer = client.app.state.engine.loaded.tokenizer
    assert tokenizer.decode(continued["tokens"]).endswith("<|im_start|>assistant\nHi,")
    closed = client.post("/tokenize", json={"messages": HELLO, "add_generation_prompt": False}).json()
    assert tokenizer.decode(closed["tokens"]).endswith("Hello there<|im_end|>\n")


def test_a_prompt_tokenizes_as_completions_do_and_detokenizes_back(client):
    tokenizer = client.app.state.engine.loaded.tokenizer
    text = "The quick brown fox"
    tokenized = client.post("/tokenize", json={"prompt": text}).json()
    assert tokenized["tokens"] == tokenizer.encode(text) and tokenized["token_strs"] is None
    bare = client.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()
    assert bare["tokens"] == tokenizer.encode(text, add_special_tokens=False)
    assert client.post("/detokenize", json={"tokens": bare["tokens"]}).json() == {"prompt": text}
    echoed = client.post("/v1/completions", json={"prompt": text, "max_tokens": 1}).json()
    assert echoed["usage"]["prompt_tokens"] == tokenized["count"]


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/tokenize", {}, "prompt"),
        ("/tokenize", {"prompt": "x", "messages": HELLO}, "prompt"),
        ("/tokenize", {"prompt": "x", "chat_template_kwargs": {"a": 1}}, "chat_template_kwargs"),
        ("/tokenize", {"prompt": "x", "continue_final_message": True}, "continue_final_message"),
        ("/tokenize", {"messages": HELLO, "add_special_tokens": True}, "add_special_tokens"),
        (
            "/tokenize",
            {"messages": HELLO, "tools": [{"type": "function", "function": {"name": "f"}}]},
            "tools",
        ),
        ("/tokenize", {"prompt": "x", "model": "another"}, "model"),
        (
            "/tokenize",
            {
                "messages": [
                    *HELLO,
                    {
                        "role": "assistant",
                        "content": "",
                        "tool_calls": [
                            {
                                "id": "c1",
                                "type": "function",
                                "function": {"name": "get_weather", "arguments": "{}"},
                            }
                        ],
                    },
                ]
            },
            "messages[1]",
        ),  # the plain ChatML template drops an assistant's calls: refused, not lost
        ("/detokenize", {"tokens": [1, 10**9]}, "tokens[1]"),
        ("/detokenize", {"tokens": [-1]}, "tokens[0]"),
        ("/detokenize", {"tokens": "1 2"}, "tokens"),
    ],
)
def test_bad_token_requests_are_4xx_naming_the_field(client, path, body, param):
    response = client.post(path, json=body)
    assert 400 <= response.status_code < 500, response.text
    assert response.json()["error"]["param"] == param


def test_one_model_card_by_its_id_and_404_for_another(client, served_model):
    card = client.get(f"/v1/models/{served_model}")
    assert card.status_code == 200 and card.json() == client.get("/v1/models").json()["data"][0]
    missing = client.get("/v1/models/org/another-model")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_completions_take_add_special_tokens_as_vllm_does(client):
    """With a tokenizer that adds BOS (the tiny one's post-processor is swapped for one that
    does, for this test), a text prompt gets it unless add_special_tokens is false."""
    from tokenizers.processors import TemplateProcessing

    tokenizer = client.app.state.engine.prompt_tokenizer
    bos = tokenizer.bos_token
    saved = tokenizer._tokenizer.post_processor
    tokenizer._tokenizer.post_processor = TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tokenizer.bos_token_id)]
    )
    try:
        body = {"prompt": "The quick brown fox", "max_tokens": 1}
        with_bos = client.post("/v1/completions", json=body).json()["usage"]["prompt_tokens"]
        bare = client.post("/v1/completions", json={**body, "add_special_tokens": False}).json()
    finally:
        tokenizer._tokenizer.post_processor = saved
    assert with_bos == bare["usage"]["prompt_tokens"] + 1
    assert client.get("/v1/models/").status_code == 404  # an empty id names no model
