"""Operations, in process: the API key, request ids and the access log, every request limit, /metrics.

One app serves the tiny model with a key and small limits; what each test asserts would
fail if the feature broke (a refused request must not run, a counter must move by what
the responses say, a capture's size estimate must equal what lands on disk).
"""

from __future__ import annotations

import hmac
import json
import logging
import socket
import threading
import time

import openai
import pytest
import uvicorn
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from safetensors import safe_open

from server.app import create_app
from server.config import Settings
from server.engine.capture import CapturePlan, stored_bytes
from server.logs import RequestIdFilter

KEY = "test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
HELLO = [{"role": "user", "content": "Hello"}]
LIMITS = {
    "max_body_size": 20_000,
    "max_messages": 4,
    "max_prompt_chars": 300,
    "max_capture_bytes": 40_000,
    "lda_max_batch_size": 2,
    "max_n": 3,
}


@pytest.fixture(scope="module")
def ops_settings(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("ops")
    return Settings(
        model=str(tiny_model_dir),
        api_key=KEY,
        max_tokens_cap=32,
        activations_dir=root / "activations",
        vectors_dir=root / "vectors",
        **LIMITS,
    )


@pytest.fixture(scope="module")
def ops(ops_settings):
    with TestClient(create_app(ops_settings)) as test_client:
        yield test_client


def chat(ops, **fields):
    return ops.post("/v1/chat/completions", headers=AUTH, json={"messages": HELLO, "max_tokens": 4, **fields})


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def metrics(ops) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics as {(name, sorted labels): value}."""
    text = ops.get("/metrics", headers=AUTH).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def sample(scrape: dict, name: str, **labels) -> float:
    return scrape.get((name, tuple(sorted(labels.items()))), 0.0)


# -- the API key --------------------------------------------------------------------------


def test_the_openai_client_with_the_key_is_served(ops):
    client = openai.OpenAI(base_url="http://testserver/v1", api_key=KEY, http_client=ops, max_retries=0)
    reply = client.chat.completions.create(model=ops_model(ops), messages=HELLO, max_tokens=3)
    assert reply.usage.completion_tokens == 3


def ops_model(ops) -> str:
    return ops.get("/v1/models", headers=AUTH).json()["data"][0]["id"]


def test_a_wrong_or_missing_key_gets_401_in_the_openai_shape(ops):
    client = openai.OpenAI(base_url="http://testserver/v1", api_key="wrong", http_client=ops, max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        client.chat.completions.create(model="x", messages=HELLO, max_tokens=3)
    assert caught.value.code == "invalid_api_key"
    before = ops.app.state.engine.scheduler.stats.batches
    for headers in (
        {},
        {"Authorization": KEY},
        {"Authorization": "Basic " + KEY},
        {"Authorization": "Bearer "},
    ):
        response = ops.post("/v1/chat/completions", headers=headers, json={"messages": HELLO})
        error = error_of(response, 401)
        assert error["code"] == "invalid_api_key" and error["type"] == "authentication_error"
        assert response.headers["WWW-Authenticate"] == "Bearer"
    assert ops.app.state.engine.scheduler.stats.batches == before  # nothing ran


@pytest.mark.parametrize(
    "path", ["/v1/models", "/metrics", "/v1/model/structure", "/openapi.json", "/nowhere"]
)
def test_every_path_but_health_needs_the_key(ops, path):
    error_of(ops.get(path), 401)
    assert ops.get(path, headers=AUTH).status_code in (200, 404)


def test_health_needs_no_key(ops):
    assert ops.get("/health").json()["status"] == "ok"


def test_keys_are_compared_in_constant_time(ops, monkeypatch):
    seen = []
    real = hmac.compare_digest

    def spy(a, b):
        seen.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    ops.get("/v1/models", headers={"Authorization": "Bearer x"})
    ops.get("/v1/models", headers=AUTH)
    assert seen == [(32, 32), (32, 32)]  # digests: the key's length does not leak either


def test_without_a_key_setting_any_client_is_served(client):
    assert client.get("/v1/models").status_code == 200
    assert client.get("/v1/models", headers={"Authorization": "Bearer anything"}).status_code == 200


def test_an_empty_key_in_the_environment_means_no_key(monkeypatch):
    monkeypatch.setenv("NNSIGHT_SERVER_API_KEY", "")
    assert Settings().api_key is None


# -- request ids and the access log ---------------------------------------------------------


def test_every_response_carries_a_request_id_named_in_one_log_line(ops, caplog):
    caplog.handler.addFilter(RequestIdFilter())  # as server.logs.configure_logging does
    with caplog.at_level(logging.DEBUG):
        first = chat(ops)
        second = chat(ops)
    ids = [first.headers["X-Request-ID"], second.headers["X-Request-ID"]]
    assert ids[0] != ids[1] and all(i.startswith("req-") for i in ids)
    usage = first.json()["usage"]
    (line,) = [r.getMessage() for r in caplog.records if r.name == "server.access" and r.request_id == ids[0]]
    assert line.startswith("POST /v1/chat/completions 200 ")
    assert f"prompt_tokens={usage['prompt_tokens']} completion_tokens={usage['completion_tokens']}" in line
    assert "duration=" in line


def test_a_plain_client_request_id_is_kept_and_a_hostile_one_replaced(ops, caplog):
    kept = ops.get("/v1/models", headers={**AUTH, "X-Request-ID": "harness-42.run:7"})
    assert kept.headers["X-Request-ID"] == "harness-42.run:7"
    with caplog.at_level(logging.INFO):
        hostile = ops.get("/v1/models", headers={**AUTH, "X-Request-ID": "a b\tforged=1"})
    assert hostile.headers["X-Request-ID"].startswith("req-")
    assert "forged" not in caplog.text


def test_errors_carry_the_request_id_too(ops):
    assert ops.get("/v1/models").headers["X-Request-ID"].startswith("req-")  # 401
    assert chat(ops, n=99).headers["X-Request-ID"].startswith("req-")  # 400


def test_no_key_reaches_the_log(ops, caplog):
    with caplog.at_level(logging.DEBUG):
        chat(ops)
        ops.get("/v1/models", headers={"Authorization": "Bearer wrong-key-abcdef"})
        ops.get("/metrics", headers=AUTH)
    assert KEY not in caplog.text and "wrong-key-abcdef" not in caplog.text


# -- limits -----------------------------------------------------------------------------------


def test_a_declared_body_over_the_limit_is_refused_before_it_is_read(ops):
    big = {"messages": [{"role": "user", "content": "x" * 30_000}]}
    error = error_of(ops.post("/v1/chat/completions", headers=AUTH, json=big), 413)
    assert error["code"] == "request_too_large" and "--max-body-size" in error["message"]
    assert chat(ops).status_code == 200  # still serving


def test_a_chunked_body_is_cut_off_at_the_limit(ops):
    received = []

    def body():
        for _ in range(100):
            received.append(1)
            yield b" " * 1000

    error = error_of(ops.post("/v1/chat/completions", headers=AUTH, content=body()), 413)
    assert error["code"] == "request_too_large"
    assert chat(ops).status_code == 200


@pytest.mark.parametrize(
    "fields, param, code",
    [
        ({"messages": HELLO * 5}, "messages", "too_many_messages"),
        ({"messages": [{"role": "user", "content": "y" * 301}]}, "messages", "prompt_too_long"),
        ({"messages": [{"role": "user", "content": "y" * 200}] * 2}, "messages", "prompt_too_long"),
        ({"n": 4}, "n", None),
    ],
)
def test_chat_limits_name_the_parameter(ops, fields, param, code):
    error = error_of(chat(ops, **fields), 400)
    assert error["param"] == param
    if code:
        assert error["code"] == code


def test_completion_prompt_characters_are_limited_over_all_prompts(ops):
    response = ops.post(
        "/v1/completions", headers=AUTH, json={"prompt": ["z" * 200, "z" * 200], "max_tokens": 2}
    )
    assert error_of(response, 400)["param"] == "prompt"
    ok = ops.post("/v1/completions", headers=AUTH, json={"prompt": ["z" * 100, "z" * 100], "max_tokens": 2})
    assert ok.status_code == 200


def test_lda_limits_name_the_parameter(ops):
    batch = {"prompts": ["a", "b", "c"], "max_new_tokens": 2, "before": {"system_prompt": "Be terse."}}
    error = error_of(ops.post("/generate_lda_batch", headers=AUTH, json=batch), 400)
    assert error["param"] == "prompts" and "--lda-max-batch-size" in error["message"]
    long = {"prompt": "q" * 200, "max_new_tokens": 2, "before": {"prefix": "p" * 101}}
    error = error_of(ops.post("/v1/lda", headers=AUTH, json=long), 400)
    assert error["param"] == "prompt" and "--max-prompt-chars" in error["message"]


def test_the_vector_store_limit(ops, monkeypatch):
    vectors = ops.app.state.vectors
    monkeypatch.setattr(vectors.settings, "max_vectors", vectors.vectors.count())
    response = ops.post("/v1/vectors", headers=AUTH, json={"name": "one-too-many", "values": [0.0] * 64})
    assert error_of(response, 400)["param"] is not None


def _capture(ops, capture: dict, max_tokens: int = 5):
    return chat(ops, capture=capture, max_tokens=max_tokens, ignore_eos=True)


@pytest.mark.parametrize(
    "capture",
    [
        {"hook_points": ["resid_post", "mlp_out"]},
        {"hook_points": ["resid_post"], "mode": "generate"},
        {"hook_points": ["attn_out"], "mode": "generate", "positions": "generated", "dtype": "float16"},
        {"hook_points": ["resid_post"], "sample_hidden": 10, "positions": "last"},
    ],
)
def test_the_capture_size_estimate_equals_the_bytes_written(ops, capture):
    """The estimate --max-capture-bytes is checked against is what lands on disk (tensor data)."""
    response = _capture(ops, capture)
    assert response.status_code == 200, response.text
    store = ops.app.state.store
    directory = store.directory(response.json()["activations"]["id"])
    written = 0
    for path in directory.glob("*.safetensors"):
        with safe_open(path, "pt") as handle:
            for name in handle.keys():
                tensor = handle.get_tensor(name)
                written += tensor.numel() * tensor.element_size()
    serving = ops.app.state.chat
    request = {"messages": HELLO, "capture": capture}
    plan = serving.captures.capture_plan(_capture_request(request), 1)
    prompt_tokens = response.json()["usage"]["prompt_tokens"]
    assert written > 0
    assert stored_bytes(plan, prompt_tokens, 5, serving.engine.loaded.dtype) == written


def _capture_request(body: dict):
    from server.protocol import ChatCompletionRequest

    return ChatCompletionRequest.model_validate(body).capture


def test_a_capture_over_the_limit_is_refused_and_writes_nothing(ops):
    store_root = ops.app.state.store.root
    before = sorted(p.name for p in store_root.rglob("act-*"))
    capture = {"hook_points": ["resid_post", "mlp_out", "attn_out"], "mode": "generate"}
    error = error_of(_capture(ops, capture, max_tokens=30), 400)
    assert error["param"] == "capture" and error["code"] == "capture_too_large"
    assert "--max-capture-bytes" in error["message"]
    assert sorted(p.name for p in store_root.rglob("act-*")) == before


def test_stored_bytes_counts_positions_by_mode():
    from server.engine.hooks import HookPoint

    point = HookPoint("p", "m", "output", 0, "resid_post", 0, 8, True)
    import torch

    def size(**fields):
        return stored_bytes(CapturePlan(points=(point,), **fields), 10, 4, torch.float32)

    assert size() == 10 * 8 * 4
    assert size(mode="generate") == 14 * 8 * 4
    assert size(mode="generate", positions="generated") == 4 * 8 * 4
    assert size(positions="last", sample_hidden=3, dtype=torch.bfloat16) == 1 * 3 * 2


# -- /metrics --------------------------------------------------------------------------------


def test_metrics_move_with_requests(ops):
    before = metrics(ops)
    plain = chat(ops, max_tokens=6, ignore_eos=True).json()["usage"]
    streamed = ops.post(
        "/v1/chat/completions",
        headers=AUTH,
        json={"messages": HELLO, "max_tokens": 5, "ignore_eos": True, "stream": True},
    )
    assert streamed.status_code == 200 and "[DONE]" in streamed.text
    error_of(chat(ops, n=99), 400)
    captured = _capture(ops, {"hook_points": ["resid_post"]})
    manifest = ops.get(captured.json()["activations"]["manifest"], headers=AUTH).json()
    after = metrics(ops)

    def moved(name, **labels):
        return sample(after, name, **labels) - sample(before, name, **labels)

    chat_path = {"endpoint": "/v1/chat/completions"}
    assert moved("nnsight_server_requests_total", method="POST", status="200", **chat_path) == 3
    assert moved("nnsight_server_requests_total", method="POST", status="400", **chat_path) == 1
    assert moved("nnsight_server_completion_tokens_total", **chat_path) == plain["completion_tokens"] + 5 + 5
    assert moved("nnsight_server_prompt_tokens_total", **chat_path) == 3 * plain["prompt_tokens"]
    assert moved("nnsight_server_time_to_first_token_seconds_count", **chat_path) == 3
    assert moved("nnsight_server_request_duration_seconds_count", **chat_path) == 4
    assert moved("nnsight_server_batch_size_count") == 3
    assert moved("nnsight_server_batch_rows_total") == 3
    manifest_bytes = sum(t["bytes"] for t in manifest["tensors"])
    assert manifest_bytes < moved("nnsight_server_capture_bytes_total") < manifest_bytes + 20_000
    assert moved("nnsight_server_captures_total") == 1
    assert sample(after, "nnsight_server_queue_depth") == 0
    assert sample(after, "nnsight_server_queue_capacity") == 64
    assert sample(after, "process_resident_memory_bytes") > 100 * 2**20
    assert sample(after, "nnsight_server_model_weight_bytes") == ops.app.state.engine.resident_weight_bytes
    assert sample(after, "nnsight_server_requests_in_progress") == 1  # the scrape itself


def test_metrics_label_refused_requests_by_their_route(ops):
    before = metrics(ops)
    ops.get("/v1/models")
    ops.get("/v1/activations/act-0123")
    after = metrics(ops)
    labels = {"endpoint": "/v1/models", "method": "GET", "status": "401"}
    assert (
        sample(after, "nnsight_server_requests_total", **labels)
        - sample(before, "nnsight_server_requests_total", **labels)
        == 1
    )
    assert (
        "nnsight_server_requests_total",
        tuple(sorted({**labels, "endpoint": "/v1/activations/act-0123"}.items())),
    ) not in after
    assert (
        sample(
            after,
            "nnsight_server_requests_total",
            endpoint="/v1/activations/{activation_id}",
            method="GET",
            status="401",
        )
        >= 1
    )


def test_each_app_has_its_own_registry(ops, client):
    assert client.app.state.metrics.registry is not ops.app.state.metrics.registry
    assert "nnsight_server_requests_total" in client.get("/metrics").text


# -- the front door at the ASGI level --------------------------------------------------------


def _drive(
    app,
    headers: list[tuple[bytes, bytes]],
    chunks: list[bytes],
    method: str = "POST",
    path: str = "/v1/chat/completions",
):
    """Call the app as a server would, body in the given chunks; returns (chunks read, messages sent)."""
    import asyncio

    read = 0
    sent: list[dict] = []

    async def receive():
        nonlocal read
        if read < len(chunks):
            read += 1
            return {"type": "http.request", "body": chunks[read - 1], "more_body": read < len(chunks)}
        await asyncio.sleep(3600)  # a client that sends nothing more

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"authorization", f"Bearer {KEY}".encode()), *headers],
        "client": ("127.0.0.1", 5000),
        "server": ("testserver", 80),
    }
    asyncio.run(asyncio.wait_for(app(scope, receive, send), 30))
    return read, sent


def _status(sent: list[dict]) -> int:
    return next(m["status"] for m in sent if m["type"] == "http.response.start")


def test_a_declared_content_length_over_the_limit_is_refused_without_reading(ops):
    read, sent = _drive(ops.app, [(b"content-length", b"1000000000")], [b"{}"])
    assert _status(sent) == 413 and read == 0


def test_a_body_without_a_length_is_read_only_up_to_the_limit(ops):
    read, sent = _drive(ops.app, [(b"content-type", b"application/json")], [b" " * 1000] * 100)
    assert _status(sent) == 413
    assert read == LIMITS["max_body_size"] // 1000 + 1  # stopped at the first chunk past 20,000 bytes


def test_an_unexpected_failure_is_a_500_with_the_request_id(ops, monkeypatch):
    def broken():
        raise RuntimeError("boom")

    monkeypatch.setattr(ops.app.state.chat, "models", broken)
    plain = TestClient(ops.app, raise_server_exceptions=False)
    response = plain.get("/v1/models", headers=AUTH)
    error = error_of(response, 500)
    request_id = response.headers["X-Request-ID"]
    assert request_id.startswith("req-")
    assert error["message"] == (
        f"internal error: RuntimeError: boom (request id {request_id}; the server log has the traceback)"
    )


def test_an_unexpected_failure_names_its_message_without_secrets(ops, ops_settings, monkeypatch):
    inside = ops_settings.activations_dir / "act-1" / "manifest.json"

    def broken():
        raise RuntimeError(f"cannot read /etc/ssl/private/server.pem or ~/.ssh/id_rsa with {KEY}; {inside}")

    monkeypatch.setattr(ops.app.state.chat, "models", broken)
    # raise_server_exceptions stays on: the front door answers the 500 itself and does not re-raise
    # (a re-raised error would make the server drop the client's keep-alive connection).
    response = ops.get("/v1/models", headers=AUTH)
    message = error_of(response, 500)["message"]
    assert message.startswith("internal error: RuntimeError: cannot read <path> or <path> with <redacted>; ")
    assert str(inside) in message  # inside the server's own store: the client may see it
    assert KEY not in message and "/etc/ssl" not in message and ".ssh" not in message
    assert ops.get("/v1/models", headers=AUTH).status_code == 500  # and the next request is answered


def _read_response(sock: socket.socket) -> tuple[int, bytes]:
    """One HTTP/1.1 response from ``sock``: (status, body), read by its Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536) or _closed()
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(
        next(
            line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
        )
    )
    while len(body) < length:
        body += sock.recv(65536) or _closed()
    return int(head.split(b" ")[1]), body


def _closed() -> bytes:
    raise ConnectionError("the server closed the connection")


def test_a_500_leaves_the_keep_alive_connection_open(ops_settings, monkeypatch):
    """Over a real socket: two requests that fail unexpectedly, one connection, both answered
    (uvicorn closed the connection after a 500 while Starlette re-raised the error)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app = create_app(ops_settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.started

        def broken():
            raise RuntimeError("boom")

        monkeypatch.setattr(app.state.chat, "models", broken)
        request = f"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n\r\n".encode()
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            for _ in range(2):
                sock.sendall(request)
                status, body = _read_response(sock)
                assert status == 500 and b"RuntimeError: boom" in body
            monkeypatch.undo()
            sock.sendall(request)
            assert _read_response(sock)[0] == 200
    finally:
        server.should_exit = True
        thread.join(30)


def test_a_stream_that_fails_names_the_error_and_the_request(ops, monkeypatch):
    def broken(job):
        raise RuntimeError("the decode step broke")

    monkeypatch.setattr(ops.app.state.engine, "stream", broken)
    response = chat(ops, stream=True)
    request_id = response.headers["X-Request-ID"]
    events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["message"].startswith("internal error: RuntimeError: the decode step broke (request id ")
    assert request_id in error["message"]


def test_every_log_line_about_a_request_names_it(ops, caplog):
    """The access line, a refusal's line, and lines the engine's worker thread logs (its
    `[memory]` line per generation) all carry the request's id."""
    caplog.handler.addFilter(RequestIdFilter())
    with caplog.at_level(logging.INFO):
        served = chat(ops, max_tokens=2)
        refused = chat(ops, n=99)  # a 400 from validation
        unauthorized = ops.get("/v1/models")
    by_request = {}
    for record in caplog.records:
        by_request.setdefault(record.request_id, []).append((record.name, record.getMessage()))
    served_lines = by_request[served.headers["X-Request-ID"]]
    assert any(name == "server.engine.memory" and "[memory]" in msg for name, msg in served_lines)
    assert any(name == "server.access" for name, _ in served_lines)
    refused_lines = by_request[refused.headers["X-Request-ID"]]
    assert any(msg.startswith("rejected request: 400 ") and "n" in msg for _, msg in refused_lines)
    assert any(name == "server.access" and " 400 " in msg for name, msg in refused_lines)
    assert any(" 401 " in msg for _, msg in by_request[unauthorized.headers["X-Request-ID"]])


def test_the_log_line_cannot_be_forged_through_the_path(ops, caplog):
    with caplog.at_level(logging.INFO):
        ops.get("/v1/models%0A2026-01-01 INFO server.access: forged", headers=AUTH)
    (line,) = [r.getMessage() for r in caplog.records if r.name == "server.access"]
    assert "\n" not in line and "%0A" in line


def test_methods_outside_http_s_own_do_not_make_new_series(ops):
    ops.request("BREW", "/v1/models", headers=AUTH)
    after = metrics(ops)
    assert (
        sample(after, "nnsight_server_requests_total", endpoint="/v1/models", method="other", status="405")
        >= 1
    )
    assert not [key for key in after if ("method", "BREW") in key[1]]
