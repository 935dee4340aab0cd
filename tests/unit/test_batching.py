"""The request scheduler: concurrent jobs batched together, each answered as if alone.

References: each job run alone through HF's own ``generate`` on the same weights
(``tests/reference.py``), before or after the batched runs.
"""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch
from fastapi.testclient import TestClient

from server.app import create_app
from server.config import Settings
from server.engine.engine import Engine, RequestTimedOut
from server.engine.job import GenerationJob, SamplingParams
from server.engine.loading import load_model
from server.engine.scheduler import QueueFull
from tests.reference import hf_generate

TEXTS = ["The quick brown fox", "What is the capital of France? The capital", "Count", "Numbers 0 1 2 3"]


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(str(tiny_model_dir))


def params_mix() -> list[SamplingParams]:
    """Different lengths, sampling settings, seeds, n, stop strings and logprobs."""
    return [
        SamplingParams(max_tokens=10, temperature=0),
        SamplingParams(max_tokens=7, temperature=0.9, top_p=0.9, seed=3, n=3, logprobs=2),
        SamplingParams(max_tokens=12, temperature=1.0, top_k=20, seed=5, stop=("e",)),
        SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, logprobs=0),
        SamplingParams(max_tokens=5, temperature=0.7, seed=11, n=2),
    ]


def jobs(tokenizer) -> list[GenerationJob]:
    prompts = [tokenizer.encode(t) for t in TEXTS]
    return [GenerationJob(prompts[i % len(prompts)], p) for i, p in enumerate(params_mix())]


def alone(loaded, job: GenerationJob):
    return hf_generate(loaded, job)


def summary(result):
    return [
        (c.token_ids, c.text, c.finish_reason, [round(lp.logprob, 4) for lp in c.logprobs or ()])
        for c in result.choices
    ]


def run_together(engine: Engine, batch: list[GenerationJob]):
    async def scenario():
        return await asyncio.gather(*(engine.generate(job) for job in batch))

    return asyncio.run(scenario())


def test_batched_jobs_get_exactly_what_they_get_alone(loaded):
    expected = [summary(alone(loaded, job)) for job in jobs(loaded.tokenizer)]
    engine = Engine(loaded, max_batch_size=16, batch_window_s=0.5)
    try:
        results = run_together(engine, jobs(loaded.tokenizer))
    finally:
        engine.close()
    assert engine.scheduler.stats.largest == len(params_mix())  # all in one batch
    assert [summary(r) for r in results] == expected


def test_max_batch_size_splits_by_rows(loaded):
    engine = Engine(loaded, max_batch_size=4, batch_window_s=0.5)
    try:
        results = run_together(engine, jobs(loaded.tokenizer))
    finally:
        engine.close()
    stats = engine.scheduler.stats
    assert stats.rows == sum(p.n for p in params_mix()) and stats.peak_rows <= 4
    assert stats.joined > 0 or stats.batches > 1
    assert [summary(r) for r in results] == [summary(alone(loaded, j)) for j in jobs(loaded.tokenizer)]


def test_a_stream_in_a_batch_and_a_cancelled_neighbour(loaded):
    """One job streams, one is cancelled after its first token, the rest are untouched."""
    tokenizer = loaded.tokenizer
    prompts = [tokenizer.encode(t) for t in TEXTS]
    long = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    expected = [summary(alone(loaded, GenerationJob(p, long))) for p in prompts]
    engine = Engine(loaded, max_batch_size=8, batch_window_s=0.5)

    async def scenario():
        batch = [GenerationJob(p, long) for p in prompts]
        streamed, cancelled = batch[0], batch[1]
        plain = [asyncio.ensure_future(engine.generate(job)) for job in batch[2:]]

        async def stream_all():
            text, result = "", None
            async for item in engine.stream(streamed):
                if hasattr(item, "choices"):
                    result = item
                else:
                    text += item.text
            return text, result

        async def cancel_soon():
            stream = engine.stream(cancelled)
            async for _ in stream:
                break
            await stream.aclose()

        (text, result), _ = await asyncio.gather(stream_all(), cancel_soon())
        return text, result, cancelled, await asyncio.gather(*plain)

    try:
        text, result, cancelled, plain = asyncio.run(scenario())
    finally:
        engine.close()
    assert engine.scheduler.stats.largest == 4
    assert summary(result) == expected[0] and text == result.choices[0].text
    assert cancelled.cancelled.is_set() and cancelled.steps < 40
    assert [summary(r) for r in plain] == expected[2:]


def hold_the_worker(engine: Engine) -> threading.Event:
    """Keep the engine's worker busy until the returned event is set."""
    started, release = threading.Event(), threading.Event()
    engine.scheduler.submit_call(lambda: (started.set(), release.wait(30)))
    assert started.wait(10)
    return release


def test_a_full_queue_refuses_and_a_timed_out_job_never_runs(loaded):
    engine = Engine(loaded, max_batch_size=8, batch_window_s=0.0, max_queue=1, request_timeout=0.3)
    release = hold_the_worker(engine)

    async def scenario():
        waiting = GenerationJob([1, 2, 3], SamplingParams(max_tokens=4, temperature=0))
        task = asyncio.ensure_future(engine.generate(waiting))
        await asyncio.sleep(0.05)
        with pytest.raises(QueueFull):
            engine.scheduler.submit_job(GenerationJob([1], SamplingParams(max_tokens=1)))
        with pytest.raises(RequestTimedOut, match="before its first token"):
            await task
        return waiting

    try:
        waiting = asyncio.run(scenario())
        release.set()
        after = asyncio.run(
            engine.generate(GenerationJob([1, 2], SamplingParams(max_tokens=2, temperature=0)))
        )
    finally:
        release.set()
        engine.close()
    assert waiting.cancelled.is_set() and waiting.steps == 0
    assert len(after.choices[0].token_ids) == 2


def test_interventions_and_captures_in_one_batch_stay_with_their_own_rows(loaded, tmp_path):
    """Steered, capturing, steered-and-capturing and plain jobs decoded together: each job's
    tokens and captured values equal its solo run's; nothing crosses between rows."""

    from interventions import Edit
    from server.engine.capture import CapturePlan, CaptureSpec
    from server.engine.hooks import HookResolver
    from server.engine.structure import find_layers
    from server.storage import ActivationStore

    resolver = HookResolver(loaded.hf_model, find_layers(loaded.hf_model))
    points = tuple(resolver.resolve(layers=[0, 1], hook_points=["resid_post"], modules=None))
    layer0 = points[0]
    steer = Edit(point=layer0, operation="add", vector=torch.full((64,), 0.5), scale=4.0)
    early = Edit(point=layer0, operation="add", vector=torch.full((64,), -1.0), scale=3.0, positions=(0, 2))
    store = ActivationStore(tmp_path / "store")
    tokenizer = loaded.tokenizer
    prompts = [tokenizer.encode(t) for t in TEXTS]

    def batch():
        plan = CapturePlan(points=points, mode="generate")
        params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
        sampled = SamplingParams(max_tokens=6, temperature=0.9, seed=4)
        spec = CaptureSpec(plan, store, "test")
        return [
            GenerationJob(prompts[0], params, edits=(steer,)),
            GenerationJob(prompts[1], params, capture=spec),
            GenerationJob(prompts[2], sampled, edits=(early,), capture=spec),
            GenerationJob(prompts[3], params),
        ]

    def run(max_batch_size):
        engine = Engine(loaded, max_batch_size=max_batch_size, batch_window_s=0.5)
        try:
            results = run_together(engine, batch())
        finally:
            engine.close()
        captures = [
            store.load_tensor(r.capture.id, "layers.0.resid_post", "safetensors") if r.capture else None
            for r in results
        ]
        return engine.scheduler.stats, results, captures

    solo_stats, solo, solo_captures = run(1)
    stats, together, captures = run(8)
    assert solo_stats.largest == 1 and stats.sizes == {4: 1}
    assert [summary(r) for r in together] == [summary(r) for r in solo]
    for mine, theirs in zip(captures, solo_captures, strict=True):
        if theirs is None:
            assert mine is None
            continue
        assert theirs.shape == mine.shape  # prompt + completion, no padding
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)
    plain = summary(
        alone(loaded, GenerationJob(prompts[0], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)))
    )
    assert summary(together[0]) != plain  # the steering did something, to its own row only


def test_the_memory_room_limits_a_batch(loaded):
    engine = Engine(loaded, max_batch_size=8, batch_window_s=0.3, memory_room=1000)
    batch = jobs(loaded.tokenizer)[:3]
    for job in batch:
        job.memory_bytes = 600  # two never fit together
    try:
        run_together(engine, batch)
    finally:
        engine.close()
    assert engine.scheduler.stats.largest == 1


def server_settings(tiny_model_dir, tmp_path, **overrides) -> Settings:
    return Settings(
        model=str(tiny_model_dir), activations_dir=tmp_path / "a", vectors_dir=tmp_path / "v", **overrides
    )


def test_http_queue_full_is_429_with_retry_after_and_timeout_is_504(tiny_model_dir, tmp_path):
    settings = server_settings(tiny_model_dir, tmp_path, max_queue=1, request_timeout=0.5, batch_window_ms=0)
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    with TestClient(create_app(settings)) as client:
        engine = client.app.state.engine
        release = hold_the_worker(engine)
        try:
            timed_out = client.post("/v1/chat/completions", json=body)
            assert timed_out.status_code == 504, timed_out.text
            assert timed_out.json()["error"]["code"] == "timeout"
            filler = engine.scheduler.submit_job(
                GenerationJob([1], SamplingParams(max_tokens=1))
            )  # queue full
            full = client.post("/v1/chat/completions", json={**body, "stream": True})
            assert full.status_code == 429 and full.headers["retry-after"] == "1"
            assert full.json()["error"]["type"] == "rate_limit_error"
        finally:
            release.set()
        filler.result(timeout=30)  # the queue has room again
        ok = client.post("/v1/chat/completions", json=body)
        assert ok.status_code == 200, ok.text


def test_concurrent_http_requests_are_batched_and_answered_as_alone(tiny_model_dir, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    settings = server_settings(tiny_model_dir, tmp_path, batch_window_ms=300)
    bodies = [
        {
            "messages": [{"role": "user", "content": text}],
            "max_tokens": 6 + i,
            "temperature": 0.8 * (i % 2),
            "seed": i,
        }
        for i, text in enumerate(TEXTS)
    ]
    with TestClient(create_app(settings)) as client:
        solo = [client.post("/v1/chat/completions", json=body).json()["choices"] for body in bodies]
        before = client.app.state.engine.scheduler.stats.largest
        with ThreadPoolExecutor(len(bodies)) as pool:
            together = list(
                pool.map(lambda b: client.post("/v1/chat/completions", json=b).json()["choices"], bodies)
            )
        assert before == 1 and client.app.state.engine.scheduler.stats.largest > 1
    assert together == solo


def test_a_failing_capture_fails_its_own_job_only(loaded, tmp_path):
    from server.engine.capture import CapturePlan, CaptureSpec
    from server.engine.hooks import HookResolver
    from server.engine.structure import find_layers

    points = tuple(
        HookResolver(loaded.hf_model, find_layers(loaded.hf_model)).resolve(
            layers=[0], hook_points=["resid_post"], modules=None
        )
    )

    class FullDisk:
        def create(self, save_dir, fmt):
            raise OSError(28, "No space left on device")

    tokenizer = loaded.tokenizer
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    full = CaptureSpec(CapturePlan(points=points, mode="generate"), FullDisk(), "test")
    batch = [
        GenerationJob(tokenizer.encode(t), params, capture=full if i == 1 else None)
        for i, t in enumerate(TEXTS)
    ]
    expected = [summary(alone(loaded, GenerationJob(job.prompt_ids, params))) for job in batch]
    engine = Engine(loaded, max_batch_size=8, batch_window_s=0.5)

    async def scenario():
        return await asyncio.gather(*(engine.generate(job) for job in batch), return_exceptions=True)

    try:
        outcomes = asyncio.run(scenario())
    finally:
        engine.close()
    assert engine.scheduler.stats.sizes == {4: 1}
    assert isinstance(outcomes[1], OSError)
    assert [summary(outcomes[i]) for i in (0, 2, 3)] == [expected[i] for i in (0, 2, 3)]


def test_closing_the_scheduler_resolves_everything_that_waits():
    from concurrent.futures import CancelledError

    from server.engine.scheduler import Scheduler

    started, release = threading.Event(), threading.Event()
    scheduler = Scheduler(lambda jobs, on_done, take_more: None, max_queue=8)
    running = scheduler.submit_call(lambda: (started.set(), release.wait(10)))
    assert started.wait(10)
    waiting = [scheduler.submit_call(lambda: "never") for _ in range(3)]
    waiting[0].cancel()
    release.set()
    scheduler.close()
    assert running.result(timeout=10)[1] is True
    with pytest.raises(CancelledError):
        waiting[0].result(timeout=1)
    for future in waiting[1:]:  # either ran before the close or was told why it did not
        assert future.done()


def test_jobs_that_arrive_later_join_the_running_batch(loaded, tmp_path):
    """A batch is running; steered, capturing and plain jobs (other prompt lengths) arrive
    several steps in, join it, and still get exactly their solo answers and captures."""

    from interventions import Edit
    from server.engine.capture import CapturePlan, CaptureSpec
    from server.engine.hooks import HookResolver
    from server.engine.structure import find_layers
    from server.storage import ActivationStore

    resolver = HookResolver(loaded.hf_model, find_layers(loaded.hf_model))
    points = tuple(resolver.resolve(layers=[0, 1], hook_points=["resid_post"], modules=None))
    edit = Edit(
        point=points[1], operation="add", vector=torch.full((64,), 0.7), scale=3.0, positions="generated"
    )
    store = ActivationStore(tmp_path / "store")
    tokenizer = loaded.tokenizer
    prompts = [tokenizer.encode(t) for t in TEXTS]
    long = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    short = SamplingParams(max_tokens=8, temperature=0.8, seed=2, ignore_eos=True)

    def make():
        first = [GenerationJob(prompts[0], long), GenerationJob(prompts[3], long)]
        spec = CaptureSpec(CapturePlan(points=points, mode="generate"), store, "test")
        later = [
            GenerationJob(prompts[1], short, edits=(edit,)),
            GenerationJob(prompts[2], short, capture=spec),
            GenerationJob(prompts[1], SamplingParams(max_tokens=5, temperature=0, n=2)),
        ]
        return first, later

    def run(engine):
        first, later = make()

        async def scenario():
            running = [asyncio.ensure_future(engine.generate(job)) for job in first]
            while first[0].steps < 4:  # the batch is well under way
                await asyncio.sleep(0.005)
            joined = await asyncio.gather(*(engine.generate(job) for job in later))
            return list(await asyncio.gather(*running)) + list(joined)

        try:
            results = asyncio.run(scenario())
        finally:
            engine.close()
        captured = store.load_tensor(results[3].capture.id, "layers.1.resid_post", "safetensors")
        return engine.scheduler.stats, results, captured

    solo_stats, solo, solo_capture = run(Engine(loaded, max_batch_size=1, batch_window_s=0))
    stats, together, capture = run(Engine(loaded, max_batch_size=8, batch_window_s=0.05))
    assert solo_stats.largest == 1 and stats.joined == 3 and stats.peak_rows == 6
    assert [summary(r) for r in together] == [summary(r) for r in solo]
    assert capture.shape == solo_capture.shape
    torch.testing.assert_close(capture, solo_capture, atol=1e-5, rtol=1e-5)


def test_a_batch_that_lives_on_does_not_grow_with_its_history(loaded, monkeypatch):
    """Jobs join one per step and leave after 3 tokens: the batch never empties, yet its KV
    cache stays as wide as its longest live row (columns of padding in every row are dropped),
    and each job still gets its solo answer."""
    from server.engine import hf_runtime
    from tests.reference import run_in_loop

    tokenizer = loaded.tokenizer
    prompts = [tokenizer.encode(TEXTS[i % len(TEXTS)]) for i in range(16)]
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    jobs = [GenerationJob(p, params) for p in prompts]
    waiting = list(jobs[1:])
    widths = []
    merge = hf_runtime.HFBatch.merge

    def recording_merge(self, other):
        merge(self, other)
        widths.append(self.mask.shape[1])

    monkeypatch.setattr(hf_runtime.HFBatch, "merge", recording_merge)
    done = {}
    run_in_loop(
        loaded,
        jobs[:1],
        on_done=lambda job, outcome: done.__setitem__(id(job), outcome),
        take_more=lambda free: [waiting.pop(0)] if waiting else [],
        max_rows=8,
    )
    assert len(widths) == 15 and max(widths) <= max(map(len, prompts)) + 3
    expected = [summary(alone(loaded, GenerationJob(p, params))) for p in prompts]
    assert [summary(done[id(job)]) for job in jobs] == expected


def test_the_model_is_loaded_and_run_on_the_worker_thread(tiny_model_dir, tmp_path):
    """A second thread that ever ran a torch parallel op slows every decode step for good
    (docs/architecture.md): the engine is built, probed and run on its worker alone."""
    engine = Engine.from_settings(server_settings(tiny_model_dir, tmp_path))
    try:
        ran_on = asyncio.run(engine.compute(threading.get_ident))
    finally:
        engine.close()
    assert engine.built_on_thread == engine.scheduler.thread_id == ran_on != threading.get_ident()


def test_a_running_job_past_the_timeout_leaves_its_batch(loaded):
    engine = Engine(loaded, max_batch_size=8, batch_window_s=0.2, request_timeout=0.3)
    tokenizer = loaded.tokenizer
    slow = GenerationJob(
        tokenizer.encode(TEXTS[0]), SamplingParams(max_tokens=240, temperature=0, ignore_eos=True)
    )
    quick = GenerationJob(tokenizer.encode(TEXTS[1]), SamplingParams(max_tokens=4, temperature=0))

    async def scenario():
        return await asyncio.gather(engine.generate(slow), engine.generate(quick), return_exceptions=True)

    try:
        slow_outcome, quick_outcome = asyncio.run(scenario())
        engine.scheduler.submit_call(lambda: None).result(timeout=30)  # the worker is free again
    finally:
        engine.close()
    assert engine.scheduler.stats.largest == 2
    assert isinstance(slow_outcome, RequestTimedOut) and "after" in str(slow_outcome)
    assert slow.cancelled.is_set() and 0 < slow.steps < 600
    assert summary(quick_outcome) == summary(alone(loaded, GenerationJob(quick.prompt_ids, quick.params)))
