"""Named bad inputs, one by one: each gets a 4xx in the OpenAI shape naming what is wrong, nothing
runs on the model, and the server answers the next good request.

(Generated bad inputs, from the OpenAPI schema, are in test_hostile_schema.py.)
"""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st

from server.app import create_app
from server.config import Settings

KEY = "hostile-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
HELLO = [{"role": "user", "content": "Hello"}]
HIDDEN = 64  # the tiny model's


@pytest.fixture(scope="module")
def app_client(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile") / "stores"
    settings = Settings(
        model=str(tiny_model_dir),
        api_key=KEY,
        max_tokens_cap=16,
        max_n=4,
        max_messages=8,
        max_body_size=200_000,
        activations_dir=root / "activations",
        vectors_dir=root / "vectors",
    )
    with TestClient(create_app(settings)) as client:
        yield client, root.parent


@pytest.fixture
def model_work(app_client, monkeypatch):
    """Counts every piece of work handed to the model's worker (generation jobs and calls: LDA, SVD)."""
    scheduler = app_client[0].app.state.engine.scheduler
    submitted = []
    for name in ("submit_job", "submit_call"):
        real = getattr(scheduler, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            submitted.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(scheduler, name, counted)
    return submitted


def chat(**fields) -> dict:
    return {"messages": HELLO, "max_tokens": 4, **fields}


def raw(text: str) -> bytes:
    return text.encode()


def add(vector) -> dict:
    return {"type": "add", "layer": 0, "hook_point": "resid_post", "vector": vector}


NAN_VECTOR = raw(
    '{"messages": [{"role": "user", "content": "x"}], '
    '"interventions": [{"type": "add", "layer": 0, "hook_point": "resid_post", '
    f'"vector": [NaN{", 0.0" * 63}]}}]}}'
)

# name: (path, body (dict: JSON; bytes: sent as is), headers beyond the key, status, param or None)
CASES = {
    "malformed JSON": (
        "/v1/chat/completions",
        raw('{"messages": [{"role": "user", "content": "x"}'),
        {},
        400,
        None,
    ),
    "not JSON at all": ("/v1/chat/completions", raw("messages=hello"), {}, 400, None),
    "a JSON array body": ("/v1/chat/completions", raw("[1, 2]"), {}, 400, None),
    "max_tokens as a string": ("/v1/chat/completions", chat(max_tokens="10"), {}, 400, "max_tokens"),
    "temperature as a bool": ("/v1/chat/completions", chat(temperature=True), {}, 400, "temperature"),
    "messages as a string": ("/v1/chat/completions", {"messages": "hello"}, {}, 400, "messages"),
    "max_tokens huge": ("/v1/chat/completions", chat(max_tokens=10**12), {}, 400, "max_tokens"),
    "max_tokens negative": ("/v1/chat/completions", chat(max_tokens=-5), {}, 400, "max_tokens"),
    "n negative": ("/v1/chat/completions", chat(n=-1), {}, 400, "n"),
    "n above --max-n": ("/v1/chat/completions", chat(n=5), {}, 400, "n"),
    "temperature 1e308": ("/v1/chat/completions", chat(temperature=1e308), {}, 400, "temperature"),
    "seed past 64 bits": ("/v1/chat/completions", chat(seed=2**70), {}, 400, "seed"),
    "NaN temperature": (
        "/v1/chat/completions",
        raw('{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}'),
        {},
        400,
        "temperature",
    ),
    "no messages": ("/v1/chat/completions", {"messages": []}, {}, 400, "messages"),
    "too many messages": ("/v1/chat/completions", {"messages": HELLO * 9}, {}, 400, "messages"),
    "unknown role": (
        "/v1/chat/completions",
        {"messages": [{"role": "wizard", "content": "x"}]},
        {},
        400,
        "messages[0].role",
    ),
    "lone surrogate": (
        "/v1/chat/completions",
        raw('{"messages": [{"role": "user", "content": "\\ud800"}]}'),
        {},
        400,
        "messages[0].content",
    ),
    "lone surrogate in model": (
        "/v1/chat/completions",
        raw('{"model": "\\ud800", "messages": [{"role": "user", "content": "x"}]}'),
        {},
        400,
        "model",
    ),
    "lone surrogate in a completions model": (
        "/v1/completions",
        raw('{"model": "\\ud800", "prompt": "x"}'),
        {},
        400,
        "model",
    ),
    "lone surrogate in an LDA model": (
        "/v1/lda",
        raw('{"model": "\\udfff", "prompt": "x"}'),
        {},
        400,
        "model",
    ),
    "lone surrogate in a stop string": (
        "/v1/chat/completions",
        raw('{"messages": [{"role": "user", "content": "x"}], "stop": ["\\udc00"]}'),
        {},
        400,
        "stop",
    ),
    "lone surrogate in a template variable": (
        "/v1/chat/completions",
        raw('{"messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": {"a": ["\\ud800"]}}'),
        {},
        400,
        "chat_template_kwargs",
    ),
    "lone surrogate in an ignored field": (
        "/v1/chat/completions",
        raw('{"messages": [{"role": "user", "content": "x"}], "user": "\\ud800"}'),
        {},
        400,
        "user",
    ),
    "lone surrogate in a contrastive example": (
        "/v1/vectors/contrastive",
        raw('{"name": "c", "positive": ["\\ud800"], "negative": ["b"], "layers": [0]}'),
        {},
        400,
        "positive",
    ),
    "an empty message list inside a list": (
        "/v1/vectors/contrastive",
        {"name": "c", "positive": [[]], "negative": ["b"], "layers": [0]},
        {},
        400,
        "positive[0]",
    ),
    "an empty token list inside a list": ("/v1/completions", {"prompt": [[]]}, {}, 400, "prompt[0]"),
    "scale factor 1e300 (overflows float32)": (
        "/v1/chat/completions",
        chat(interventions=[{"type": "scale", "layer": 0, "hook_point": "resid_post", "factor": 1e300}]),
        {},
        400,
        "interventions[0].factor",
    ),
    "vector of 1e39 (overflows float32)": (
        "/v1/chat/completions",
        chat(interventions=[add([1e39] + [0.0] * (HIDDEN - 1))]),
        {},
        400,
        "interventions[0].vector",
    ),
    "scale x vector overflows float32": (
        "/v1/chat/completions",
        chat(interventions=[{**add([1e10] + [0.0] * (HIDDEN - 1)), "scale": 1e30}]),
        {},
        400,
        "interventions[0].scale",
    ),
    "project_out of a vector with no length in float32": (
        "/v1/chat/completions",
        chat(
            interventions=[
                {
                    "type": "project_out",
                    "layer": 0,
                    "hook_point": "resid_post",
                    "vector": [1e-45] + [0.0] * 63,
                }
            ]
        ),
        {},
        400,
        "interventions[0].vector",
    ),
    "repetition_penalty 5e-324 (divides logits into infinity)": (
        "/v1/chat/completions",
        chat(repetition_penalty=5e-324),
        {},
        400,
        "repetition_penalty",
    ),
    "layer out of range": (
        "/v1/chat/completions",
        chat(capture={"layers": [99], "hook_points": ["resid_post"]}),
        {},
        400,
        "capture.layers[0]",
    ),
    "unknown hook point": (
        "/v1/chat/completions",
        chat(capture={"hook_points": ["resid_middle"]}),
        {},
        400,
        "capture.hook_points[0]",
    ),
    "save_dir escaping the root": (
        "/v1/chat/completions",
        chat(capture={"hook_points": ["resid_post"], "save_dir": "../../etc"}),
        {},
        400,
        "capture.save_dir",
    ),
    "absolute save_dir": (
        "/v1/chat/completions",
        chat(capture={"hook_points": ["resid_post"], "save_dir": "/tmp/x"}),
        {},
        400,
        "capture.save_dir",
    ),
    "vector of the wrong size": (
        "/v1/chat/completions",
        chat(interventions=[add([1.0, 2.0, 3.0])]),
        {},
        400,
        "interventions[0].vector",
    ),
    "NaN in a vector": ("/v1/chat/completions", NAN_VECTOR, {}, 400, "interventions[0].vector"),
    "unknown stored vector": (
        "/v1/chat/completions",
        chat(interventions=[add("no-such-vector")]),
        {},
        400,
        "interventions[0].vector",
    ),
    "infinite stored values": (
        "/v1/vectors",
        raw('{"name": "v", "values": [Infinity' + ", 0.0" * 63 + "]}"),
        {},
        400,
        "values[0]",
    ),
    "stored values past float32": (
        "/v1/vectors",
        {"name": "v", "values": [1e39] + [0.0] * (HIDDEN - 1)},
        {},
        400,
        "values",
    ),
    "vector name with a path": (
        "/v1/vectors",
        {"name": "../evil", "values": [0.0] * HIDDEN},
        {},
        400,
        "name",
    ),
    "LDA alpha NaN": ("/v1/lda", raw('{"prompt": "x", "alpha": NaN}'), {}, 400, "alpha"),
    "LDA alpha huge": (
        "/v1/lda",
        {"prompt": "x", "alpha": 1e9, "before": {"system_prompt": "Be brief."}},
        {},
        400,
        "alpha",
    ),
    "oversized body": (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x" * 300_000}]},
        {},
        413,
        None,
    ),
    "unknown model": ("/v1/chat/completions", chat(model="gpt-9"), {}, 404, "model"),
    "wrong API key": ("/v1/chat/completions", chat(), {"Authorization": "Bearer wrong"}, 401, None),
    "activation id with a path": ("/v1/activations/%2E%2E", None, {}, 404, None),
    "intervention layer out of range": (
        "/v1/chat/completions",
        chat(interventions=[{"type": "ablate", "layer": 99, "hook_point": "resid_post"}]),
        {},
        400,
        "interventions[0].layer",
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_a_bad_input_gets_a_clear_4xx_and_the_server_keeps_serving(app_client, model_work, name):
    client, folder = app_client
    path, body, headers, status, param = CASES[name]
    written = sorted(p for p in folder.rglob("*") if p.is_file())
    headers = {**AUTH, **headers}
    if body is None:
        response = client.get(path, headers=headers)
    elif isinstance(body, bytes):
        response = client.post(path, content=body, headers={**headers, "content-type": "application/json"})
    else:
        response = client.post(path, json=body, headers=headers)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    if status == 404 and body is None:
        assert error["code"] == "not_found"  # refused by the store, not by the router
    assert model_work == []  # nothing was handed to the model
    assert sorted(p for p in folder.rglob("*") if p.is_file()) == written  # nothing written anywhere
    good = client.post("/v1/chat/completions", json=chat(temperature=0, ignore_eos=True), headers=AUTH)
    assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] == 4


def test_the_cases_cover_what_the_issue_names():
    names = " ".join(CASES)
    kinds = ["malformed", "string", "huge", "negative", "no messages", "too many", "role", "layer"]
    kinds += [
        "hook",
        "size",
        "NaN",
        "save_dir",
        "oversized",
        "model",
        "key",
        "surrogate",
        "empty",
        "overflows",
    ]
    for kind in kinds:
        assert kind in names, kind


# -- the request models under arbitrary JSON (hypothesis) ---------------------------------------

# Text with any code point, lone surrogates included (what JSON's \ud800 escape decodes to).
ANY_TEXT = st.text(st.characters(exclude_categories=()), max_size=20)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | ANY_TEXT,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
FIELDS = ["messages", "prompt", "prompts", "model", "max_tokens", "n", "temperature", "top_p", "stop", "seed",
          "stream", "logprobs", "capture", "interventions", "alpha", "before", "name", "values"]  # fmt: skip


@given(body=st.dictionaries(st.sampled_from(FIELDS) | ANY_TEXT, JSON_VALUES, max_size=6))
@settings(max_examples=300, deadline=None, derandomize=True, database=None)
def test_request_models_accept_or_refuse_any_json_cleanly(body):
    """Any JSON object: a model is built, or a ValidationError that becomes a 400 naming a field."""
    from fastapi.exceptions import RequestValidationError
    from pydantic import ValidationError

    from server.errors import APIError, validation_error
    from server.protocol import (
        ChatCompletionRequest,
        CompletionRequest,
        ContrastiveCreate,
        PresetCreate,
        ServerCaptureConfig,
        VectorCreate,
    )
    from server.protocol_lda import GenerateLdaBatchRequest, GenerateLdaRequest, LdaRequest

    models = [
        ChatCompletionRequest,
        CompletionRequest,
        LdaRequest,
        GenerateLdaRequest,
        GenerateLdaBatchRequest,
    ]
    models += [VectorCreate, ContrastiveCreate, PresetCreate, ServerCaptureConfig]
    for model in models:
        try:
            model.model_validate(body)
        except APIError as exc:  # an unknown field refused by name (invalid Unicode in it)
            assert exc.status == 400 and exc.param is not None and exc.message
        except ValidationError as exc:
            located = [{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]
            error = validation_error(RequestValidationError(located))
            assert error.status == 400 and error.message and error.type == "invalid_request_error"
            if any(e["loc"] for e in exc.errors()):  # a field is to blame: the error names one
                assert error.param, (model.__name__, exc.errors())
