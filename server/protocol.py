"""Request and response models of the OpenAI-compatible API.

Requests validate and convert themselves: ``sampling_params()`` turns a
request into the engine's :class:`~server.engine.job.SamplingParams`,
raising :class:`~server.errors.APIError` naming the parameter at fault.
OpenAI's fields come first, in OpenAI's order; our extensions follow in one
block, each with a description. A field of OpenAI's or vLLM's spec that is not
implemented is refused with a 400 naming it (``protocol_fields.py``); fields in
neither spec are accepted (clients send many) and logged once per request.

Validation is strict: JSON types must match (``true`` is not the integer 1,
``"5"`` is not a number), floats must be finite, and text must be valid
Unicode (a lone surrogate escape such as ``"\ud800"`` cannot be tokenized).
"""

from __future__ import annotations

import inspect
import json
import logging
import re
import time
import uuid
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from interventions import InterventionRequest

from .engine.engine import ChatOptions
from .engine.job import SamplingParams
from .errors import APIError
from .protocol_fields import NO_EFFECT, REFUSED, check_refused

logger = logging.getLogger(__name__)

MAX_TOP_LOGPROBS = 20
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 512
GREEDY_BELOW_TEMPERATURE = 1e-5  # dividing logits by less overflows: sample greedily instead
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


def _reserved_template_variables() -> frozenset[str]:
    """What transformers' apply_chat_template takes as its own arguments or sets itself: a
    request sets these through its fields (messages, tools, add_generation_prompt, ...), not
    as template variables."""
    from transformers import PreTrainedTokenizerBase

    own = set(inspect.signature(PreTrainedTokenizerBase.apply_chat_template).parameters)
    return frozenset((own - {"self", "kwargs"}) | {"messages"})


RESERVED_TEMPLATE_VARIABLES = _reserved_template_variables()


_SCALARS = frozenset({int, float, bool, type(None)})


def invalid_unicode_at(value: Any) -> str | None:
    """Where in ``value`` (a string, or lists, dicts and models holding strings, keys included)
    a string is not valid Unicode: JSON's ``\\ud800`` escape decodes to a lone surrogate, which
    no tokenizer, log or UTF-8 response can take. ``""`` for ``value`` itself, ``"[0].content"``
    further in; None when every string is valid. Models of this module checked themselves.
    Numbers are skipped at the cost of a type lookup (a vector of a million takes ~50 ms)."""
    stack: list[tuple[tuple, Any]] = [((), value)]
    while stack:
        where, item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in where)
        elif isinstance(item, dict):
            for key, child in item.items():
                stack.append(((*where, key), key))
                if type(child) not in _SCALARS:
                    stack.append(((*where, key), child))
        elif isinstance(item, (list, tuple)):
            stack.extend(((*where, i), child) for i, child in enumerate(item) if type(child) not in _SCALARS)
        elif isinstance(item, BaseModel) and not isinstance(item, StrictModel):
            fields = {**item.__dict__, **(item.__pydantic_extra__ or {})}
            stack.extend(
                ((*where, name), child) for name, child in fields.items() if type(child) not in _SCALARS
            )
    return None


Text = str  # text a client sends: every request model refuses invalid Unicode in any field
StopString = Annotated[Text, Field(max_length=MAX_STOP_CHARS)]
Bias = Annotated[float, Field(ge=-100, le=100)]
TOKEN_ID = re.compile(r"[0-9]{1,10}")  # a logit_bias key: plain ASCII digits
MAX_TEMPLATE_DEPTH = 16  # nesting of a chat_template_kwargs value


def _depth(value: Any, limit: int = MAX_TEMPLATE_DEPTH + 1) -> int:
    """How deep JSON ``value`` nests (counting stops past ``limit``: no recursion error)."""
    depth, level = 0, [value]
    while level and depth <= limit:
        depth += 1
        level = [
            child
            for item in level
            for child in (item.values() if isinstance(item, dict) else item if isinstance(item, list) else ())
        ]
    return depth


class StrictModel(BaseModel):
    """Base of every request model: strict types, finite numbers, valid Unicode in every string
    (a field that holds a lone surrogate is refused, naming the field; unknown fields too)."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _valid_unicode(cls, value: Any) -> Any:
        where = invalid_unicode_at(value)
        if where is not None:
            at = f" (at {where.lstrip('.')})" if where else ""
            raise ValueError(f"text must be valid Unicode: it holds a lone surrogate escape{at}")
        return value

    @model_validator(mode="after")
    def _valid_unicode_in_unknown_fields(self):
        for name, value in (self.model_extra or {}).items():
            if invalid_unicode_at(name) is not None or invalid_unicode_at(value) is not None:
                raise APIError(
                    "text must be valid Unicode: an unknown field holds a lone surrogate escape",
                    param=name,
                )
        return self


class OpenAIModel(StrictModel):
    """Base for requests: extra fields allowed and logged, never silently used."""

    model_config = ConfigDict(extra="allow")  # strict and finite, as StrictModel

    @model_validator(mode="after")
    def _log_unknown_fields(self):
        unknown = sorted(set(self.model_extra or ()) - set(REFUSED) - set(NO_EFFECT))  # both: by name
        if unknown:
            logger.info("ignoring unknown request fields: %s", ", ".join(unknown))
        return self


class TextContentPart(StrictModel):
    type: Literal["text"]
    text: Text


class FunctionCallIn(StrictModel):
    name: Annotated[Text, Field(max_length=64)]
    arguments: Annotated[Text, Field(max_length=1_000_000)]  # JSON, as the model wrote it


class ToolCallIn(StrictModel):
    """A call an earlier assistant message made (OpenAI's ``message.tool_calls[i]``)."""

    id: Annotated[Text, Field(max_length=200)]
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ChatMessage(OpenAIModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextContentPart] | None = None
    name: str | None = None
    tool_calls: Annotated[list[ToolCallIn], Field(max_length=128)] | None = None  # assistant
    tool_call_id: Annotated[Text, Field(max_length=200)] | None = None  # tool: the call answered

    def template_form(self) -> dict[str, Any]:
        """As chat templates expect it: plain-string content, 'developer' as 'system'; an
        assistant's calls with their arguments as objects (the form transformers documents),
        a tool message with the id of the call it answers."""
        form: dict[str, Any] = {
            "role": "system" if self.role == "developer" else self.role,
            "content": self.text(),
        }
        if self.tool_calls:
            form["tool_calls"] = [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {
                        "name": call.function.name,
                        "arguments": _json_or_text(call.function.arguments),
                    },
                }
                for call in self.tool_calls
            ]
        if self.tool_call_id is not None:
            form["tool_call_id"] = self.tool_call_id
        if self.name is not None and self.role == "tool":
            form["name"] = self.name
        return form

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


class FunctionDefinition(StrictModel):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    description: Annotated[Text, Field(max_length=10_000)] | None = None
    parameters: dict[str, Any] | None = None  # a JSON Schema (object)
    strict: bool | None = None


class Tool(StrictModel):
    """A function the model may call (OpenAI's ``tools[i]``)."""

    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(StrictModel):
    name: Annotated[str, Field(max_length=64)]


class NamedToolChoice(StrictModel):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(StrictModel):
    include_usage: bool = False


class CaptureRequest(StrictModel):
    """What to capture while answering (extension field ``capture``; see docs/capture.md)."""

    layers: list[int] | Literal["all"] | None = Field(
        None, description='Layer indexes (negative counts from the end) or "all" (the default).'
    )
    hook_points: list[Annotated[str, Field(max_length=200)]] | None = Field(
        None,
        max_length=64,
        description="Per-layer: resid_pre, resid_post, attn_out, mlp_out, or <submodule>.input/.output.",
    )
    modules: list[Annotated[str, Field(max_length=300)]] | None = Field(
        None, max_length=256, description="Absolute module paths with .input/.output, e.g. model.norm.output."
    )
    mode: Literal["trace", "generate"] = Field(
        "trace",
        description="trace: one forward over the prompt. generate: the prompt and every generated token.",
    )
    positions: Literal["all", "prompt", "generated", "last"] = "all"
    sample_hidden: int | None = Field(None, ge=1, description="Keep this many hidden units.")
    sample_hidden_method: Literal["random", "first"] = Field(
        "random", description="random: a seeded random subset (indices recorded); first: the first N."
    )
    sample_hidden_seed: int = Field(0, ge=0, lt=2**63)
    dtype: Literal["float32", "float16", "bfloat16"] | None = Field(
        None, description="Storage dtype (default: the model's)."
    )
    format: Literal["safetensors", "npy", "pt"] = "safetensors"
    save_dir: Text | None = Field(
        None, max_length=500, description="A subdirectory of the server's --activations-dir."
    )
    saes: Annotated[list[Annotated[str, Field(max_length=64)]], Field(min_length=1, max_length=16)] | None = (
        Field(
            None,
            description="Loaded SAEs (GET /v1/saes): store each one's top sae_top_k features and its "
            "reconstruction error norm at every position (saes.<name>.indices/.values/.error_norm).",
        )
    )
    sae_top_k: int = Field(16, ge=1, le=1024, description="Features stored per position and SAE.")
    logit_lens: list[int] | Literal["all"] | None = Field(
        None,
        description="Layers whose resid_post goes through the model's final norm and unembedding: "
        "store the top logit_lens_top_k next tokens and logprobs at every position "
        "(logit_lens.layers.<L>.indices/.logprobs).",
    )
    logit_lens_top_k: int = Field(5, ge=1, le=100, description="Tokens stored per position and layer.")
    attention: list[int] | Literal["all"] | None = Field(
        None,
        description="Layers whose attention probabilities to store (attention.layers.<L>.pattern, "
        "[query position, head, key position]), read beside the model's own attention.",
    )
    attention_heads: (
        Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1, max_length=256)] | None
    ) = Field(None, description="Only these heads of each attention pattern (default: all).")


class SaeLoad(StrictModel):
    """Body of ``POST /v1/saes``: serve the SAE in a folder under ``--saes-dir``."""

    name: Annotated[str, Field(min_length=1, max_length=64)]
    folder: Annotated[str, Field(min_length=1, max_length=500)] = Field(
        description="A folder under the server's --saes-dir holding cfg.json and sae_weights.safetensors."
    )


class VectorCreate(StrictModel):
    """POST /v1/vectors: a named vector from numbers or a base64 safetensors file holding one tensor."""

    name: Annotated[str, Field(min_length=1, max_length=100)]
    values: Annotated[list[float], Field(min_length=1, max_length=1_000_000)] | None = None
    safetensors_base64: Annotated[str, Field(max_length=8_000_000)] | None = None
    layer: int | None = Field(None, description="The layer the vector is meant for (checked, recorded).")
    hook_point: Annotated[str, Field(max_length=200)] | None = Field(
        None, description="The hook point it is meant for; its width must equal the vector's size."
    )
    description: Annotated[str, Field(max_length=2000)] | None = None


Messages = Annotated[list[ChatMessage], Field(min_length=1)]  # a conversation: never empty


class ContrastiveCreate(StrictModel):
    """POST /v1/vectors/contrastive: one vector per layer from positive and negative examples."""

    name: Annotated[str, Field(min_length=1, max_length=90)]
    positive: Annotated[list[Text | Messages], Field(min_length=1, max_length=256)]
    negative: Annotated[list[Text | Messages], Field(min_length=1, max_length=256)]
    layers: list[int] | Literal["all"]
    hook_point: Annotated[str, Field(max_length=200)] = "resid_post"
    position: Literal["last", "mean"] = Field("last", description="Each example's last token, or its mean.")
    method: Literal["mean_diff", "pca"] = "mean_diff"


class PresetCreate(StrictModel):
    """POST /v1/interventions/presets: a named list of intervention items."""

    name: Annotated[str, Field(min_length=1, max_length=100)]
    items: Annotated[list[InterventionRequest], Field(min_length=1, max_length=64)]


class ServerCaptureConfig(StrictModel):
    """Server-wide capture settings (``POST /v1/interventions``), for clients of the earlier server.

    When ``enabled``, every chat or completion request that sends no ``capture`` of its own is
    captured with these settings.
    """

    enabled: bool = False
    layers: list[int] | Literal["all"] = "all"
    hook_points: list[Annotated[str, Field(max_length=200)]] = Field(
        default_factory=lambda: ["resid_post"], min_length=1, max_length=64
    )
    mode: Literal["trace", "generate"] = "trace"
    save_dir: Text | None = Field(None, max_length=500, description="Inside --activations-dir.")
    per_request_subdir: bool = Field(
        True, description="Each request's capture in its own directory (the only layout; false is refused)."
    )
    sample_hidden: int | None = Field(None, ge=1)
    save_format: Literal["safetensors", "npy", "pt"] = "safetensors"
    include_metadata_json: bool = Field(True, description="The manifest is always written; false is refused.")

    def for_request(self, overrides: NdifOverrides | None) -> CaptureRequest:
        save_dir = self.save_dir
        if overrides is not None and "save_dir" in overrides.model_fields_set:
            save_dir = overrides.save_dir
        return CaptureRequest(
            layers=self.layers,
            hook_points=self.hook_points,
            mode=self.mode,
            sample_hidden=self.sample_hidden,
            format=self.save_format,
            save_dir=save_dir,
        )


class NdifOverrides(StrictModel):
    """Per-request overrides of the server-wide capture settings (extension field ``ndif``)."""

    save_dir: Text | None = Field(None, max_length=500)
    per_request_subdir: bool = True


class ChatTemplateFields(OpenAIModel):
    """vLLM's chat templating fields (not in the OpenAI API), for chat and ``/tokenize``."""

    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = Field(
        True, description="End the prompt with the header of the assistant's reply (the template's flag)."
    )
    continue_final_message: bool = Field(
        False,
        description="Leave the final (assistant) message open so the reply continues it (prefill); "
        "needs add_generation_prompt false.",
    )
    chat_template_kwargs: Annotated[dict[str, Any], Field(max_length=64)] | None = Field(
        None, description='More variables for the chat template, e.g. {"enable_thinking": false}.'
    )
    tools: Annotated[list[Tool], Field(max_length=128)] | None = Field(
        None, description="Functions the model may call, rendered by the chat template."
    )

    @field_validator("chat_template_kwargs", mode="after")
    @classmethod
    def _no_reserved_template_variables(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and _depth(value) > MAX_TEMPLATE_DEPTH:
            raise ValueError(f"values nest more than {MAX_TEMPLATE_DEPTH} levels deep")
        try:  # keys and values end up in the prompt text: valid Unicode only
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("text must be valid Unicode (it holds a lone surrogate escape)") from None
        for key in value or {}:
            if key in RESERVED_TEMPLATE_VARIABLES:
                raise ValueError(
                    f"{key!r} is set by the server (from messages and the request's own fields), "
                    "not through chat_template_kwargs"
                )
        return value

    def chat_options(self) -> ChatOptions:
        """How to render the messages (vLLM's rules: prefill continues an assistant message)."""
        if self.continue_final_message:
            if self.add_generation_prompt:
                raise APIError(
                    "continue_final_message and add_generation_prompt cannot both be true: send "
                    "add_generation_prompt false to continue the final message",
                    param="add_generation_prompt",
                )
            if self.messages[-1].role != "assistant":
                raise APIError(
                    "continue_final_message continues the final message, which must be the assistant's "
                    f"(it is {self.messages[-1].role!r})",
                    param="continue_final_message",
                )
        return ChatOptions(
            add_generation_prompt=self.add_generation_prompt,
            continue_final_message=self.continue_final_message,
            template_kwargs=dict(self.chat_template_kwargs or {}),
            tools=self.tool_specs(),
        )

    def template_chars(self) -> int:
        """Characters the template variables add to the prompt's text (as JSON)."""
        return len(json.dumps(self.chat_template_kwargs)) if self.chat_template_kwargs else 0

    def template_messages(self) -> list[dict[str, Any]]:
        """Messages as chat templates expect them (``ChatMessage.template_form``)."""
        return [m.template_form() for m in self.messages]

    def tool_specs(self) -> list[dict] | None:
        """``tools`` as the chat template gets them (OpenAI's shape, plain dicts)."""
        return [tool.model_dump(exclude_none=True) for tool in self.tools] if self.tools else None


class JsonSchemaFormat(StrictModel):
    """OpenAI's ``response_format.json_schema``."""

    model_config = ConfigDict(populate_by_name=True)

    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
    description: Text | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="A JSON Schema (object).")
    strict: bool | None = None


class ResponseFormat(StrictModel):
    """OpenAI's ``response_format``: plain text (the default), any JSON object, or JSON that
    follows a schema; the last two are enforced while decoding."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


Choice = Annotated[Text, Field(max_length=1000)]


class StructuredOutputs(StrictModel):
    """vLLM's ``structured_outputs``: exactly one constraint, enforced while decoding."""

    json_: dict[str, Any] | Text | None = Field(None, alias="json", description="A JSON Schema.")
    regex: Annotated[Text, Field(max_length=10_000)] | None = None
    choice: (
        Annotated[list[Annotated[Text, Field(max_length=1000)]], Field(min_length=1, max_length=256)] | None
    ) = None
    grammar: Annotated[Text, Field(max_length=100_000)] | None = Field(None, description="A Lark grammar.")
    json_object: bool | None = None

    model_config = ConfigDict(populate_by_name=True)


def grammar_of(format_: ResponseFormat | None, outputs: StructuredOutputs | None) -> tuple[str, str] | None:
    """(llguidance grammar, the field it came from) for a request's structured output, or None.

    Raises:
        APIError: both fields sent, an empty constraint, or a schema that is not an object.
    """
    from llguidance import LLMatcher

    if format_ is not None and format_.type != "text" and outputs is not None:
        raise APIError("send response_format or structured_outputs, not both", param="structured_outputs")
    if format_ is not None and format_.type == "json_object":
        return schema_grammar({"type": "object"}, "response_format"), "response_format"
    if format_ is not None and format_.type == "json_schema":
        if format_.json_schema is None or format_.json_schema.schema_ is None:
            raise APIError("json_schema needs a schema", param="response_format.json_schema")
        return schema_grammar(
            format_.json_schema.schema_, "response_format.json_schema.schema"
        ), "response_format"
    if outputs is None:
        return None
    given = [
        name for name in ("json_", "regex", "choice", "grammar", "json_object") if getattr(outputs, name)
    ]
    if len(given) != 1:
        raise APIError(
            "structured_outputs takes exactly one of json, regex, choice, grammar, json_object",
            param="structured_outputs",
        )
    if outputs.json_ is not None:
        schema = outputs.json_
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as exc:
                raise APIError(f"json is not JSON: {exc}", param="structured_outputs.json") from None
        return schema_grammar(schema, "structured_outputs.json"), "structured_outputs"
    if outputs.regex is not None:
        return LLMatcher.grammar_from_regex(outputs.regex), "structured_outputs"
    if outputs.choice is not None:
        alternatives = " | ".join(json.dumps(choice) for choice in outputs.choice)  # Lark string literals
        return LLMatcher.grammar_from_lark(f"start: {alternatives}"), "structured_outputs"
    if outputs.grammar is not None:
        return LLMatcher.grammar_from_lark(outputs.grammar), "structured_outputs"
    return schema_grammar({"type": "object"}, "structured_outputs"), "structured_outputs"


# JSON as json.dumps writes it: no whitespace but ", " and ": ". Flexible whitespace lets a
# model pad forever (small models do); a schema's own "x-guidance" options still win.
# oneOf is read as anyOf (pydantic's discriminated unions write oneOf; llguidance cannot check
# exclusivity while decoding).
JSON_LAYOUT = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
    "coerce_one_of": True,
}


def schema_grammar(schema: Any, param: str) -> str:
    """The llguidance grammar of a JSON Schema, laid out as :data:`JSON_LAYOUT` says.

    Raises:
        APIError: naming ``param``, where the schema is not an object or not usable."""
    from llguidance import LLMatcher

    if not isinstance(schema, dict):
        raise APIError("a JSON Schema is a JSON object", param=param)
    try:
        return LLMatcher.grammar_from_json_schema(schema, defaults=JSON_LAYOUT)
    except ValueError as exc:
        raise APIError(f"not a usable JSON Schema: {exc}", param=param) from None


class _SamplingFields(OpenAIModel):
    """Fields chat and completions share, and their conversion to SamplingParams."""

    frequency_penalty: float | None = Field(
        None, ge=-2, le=2, description="Minus this x each token's count in the output so far."
    )
    presence_penalty: float | None = Field(
        None, ge=-2, le=2, description="Minus this for each token that is in the output so far."
    )
    logit_bias: Annotated[dict[str, Bias], Field(max_length=1024)] | None = Field(
        None, description="Token id (as a string) -> a bias added to its logit, -100 to 100."
    )
    n: int = Field(1, ge=1)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2, description="0 means greedy; default 1.")
    top_p: float | None = Field(None, gt=0, le=1)
    user: str | None = None
    # -- extensions (not in the OpenAI API) --
    top_k: int | None = Field(
        None, ge=-1, description="Sample from the k most likely tokens only; 0 or -1: off."
    )
    ignore_eos: bool = Field(
        False, description="Keep generating past the end-of-sequence token until max_tokens."
    )
    repetition_penalty: float | None = Field(
        None,
        ge=0.01,  # symmetric to le: 1e-300 would divide a logit into infinity
        le=100,
        description="Divide (>1: discourage) the logits of tokens already in the "
        "prompt or output (HF's repetition_penalty; 1: off; 0.01 to 100).",
    )
    min_p: float | None = Field(
        None, ge=0, le=1, description="Drop tokens whose probability is below min_p x the top one's (0: off)."
    )
    min_tokens: int | None = Field(
        None, ge=0, description="Generate at least this many tokens before EOS or stop_token_ids."
    )
    stop_token_ids: Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=64)] | None = Field(
        None, description="More token ids that end a choice (finish_reason stop), besides EOS."
    )
    response_format: ResponseFormat | None = Field(
        None, description="text, json_object or json_schema: the last two enforced while decoding."
    )
    structured_outputs: StructuredOutputs | None = Field(
        None, description="vLLM's: one of json (a schema), regex, choice, grammar (Lark), json_object."
    )

    def grammar(self) -> tuple[str, str] | None:
        """(llguidance grammar, the field it came from) of the request's structured output."""
        return grammar_of(self.response_format, self.structured_outputs)

    capture: CaptureRequest | None = Field(
        None, description="Capture activations while answering; the response names the stored tensors."
    )
    ndif: NdifOverrides | None = Field(
        None, description="Overrides save_dir / per_request_subdir of the server-wide capture settings."
    )
    interventions: Annotated[list[InterventionRequest], Field(max_length=64)] | None = Field(
        None, description="Changes to the model's values while it answers (steering, ablation, ...)."
    )
    presets: Annotated[list[Annotated[str, Field(max_length=100)]], Field(max_length=16)] | None = Field(
        None, description="Names of stored intervention presets, applied before `interventions`."
    )

    ENDPOINT: ClassVar[str] = ""  # "chat" or "completions": which fields of protocol_fields.REFUSED apply

    def _check_unsupported(self) -> None:
        check_refused(self.ENDPOINT, self.model_extra or {})

    def _token_ids(self, vocab_size: int) -> tuple[tuple[tuple[int, float], ...], tuple[int, ...]]:
        """``logit_bias`` and ``stop_token_ids`` as ids of this model's logits."""
        bias: dict[int, float] = {}
        for key, value in (self.logit_bias or {}).items():
            if not TOKEN_ID.fullmatch(key) or int(key) >= vocab_size:
                raise APIError(
                    f"logit_bias keys are token ids from 0 to {vocab_size - 1} (got {key[:40]!r})",
                    param="logit_bias",
                )
            if int(key) in bias:
                raise APIError(f"logit_bias names token {int(key)} twice", param="logit_bias")
            bias[int(key)] = value
        for token in self.stop_token_ids or ():
            if token >= vocab_size:
                raise APIError(
                    f"stop_token_ids holds {token}; this model's ids run from 0 to {vocab_size - 1}",
                    param="stop_token_ids",
                )
        return tuple(bias.items()), tuple(dict.fromkeys(self.stop_token_ids or ()))

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def sampling_params(
        self,
        *,
        max_tokens: int,
        logprobs: int | None,
        max_n: int,
        vocab_size: int,
        grammar: str | None = None,
    ) -> SamplingParams:
        """The engine's sampling parameters; ``vocab_size``: the width of the model's logits;
        ``grammar``: the checked grammar of :meth:`grammar`, if any.

        Raises:
            APIError: a refused field, or a value this model or request cannot take.
        """
        self._check_unsupported()
        if grammar is not None:
            constrained = "response_format" if self.response_format is not None else "structured_outputs"
            if self.ignore_eos:
                raise APIError(
                    f"ignore_eos cannot go with {constrained}: a finished structure ends", param="ignore_eos"
                )
            if self.min_tokens:
                raise APIError(f"min_tokens cannot go with {constrained}", param="min_tokens")
        logit_bias, stop_token_ids = self._token_ids(vocab_size)
        if self.min_tokens and self.min_tokens > max_tokens:
            raise APIError(
                f"min_tokens ({self.min_tokens}) is more than max_tokens ({max_tokens})", param="min_tokens"
            )
        if self.n > max_n:
            raise APIError(f"n must be at most {max_n} on this server", param="n")
        if self.stream_options is not None and not self.stream:
            raise APIError("stream_options is only allowed when stream is true", param="stream_options")
        temperature = 1.0 if self.temperature is None else self.temperature
        if temperature < GREEDY_BELOW_TEMPERATURE:
            temperature = 0.0
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=max(self.top_k or 0, 0),
            n=self.n,
            stop=self.stop_strings(),
            seed=None if self.seed is None else self.seed % 2**63,
            logprobs=logprobs,
            ignore_eos=self.ignore_eos,
            logit_bias=logit_bias,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            frequency_penalty=self.frequency_penalty or 0.0,
            presence_penalty=self.presence_penalty or 0.0,
            min_tokens=self.min_tokens or 0,
            min_p=self.min_p or 0.0,
            stop_token_ids=stop_token_ids,
            grammar=grammar,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(ChatTemplateFields, _SamplingFields):
    """POST /v1/chat/completions."""

    ENDPOINT: ClassVar[str] = "chat"
    model: str | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    max_tokens: int | None = Field(
        None, ge=1, description="Deprecated by OpenAI in favour of max_completion_tokens."
    )
    max_completion_tokens: int | None = Field(None, ge=1)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="none, auto (the default with tools), required, or a named function."
    )
    parallel_tool_calls: bool = Field(True, description="Allow more than one call in an answer.")
    # -- vLLM's extra chat field (with --reasoning-parser) --
    include_reasoning: bool = Field(
        True, description="With --reasoning-parser: return reasoning_content (false: only the content)."
    )

    def requested_max_tokens(self) -> tuple[int | None, str]:
        """(value, the name the client used) -- max_completion_tokens wins when both are sent."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"

    def logprobs_k(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError("top_logprobs requires logprobs to be true", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_SamplingFields):
    """POST /v1/completions."""

    ENDPOINT: ClassVar[str] = "completions"

    model: str | None = None
    prompt: Text | list[Text] | list[int] | list[list[int]] = Field(
        description="A string, a list of strings, a list of token ids, or a list of such lists."
    )
    best_of: int | None = Field(None, ge=1)
    echo: bool = Field(False, description="Return the prompt before the completion (with its logprobs).")
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    max_tokens: int | None = Field(
        COMPLETIONS_DEFAULT_MAX_TOKENS,
        ge=0,
        description="Default 16; 0 is allowed with echo: score the prompt only.",
    )
    suffix: str | None = None
    # -- vLLM's extra completions field --
    add_special_tokens: bool = Field(
        True, description="Add the tokenizer's special tokens (e.g. BOS) to a text prompt (vLLM's default)."
    )

    @field_validator("max_tokens", mode="after")
    @classmethod
    def _null_means_default(cls, value: int | None) -> int:
        return COMPLETIONS_DEFAULT_MAX_TOKENS if value is None else value

    def prompts(self) -> list[str | list[int]]:
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if not prompt:
            raise APIError("prompt must not be empty", param="prompt")
        if isinstance(prompt[0], int):
            return [list(prompt)]
        return list(prompt)

    def check_supported(self) -> None:
        if self.max_tokens == 0 and not self.echo:
            raise APIError("max_tokens must be at least 1 unless echo is true", param="max_tokens")
        if self.suffix:
            raise APIError("suffix is not supported by this server", param="suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise APIError("best_of is not supported (only best_of == n)", param="best_of")


class TokenizeRequest(ChatTemplateFields):
    """POST /tokenize (vLLM's shapes): ``prompt`` as text, or ``messages`` rendered exactly as a
    chat request renders them (the chat templating fields apply to ``messages`` only)."""

    model: str | None = None
    prompt: Text | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    add_special_tokens: bool | None = Field(
        None,
        description="prompt: add the tokenizer's special tokens such as BOS (default true); messages: "
        "only false (the chat template holds them)",
    )
    return_token_strs: bool = Field(False, description="Also return each token as the tokenizer spells it.")

    def check(self) -> None:
        """Exactly one of ``prompt`` and ``messages``; the chat fields only with ``messages``.

        Raises:
            APIError: naming the field at fault.
        """
        if (self.prompt is None) == (self.messages is None):
            raise APIError("send exactly one of prompt and messages", param="prompt")
        check_refused("chat" if self.messages is not None else "completions", self.model_extra or {})
        if self.prompt is not None:
            for name in ("add_generation_prompt", "continue_final_message", "chat_template_kwargs"):
                if name in self.model_fields_set:
                    raise APIError(f"{name} applies to messages, not to a prompt", param=name)
        elif self.add_special_tokens:
            raise APIError(
                "add_special_tokens must be false with messages: the chat template holds the special tokens",
                param="add_special_tokens",
            )


class DetokenizeRequest(OpenAIModel):
    """POST /detokenize (vLLM's shape): token ids -> text."""

    model: str | None = None
    tokens: Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=1_000_000)]


# -- responses ----------------------------------------------------------------------


def completion_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    reasoning_content: str | None = None  # with --reasoning-parser: the answer's thinking
    tool_calls: list[dict] | None = None  # [{"id", "type": "function", "function": {"name", "arguments"}}]


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls"]


class ActivationsRef(BaseModel):
    """Where a request's captured activations are (extension)."""

    id: str
    manifest: str  # URL path of the manifest
    directory: str  # relative to the server's --activations-dir
    tensors: list[str]


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    activations: ActivationsRef | None = None
    ndif: ActivationsRef | None = None  # the same object, for clients of the earlier server


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"]


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    activations: ActivationsRef | None = None
    ndif: ActivationsRef | None = None  # the same object, for clients of the earlier server


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "nnsight-server"
    root: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ServerCaptureResponse(BaseModel):
    ok: bool = True
    config: ServerCaptureConfig


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(BaseModel):
    prompt: str


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    model: str


def dump(model: BaseModel) -> dict[str, Any]:
    return model.model_dump(mode="json")
