"""Tool calls: the model's output read as calls (``--tool-call-parser``), or constrained into them.

* ``tool_choice: "auto"`` with ``--tool-call-parser hermes`` (vLLM's flag and name): the
  answer is free text in which the model may write ``<tool_call>{"name": ..., "arguments":
  {...}}</tool_call>`` blocks, the format Hermes, Qwen2.5 and Qwen3 are trained on. Each
  well-formed block becomes a call; the text around them is the content. A block that is not
  JSON of that shape stays in the content, as written.
* ``tool_choice: "required"`` or a named function (vLLM's approach, independent of the
  model's own format): the answer is constrained while decoding to JSON, for a named
  function its ``parameters`` schema (one call), for ``required`` an array of one or more
  ``{"name", "parameters"}`` objects (one if ``parallel_tool_calls`` is false), and read
  back as calls (:func:`required_schema`, :func:`calls_from_constrained`).

:class:`HermesStream` reads a streamed answer with the same code the whole answer is read
with (:func:`parse_hermes` feeds it everything at once): content deltas go out as they come,
holding back only what may still start a ``<tool_call>``; a call goes out whole when its
block closes. Streamed and unstreamed answers carry the same content and calls.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

TOOL_CALL_PARSERS = ("hermes",)
START, END = "<tool_call>", "</tool_call>"


@dataclass(frozen=True)
class ToolCall:
    """One call: an id (``call_...``), the function's name and its arguments as a JSON string."""

    id: str
    name: str
    arguments: str

    @classmethod
    def of(cls, name: str, arguments: dict) -> ToolCall:
        """A new call (a fresh id) of ``name`` with ``arguments`` (an object: sent as JSON)."""
        text = json.dumps(arguments, ensure_ascii=False)
        return cls(id=f"call_{uuid.uuid4().hex[:24]}", name=name, arguments=text)

    def wire(self, index: int | None = None) -> dict:
        """OpenAI's shape (``index`` set: a streamed ``delta.tool_calls`` entry)."""
        call = {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }
        return call if index is None else {"index": index, **call}


def _read_block(body: str, tool_names: frozenset[str]) -> ToolCall | None:
    """The call a ``<tool_call>`` block holds, or None where it is not one (then it is content)."""
    try:
        data = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str) or data["name"] not in tool_names:
        return None
    arguments = data.get("arguments", data.get("parameters", {}))
    if not isinstance(arguments, dict):
        return None
    return ToolCall.of(data["name"], arguments)


class HermesStream:
    """Reads one answer's text deltas into (content delta, calls completed). ``parallel``
    false: the first call only; later blocks stay content, as written."""

    def __init__(self, tool_names: frozenset[str], parallel: bool = True) -> None:
        self.tool_names = tool_names
        self.parallel = parallel
        self.held = ""  # outside a block: text that may still start "<tool_call>"
        self.block: str | None = None  # inside a block: its text so far
        self.calls = 0

    def feed(self, delta: str) -> tuple[str, list[ToolCall]]:
        text, content, calls = self.held + delta, "", []
        self.held = ""
        while text:
            if self.block is None:
                index = text.find(START)
                if index < 0:
                    keep = _partial_suffix(text, START)
                    content += text[: len(text) - keep]
                    self.held = text[len(text) - keep :]
                    break
                content += text[:index]
                self.block, text = "", text[index + len(START) :]
            else:
                index = (self.block + text).find(END)
                if index < 0:
                    self.block += text
                    break
                joined = self.block + text
                body, text = joined[:index], joined[index + len(END) :]
                self.block = None
                call = _read_block(body.strip(), self.tool_names)
                if call is None or (self.calls and not self.parallel):
                    content += START + body + END
                else:
                    calls.append(call)
                    self.calls += 1
        return content, calls

    def finish(self) -> str:
        """What is left at the end: held text, or an unclosed block, as content."""
        rest = self.held + ("" if self.block is None else START + self.block)
        self.held, self.block = "", None
        return rest


def parse_hermes(
    text: str, tool_names: frozenset[str], parallel: bool = True
) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of a whole answer; content None where only calls remain."""
    stream = HermesStream(tool_names, parallel)
    content, calls = stream.feed(text)
    content += stream.finish()
    return (content if content.strip() or not calls else None), calls


def _partial_suffix(text: str, tag: str) -> int:
    for length in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:length]):
            return length
    return 0


def named_schema(tool: dict) -> dict:
    """The JSON Schema of a named function's arguments (an object, as OpenAI requires)."""
    return tool["function"].get("parameters") or {"type": "object", "properties": {}}


def required_schema(tools: list[dict], parallel: bool) -> dict:
    """``tool_choice: "required"``: an array of one (or, with ``parallel``, more) calls of the
    given functions, each ``{"name": <one of them>, "parameters": <its schema>}`` (vLLM's)."""
    one_of = [
        {
            "type": "object",
            "properties": {"name": {"const": tool["function"]["name"]}, "parameters": named_schema(tool)},
            "required": ["name", "parameters"],
            "additionalProperties": False,
        }
        for tool in tools
    ]
    schema = {"type": "array", "items": {"anyOf": one_of}, "minItems": 1}
    if not parallel:
        schema["maxItems"] = 1
    return schema


def calls_from_constrained(text: str, named: str | None) -> list[ToolCall]:
    """The calls of an answer constrained by :func:`named_schema` (``named``: the function) or
    :func:`required_schema`; none where it was cut short (``max_tokens``) and is not JSON."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return []
    if named is not None:
        return [ToolCall.of(named, data)] if isinstance(data, dict) else []
    return [ToolCall.of(item["name"], item["parameters"]) for item in data]


@dataclass(frozen=True)
class ToolPlan:
    """How a request's answer becomes tool calls: ``mode`` "auto" (parsed from free text) or
    "named"/"required" (constrained by ``grammar``); ``names``: the functions it may call;
    ``named``: the function of a named choice."""

    mode: str
    names: frozenset[str]
    named: str | None = None
    grammar: str | None = None
    parallel: bool = True  # auto: more than one call read from an answer

    def read(self, content: str | None) -> tuple[str | None, list[ToolCall]]:
        """A whole constrained answer's (content, calls): no content beside its calls; a cut
        answer (``max_tokens``, a stop string) keeps its text as content and makes no call."""
        calls = calls_from_constrained(content or "", self.named)
        return (None if calls else content), calls

    def stream(self) -> ToolStream:
        return ToolStream(self)


class ToolStream:
    """One streamed answer's (content delta, calls) as its content deltas come."""

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.hermes = HermesStream(plan.names, plan.parallel) if plan.mode == "auto" else None
        self.buffer = ""  # constrained: the whole answer, read at the end

    def feed(self, delta: str, last: bool) -> tuple[str, list[ToolCall]]:
        if self.hermes is not None:
            content, calls = self.hermes.feed(delta)
            return (content + self.hermes.finish(), calls) if last else (content, calls)
        self.buffer += delta
        if not last:
            return "", []
        content, calls = self.plan.read(self.buffer)
        return content or "", calls
