"""Memory: sizes, the request estimate, the budget refusal, [memory] logging, and out-of-memory recovery."""

from __future__ import annotations

import logging

import pytest
import torch

from server.engine.memory import ModelShape, estimate, parse_size

HELLO = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def weight_bytes(reference_model) -> int:
    return sum(p.numel() * p.element_size() for p in reference_model.parameters())


@pytest.fixture(scope="module")
def settings(tiny_model_dir, activations_dir, weight_bytes):
    """This module's app has a memory budget of the weights plus 300 kB."""
    from server.config import Settings

    return Settings(
        model=str(tiny_model_dir),
        max_tokens_cap=64,
        max_n=4,
        activations_dir=activations_dir,
        vectors_dir=activations_dir / "vectors",
        memory_budget=weight_bytes + 300_000,
    )


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("16GB", 16 * 10**9),
        ("16GiB", 16 * 2**30),
        ("512MB", 512 * 10**6),
        ("1.5G", 1_500_000_000),
        ("2048", 2048),
        ("3 kib", 3072),
    ],
)
def test_parse_size(text, size):
    assert parse_size(text) == size


def test_parse_size_refuses_nonsense():
    with pytest.raises(ValueError):
        parse_size("lots")


def test_the_estimate_follows_its_formula(reference_model, weight_bytes):
    shape = ModelShape.of(reference_model, 2)
    assert (shape.hidden, shape.intermediate, shape.heads, shape.kv_heads, shape.head_dim) == (
        64,
        128,
        4,
        2,
        16,
    )
    need = estimate(
        shape, prompt_tokens=10, max_tokens=20, n=2, capture_widths=(64, 128), capture_positions=10
    )
    assert need.weights == weight_bytes
    assert need.kv_cache == 2 * 30 * 2 * 2 * 2 * 16 * 4
    assert need.activations == 2 * 10 * (4 * 64 + 2 * 128) * 4 + 2 * 4 * 10 * 10 * 4 + 2 * 400 * 4
    assert need.capture == (64 + 128) * 10 * 4 and need.scoring == 0
    assert need.total == need.weights + need.kv_cache + need.activations + need.capture


def test_requests_over_the_budget_are_refused_before_they_run(client, caplog):
    with caplog.at_level(logging.INFO, logger="server.engine.memory"):
        assert (
            client.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 8}).status_code == 200
        )
    assert "[memory] generate: before=" in caplog.text and "max_new_tokens=8" in caplog.text
    caplog.clear()
    structure = client.get("/v1/model/structure").json()
    every_point = structure["hook_points"]["per_layer"]
    big_capture = {
        "messages": HELLO,
        "max_tokens": 4,
        "capture": {"layers": "all", "hook_points": every_point},
    }
    many_tokens = {"messages": HELLO, "max_tokens": 64, "n": 4}  # fits with n=1, not with max_tokens=1
    for body, param in ((big_capture, "capture"), (many_tokens, "n")):
        with caplog.at_level(logging.INFO, logger="server.engine.memory"):
            response = client.post("/v1/chat/completions", json=body)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == param and error["code"] == "memory_budget_exceeded"
        assert "--memory-budget" in error["message"] and "KV cache" in error["message"]
        assert "[memory]" not in caplog.text  # refused before any model work


def test_out_of_memory_is_507_and_the_next_request_works(client, monkeypatch):
    from server.engine.hf_runtime import HFBatch

    real = HFBatch.forward
    calls = []

    def out_of_memory_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*args, **kwargs)

    monkeypatch.setattr(HFBatch, "forward", out_of_memory_once)
    response = client.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 4})
    assert response.status_code == 507
    error = response.json()["error"]
    assert error["code"] == "out_of_memory" and "Tried to allocate 2.00 GiB" in error["message"]
    assert client.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 4}).status_code == 200


def test_out_of_memory_in_a_stream_is_an_error_event(client, monkeypatch):
    from server.engine.hf_runtime import HFBatch

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")

    monkeypatch.setattr(HFBatch, "forward", out_of_memory)
    body = {"messages": HELLO, "max_tokens": 4, "stream": True}
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert '"code": "out_of_memory"' in events[-2] and events[-1] == "data: [DONE]"
