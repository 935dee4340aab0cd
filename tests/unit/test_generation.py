"""The engine's generation path on the tiny model: logprobs, cancellation, the one copy of the weights."""

from __future__ import annotations

import asyncio
import gc
import threading

import pytest
import torch

from server.engine.engine import Engine
from server.engine.job import GenerationJob, SamplingParams
from server.engine.loading import load_model
from tests.reference import run_in_loop


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(str(tiny_model_dir), dtype="float32", device="cpu")


def test_loading_makes_one_model_and_the_wrapper_traces_it(tiny_model_dir):
    """load_model creates exactly one HF model; nnsight traces that same module, not a copy."""
    from transformers import PreTrainedModel

    def models() -> set[int]:
        gc.collect()
        return {id(o) for o in gc.get_objects() if isinstance(o, PreTrainedModel)}

    before = models()
    loaded = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    created = models() - before
    served = {
        id(module) for module in loaded.hf_model.modules()
    }  # LlamaModel inside is a PreTrainedModel too
    assert id(loaded.hf_model) in created and created <= served
    assert loaded.hf_model is loaded.wrapper._module
    with loaded.wrapper.trace(torch.tensor([[1, 5, 9]])):
        traced = loaded.wrapper.model.layers[0].output.save()
    with torch.no_grad():
        direct = loaded.hf_model(torch.tensor([[1, 5, 9]]), output_hidden_states=True).hidden_states[1]
    assert torch.equal(traced, direct)


def test_sampled_logprobs_are_raw_model_logprobs(loaded, reference_model):
    """Logprobs come from the raw logits, not the temperature/top-p warped distribution."""
    prompt = [1, 20, 30, 40]
    params = SamplingParams(max_tokens=6, temperature=0.5, top_p=0.9, seed=11, logprobs=2, ignore_eos=True)
    (result,) = run_in_loop(loaded, [GenerationJob(prompt_ids=prompt, params=params)])
    choice = result.choices[0]
    assert len(choice.token_ids) == 6
    with torch.no_grad():
        logits = reference_model(torch.tensor([prompt + choice.token_ids])).logits[0]
    expected = torch.log_softmax(logits.float(), dim=-1)
    for step, (token, entry) in enumerate(zip(choice.token_ids, choice.logprobs, strict=True)):
        row = expected[len(prompt) - 1 + step]
        assert entry.token_id == token
        assert entry.logprob == pytest.approx(row[token].item(), abs=1e-4)
        assert [i for i, _ in entry.top] == row.topk(2).indices.tolist()


def test_seeded_sampling_does_not_disturb_the_global_rng(loaded):
    torch.manual_seed(99)
    expected_next = torch.rand(1)
    torch.manual_seed(99)
    params = SamplingParams(max_tokens=4, temperature=1.0, seed=5)
    run_in_loop(loaded, [GenerationJob(prompt_ids=[1, 2, 3], params=params)])
    assert torch.equal(torch.rand(1), expected_next)


def test_closing_a_stream_cancels_the_job(loaded):
    engine = Engine(loaded)

    async def scenario():
        job = GenerationJob(
            prompt_ids=[1, 2, 3], params=SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
        )
        stream = engine.stream(job)
        seen = 0
        async for _ in stream:
            seen += 1
            if seen == 3:
                break
        await stream.aclose()
        assert job.cancelled.is_set()
        # The worker is free again: a new job runs to completion.
        after = GenerationJob(prompt_ids=[1, 2], params=SamplingParams(max_tokens=2, temperature=0))
        result = await engine.generate(after)
        return job, result

    try:
        job, result = asyncio.run(scenario())
    finally:
        engine.close()
    assert len(result.choices[0].token_ids) <= 2
    assert job.steps < 200  # stopped early, not run to max_tokens


def test_cancelled_before_start_runs_nothing(loaded):
    job = GenerationJob(prompt_ids=[1, 2], params=SamplingParams(max_tokens=5), cancelled=threading.Event())
    job.cancelled.set()
    (result,) = run_in_loop(loaded, [job])
    assert job.steps == 0 and result.choices[0].token_ids == []
