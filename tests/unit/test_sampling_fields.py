"""The sampling fields beyond temperature/top-p/top-k: ``logit_bias``, ``repetition_penalty``,
``frequency_penalty``, ``presence_penalty``, ``min_tokens``, ``min_p``, ``stop_token_ids``.

References: HF ``generate`` with HF's own logits processors where HF has one
(``tests/reference.hf_generate``: sequence bias, repetition penalty, min new tokens, min-p);
for OpenAI's frequency and presence penalties (HF has none), greedy decoding by full forward
passes with the formula written out here; each field per row: a batch equals each job alone.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from reference import hf_generate, run_in_loop

from server.engine.job import GenerationJob, SamplingParams
from server.engine.loading import load_model

PROMPT = [1, 20, 30, 40, 50, 60]
GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
SAMPLED = SamplingParams(max_tokens=10, temperature=0.9, seed=5, ignore_eos=True)


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(str(tiny_model_dir), dtype="float32", device="cpu")


def ours(loaded, params: SamplingParams, prompt=PROMPT):
    (result,) = run_in_loop(loaded, [GenerationJob(list(prompt), params)])
    return result.choices[0]


def theirs(loaded, params: SamplingParams, prompt=PROMPT):
    return hf_generate(loaded, GenerationJob(list(prompt), params)).choices[0]


CASES = {
    "logit_bias": {"logit_bias": ((77, 8.0), (5, -100.0))},
    "repetition_penalty": {"repetition_penalty": 1.8},
    "min_p": {"min_p": 0.2},
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("base", [GREEDY, SAMPLED], ids=["greedy", "seeded"])
def test_a_field_equals_hfs_own_logits_processor(loaded, name, base):
    params = dataclasses.replace(base, **CASES[name])
    assert ours(loaded, params).token_ids == theirs(loaded, params).token_ids
    if name != "min_p":  # min-p cannot change a greedy choice (checked seeded, below)
        greedy = dataclasses.replace(GREEDY, **CASES[name])
        assert ours(loaded, greedy).token_ids != ours(loaded, GREEDY).token_ids  # it did something
    else:
        assert (
            ours(loaded, dataclasses.replace(SAMPLED, min_p=0.2)).token_ids != ours(loaded, SAMPLED).token_ids
        )


def test_min_tokens_holds_back_eos_as_hf_does(loaded):
    eos = loaded.tokenizer.eos_token_id
    eager = SamplingParams(max_tokens=10, temperature=0, logit_bias=((eos, 50.0),))  # EOS at once
    assert ours(loaded, eager).token_ids == [eos]
    held = dataclasses.replace(eager, min_tokens=4)
    choice = ours(loaded, held)
    assert choice.token_ids == theirs(loaded, held).token_ids
    assert len(choice.token_ids) == 5 and choice.token_ids[-1] == eos and eos not in choice.token_ids[:4]
    assert choice.finish_reason == "stop"


def test_a_stop_token_id_ends_the_choice_and_keeps_its_text_as_vllm_does(loaded):
    plain = ours(loaded, GREEDY).token_ids
    stop_at = plain[3]
    first = plain.index(stop_at)
    params = dataclasses.replace(GREEDY, stop_token_ids=(stop_at,))
    choice = ours(loaded, params)
    assert choice.token_ids == plain[: first + 1] and choice.finish_reason == "stop"
    assert choice.token_ids == theirs(loaded, params).token_ids
    assert choice.text == loaded.tokenizer.decode(plain[: first + 1], skip_special_tokens=True)


def test_min_tokens_holds_back_stop_token_ids_too(loaded):
    plain = ours(loaded, GREEDY).token_ids
    early = plain[0]  # what the model says first
    held = dataclasses.replace(GREEDY, stop_token_ids=(early,), min_tokens=3)
    choice = ours(loaded, held)
    assert early not in choice.token_ids[:3] and len(choice.token_ids) >= 3
    assert choice.token_ids == theirs(loaded, held).token_ids


def test_stop_strings_wait_for_min_tokens_as_vllm_does(loaded):
    from server.engine.text import CompletionText

    plain = ours(loaded, GREEDY)
    stop = loaded.tokenizer.decode(plain.token_ids[:1], skip_special_tokens=True)  # in the first token
    assert stop
    stopped = ours(loaded, dataclasses.replace(GREEDY, stop=(stop,)))
    assert stopped.finish_reason == "stop" and len(stopped.token_ids) == 1
    waited = ours(loaded, dataclasses.replace(GREEDY, stop=(stop,), min_tokens=4))
    assert len(waited.token_ids) >= 4
    text = CompletionText(loaded.tokenizer, ("b",), min_tokens=2)
    ids = loaded.tokenizer.encode("ab", add_special_tokens=False)
    assert len(ids) <= 2 and not any(text.append(t) for t in ids[:1])


def greedy_with_penalties(model, ids: list[int], steps: int, frequency: float, presence: float) -> list[int]:
    """OpenAI's formula (as vLLM applies it, output tokens only), by full forward passes."""
    out: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([ids + out])).logits[0, -1].float()
            counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=logits.shape[0]).float()
            logits = logits - frequency * counts - presence * (counts > 0).float()
            out.append(int(logits.argmax()))
    return out


@pytest.mark.parametrize(("frequency", "presence"), [(1.5, 0.0), (0.0, 2.0), (-1.0, 0.5)])
def test_frequency_and_presence_penalties_follow_openais_formula(
    loaded, reference_model, frequency, presence
):
    params = dataclasses.replace(GREEDY, frequency_penalty=frequency, presence_penalty=presence)
    expected = greedy_with_penalties(reference_model, PROMPT, GREEDY.max_tokens, frequency, presence)
    assert ours(loaded, params).token_ids == expected
    assert expected != ours(loaded, GREEDY).token_ids  # it did something


def test_each_row_of_a_batch_keeps_its_own_fields(loaded):
    jobs = [
        (PROMPT, dataclasses.replace(GREEDY, repetition_penalty=2.0, frequency_penalty=1.0)),
        ([3, 4, 5], GREEDY),
        ([7, 8, 9, 10], dataclasses.replace(SAMPLED, logit_bias=((77, 6.0),), min_p=0.1)),
    ]
    together = run_in_loop(loaded, [GenerationJob(list(p), params) for p, params in jobs])
    for (prompt, params), batched in zip(jobs, together, strict=True):
        assert batched.choices[0].token_ids == ours(loaded, params, prompt).token_ids


def test_logprobs_stay_those_of_the_raw_logits(loaded):
    """As OpenAI and vLLM report them: the processors change what is chosen, not its logprob."""
    biased = dataclasses.replace(GREEDY, max_tokens=3, logprobs=0, logit_bias=((77, 30.0),))
    plain = dataclasses.replace(GREEDY, max_tokens=1, logprobs=0)
    first = ours(loaded, biased).logprobs[0]
    assert first.token_id == 77
    with torch.no_grad():
        logits = loaded.hf_model(torch.tensor([PROMPT])).logits[0, -1].float()
    assert first.logprob == pytest.approx(float(torch.log_softmax(logits, -1)[77]), abs=1e-4)
    assert ours(loaded, plain).logprobs[0].token_id != 77


HTTP_FIELDS = {
    "frequency_penalty": 2.0,
    "presence_penalty": 2.0,
    "repetition_penalty": 3.0,
    "min_p": 0.5,
    "logit_bias": {"77": 30},
    "min_tokens": 12,
}


@pytest.mark.parametrize("name", sorted(HTTP_FIELDS))
def test_each_field_over_http_changes_the_answer(client, name):
    body = {"messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 12, "temperature": 0.9,
            "seed": 3, "logprobs": True}  # fmt: skip
    if name in ("frequency_penalty", "presence_penalty", "repetition_penalty"):
        body["temperature"] = 0  # greedy answers repeat tokens: the penalties show
    if name == "min_tokens":  # EOS made likely, so holding it back shows
        body["logit_bias"] = {str(client.app.state.engine.loaded.tokenizer.eos_token_id): 8}

    def tokens(extra: dict) -> list[str]:
        response = client.post("/v1/chat/completions", json={**body, **extra})
        assert response.status_code == 200, response.text
        return [entry["token"] for entry in response.json()["choices"][0]["logprobs"]["content"]]

    assert tokens({name: HTTP_FIELDS[name]}) != tokens({})
