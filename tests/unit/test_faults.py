"""Faults, injected: the accelerator running out of memory inside a batch, a read-only or full disk
under the activation store. Each gives a clear error, leaves no partial file, and the next
request works. (A client that hangs up mid-stream and SIGTERM mid-request are tested on the
real server: tests/integration/test_faults_live.py and test_server_lifecycle.py.)"""

from __future__ import annotations

import errno
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

HELLO = [{"role": "user", "content": "Hello"}]


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def test_out_of_memory_inside_a_batch_fails_each_request_clearly_and_the_next_batch_works(
    client, monkeypatch
):
    from server.engine import engine as engine_module

    real = engine_module.run_batched_generation

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB")

    monkeypatch.setattr(engine_module, "run_batched_generation", out_of_memory)
    body = {"messages": HELLO, "max_tokens": 4, "temperature": 0}
    scheduler = client.app.state.engine.scheduler
    with ThreadPoolExecutor(4) as pool:  # concurrent: they meet in one batch
        responses = list(pool.map(lambda _: client.post("/v1/chat/completions", json=body), range(4)))
    if scheduler.stats.largest < 2:
        pytest.skip("the requests did not meet in one batch on this machine")
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) <= {200, 507} and 507 in statuses
    for response in responses:
        if response.status_code == 507:
            assert response.json()["error"]["code"] == "out_of_memory"
    monkeypatch.setattr(engine_module, "run_batched_generation", real)
    with ThreadPoolExecutor(4) as pool:
        again = list(pool.map(lambda _: client.post("/v1/chat/completions", json=body), range(4)))
    assert [r.status_code for r in again] == [200] * 4


@pytest.mark.parametrize("failure", [errno.EROFS, errno.ENOSPC, errno.EACCES])
@pytest.mark.parametrize("mode", ["trace", "generate"])
def test_a_store_that_cannot_be_written_is_507_and_leaves_nothing(
    client, activations_dir, monkeypatch, failure, mode
):
    from server.storage import activations as storage

    real_save, real_append = storage.save_tensor, storage._Appender.append

    def broken_save(*args, **kwargs):
        raise OSError(failure, "injected")

    def broken_append(self, tensor):
        real_append(self, tensor)
        raise OSError(failure, "injected")

    monkeypatch.setattr(storage, "save_tensor", broken_save)
    monkeypatch.setattr(storage._Appender, "append", broken_append)
    before = files_under(activations_dir)
    body = {
        "messages": HELLO,
        "max_tokens": 3,
        "capture": {"mode": mode, "layers": [0], "hook_points": ["resid_post"]},
    }
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 507, response.text
    error = response.json()["error"]
    assert error["code"] == "storage_error" and "could not store the activations" in error["message"]
    assert files_under(activations_dir) == before  # no partial file, no manifest-less directory
    assert not [d for d in activations_dir.rglob("act-*") if not (d / "manifest.json").exists()]
    monkeypatch.setattr(storage, "save_tensor", real_save)
    monkeypatch.setattr(storage._Appender, "append", real_append)
    assert client.post("/v1/chat/completions", json=body).status_code == 200
