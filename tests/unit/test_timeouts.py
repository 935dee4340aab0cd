"""Every job kind obeys --request-timeout, and stops part-way through a forward pass.

A model whose every layer is slowed (a pre-hook that sleeps) takes far longer than the timeout
for one forward pass. Each job kind (generation, a trace capture, echo scoring, contrastive
vectors, LDA) must answer 504 at the timeout, stop running on the worker between two layers
(the layers that ran are counted), leave nothing in the stores, and leave the worker free for
the next request.
"""

from __future__ import annotations

import time

import pytest
from tiny_model import build_tiny_model

from tests.apps import app_client

LAYERS = 8
LAYER_S = 0.3  # one forward pass: 2.4 s
TIMEOUT_S = 0.8
HELLO = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def slow(tmp_path_factory):
    """An app over an 8-layer tiny model, and a switch that slows every layer (counting them)."""
    folder = build_tiny_model(tmp_path_factory.mktemp("eight-layers"), num_layers=LAYERS)
    work = tmp_path_factory.mktemp("timeouts")
    with app_client(folder, work, request_timeout=TIMEOUT_S) as client:
        yield Slowdown(client, work)


class Slowdown:
    def __init__(self, client, work) -> None:
        self.client = client
        self.work = work
        self.layers_run = 0
        self.handles = []

    def __enter__(self):
        self.layers_run = 0

        def sleep(module, args):
            self.layers_run += 1
            time.sleep(LAYER_S)

        layers = self.client.app.state.engine.loaded.hf_model.model.layers
        self.handles = [layer.register_forward_pre_hook(sleep) for layer in layers]
        return self

    def __exit__(self, *exc_info) -> None:
        self.wait_idle()
        for handle in self.handles:
            handle.remove()

    def wait_idle(self) -> None:
        """Until the worker has finished whatever the timed-out request left running."""
        self.client.app.state.engine.scheduler.submit_call(lambda: None).result(timeout=60)


JOBS = {
    "generation": ("/v1/chat/completions", {"messages": HELLO, "max_tokens": 8}),
    "trace capture": (
        "/v1/chat/completions",
        {"messages": HELLO, "max_tokens": 1, "capture": {"layers": "all", "hook_points": ["resid_post"]}},
    ),
    "generate capture": (
        "/v1/chat/completions",
        {"messages": HELLO, "max_tokens": 4, "capture": {"mode": "generate", "hook_points": ["resid_post"]}},
    ),
    "echo scoring": (
        "/v1/completions",
        {"prompt": "Hello there, how are you", "max_tokens": 0, "echo": True, "logprobs": 1},
    ),
    "contrastive vectors": (
        "/v1/vectors/contrastive",
        {"name": "mood", "positive": ["happy", "glad"], "negative": ["sad", "down"], "layers": [0, 1]},
    ),
    "LDA": (
        "/v1/lda",
        {"prompt": "Hello", "max_tokens": 4, "alpha": 1.0, "before": {"system_prompt": "Be brief."}},
    ),
}


@pytest.mark.parametrize("kind", list(JOBS))
def test_every_job_kind_stops_at_the_timeout_between_layers(slow, kind):
    path, body = JOBS[kind]
    stores = slow.work
    before = sorted(p for p in stores.rglob("*") if p.is_file())
    with slow:
        response = slow.client.post(path, json=body)
        assert response.status_code == 504, response.text
        assert response.json()["error"]["code"] == "timeout"
        assert "--request-timeout" in response.json()["error"]["message"]
        slow.wait_idle()
        # Full work is at least one forward pass (LAYERS layers; LDA and contrastive: more). It
        # stopped within a layer or two of the timeout instead.
        assert slow.layers_run <= TIMEOUT_S / LAYER_S + 2 < LAYERS, slow.layers_run
    assert sorted(p for p in stores.rglob("*") if p.is_file()) == before  # nothing written or left
    good = slow.client.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 2})
    assert good.status_code == 200  # the worker is free


def test_a_requests_pieces_of_work_share_one_clock(slow):
    """Two pieces of model work in one request (one task) share --request-timeout: each fits
    alone, the second does not fit in what the first left. Two requests each get their own."""
    import asyncio

    from server.engine.engine import RequestTimedOut

    engine = slow.client.app.state.engine
    prompt = engine.loaded.tokenizer.encode("Hello there")
    first_layer = engine.loaded.hf_model.model.layers[0]
    handle = first_layer.register_forward_pre_hook(lambda module, args: time.sleep(0.5))

    async def one_request():
        await engine.score_prompt(prompt, 0)  # 0.5 s of the 0.8 s
        with pytest.raises(RequestTimedOut):
            await engine.score_prompt(prompt, 0)

    async def two_requests():  # each in a task of its own, as each HTTP request is
        await asyncio.ensure_future(engine.score_prompt(prompt, 0))
        await asyncio.ensure_future(engine.score_prompt(prompt, 0))

    try:
        asyncio.run(one_request())
        slow.wait_idle()
        asyncio.run(two_requests())
    finally:
        handle.remove()
