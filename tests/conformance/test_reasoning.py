"""``--reasoning-parser``: thinking apart from the answer, streamed and not, and marked in captures.

The parser is checked on texts for both conventions and every way of cutting them into
deltas; the server on a tiny Qwen3-shaped model whose tokenizer has ``<think>`` and
``</think>`` as added tokens and a Qwen3-style template written for the tests
(``enable_thinking``). A random model does not think on its own: the answers are steered
into shape with ``logit_bias`` and ``repetition_penalty`` (each forced token wins once, then
the penalty lets the next one win).
"""

from __future__ import annotations

import json

import pytest
from apps import app_client
from families import FAMILIES, build_family_model

from server.serving.reasoning import ReasoningParser

QWEN3, R1 = ReasoningParser("qwen3"), ReasoningParser("deepseek_r1")
TEXTS = {
    # text: (qwen3's split, deepseek_r1's split)
    "<think>Let me see.</think>\n\nParis.": (("Let me see.", "\n\nParis."), ("Let me see.", "\n\nParis.")),
    "Let me see.</think>Paris.": ((None, "Let me see.</think>Paris."), ("Let me see.", "Paris.")),
    "Paris.": ((None, "Paris."), ("Paris.", None)),
    "<think>Still thinking": (("Still thinking", None), ("Still thinking", None)),
    "<think></think>": (("", None), ("", None)),
    "<thin": ((None, "<thin"), ("<thin", None)),
    "a </thi": ((None, "a </thi"), ("a </thi", None)),
    "<think>x</think>y</think>z": (("x", "y</think>z"), ("x", "y</think>z")),
    "": ((None, ""), ("", None)),
}


@pytest.mark.parametrize("text", sorted(TEXTS))
@pytest.mark.parametrize("parser", [QWEN3, R1], ids=["qwen3", "deepseek_r1"])
def test_a_streamed_answer_splits_as_the_whole_answer_does(parser, text):
    assert parser.split(text) == TEXTS[text][parser is R1]
    cuts = [[text[:i], text[i:]] for i in range(len(text) + 1)] + [list(text)]
    for deltas in cuts:
        stream = parser.stream()
        reasoning = content = ""
        for delta in deltas:
            r, c = stream.feed(delta)
            reasoning, content = reasoning + r, content + c
        r, c = stream.finish()
        assert stream.result(reasoning + r, content + c) == parser.split(text), deltas


TEMPLATE = (  # Qwen3's convention, written for the tests
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}"
    "{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}"
    "{% endif %}"
)


@pytest.fixture(scope="module")
def thinking_model(tmp_path_factory):
    """A tiny Qwen3 with <think> and </think> as added (not special) tokens."""
    from tiny_model import build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.add_tokens(["<think>", "</think>"])
    tokenizer.chat_template = TEMPLATE
    return build_family_model(tmp_path_factory.mktemp("thinking-qwen3"), FAMILIES["qwen3"], tokenizer)


def serve(folder, tmp_path_factory, parser: str):
    return app_client(folder, tmp_path_factory.mktemp(parser), reasoning_parser=parser, max_tokens_cap=32)


@pytest.fixture(scope="module")
def qwen3_client(thinking_model, tmp_path_factory):
    with serve(thinking_model, tmp_path_factory, "qwen3") as client:
        yield client


@pytest.fixture(scope="module")
def r1_client(thinking_model, tmp_path_factory):
    with serve(thinking_model, tmp_path_factory, "deepseek_r1") as client:
        yield client


def steered(client) -> dict:
    """A body whose greedy answer is <think>, two words' tokens, </think>, then the model's own."""
    tokenizer = client.app.state.engine.loaded.tokenizer
    vocab = tokenizer.get_vocab()
    order = [
        vocab["<think>"],
        *tokenizer.encode(" quick brown", add_special_tokens=False)[:2],
        vocab["</think>"],
    ]
    bias = {str(token): 40.0 - 10 * i for i, token in enumerate(order)}
    return {"messages": [{"role": "user", "content": "Where is Paris?"}], "max_tokens": 8, "temperature": 0,
            "ignore_eos": True, "logit_bias": bias, "repetition_penalty": 100.0}  # fmt: skip


def thought(client) -> str:
    """The text of the two steered tokens inside the block."""
    tokenizer = client.app.state.engine.loaded.tokenizer
    return tokenizer.decode(tokenizer.encode(" quick brown", add_special_tokens=False)[:2])


def stream_fields(client, body: dict) -> tuple[str, str]:
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
        chunks = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    return "".join(d.get("reasoning_content") or "" for d in deltas), "".join(
        d.get("content") or "" for d in deltas
    )


def test_thinking_comes_apart_from_the_answer(qwen3_client):
    body = steered(qwen3_client)
    answer = qwen3_client.post("/v1/chat/completions", json=body).json()
    message = answer["choices"][0]["message"]
    assert message["reasoning_content"] == thought(qwen3_client)
    assert message["content"] and "<think>" not in message["content"] and "</think>" not in message["content"]
    assert stream_fields(qwen3_client, body) == (message["reasoning_content"], message["content"])


def test_thinking_turned_off_in_the_template_leaves_only_the_answer(qwen3_client):
    body = {**steered(qwen3_client), "logit_bias": None, "repetition_penalty": None,
            "chat_template_kwargs": {"enable_thinking": False}}  # fmt: skip
    message = qwen3_client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]
    assert message["reasoning_content"] is None and message["content"]


def test_a_block_opened_by_the_template_is_reasoning_until_it_closes(r1_client, qwen3_client):
    plain = {**steered(r1_client), "logit_bias": None, "repetition_penalty": None}
    message = r1_client.post("/v1/chat/completions", json=plain).json()["choices"][0]["message"]
    same = qwen3_client.post("/v1/chat/completions", json=plain).json()["choices"][0]["message"]
    assert message["content"] is None and message["reasoning_content"] == same["content"]  # never closed
    assert stream_fields(r1_client, plain) == (message["reasoning_content"], "")


def test_the_capture_manifest_marks_the_reasoning_positions(qwen3_client):
    body = {
        **steered(qwen3_client),
        "capture": {"mode": "generate", "layers": [0], "hook_points": ["resid_post"]},
    }
    answer = qwen3_client.post("/v1/chat/completions", json=body).json()
    manifest = qwen3_client.get(f"/v1/activations/{answer['activations']['id']}").json()
    prompt = answer["usage"]["prompt_tokens"]
    assert manifest["reasoning"] == {
        "parser": "qwen3",
        "positions": [prompt, prompt + 4],
    }  # <think> .. </think>
    tokens = manifest["token_ids"]
    vocab = qwen3_client.app.state.engine.loaded.tokenizer.get_vocab()
    assert tokens[prompt] == vocab["<think>"] and tokens[prompt + 3] == vocab["</think>"]
    assert len(tokens) == prompt + 8  # every position counted, reasoning included


def test_a_constraint_with_a_reasoning_parser_is_refused_by_name(qwen3_client):
    """A grammar would hold the thinking too (deepseek_r1: all of it read as reasoning; qwen3:
    thinking silently off): refused until constraints start after the thinking."""
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
            "response_format": {"type": "json_object"}}  # fmt: skip
    response = qwen3_client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400 and response.json()["error"]["param"] == "response_format"
