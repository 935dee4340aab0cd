"""The rule for request fields: every field of OpenAI's chat/completions API (as the official
``openai`` client defines them) and of vLLM's extra parameters works, has no effect by its own
spec, or is refused with a 400 naming it; docs/api.md shows the table the code holds."""

from __future__ import annotations

import logging
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from server.protocol import ChatCompletionRequest, CompletionRequest
from server.protocol_fields import NO_EFFECT, REFUSED

ROOT = Path(__file__).resolve().parents[2]
HELLO = [{"role": "user", "content": "Hello there"}]
BODIES = {
    "chat": ("/v1/chat/completions", {"messages": HELLO}),
    "completions": ("/v1/completions", {"prompt": "Hi"}),
}


def openai_fields(endpoint: str) -> set[str]:
    """The request fields of the installed openai client's types for ``endpoint``."""
    from openai.types import completion_create_params as completions
    from openai.types.chat import completion_create_params as chat

    params = chat if endpoint == "chat" else completions
    return set(typing.get_type_hints(params.CompletionCreateParamsBase)) | {"stream"}


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_every_field_of_openais_api_has_a_state(endpoint):
    model = ChatCompletionRequest if endpoint == "chat" else CompletionRequest
    refused = {name for name, rule in REFUSED.items() if endpoint in rule.endpoints}
    covered = set(model.model_fields) | set(NO_EFFECT) | refused
    assert openai_fields(endpoint) <= covered, openai_fields(endpoint) - covered


# vLLM's extra request fields (vllm/entrypoints/openai protocol, as of vLLM 0.11-0.12), kept
# by hand: vLLM has no client library to read them from.
VLLM_CHAT = {
    "best_of",
    "use_beam_search",
    "top_k",
    "min_p",
    "repetition_penalty",
    "length_penalty",
    "stop_token_ids",
    "include_stop_str_in_output",
    "ignore_eos",
    "min_tokens",
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "truncate_prompt_tokens",
    "prompt_logprobs",
    "allowed_token_ids",
    "bad_words",
    "echo",
    "add_generation_prompt",
    "continue_final_message",
    "add_special_tokens",
    "documents",
    "chat_template",
    "chat_template_kwargs",
    "mm_processor_kwargs",
    "structured_outputs",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "structural_tag",
    "guided_decoding_backend",
    "guided_whitespace_pattern",
    "priority",
    "request_id",
    "logits_processors",
    "return_tokens_as_token_ids",
    "return_token_ids",
    "cache_salt",
    "kv_transfer_params",
    "vllm_xargs",
    "include_reasoning",
    "thinking_token_budget",
}
VLLM_COMPLETIONS = (VLLM_CHAT - {
    "add_generation_prompt", "continue_final_message", "documents", "chat_template", "chat_template_kwargs",
    "echo", "best_of", "include_reasoning", "thinking_token_budget",
}) | {"prompt_embeds", "response_format"}  # fmt: skip


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_every_vllm_extra_field_has_a_state(endpoint):
    model = ChatCompletionRequest if endpoint == "chat" else CompletionRequest
    refused = {name for name, rule in REFUSED.items() if endpoint in rule.endpoints}
    covered = set(model.model_fields) | {n for n, r in NO_EFFECT.items() if endpoint in r.endpoints} | refused
    fields = VLLM_CHAT if endpoint == "chat" else VLLM_COMPLETIONS
    assert fields <= covered, fields - covered


def test_the_docs_table_is_the_codes():
    printed = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "fields_table.py")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.rstrip("\n")
    docs = (ROOT / "docs" / "api.md").read_text()
    start, end = "<!-- fields_table.py: start -->\n", "\n<!-- fields_table.py: end -->"
    assert docs[docs.index(start) + len(start) : docs.index(end)] == printed


CASES = [(name, endpoint) for name, rule in sorted(REFUSED.items()) for endpoint in rule.endpoints]


@pytest.mark.parametrize(("name", "endpoint"), CASES)
def test_a_refused_field_is_a_400_naming_it_unless_its_value_is_what_the_server_does(client, name, endpoint):
    path, body = BODIES[endpoint]
    response = client.post(path, json={**body, "max_tokens": 2, name: "a value this server does not do"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == name and error["code"] == "unsupported_field"
    for accepted in (None, *REFUSED[name].accepted):
        response = client.post(path, json={**body, "max_tokens": 2, name: accepted})
        assert response.status_code == 200, (name, accepted, response.text)


def test_a_refused_value_is_not_taken_for_an_accepted_one_of_another_json_type(client):
    path, body = BODIES["completions"]
    for value in (1, 0):  # true and false are not 1 and 0
        response = client.post(path, json={**body, "max_tokens": 2, "skip_special_tokens": value})
        assert response.status_code == 400, response.text


@pytest.mark.parametrize(
    ("name", "endpoint"),
    [(name, endpoint) for name, rule in sorted(NO_EFFECT.items()) for endpoint in rule.endpoints],
)
def test_a_field_without_effect_is_accepted_quietly(client, caplog, name, endpoint):
    path, body = BODIES[endpoint]
    with caplog.at_level(logging.INFO, logger="server.protocol"):
        response = client.post(
            path, json={**body, "max_tokens": 2, name: {"k": "v"} if name == "metadata" else "x"}
        )
    assert response.status_code == 200, response.text
    assert name not in caplog.text
