"""The engine core: one loop for every job, the runtime seam, the one home of interventions."""

from __future__ import annotations

import asyncio

import pytest
import torch

from interventions import OPERATIONS, InterventionRequest
from server.engine.engine import Engine
from server.engine.hf_runtime import HFBatch
from server.engine.hooks import HookResolver
from server.engine.job import GenerationJob, SamplingParams
from server.engine.lda import LdaJob
from server.engine.loading import load_model
from server.engine.runtime import RowGroup
from server.engine.structure import find_layers
from tests.reference import hf_generate, run_in_loop


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(str(tiny_model_dir), dtype="float32", device="cpu")


def test_the_wire_model_names_exactly_the_operation_table():
    assert set(InterventionRequest.model_fields["type"].annotation.__args__) == set(OPERATIONS)


def test_a_step_without_reads_or_edits_equals_a_traced_step(loaded):
    """The runtime calls the wrapped module itself when nothing is read or edited, else traces
    through nnsight: the logits are the same, step after step, for rows of different lengths."""
    point = HookResolver(loaded.hf_model, find_layers(loaded.hf_model)).resolve(
        layers=[0], hook_points=["resid_post"], modules=None
    )[0]
    prompts = [[1, 20, 30, 40, 50], [7, 8]]
    pad = loaded.tokenizer.pad_token_id
    plain = HFBatch(loaded.wrapper, [RowGroup(p) for p in prompts], pad)
    seen = []
    traced = HFBatch(
        loaded.wrapper, [RowGroup(p, reads=(point,), on_values=seen.append) for p in prompts], pad
    )
    assert plain.plan.empty and not traced.plan.empty
    for _ in range(4):
        a, b = plain.forward(), traced.forward()
        assert torch.equal(a, b)
        tokens = a.argmax(-1)
        plain.append(tokens)
        traced.append(tokens)
    assert len(seen) == 2 * 4  # each group read at every step


def test_a_short_request_joins_a_long_one_instead_of_waiting(loaded):
    """A job alone is a batch of one: a short job sent while a long one runs joins it and is
    answered long before the long one ends, with exactly what it gets alone."""
    engine = Engine(loaded, max_batch_size=8, batch_window_s=0)
    long_job = GenerationJob([1, 20, 30], SamplingParams(max_tokens=400, temperature=0, ignore_eos=True))
    short_params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    short_job = GenerationJob([5, 6, 7, 8], short_params)

    async def scenario():
        running = asyncio.ensure_future(engine.generate(long_job))
        while long_job.steps < 3:
            await asyncio.sleep(0.002)
        short = await engine.generate(short_job)
        steps_when_short_done = long_job.steps
        return short, steps_when_short_done, await running

    try:
        short, steps_then, long_result = asyncio.run(scenario())
    finally:
        engine.close()
    assert engine.scheduler.stats.joined == 1 and engine.scheduler.stats.batches == 1
    assert steps_then < 100 and len(long_result.choices[0].token_ids) == 400
    expected = hf_generate(loaded, GenerationJob([5, 6, 7, 8], short_params))
    assert short.choices[0].token_ids == expected.choices[0].token_ids


def test_lda_rows_and_chat_jobs_share_one_batch_each_as_alone(loaded):
    """LDA's two sides are two lanes of the same loop step: LDA rows batched with plain jobs
    give what each gives alone (alpha 0 is the after side alone: plain greedy decoding)."""
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    prompts = [[1, 20, 30, 40], [9, 8]]
    lda = LdaJob(
        after_prompts=tuple(map(tuple, prompts)),
        before_prompts=((3, 4, 5), (6,)),
        alpha=0.0,
        params=params,
    )
    chat = GenerationJob([11, 12, 13], SamplingParams(max_tokens=4, temperature=0.8, seed=3, n=2))
    together = run_in_loop(loaded, [*lda.jobs, chat])
    plain = [hf_generate(loaded, GenerationJob(p, params)).choices[0].token_ids for p in prompts]
    assert [r.choices[0].token_ids for r in together[:2]] == plain
    alone = hf_generate(loaded, GenerationJob([11, 12, 13], chat.params))
    assert [c.token_ids for c in together[2].choices] == [c.token_ids for c in alone.choices]


def test_a_job_whose_logits_go_non_finite_ends_alone(loaded):
    """An edit that overflows the dtype ends its own job with NonFiniteLogits; the job batched
    beside it gets what it gets alone."""
    from interventions import Edit
    from server.engine.sampler import NonFiniteLogits

    (point,) = HookResolver(loaded.hf_model, find_layers(loaded.hf_model)).resolve(
        layers=None, hook_points=None, modules=["lm_head.output"]
    )
    overflow = Edit(point=point, operation="scale", factor=1e39)
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logprobs=2)
    broken, neighbour = run_in_loop(
        loaded, [GenerationJob([1, 2, 3], params, edits=(overflow,)), GenerationJob([4, 5, 6, 7], params)]
    )
    assert isinstance(broken, NonFiniteLogits) and broken.edited and broken.step == 0
    (alone,) = run_in_loop(loaded, [GenerationJob([4, 5, 6, 7], params)])
    assert neighbour.choices[0].token_ids == alone.choices[0].token_ids


def test_a_logprob_of_minus_infinity_is_reported_as_the_floor():
    from server.engine.sampler import LOGPROB_FLOOR, chosen_logprobs

    logits = torch.tensor([[0.0, float("-inf"), 1.0]])
    (entry,) = chosen_logprobs(logits, torch.tensor([2]), top_k=3)
    assert entry.top[-1] == (1, LOGPROB_FLOOR)
