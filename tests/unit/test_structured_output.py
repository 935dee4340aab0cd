"""Structured output: ``response_format`` (json_object, json_schema) and vLLM's
``structured_outputs`` (json, regex, choice, grammar), enforced while decoding.

References: a JSON Schema validator written out here for the schemas used (enums, booleans,
bounded strings and arrays: what a random tiny model can finish within its tokens), Python's
``re`` for regexes, and the plain request alone for the free neighbour of a constrained one in
a batch. The official ``openai`` client's ``chat.completions.parse`` reads the answer into a
pydantic model.
"""

from __future__ import annotations

import json
import re

import pytest
from apps import app_client

HELLO = [{"role": "user", "content": "Describe a cat as JSON."}]
SCHEMA = {
    "type": "object",
    "properties": {
        "mood": {"enum": ["calm", "angry", "sad"]},
        "indoor": {"type": "boolean"},
        "name": {"type": "string", "maxLength": 6},
        "toys": {"type": "array", "items": {"enum": ["ball", "box"]}, "maxItems": 3},
    },
    "required": ["mood", "indoor", "name", "toys"],
    "additionalProperties": False,
}


def follows(value, schema: dict) -> bool:
    """The few JSON Schema keywords SCHEMA uses, checked by hand."""
    if "enum" in schema:
        return value in schema["enum"]
    kind = schema.get("type")
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "string":
        return isinstance(value, str) and len(value) <= schema.get("maxLength", len(value))
    if kind == "array":
        return (
            isinstance(value, list)
            and len(value) <= schema.get("maxItems", len(value))
            and all(follows(item, schema["items"]) for item in value)
        )
    if kind == "object":
        return (
            isinstance(value, dict)
            and set(value) == set(schema["required"])
            and all(follows(value[key], schema["properties"][key]) for key in value)
        )
    raise AssertionError(f"unexpected schema {schema}")


@pytest.fixture(scope="module")
def client(tiny_model_dir, tmp_path_factory):
    """The tiny model with room for the longest answer SCHEMA allows (the shared app caps at 64)."""
    with app_client(tiny_model_dir, tmp_path_factory.mktemp("structured"), max_tokens_cap=160) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def openai_client(client):
    import openai

    return openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client, max_retries=0)


def chat(client, **body) -> dict:
    body = {"messages": HELLO, "max_tokens": 160, **body}  # room for the longest answer SCHEMA allows
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_a_json_schema_answer_validates_every_time(client):
    """100 seeded samples (and greedy): each stops on its own and follows the schema."""
    response_format = {
        "type": "json_schema",
        "json_schema": {"name": "cat", "schema": SCHEMA, "strict": True},
    }
    plain = chat(client, temperature=0)["choices"][0]["message"]["content"]
    with pytest.raises(json.JSONDecodeError):
        json.loads(plain)  # the model does not write JSON on its own
    answers = [chat(client, temperature=0, response_format=response_format)]
    answers += [
        chat(client, temperature=1.0, seed=seed, response_format=response_format) for seed in range(100)
    ]
    for answer in answers:
        choice = answer["choices"][0]
        assert choice["finish_reason"] == "stop", choice
        assert follows(json.loads(choice["message"]["content"]), SCHEMA), choice["message"]["content"]


def test_a_constrained_job_and_a_free_one_in_one_batch(client):
    """Decoded together by the engine's loop: the constrained row follows its schema, the free
    one equals its solo run, token for token."""
    from server.engine.job import GenerationJob, SamplingParams
    from server.protocol import ResponseFormat, grammar_of
    from tests.reference import run_in_loop

    loaded = client.app.state.engine.loaded
    grammar, _ = grammar_of(ResponseFormat.model_validate({"type": "json_schema", "json_schema": {
        "name": "cat", "schema": SCHEMA}}), None)  # fmt: skip
    free = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    constrained = SamplingParams(max_tokens=150, temperature=0.9, seed=1, grammar=grammar)
    prompt = [1, 20, 30, 40]
    together = run_in_loop(loaded, [GenerationJob(prompt, constrained), GenerationJob(prompt, free)])
    (alone,) = run_in_loop(loaded, [GenerationJob(prompt, free)])
    assert together[1].choices[0].token_ids == alone.choices[0].token_ids
    assert follows(json.loads(together[0].choices[0].text), SCHEMA)


def test_a_json_object_answer_is_an_object(client):
    """Every seeded answer that ends on its own is a JSON object; most do within 160 tokens."""
    ended = 0
    for seed in range(10):
        choice = chat(client, temperature=1.0, seed=seed, response_format={"type": "json_object"})["choices"][
            0
        ]
        if choice["finish_reason"] == "stop":
            ended += 1
            assert isinstance(json.loads(choice["message"]["content"]), dict)
    assert ended >= 5


def test_n_constrained_choices_each_follow_the_schema(client):
    """Rows of one request finish at different steps; each follows its own matcher."""
    response_format = {"type": "json_schema", "json_schema": {"name": "cat", "schema": SCHEMA}}
    choices = chat(client, temperature=1.0, seed=4, n=4, response_format=response_format)["choices"]
    lengths = set()
    for choice in choices:
        assert choice["finish_reason"] == "stop"
        assert follows(json.loads(choice["message"]["content"]), SCHEMA)
        lengths.add(len(choice["message"]["content"]))
    assert len(lengths) > 1  # they did finish at different steps


@pytest.mark.parametrize(
    "outputs",
    [{"json": {"$ref": "#"}}, {"grammar": 'start: a\na: a "x"'}],
    ids=["self-reference", "no-finite-string"],
)
def test_a_grammar_that_can_match_nothing_is_a_400_before_it_runs(client, outputs):
    response = client.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 4,
                                                         "structured_outputs": outputs})  # fmt: skip
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "structured_outputs"


@pytest.mark.parametrize(
    ("outputs", "check"),
    [
        ({"regex": "[a-c]{2,4}-[0-9]{3}"}, lambda text: re.fullmatch("[a-c]{2,4}-[0-9]{3}", text)),
        ({"choice": ["yes", "no", "maybe \"so\""]}, lambda text: text in ("yes", "no", 'maybe "so"')),
        ({"grammar": 'start: "(" NUM ")"\nNUM: /[0-9]{1,3}/'},
         lambda text: re.fullmatch(r"\([0-9]{1,3}\)", text)),
        ({"json": {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
                   "additionalProperties": False}}, lambda text: isinstance(json.loads(text)["ok"], bool)),
    ],
)  # fmt: skip
def test_vllms_structured_outputs(client, outputs, check):
    for seed in range(5):
        choice = chat(client, temperature=1.0, seed=seed, structured_outputs=outputs)["choices"][0]
        assert choice["finish_reason"] == "stop" and check(choice["message"]["content"]), choice


def test_completions_take_structured_output_too(client):
    body = {"prompt": "Answer:", "max_tokens": 10, "temperature": 0,
            "structured_outputs": {"choice": ["alpha", "beta"]}}  # fmt: skip
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["text"] in ("alpha", "beta")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        ({"response_format": {"type": "json_schema",
                              "json_schema": {"name": "x", "schema": {"type": "nope"}}}}, "response_format"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"structured_outputs": {}}, "structured_outputs"),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
        ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs"),
        ({"structured_outputs": {"grammar": "start: undefined_rule"}}, "structured_outputs"),
        ({"structured_outputs": {"json": "{not json"}}, "structured_outputs.json"),
        ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
         "structured_outputs"),
        ({"response_format": {"type": "json_object"}, "ignore_eos": True}, "ignore_eos"),
        ({"response_format": {"type": "json_object"}, "min_tokens": 2}, "min_tokens"),
        ({"guided_json": {"type": "object"}}, "guided_json"),
    ],
)  # fmt: skip
def test_a_constraint_that_cannot_be_followed_is_a_400_naming_it(client, body, param):
    response = client.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 4, **body})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_the_openai_clients_parse_reads_the_answer_into_a_model(openai_client, served_model):
    from typing import Literal

    from pydantic import BaseModel

    class Cat(BaseModel):
        mood: Literal["calm", "angry", "sad"]
        indoor: bool

    completion = openai_client.chat.completions.parse(
        model=served_model, messages=HELLO, response_format=Cat, max_tokens=40, temperature=0
    )
    cat = completion.choices[0].message.parsed
    assert isinstance(cat, Cat) and cat.mood in ("calm", "angry", "sad")
