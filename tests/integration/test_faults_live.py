"""Faults on the real server: a client that hangs up in the middle of a stream that captures.

The generation stops at the next token, the capture's directory is removed (no partial
files), and the next request is served. (Injected out-of-memory and storage errors:
tests/unit/test_faults.py; SIGTERM mid-request: test_server_lifecycle.py.)
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx


def test_a_client_that_hangs_up_mid_stream_leaves_no_capture_behind(embedded_server, model_id):
    activations = Path(embedded_server.flag("--activations-dir"))
    before = {p.name for p in activations.rglob("act-*")}
    body = {
        "model": model_id,
        "messages": [{"role": "user", "content": "Count slowly to two hundred."}],
        "max_tokens": 200,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "capture": {"mode": "generate", "layers": [0, 10, 20], "hook_points": ["resid_post"]},
    }
    with httpx.Client(timeout=120) as client:
        with client.stream("POST", f"{embedded_server.url}/v1/chat/completions", json=body) as response:
            lines = response.iter_lines()
            received = [next(lines) for _ in range(8)]  # some tokens, then hang up
        assert any('"content"' in line for line in received)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the worker notices at its next token
            partial = [p for p in activations.rglob("act-*") if p.name not in before]
            if not partial:
                break
            time.sleep(0.2)
        assert not partial, f"left behind: {partial}"
        assert not [p for p in activations.rglob(".*") if p.suffix in (".part", ".tmp")]
        cancelled = [line for line in embedded_server.log_path.read_text().splitlines() if "of 200" in line]
        assert cancelled and "generation cancelled after" in cancelled[-1]
        steps = int(cancelled[-1].split("generation cancelled after ")[1].split()[0])
        assert steps < 150  # it stopped soon after the client left, not at the end
        after = client.post(
            f"{embedded_server.url}/v1/chat/completions",
            json={"model": model_id, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3},
        )
        assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] == 3


def test_pooled_connections_stay_usable_after_errors(embedded_server, model_id):
    """The official client on one pooled connection, retries off: after a refused request, an
    intervention that overflows (answered and streamed) and an unknown route, every next request
    on the same pool succeeds."""
    import openai

    overflow = {"interventions": [{"type": "scale", "module": "lm_head.output", "factor": 3e38}]}
    messages = [{"role": "user", "content": "Say hi."}]
    with httpx.Client(timeout=120) as pool:
        client = openai.OpenAI(
            base_url=f"{embedded_server.url}/v1", api_key="none", max_retries=0, http_client=pool
        )

        def plain() -> str:
            reply = client.chat.completions.create(
                model=model_id, messages=messages, max_tokens=2, temperature=0
            )
            return reply.choices[0].message.content

        create = client.chat.completions.create
        failures = [
            lambda: create(model=model_id, messages=messages, n=10_000),
            lambda: create(model=model_id, messages=messages, max_tokens=2, extra_body=overflow),
            lambda: list(
                create(model=model_id, messages=messages, max_tokens=2, stream=True, extra_body=overflow)
            ),
            lambda: client.models.retrieve("no-such-model-route/x"),
        ]
        for fail in failures:
            try:
                fail()
            except (openai.APIError, RuntimeError):
                pass
            assert [plain() for _ in range(3)]
