"""The stores and connections on the real server (``python -m server`` under uvicorn): kill -9
in the middle of a capture, a delete while a download is being read, a client that leaves
during a trace capture, and connections that stall. (In process, with injected faults:
tests/unit/test_stores.py.)
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path

import httpx
import pytest
from safetensors.torch import load


def unfinished(root: Path) -> list[Path]:
    return [p for p in root.rglob("act-*") if p.is_dir() and not (p / "manifest.json").exists()]


def temporaries(root: Path) -> list[Path]:
    return [p for p in root.rglob(".*") if p.name.endswith((".tmp", ".part"))]


@pytest.fixture
def tiny_server(server_process, tiny_model_dir, tmp_path):
    """A server on the tiny model with short connection timeouts; its stores under ``tmp_path``."""

    def start():
        args = ["--model", str(tiny_model_dir), "--activations-dir", str(tmp_path / "activations")]
        args += [
            "--vectors-dir",
            str(tmp_path / "vectors"),
            "--read-timeout",
            "1",
            "--keep-alive-timeout",
            "1",
        ]
        return server_process(args, tmp_path / f"server-{time.monotonic_ns()}.log")

    return start


def test_kill_9_mid_capture_then_restart_leaves_nothing_half_written(tiny_server, tmp_path):
    activations = tmp_path / "activations"
    hello = [{"role": "user", "content": "Hello"}]
    with tiny_server() as server:
        kept = httpx.post(
            f"{server.url}/v1/chat/completions",
            json={"messages": hello, "max_tokens": 3, "capture": {"hook_points": ["resid_post"]}},
            timeout=60,
        ).json()["activations"]
        body = {
            "messages": hello,
            "max_tokens": 200,
            "ignore_eos": True,
            "stream": True,
            "capture": {"mode": "generate", "hook_points": ["resid_pre", "resid_post", "mlp_out"]},
        }
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            for _ in range(6):
                next(lines)
            assert unfinished(activations)  # the capture is being written
            os.kill(server.process.pid, signal.SIGKILL)
        server.process.wait(timeout=30)
    assert unfinished(activations)  # what kill -9 leaves

    with tiny_server() as server:
        assert not unfinished(activations) and not temporaries(activations)
        tensor = httpx.get(f"{server.url}/v1/activations/{kept['id']}/{kept['tensors'][0]}", timeout=30)
        assert tensor.status_code == 200 and load(tensor.content)


def test_stalled_connections_are_closed_and_the_server_keeps_serving(tiny_server):
    with tiny_server() as server:
        stalls = {
            "nothing sent": b"",
            "part of the headers": b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n",
            "part of the body": b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
            b'application/json\r\nContent-Length: 100\r\n\r\n{"messages": [',
        }
        for name, sent in stalls.items():
            with socket.create_connection(("127.0.0.1", server.port), timeout=15) as sock:
                sock.sendall(sent)
                started = time.monotonic()
                assert sock.recv(1024) == b"", name  # closed by the server (else: socket.timeout)
                assert time.monotonic() - started < 10, name
        with socket.create_connection(("127.0.0.1", server.port), timeout=15) as sock:  # idle keep-alive
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = b""
            while chunk := sock.recv(4096):  # the response, then the close (else: socket.timeout)
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 200 OK")  # and closed after --keep-alive-timeout
        reply = httpx.post(
            f"{server.url}/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
            timeout=60,
        )
        assert reply.status_code == 200
        assert "--read-timeout" in server.log_path.read_text()


LONG_PROMPT = "Tell me about the sea. " * 400  # about 2,400 tokens: a few MB per captured tensor


def test_a_delete_during_a_download_over_http_lets_it_finish(embedded_server, model_id):
    url = embedded_server.url
    body = {
        "model": model_id,
        "messages": [{"role": "user", "content": LONG_PROMPT}],
        "max_tokens": 1,
        "capture": {"layers": [3], "hook_points": ["resid_post"]},
    }
    ref = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300).json()["activations"]
    tensor_url = f"{url}/v1/activations/{ref['id']}/{ref['tensors'][0]}"
    whole = httpx.get(tensor_url, timeout=60).content
    assert len(whole) > 2 * 2**20  # more than one chunk of the response
    with httpx.Client(timeout=60) as client, client.stream("GET", tensor_url) as response:
        chunks = response.iter_bytes()
        received = next(chunks)
        assert httpx.delete(f"{url}/v1/activations/{ref['id']}", timeout=30).status_code == 200
        received += b"".join(chunks)
    assert received == whole
    assert httpx.get(tensor_url, timeout=30).status_code == 404


def test_a_client_that_leaves_during_a_trace_capture_leaves_no_capture(embedded_server, model_id):
    activations = Path(embedded_server.flag("--activations-dir"))
    before = {p.name for p in activations.rglob("act-*")}
    body = json.dumps(
        {
            "model": model_id,
            "messages": [{"role": "user", "content": LONG_PROMPT}],
            "max_tokens": 50,
            "stream": True,
            "capture": {"layers": "all", "hook_points": ["resid_post"]},
        }
    ).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    for wait_s in (0.5, 3.0):  # before the capture is written, and while or after it is
        with socket.create_connection(("127.0.0.1", embedded_server.port), timeout=30) as sock:
            sock.sendall(head + body)
            time.sleep(wait_s)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            left = [p for p in activations.rglob("act-*") if p.name not in before]
            if not left:
                break
            time.sleep(0.5)
        assert not left, f"left behind after {wait_s} s: {left}"
    reply = httpx.post(
        f"{embedded_server.url}/v1/chat/completions",
        json={"model": model_id, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
        timeout=120,
    )
    assert reply.status_code == 200
