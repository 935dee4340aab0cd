"""Tool calling as agents and rollout frameworks drive it: ``tools``, ``tool_choice`` (auto,
required, named), ``parallel_tool_calls``, ``--tool-call-parser hermes``, tool results fed
back, through the official ``openai`` client.

On a tiny Qwen3 whose tokenizer has ``<tool_call>``/``</tool_call>`` as added tokens and a
Qwen-style template written for the tests (it renders tools, calls and results). A random
model does not call tools on its own: ``required`` and named choices are enforced while
decoding (that is the feature), and ``auto`` is shown a call by constraining the text to one
in the model's own format with a regex. The parser is checked on texts for every way of
cutting them into deltas.
"""

from __future__ import annotations

import json

import pytest
from apps import app_client
from families import FAMILIES, build_family_model

from server.serving.tools import HermesStream, parse_hermes

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"enum": ["Paris", "Rome"]}, "celsius": {"type": "boolean"}},
            "required": ["city", "celsius"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"enum": ["UTC", "CET"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}  # fmt: skip
NAMES = frozenset({"get_weather", "get_time"})
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]

TEXTS = {
    # text: (content, [(name, arguments)])
    'Sure.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>': (
        "Sure.", [("get_weather", {"city": "Paris"})]),
    '<tool_call>{"name": "get_time", "arguments": {"zone": "UTC"}}</tool_call>'
    '<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>': (
        None, [("get_time", {"zone": "UTC"}), ("get_weather", {"city": "Rome"})]),
    "No tools needed.": ("No tools needed.", []),
    '<tool_call>{"name": "unknown", "arguments": {}}</tool_call>': (
        '<tool_call>{"name": "unknown", "arguments": {}}</tool_call>', []),  # not a listed function
    "<tool_call>not json</tool_call> then text": ("<tool_call>not json</tool_call> then text", []),
    '<tool_call>{"name": "get_time", "arguments": {"zone"': (  # unclosed: content, as written
        '<tool_call>{"name": "get_time", "arguments": {"zone"', []),
    "a <tool_c": ("a <tool_c", []),
}  # fmt: skip


@pytest.mark.parametrize("text", sorted(TEXTS))
def test_hermes_blocks_read_the_same_streamed_or_whole(text):
    content, calls = TEXTS[text]
    whole_content, whole_calls = parse_hermes(text, NAMES)
    assert whole_content == content
    assert [(c.name, json.loads(c.arguments)) for c in whole_calls] == calls
    for deltas in [[text[:i], text[i:]] for i in range(len(text) + 1)] + [list(text)]:
        stream = HermesStream(NAMES)
        streamed, found = "", []
        for delta in deltas:
            piece, more = stream.feed(delta)
            streamed, found = streamed + piece, found + more
        streamed += stream.finish()
        assert streamed == (content or "") or (content is None and not streamed.strip())
        assert [(c.name, json.loads(c.arguments)) for c in found] == calls


TEMPLATE = (  # Qwen's tool format, written for the tests (tools by name: the tiny context is 256)
    "{% if tools %}<|im_start|>system\nTools:\n{% for tool in tools %}{{ tool.function.name }}\n{% endfor %}"
    "<|im_end|>\n{% endif %}"
    "{% for message in messages %}"
    "{% if message.role == 'tool' %}<|im_start|>tool\n{{ message.content }}<|im_end|>\n"
    "{% elif message.tool_calls %}<|im_start|>assistant\n{% for call in message.tool_calls %}<tool_call>\n"
    "{{ {'name': call.function.name, 'arguments': call.function.arguments} | tojson }}\n</tool_call>"
    "{% endfor %}<|im_end|>\n"
    "{% else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from tiny_model import build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.add_tokens(["<tool_call>", "</tool_call>"])
    tokenizer.chat_template = TEMPLATE
    folder = build_family_model(tmp_path_factory.mktemp("tools-qwen3"), FAMILIES["qwen3"], tokenizer)
    work = tmp_path_factory.mktemp("tools-server")
    with app_client(folder, work, tool_call_parser="hermes", max_tokens_cap=120) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def openai_client(client):
    import openai

    return openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client, max_retries=0)


def answer(client, **body) -> dict:
    response = client.post("/v1/chat/completions", json={"messages": ASK, "max_tokens": 100, **body})
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]


def arguments_follow(call: dict) -> bool:
    arguments = json.loads(call["function"]["arguments"])
    if call["function"]["name"] == "get_weather":
        return arguments["city"] in ("Paris", "Rome") and isinstance(arguments["celsius"], bool)
    return arguments["zone"] in ("UTC", "CET")


@pytest.mark.parametrize("seed", range(5))
def test_a_named_choice_calls_that_function_with_valid_arguments(client, seed):
    choice = answer(client, tools=[WEATHER, TIME], temperature=1.0, seed=seed,
                    tool_choice={"type": "function", "function": {"name": "get_weather"}})  # fmt: skip
    # a named function's call ends with "stop", as OpenAI and vLLM say (not "tool_calls")
    assert choice["finish_reason"] == "stop" and choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert (
        call["function"]["name"] == "get_weather"
        and call["id"].startswith("call_")
        and arguments_follow(call)
    )


@pytest.mark.parametrize("parallel", [False, True])
def test_required_makes_at_least_one_call_and_one_without_parallel_calls(client, parallel):
    """Every answer that ends on its own is calls; with parallel calls the random model may
    go on listing them until max_tokens (then it has no calls, its content the cut JSON)."""
    ended = 0
    for seed in range(5):
        choice = answer(client, tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=parallel,
                        temperature=1.0, seed=seed)  # fmt: skip
        calls = choice["message"]["tool_calls"]
        if choice["finish_reason"] == "length" and parallel:
            assert calls is None and choice["message"]["content"].startswith("[")
            continue
        ended += 1
        assert choice["finish_reason"] == "tool_calls" and calls and all(arguments_follow(c) for c in calls)
        assert len(calls) == 1 or parallel
    assert ended


# One call in Hermes' format, as a Lark grammar (<tool_call> is one added token: llguidance
# names such tokens in angle brackets)
HERMES_CALL = (
    'start: <tool_call> "\\n{\\"name\\": \\"get_time\\", \\"arguments\\": '
    '{\\"zone\\": \\"" ZONE "\\"}}\\n" </tool_call>\n'
    'ZONE: "UTC" | "CET"'
)


def test_auto_reads_the_models_own_call_format(client):
    """The text is constrained (a grammar) to one call in Hermes' format; the parser reads it."""
    choice = answer(client, tools=[WEATHER, TIME], temperature=0, structured_outputs={"grammar": HERMES_CALL})
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "get_time" and arguments_follow(call)


@pytest.mark.parametrize(
    "fields",
    [{"tool_choice": "required"}, {"structured_outputs": {"grammar": HERMES_CALL}}],
    ids=["required", "auto"],
)
def test_streamed_calls_are_the_unstreamed_ones(client, fields):
    body = {"messages": ASK, "max_tokens": 100, "tools": [WEATHER, TIME], "temperature": 0, **fields}
    whole = client.post("/v1/chat/completions", json=body).json()["choices"][0]
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
        chunks = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    streamed = [call for d in deltas for call in d.get("tool_calls", [])]
    assert [c["index"] for c in streamed] == list(range(len(streamed)))
    pairs = [(c["function"]["name"], c["function"]["arguments"]) for c in streamed]
    assert pairs == [
        (c["function"]["name"], c["function"]["arguments"]) for c in whole["message"]["tool_calls"]
    ]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert not "".join(d.get("content") or "" for d in deltas).strip()


def test_an_agent_loop_with_the_official_client(openai_client, client):
    """Call, feed the result back as a tool message, and get the next answer; the result
    reaches the prompt through the template."""
    model = openai_client.models.list().data[0].id
    first = openai_client.chat.completions.create(
        model=model, messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=80, temperature=0
    )
    message = first.choices[0].message
    (call,) = message.tool_calls  # parsed into the client's own types
    assert call.function.name == "get_weather" and json.loads(call.function.arguments)["city"] in (
        "Paris",
        "Rome",
    )
    history = [*ASK, message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 24 degrees."}]  # fmt: skip
    tokenized = client.post("/tokenize", json={"messages": history, "tools": [WEATHER]}).json()
    text = client.app.state.engine.loaded.tokenizer.decode(tokenized["tokens"])
    assert "Sunny, 24 degrees." in text and '"get_weather"' in text
    second = openai_client.chat.completions.create(
        model=model, messages=history, tools=[WEATHER], tool_choice="none", max_tokens=8, temperature=0
    )
    assert second.choices[0].message.tool_calls is None and second.choices[0].finish_reason == "length"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"tool_choice": "required"}, "tool_choice"),  # no tools
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
        ),
        (
            {"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
            "tool_choice",
        ),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
        ({"tools": [WEATHER], "functions": [WEATHER["function"]]}, "functions"),
        (
            {
                "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}],
                "tool_choice": "required",
            },
            "tools[0].function.parameters",
        ),
    ],
)
def test_tool_fields_that_cannot_work_are_400_naming_them(client, body, param):
    response = client.post("/v1/chat/completions", json={"messages": ASK, "max_tokens": 4, **body})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_auto_needs_a_parser(client, monkeypatch):
    monkeypatch.setattr(client.app.state.chat, "tool_call_parser", None)
    response = client.post(
        "/v1/chat/completions", json={"messages": ASK, "max_tokens": 4, "tools": [WEATHER]}
    )
    assert response.status_code == 400 and response.json()["error"]["param"] == "tool_choice"
    assert "--tool-call-parser" in response.json()["error"]["message"]


def test_parallel_tool_calls_false_reads_the_first_call_only():
    text = ('<tool_call>{"name": "get_time", "arguments": {"zone": "UTC"}}</tool_call>'
            '<tool_call>{"name": "get_time", "arguments": {"zone": "CET"}}</tool_call>')  # fmt: skip
    content, calls = parse_hermes(text, NAMES, parallel=False)
    assert [json.loads(c.arguments)["zone"] for c in calls] == ["UTC"]
    assert content == '<tool_call>{"name": "get_time", "arguments": {"zone": "CET"}}</tool_call>'


TOJSON_TEMPLATE = TEMPLATE.replace(
    "{{ message.content }}<|im_end|>", "{{ message.content | tojson }}<|im_end|>", 1
)


def test_a_template_that_quotes_tool_results_is_accepted_and_one_that_drops_calls_is_not(client):
    """Llama's templates write a tool result with tojson (quoted, escaped): it is rendered, not
    dropped. A template that leaves out an assistant's calls is refused, even though the
    tools' names are in its system prompt anyway."""
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}  # fmt: skip
    history = [*ASK, {"role": "assistant", "content": "", "tool_calls": [call]},
               {"role": "tool", "tool_call_id": "call_1", "content": 'line1\nline2 "24"'}]  # fmt: skip
    tokenizer = client.app.state.engine.prompt_tokenizer
    saved = tokenizer.chat_template
    try:
        tokenizer.chat_template = TOJSON_TEMPLATE
        assert client.post("/tokenize", json={"messages": history, "tools": [WEATHER]}).status_code == 200
        tokenizer.chat_template = TEMPLATE.replace("{% elif message.tool_calls %}", "{% elif false %}")
        refused = client.post("/tokenize", json={"messages": history, "tools": [WEATHER]})
    finally:
        tokenizer.chat_template = saved
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "messages[1]"
