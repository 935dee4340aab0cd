"""Property-based fuzzing of the HTTP API from its own OpenAPI schema (schemathesis + hypothesis).

Every operation the schema lists gets generated requests: valid ones (positive mode) and
invalid ones (negative mode: wrong types, missing fields, out-of-range numbers, bodies that
are not JSON). Whatever arrives: no 5xx, and every error has the OpenAI shape. The app
serves the tiny model with small limits, so the valid requests that generate run fast.

The cases are derandomized (the same every run, so a CI failure reproduces) and few per
operation; ``NNSIGHT_FUZZ_EXAMPLES=300 pytest -m slow tests/unit/test_hostile_schema.py``
runs the long version with fresh random cases (docs/testing.md).
"""

from __future__ import annotations

import os

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.app import create_app
from server.config import Settings
from server.protocol import ServerCaptureConfig

EXAMPLES = int(os.environ.get("NNSIGHT_FUZZ_EXAMPLES", "0"))


def _operations() -> list[str]:
    """Every operation of the schema (building an app loads no model: that is the lifespan's)."""
    schema = schemathesis.openapi.from_dict(create_app(Settings(model="unused")).openapi())
    return [result.ok().label for result in schema.get_all_operations()]


OPERATIONS = _operations()


@pytest.fixture(scope="module")
def fuzzed(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    app = create_app(
        Settings(
            model=str(tiny_model_dir),
            max_tokens_cap=8,
            max_n=2,
            activations_dir=root / "activations",
            vectors_dir=root / "vectors",
            lda_max_batch_size=2,
            request_timeout=60,
        )
    )
    with TestClient(app) as client:
        schema = schemathesis.openapi.from_dict(app.openapi())
        yield client, {result.ok().label: result.ok() for result in schema.get_all_operations()}


def _check(client: TestClient, case) -> None:
    kwargs = case.as_transport_kwargs(base_url="http://testserver")
    kwargs.pop("cookies", None)
    response = client.request(**kwargs)
    where = f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:300]}"
    assert response.status_code < 500, where
    if response.status_code >= 400:
        body = response.json()
        assert set(body) == {"error"}, where
        assert set(body["error"]) == {"message", "type", "param", "code"}, where
        assert isinstance(body["error"]["message"], str) and body["error"]["message"], where


def _fuzz(fuzzed, label: str, examples: int, derandomize: bool) -> None:
    client, operations = fuzzed
    operation = operations[label]
    cases = st.one_of(
        operation.as_strategy(generation_mode=schemathesis.GenerationMode.POSITIVE),
        operation.as_strategy(generation_mode=schemathesis.GenerationMode.NEGATIVE),
    )

    @given(case=cases)
    @settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=derandomize,
        database=None,
    )
    def run(case):
        _check(client, case)

    client.app.state.chat.captures.server_capture.config = ServerCaptureConfig()  # what a case may have set
    run()
    client.app.state.chat.captures.server_capture.config = ServerCaptureConfig()
    good = {
        "messages": [{"role": "user", "content": "Hello"}],
        "max_tokens": 3,
        "temperature": 0,
        "ignore_eos": True,
    }
    after = client.post("/v1/chat/completions", json=good)  # the model still answers
    assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize("label", OPERATIONS)
def test_fuzzed_requests_get_no_server_error_and_openai_shaped_errors(fuzzed, label):
    _fuzz(fuzzed, label, examples=EXAMPLES or 15, derandomize=True)


@pytest.mark.slow
@pytest.mark.parametrize("label", OPERATIONS)
def test_long_fuzzing_with_fresh_cases(fuzzed, label):
    _fuzz(fuzzed, label, examples=EXAMPLES or 300, derandomize=False)
