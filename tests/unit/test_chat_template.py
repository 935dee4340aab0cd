"""Chat templating as vLLM's clients drive it: prefill (``continue_final_message``),
``add_generation_prompt``, ``chat_template_kwargs`` and the server's ``--chat-template``.

The reference for each rendered prompt is written out by hand in the tiny model's ChatML
format (``tests/tiny_model.py``), not rendered by transformers: the served answer must
equal plain HF greedy decoding of those hand-made token ids.
"""

from __future__ import annotations

import pytest
import torch
from apps import app_client

PREFILL = [
    {"role": "user", "content": "Count to three, comma-separated."},
    {"role": "assistant", "content": "1, 2,"},
]
MAX_TOKENS = 6


def greedy_after(model, tokenizer, text: str) -> tuple[int, list[int]]:
    """(prompt tokens, HF greedy continuation) of ``text`` encoded as is."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=MAX_TOKENS,
                             min_new_tokens=MAX_TOKENS, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    return len(ids), out[0, len(ids) :].tolist()


def served(client, **body) -> dict:
    request = {"max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True, "logprobs": True, **body}
    response = client.post("/v1/chat/completions", json=request)
    assert response.status_code == 200, response.text
    return response.json()


def token_ids(client, answer: dict) -> list[int]:
    """The answer's tokens, from the raw bytes its logprobs carry."""
    engine = client.app.state.engine
    by_bytes = {bytes(engine.token_bytes(i)): i for i in reversed(range(len(engine.loaded.tokenizer)))}
    return [by_bytes[bytes(entry["bytes"])] for entry in answer["choices"][0]["logprobs"]["content"]]


def test_a_prefilled_assistant_message_is_continued_not_answered(client, tiny_tokenizer, reference_model):
    """vLLM's convention: the reply continues "1, 2," inside the open assistant message."""
    answer = served(client, messages=PREFILL, continue_final_message=True, add_generation_prompt=False)
    expected_text = (
        "<|im_start|>user\nCount to three, comma-separated.<|im_end|>\n<|im_start|>assistant\n1, 2,"
    )
    prompt_tokens, expected = greedy_after(reference_model, tiny_tokenizer, expected_text)
    assert answer["usage"]["prompt_tokens"] == prompt_tokens
    assert token_ids(client, answer) == expected
    new_turn = served(client, messages=PREFILL)  # the default: a new assistant turn after it
    assert new_turn["usage"]["prompt_tokens"] > prompt_tokens


def test_without_the_generation_prompt_the_conversation_ends_after_the_last_message(
    client, tiny_tokenizer, reference_model
):
    messages = [{"role": "user", "content": "Hello there"}]
    answer = served(client, messages=messages, add_generation_prompt=False)
    prompt_tokens, expected = greedy_after(
        reference_model, tiny_tokenizer, "<|im_start|>user\nHello there<|im_end|>\n"
    )
    assert answer["usage"]["prompt_tokens"] == prompt_tokens
    assert token_ids(client, answer) == expected


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"continue_final_message": True}, "add_generation_prompt"),  # both true
        ({"continue_final_message": True, "add_generation_prompt": False,
          "messages": [{"role": "user", "content": "Hi"}]}, "continue_final_message"),  # not an assistant's
        ({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs"),  # set by the server
        ({"chat_template_kwargs": {"add_generation_prompt": False}}, "chat_template_kwargs"),
        ({"chat_template_kwargs": ["enable_thinking"]}, "chat_template_kwargs"),
        ({"chat_template": "{{ messages }}"}, "chat_template"),  # clients never send code
    ],
)  # fmt: skip
def test_template_fields_that_cannot_work_are_400_naming_them(client, body, param):
    response = client.post("/v1/chat/completions", json={"messages": PREFILL, "max_tokens": 2, **body})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


TEMPLATE = (  # ChatML with an optional variable, as Qwen3's enable_thinking
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if mood is defined %}{{ 'Mood: ' + mood + '\\n' }}{% endif %}{% endif %}"
)


@pytest.fixture(scope="module")
def templated_client(tiny_model_dir, tmp_path_factory):
    """A server started with --chat-template FILE."""
    folder = tmp_path_factory.mktemp("templated")
    (folder / "template.jinja").write_text(TEMPLATE)
    with app_client(
        tiny_model_dir, folder, chat_template=folder / "template.jinja", max_tokens_cap=16
    ) as client:
        yield client


def test_the_servers_template_and_every_template_variable_reach_the_prompt(
    templated_client, tiny_tokenizer, reference_model
):
    messages = [{"role": "user", "content": "Hello there"}]
    answer = served(templated_client, messages=messages, chat_template_kwargs={"mood": "calm"})
    expected_text = "<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\nMood: calm\n"
    prompt_tokens, expected = greedy_after(reference_model, tiny_tokenizer, expected_text)
    assert answer["usage"]["prompt_tokens"] == prompt_tokens
    assert token_ids(templated_client, answer) == expected
    without = served(templated_client, messages=messages)
    assert without["usage"]["prompt_tokens"] < prompt_tokens


def test_a_template_variable_the_template_cannot_use_is_400(templated_client):
    body = {
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 2,
        "chat_template_kwargs": {"mood": 3},
    }
    response = templated_client.post("/v1/chat/completions", json=body)  # 'Mood: ' + 3 fails in Jinja
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "chat_template_kwargs"


def test_a_chat_template_file_that_is_not_jinja_is_refused_before_loading(tmp_path, tiny_model_dir):
    from server.__main__ import StartupRefused, preflight
    from server.config import Settings

    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for message in messages %}")
    for path, reason in ((bad, "not a Jinja template"), (tmp_path / "missing.jinja", "cannot read it")):
        with pytest.raises(StartupRefused, match=reason):
            preflight(Settings(model=str(tiny_model_dir), chat_template=path), check_port=False)


def test_template_variables_must_be_valid_unicode(client):
    import json

    body = {"messages": PREFILL[:1], "max_tokens": 2, "chat_template_kwargs": {"mood": "calm \ud800"}}
    response = client.post(  # sent as JSON escapes: "\ud800" is valid JSON, but no Unicode text
        "/v1/chat/completions", content=json.dumps(body), headers={"content-type": "application/json"}
    )
    assert response.status_code == 400 and response.json()["error"]["param"] == "chat_template_kwargs"
