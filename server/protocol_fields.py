"""The rule for fields of OpenAI's API and vLLM's extra parameters this server does not implement.

A field of either spec either works as specified (a field of the request models in
``protocol.py``) or is refused with a 400 naming it: :data:`REFUSED` lists the others, each
with the values that mean what this server does anyway (accepted: a client that sends
``store: false`` or ``skip_special_tokens: true`` gets exactly that) and the reason a client
reads in the error. :data:`NO_EFFECT` lists the fields whose spec gives them no effect on
the answer here (identifiers, hints for caches this server does not have); they are
accepted. Only fields in neither spec are accepted and logged (``OpenAIModel``).
``docs/api.md`` shows the table (``scripts/fields_table.py`` prints it; a test keeps the two
equal).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import APIError


@dataclass(frozen=True)
class NoEffect:
    """A field whose own spec gives it no effect on the answer here (``why``), accepted."""

    why: str
    endpoints: tuple[str, ...] = ("chat", "completions")


@dataclass(frozen=True)
class Refused:
    """A field this server does not implement: ``reason`` for the 400; ``accepted``: values that
    ask for what it does anyway (``None`` always included)."""

    reason: str
    accepted: tuple[Any, ...] = ()
    endpoints: tuple[str, ...] = ("chat", "completions")


NOT_YET = "not supported by this server yet"
GUIDED = "vLLM's guided_* fields are deprecated: send structured_outputs (or response_format)"

REFUSED: dict[str, Refused] = {
    # OpenAI chat/completions
    "audio": Refused("audio output is not supported: this server serves text models"),
    "modalities": Refused("only text output is supported", accepted=(["text"],)),
    "functions": Refused("functions is deprecated: send tools", accepted=([],), endpoints=("chat",)),
    "function_call": Refused("function_call is deprecated: send tool_choice", accepted=("none",),
                             endpoints=("chat",)),
    "prediction": Refused("predicted outputs are not supported", endpoints=("chat",)),
    "reasoning_effort": Refused(
        "reasoning effort is not a setting of open models; control thinking through the chat template "
        '(e.g. chat_template_kwargs: {"enable_thinking": false})',
        endpoints=("chat",),
    ),
    "verbosity": Refused("verbosity is not a setting of open models", endpoints=("chat",)),
    "web_search_options": Refused("web search is not supported", endpoints=("chat",)),
    "moderation": Refused("this server runs no moderation", endpoints=("chat",)),
    "store": Refused("this server stores no completions", accepted=(False,), endpoints=("chat",)),
    "service_tier": Refused("this server has one service tier", accepted=("auto", "default")),
    # vLLM's extra parameters
    "use_beam_search": Refused("beam search is not supported", accepted=(False,)),
    "length_penalty": Refused("it applies to beam search, which is not supported", accepted=(1.0,)),
    "include_stop_str_in_output": Refused("stop strings are never included in the output", accepted=(False,)),
    "skip_special_tokens": Refused("special tokens are always skipped in the output text", accepted=(True,)),
    "spaces_between_special_tokens": Refused("special tokens are always skipped in the output text",
                                             accepted=(True,)),
    "truncate_prompt_tokens": Refused("prompts are never truncated: a prompt past the context is a 400"),
    "prompt_logprobs": Refused("use /v1/completions with echo and logprobs to score a prompt"),
    "allowed_token_ids": Refused(NOT_YET),
    "bad_words": Refused(NOT_YET, accepted=([],)),
    "guided_json": Refused(GUIDED),
    "guided_regex": Refused(GUIDED),
    "guided_choice": Refused(GUIDED),
    "guided_grammar": Refused(GUIDED),
    "guided_decoding_backend": Refused(GUIDED),
    "guided_whitespace_pattern": Refused(GUIDED),
    "structural_tag": Refused(NOT_YET + "; use structured_outputs or response_format"),
    "echo": Refused("echo on chat is not supported (it is on /v1/completions)", accepted=(False,),
                    endpoints=("chat",)),
    "add_special_tokens": Refused(
        "chat prompts are rendered by the template, which holds every special token",
        accepted=(False,),
        endpoints=("chat",),
    ),
    "documents": Refused(NOT_YET, endpoints=("chat",)),
    "chat_template": Refused(
        "clients cannot send templates (they are code): start the server with --chat-template FILE",
        endpoints=("chat",),
    ),
    "mm_processor_kwargs": Refused("this server serves text models"),
    "priority": Refused("requests are served in arrival order", accepted=(0,)),
    "logits_processors": Refused("clients cannot send code"),
    "return_tokens_as_token_ids": Refused(NOT_YET, accepted=(False,)),
    "return_token_ids": Refused(NOT_YET, accepted=(False,)),
    "kv_transfer_params": Refused("disaggregated serving is not supported"),
    "vllm_xargs": Refused(NOT_YET),
    "prompt_embeds": Refused("prompts are text or token ids (prompt embeddings are not accepted)",
                             endpoints=("completions",)),
    "best_of": Refused("beam-style reranking is not supported: chat returns n choices", accepted=(1,),
                       endpoints=("chat",)),
    "thinking_token_budget": Refused(NOT_YET, endpoints=("chat",)),
    "request_id": Refused(NOT_YET + "; send the X-Request-ID header (responses and log lines carry it)"),
}  # fmt: skip

# Fields of either spec that change nothing in the answer here, by their own spec: accepted.
NO_EFFECT: dict[str, NoEffect] = {
    "metadata": NoEffect("OpenAI keeps it with stored completions; this server stores none"),
    "prompt_cache_key": NoEffect("a routing hint for OpenAI's prompt cache"),
    "prompt_cache_options": NoEffect("settings of OpenAI's prompt cache; this server keeps no prompt cache"),
    "prompt_cache_retention": NoEffect("how long OpenAI keeps a cached prompt; this server keeps none"),
    "safety_identifier": NoEffect("an end-user id for OpenAI's abuse monitoring"),
    "cache_salt": NoEffect("vLLM's prefix-cache salt; this server keeps no prefix cache"),
}


def _same(value: Any, accepted: Any) -> bool:
    """JSON equality: ``true`` is not ``1``; ``1`` is ``1.0``."""
    if isinstance(accepted, bool) or isinstance(value, bool):
        return value is accepted
    return value == accepted


def check_refused(endpoint: str, sent: dict[str, Any]) -> None:
    """Raise a 400 naming the first field of ``sent`` (the request's fields outside its model)
    that :data:`REFUSED` lists for ``endpoint`` (``chat`` or ``completions``) with a value
    other than ``None`` or an accepted one.

    Raises:
        APIError: 400 with ``param`` the field, ``code`` ``unsupported_field``.
    """
    for name, value in sent.items():
        rule = REFUSED.get(name)
        if rule is None or endpoint not in rule.endpoints:
            continue
        if value is None or any(_same(value, ok) for ok in rule.accepted):
            continue
        raise APIError(f"{name}: {rule.reason}", param=name, code="unsupported_field")
