"""Soak: 8 clients send a mix of requests (plain, streaming, capture, interventions, LDA, completions)
to one real server on loopback. Nothing may be lost or fail, every capture must be complete and
readable, and the server's resident memory must end within 10% of its level after warm-up.

CI runs 8 clients x 25 requests; ``pytest -m slow tests/integration/test_soak.py`` runs 8 x 75.
Both are bounded in count and time. Memory is the server's anonymous resident memory (the
weights are a file mapping, which the kernel may page out and back in), lowest of 3 readings.
"""

from __future__ import annotations

import json
import random
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest
from safetensors.torch import load

CLIENTS = 8
KINDS = ("plain", "stream", "capture", "steer", "lda", "completion")


def _chat(n: int, **extra) -> dict:
    return {
        "messages": [{"role": "user", "content": f"Say something about the number {n}."}],
        "max_tokens": 8,
        "temperature": 0.7,
        "seed": n,
        **extra,
    }


def one_request(client: httpx.Client, kind: str, n: int, model_hidden: int) -> dict:
    """Send one request of ``kind``; check its answer in full; return what the soak tallies."""
    if kind == "plain":
        reply = client.post("/v1/chat/completions", json=_chat(n))
        reply.raise_for_status()
        assert reply.json()["usage"]["completion_tokens"] >= 1
    elif kind == "stream":
        events = []
        with client.stream("POST", "/v1/chat/completions", json=_chat(n, stream=True)) as reply:
            reply.raise_for_status()
            events = [line[6:] for line in reply.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and not any('"error"' in e for e in events)
        assert any(c["finish_reason"] for e in events[:-1] for c in json.loads(e)["choices"])
    elif kind == "capture":
        capture = {"mode": "generate", "layers": [0, 15, 29], "hook_points": ["resid_post"]}
        reply = client.post("/v1/chat/completions", json=_chat(n, capture=capture))
        reply.raise_for_status()
        ref = reply.json()["activations"]
        usage = reply.json()["usage"]
        manifest = client.get(ref["manifest"]).json()
        assert [e["name"] for e in manifest["tensors"]] == [f"layers.{i}.resid_post" for i in (0, 15, 29)]
        for entry in manifest["tensors"]:  # every position of prompt and completion, readable
            assert entry["saved_shape"] == [usage["prompt_tokens"] + usage["completion_tokens"], model_hidden]
            raw = client.get(f"/v1/activations/{ref['id']}/{entry['name']}")
            raw.raise_for_status()
            tensor = load(raw.content)[entry["name"]]
            assert list(tensor.shape) == entry["saved_shape"] and len(raw.content) == entry["bytes"]
        client.delete(f"/v1/activations/{ref['id']}").raise_for_status()
    elif kind == "steer":
        steer = {"type": "add", "layer": 10, "hook_point": "resid_post", "vector": [0.01] * model_hidden}
        reply = client.post("/v1/chat/completions", json=_chat(n, interventions=[steer]))
        reply.raise_for_status()
    elif kind == "lda":
        body = {
            "prompts": [f"Tell me about {n}.", "Name a color."],
            "alpha": 1.0,
            "max_new_tokens": 6,
            "seed": n,
            "before": {"system_prompt": "Answer in one word."},
        }
        reply = client.post("/generate_lda_batch", json=body)
        reply.raise_for_status()
        assert len(reply.json()["results"]) == 2
    else:
        reply = client.post(
            "/v1/completions", json={"prompt": f"{n} plus {n} is", "max_tokens": 6, "seed": n}
        )
        reply.raise_for_status()
    return {"kind": kind}


def anonymous_memory(process: psutil.Process) -> int:
    """Resident anonymous memory (not the weights' file mapping): the lowest of 3 readings."""
    readings = []
    for _ in range(3):
        time.sleep(0.5)
        status = open(f"/proc/{process.pid}/status").read()
        readings.append(int(status.split("RssAnon:")[1].split()[0]) * 1024)
    return min(readings)


def soak(server, requests_per_client: int) -> dict:
    process = psutil.Process(server.process.pid)
    with httpx.Client(base_url=server.url, timeout=300) as probe:
        hidden = probe.get("/v1/model/structure").json()["hidden_size"]
    plan = [KINDS[(i + c) % len(KINDS)] for c in range(CLIENTS) for i in range(requests_per_client)]
    random.Random(0).shuffle(plan)

    def run(jobs: list[tuple[str, int]]) -> list[dict]:
        def worker(chunk):
            with httpx.Client(base_url=server.url, timeout=300) as client:
                return [one_request(client, kind, n, hidden) for kind, n in chunk]

        chunks = [jobs[c::CLIENTS] for c in range(CLIENTS)]
        with ThreadPoolExecutor(CLIENTS) as pool:
            return [r for part in pool.map(worker, chunks) for r in part]

    warm = run([(kind, 10_000 + i) for i, kind in enumerate(KINDS * 2)])  # every kind, twice
    rss_warm = anonymous_memory(process)
    started = time.monotonic()
    done = run([(kind, i) for i, kind in enumerate(plan)])
    seconds = time.monotonic() - started
    rss_end = anonymous_memory(process)
    return {"warm": len(warm), "done": len(done), "planned": len(plan), "rss_warm": rss_warm,
            "rss_end": rss_end, "seconds": seconds}  # fmt: skip


@pytest.fixture(scope="module")
def soak_server(server_process, tmp_path_factory):
    folder = tmp_path_factory.mktemp("soak")
    args = ["--activations-dir", str(folder / "a"), "--vectors-dir", str(folder / "v"), "--max-queue", "64"]
    with server_process(args, folder / "server.log") as server:
        yield server


def _check(server, result: dict) -> None:
    print(  # shown with -s: the figures for the docs
        f"soak: {result['done']} requests by {CLIENTS} clients in {result['seconds']:.0f} s; "
        "anonymous memory "
        f"{result['rss_warm'] / 2**20:.0f} MiB after warm-up, {result['rss_end'] / 2**20:.0f} MiB at the end"
    )
    assert result["done"] == result["planned"]  # nothing lost: every request answered and checked
    growth = result["rss_end"] / result["rss_warm"]
    assert growth <= 1.10, f"resident memory grew {growth:.3f}x after warm-up: {result}"
    log = server.log_path.read_text()
    assert " 500 " not in log and "Traceback" not in log
    leftovers = [p for p in (server.log_path.parent / "a").rglob("act-*")]
    assert leftovers == []  # every capture was deleted by its client, completely


def test_soak(soak_server):
    _check(soak_server, soak(soak_server, requests_per_client=25))


@pytest.mark.slow
def test_long_soak(soak_server):
    _check(soak_server, soak(soak_server, requests_per_client=75))
