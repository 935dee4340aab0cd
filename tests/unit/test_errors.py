"""Bad requests: a 4xx in the OpenAI error shape naming the parameter, and the server keeps serving."""

from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest

HELLO = [{"role": "user", "content": "Hello"}]


def post(client, path: str, body: dict):
    """Send JSON as Python's json module writes it (lone surrogates become \\ud800 escapes)."""
    return client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})


def assert_error(response, status: int, param: str | None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    assert error["param"] == param
    return error


BAD_CHAT_BODIES = [
    ({"messages": []}, "messages"),
    ({"messages": "hello"}, "messages"),
    ({"messages": [{"role": "function", "content": "x"}]}, "messages[0].role"),
    (
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        "messages[0].content",
    ),
    ({"messages": HELLO, "max_tokens": -1}, "max_tokens"),
    ({"messages": HELLO, "max_tokens": "ten"}, "max_tokens"),
    ({"messages": HELLO, "max_tokens": 65}, "max_tokens"),  # above the cap of 64
    ({"messages": HELLO, "max_completion_tokens": 10**9}, "max_completion_tokens"),
    ({"messages": HELLO, "temperature": 3}, "temperature"),
    ({"messages": HELLO, "top_p": 0}, "top_p"),
    ({"messages": HELLO, "n": 0}, "n"),
    ({"messages": HELLO, "n": 5}, "n"),  # above max_n of 4
    ({"messages": HELLO, "top_logprobs": 2}, "top_logprobs"),  # without logprobs
    ({"messages": HELLO, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"messages": HELLO, "stop": ["a"] * 17}, "stop"),
    ({"messages": HELLO, "stream_options": {"include_usage": True}}, "stream_options"),
    ({"messages": HELLO, "frequency_penalty": 2.5}, "frequency_penalty"),
    ({"messages": HELLO, "presence_penalty": -3}, "presence_penalty"),
    ({"messages": HELLO, "logit_bias": {"one": 5}}, "logit_bias"),  # keys are token ids
    ({"messages": HELLO, "logit_bias": {"99999": 5}}, "logit_bias"),  # past the vocabulary
    ({"messages": HELLO, "logit_bias": {"1": 101}}, "logit_bias.1"),
    ({"messages": HELLO, "repetition_penalty": 0}, "repetition_penalty"),
    ({"messages": HELLO, "min_p": 1.5}, "min_p"),
    ({"messages": HELLO, "max_tokens": 4, "min_tokens": 5}, "min_tokens"),
    ({"messages": HELLO, "stop_token_ids": [99999]}, "stop_token_ids"),
    ({"messages": HELLO, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"messages": HELLO, "response_format": {"type": "yaml"}}, "response_format.type"),
    ({"messages": HELLO, "seed": 2**70}, "seed"),
    ({"messages": [{"role": "user", "content": "word " * 300}]}, "messages"),  # past the context
    ({"messages": [{"role": "user", "content": "hi \ud800"}]}, "messages[0].content"),  # lone surrogate
    (
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]},
        "messages[0].content",
    ),
    ({"messages": HELLO, "max_tokens": True}, "max_tokens"),  # strict types: a bool is not an integer
    ({"messages": HELLO, "temperature": "0.5"}, "temperature"),
    ({"messages": HELLO, "stop": "x" * 513}, "stop"),
    ({"messages": HELLO, "stop": ["ok", "y" * 513]}, "stop"),
]


@pytest.mark.parametrize(("body", "param"), BAD_CHAT_BODIES)
def test_bad_chat_request_names_the_parameter(client, body, param):
    assert_error(post(client, "/v1/chat/completions", body), 400, param)
    assert client.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 2}).status_code == 200


def test_prompt_plus_max_tokens_past_the_context_window(client, tiny_tokenizer):
    words = 1
    while len(tiny_tokenizer.encode("the " * words)) < 200:  # a prompt that fits, with < 64 to spare
        words += 1
    body = {"messages": [{"role": "user", "content": "the " * words}], "max_tokens": 64}
    error = assert_error(client.post("/v1/chat/completions", json=body), 400, "max_tokens")
    assert error["code"] == "context_length_exceeded"


def test_non_finite_numbers_are_refused(client):
    body = b'{"messages": [{"role": "user", "content": "Hello"}], "temperature": NaN}'
    response = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert_error(response, 400, "temperature")


def test_malformed_json(client):
    response = client.post(
        "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    error = assert_error(response, 400, None)
    assert error["code"] == "invalid_json"


def test_unknown_model_is_404(client):
    error = assert_error(
        client.post("/v1/chat/completions", json={"messages": HELLO, "model": "gpt-9"}), 404, "model"
    )
    assert error["code"] == "model_not_found"


def test_unknown_route_and_method(client):
    assert_error(client.get("/v1/nothing"), 404, None)
    assert_error(client.get("/v1/chat/completions"), 405, None)


BAD_COMPLETION_BODIES = [
    ({}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": [5, 10**6]}, "prompt"),
    ({"prompt": ["ok", ""]}, "prompt[1]"),
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),  # 0 only with echo
    ({"prompt": "hi", "suffix": "x"}, "suffix"),
    ({"prompt": "hi", "best_of": 3}, "best_of"),
    ({"prompt": "hi", "logprobs": 21}, "logprobs"),
    ({"prompt": "hi", "max_tokens": 1000}, "max_tokens"),
    ({"prompt": [True, False]}, "prompt"),
    ({"prompt": "hi \ud800"}, "prompt"),
    ({"prompt": "hi", "logprobs": True}, "logprobs"),
]


@pytest.mark.parametrize(("body", "param"), BAD_COMPLETION_BODIES)
def test_bad_completion_request_names_the_parameter(client, body, param):
    assert_error(post(client, "/v1/completions", body), 400, param)


def test_openai_client_sees_bad_request_then_succeeds(openai_client, served_model):
    with pytest.raises(openai.BadRequestError) as caught:
        openai_client.chat.completions.create(model=served_model, messages=HELLO, max_tokens=10_000)
    assert caught.value.body["param"] == "max_tokens"
    ok = openai_client.chat.completions.create(model=served_model, messages=HELLO, max_tokens=3)
    assert ok.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize(
    "message, expected",
    [
        ("cannot open /etc/ssl/private/key.pem", "cannot open <path>"),
        ("see `/home/u/x` now", "see `<path>` now"),
        ("a,/home/u;b", "a,<path>;b"),
        ("No such file or directory: '/home/John Smith/m'", "No such file or directory: '<path>'"),
        ("path:/etc/passwd and ~/.ssh/id_rsa", "path:<path> and <path>"),
        ("https://huggingface.co/Qwen/x failed", "https://huggingface.co/Qwen/x failed"),
        ("ratio 1/2 and a/b", "ratio 1/2 and a/b"),
        ("the key sk-test-123 was wrong", "the key <redacted> was wrong"),
        ("kept: /srv/acts/act-1/manifest.json", "kept: /srv/acts/act-1/manifest.json"),
        ("kept: '/srv/acts/a b.json'", "kept: '/srv/acts/a b.json'"),
        ("escaped: /srv/acts/../../etc/passwd", "escaped: <path>"),
    ],
)
def test_the_redactor_keeps_secrets_and_outside_paths_from_clients(message, expected):
    from server.errors import Redactor

    assert Redactor(secrets=["sk-test-123"], roots=[Path("/srv/acts")])(message) == expected
