"""Faults, injected: the accelerator running out of memory inside a batch, a read-only or full disk
under the activation store. Each gives a clear error, leaves no partial file, and the next
request works. (A client that hangs up mid-stream and SIGTERM mid-request are tested on the
real server: tests/integration/test_faults_live.py and test_server_lifecycle.py.)"""

from __future__ import annotations

import errno
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from tests.faults import failing_disk

HELLO = [{"role": "user", "content": "Hello"}]


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def _in_one_batch(client, body: dict, count: int) -> list:
    """Send ``count`` requests that the worker takes as one batch: it is held busy until all wait."""
    scheduler = client.app.state.engine.scheduler
    gate = threading.Event()
    held = scheduler.submit_call(lambda: gate.wait(30))
    with ThreadPoolExecutor(count) as pool:
        futures = [pool.submit(client.post, "/v1/chat/completions", json=body) for _ in range(count)]
        deadline = time.monotonic() + 30
        while scheduler.depth < count and time.monotonic() < deadline:
            time.sleep(0.01)
        assert scheduler.depth == count, "the requests never all queued"
        sizes_before = dict(scheduler.stats.sizes)
        gate.set()
        held.result(timeout=30)
        responses = [f.result() for f in futures]
    assert scheduler.stats.sizes.get(count, 0) == sizes_before.get(count, 0) + 1  # one batch of them all
    return responses


def test_out_of_memory_inside_a_batch_fails_each_request_clearly_and_the_next_batch_works(
    client, monkeypatch
):
    from server.engine.loop import DecodeLoop

    real = DecodeLoop.run

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB")

    monkeypatch.setattr(DecodeLoop, "run", out_of_memory)
    body = {"messages": HELLO, "max_tokens": 4, "temperature": 0}
    for response in _in_one_batch(client, body, 4):
        assert response.status_code == 507
        assert response.json()["error"]["code"] == "out_of_memory"
    monkeypatch.setattr(DecodeLoop, "run", real)
    assert [r.status_code for r in _in_one_batch(client, body, 4)] == [200] * 4


@pytest.mark.parametrize("failure", [errno.EROFS, errno.ENOSPC, errno.EACCES])
@pytest.mark.parametrize("mode", ["trace", "generate"])
@pytest.mark.parametrize("budget", [0, 600, 5000], ids=["first-file", "mid-file", "later-file"])
def test_a_store_that_cannot_be_written_is_507_and_leaves_nothing(
    client, activations_dir, failure, mode, budget
):
    """The disk fails at the first byte, inside a tensor file, or after whole files (the
    manifest, last, included): 507 storage_error, and nothing of the capture is left."""
    before = files_under(activations_dir)
    body = {
        "messages": HELLO,
        "max_tokens": 3,
        "capture": {"mode": mode, "layers": [0, 1], "hook_points": ["resid_post"]},
    }
    with failing_disk(failure, budget) as disk:
        response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 507, response.text
    error = response.json()["error"]
    assert error["code"] == "storage_error" and "could not store the activations" in error["message"]
    assert disk.failures == 1
    assert files_under(activations_dir) == before  # no partial file, no manifest-less directory
    assert not [d for d in activations_dir.rglob("act-*") if not (d / "manifest.json").exists()]
    assert client.post("/v1/chat/completions", json=body).status_code == 200
