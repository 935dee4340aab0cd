"""LDA: the decode loop against independent references, the before kinds, and the endpoints.

References: plain greedy decoding by full forward passes (no cache, no padding), HF
``generate`` for seeded sampling, a PEFT model built by peft itself for the adapter,
and the server's own chat/completions endpoints for interventions and system prompts.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from fastapi.testclient import TestClient

from server.app import create_app
from server.config import Settings
from server.engine.hf_runtime import HFBatch
from server.engine.job import SamplingParams
from server.engine.lda import LdaJob, LdaResult, amplify
from server.engine.loading import ModelLoadError, check_same_vocabulary, load_model
from server.engine.memory import ModelShape, estimate_lda
from server.engine.runtime import RowGroup
from tests.reference import decode_loop

TEXTS = ["The quick brown fox", "What is the capital of France? The capital of France is", "Count"]
STEPS = 10


def greedy_reference(model, ids: list[int], steps: int = STEPS) -> list[int]:
    """Greedy decoding by full forward passes: no cache, no padding, nothing shared with the server."""
    ids = list(ids)
    out = []
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            out.append(token)
            ids.append(token)
    return out


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(str(tiny_model_dir))


@pytest.fixture(scope="module")
def prompts(tiny_tokenizer) -> list[list[int]]:
    return [tiny_tokenizer.encode(text) for text in TEXTS]


@pytest.fixture(scope="module")
def other_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with perturbed weights and the same tokenizer: a "before" checkpoint."""
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("before-model")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def other_model(other_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(other_model_dir).eval()


@pytest.fixture(scope="module")
def other_loaded(other_model_dir):
    return load_model(str(other_model_dir))


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    """A LoRA adapter with random (non-zero) weights, saved by peft itself."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("adapter")
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False
    )
    get_peft_model(model, config).save_pretrained(folder)
    return folder


def run_lda(loaded, before, job: LdaJob, eos=None) -> LdaResult:
    """An LDA job's rows through the engine's decode loop, its before side on ``before``."""
    loop = decode_loop(loaded, before)
    if eos is not None:
        loop.eos_ids = eos
    outcomes = loop.run(job.jobs)
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
    return LdaResult(rows=[outcome.choices[0] for outcome in outcomes], steps=job.steps)


def lda_job(prompts, before_prompts=None, alpha=1.0, **params) -> LdaJob:
    """Rows of ``prompts``; the before side runs the before checkpoint."""
    return LdaJob(
        after_prompts=tuple(map(tuple, prompts)),
        before_prompts=tuple(map(tuple, before_prompts or prompts)),
        alpha=alpha,
        params=SamplingParams(**params),
        weights="before_model",
    )


def run(loaded, before, prompts, alpha=1.5, eos=None, before_prompts=None, **params):
    params = {"max_tokens": STEPS, "temperature": 0, **params}
    return run_lda(loaded, before, lda_job(prompts, before_prompts, alpha, **params), eos)


# -- the decode loop -------------------------------------------------------------------


def test_amplify_moves_probability_toward_what_after_prefers():
    before = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    after = before + torch.tensor([[0.0, 1.0, 0.0, 0.0]])  # after prefers token 1 more than before does
    p_after = torch.softmax(amplify(after, before, 0.0), -1)
    p_lda = torch.softmax(amplify(after, before, 2.0), -1)
    assert torch.equal(amplify(after, before, 0.0), after)
    assert torch.allclose(amplify(after, before, -1.0), before)
    assert p_lda[0, 1] > p_after[0, 1] > torch.softmax(before, -1)[0, 1]


def test_alpha_zero_samples_exactly_what_the_after_model_alone_samples(
    loaded, other_loaded, prompts, reference_model
):
    """Same seed: token for token what HF generate samples from the after model alone."""
    settings = {"temperature": 0.8, "top_p": 0.9, "top_k": 40, "seed": 11}
    for ids in prompts:
        result = run(loaded, other_loaded, [ids], alpha=0.0, **settings)
        torch.manual_seed(settings["seed"])
        with torch.no_grad():
            expected = reference_model.generate(
                torch.tensor([ids]),
                do_sample=True,
                temperature=0.8,
                top_p=0.9,
                top_k=40,
                max_new_tokens=STEPS,
                pad_token_id=loaded.tokenizer.pad_token_id,
                eos_token_id=loaded.tokenizer.eos_token_id,
            )[0, len(ids) :].tolist()
        assert result.rows[0].token_ids == expected[: len(result.rows[0].token_ids)]
        assert len(result.rows[0].token_ids) == len(expected)


def test_alpha_minus_one_is_the_before_model_alone(loaded, other_loaded, other_model, prompts):
    result = run(loaded, other_loaded, prompts, alpha=-1.0, ignore_eos=True)
    assert [row.token_ids for row in result.rows] == [greedy_reference(other_model, ids) for ids in prompts]


def test_greedy_batch_equals_greedy_singles(loaded, other_loaded, prompts):
    assert len({len(ids) for ids in prompts}) == len(prompts)  # different lengths: real left padding
    batched = run(loaded, other_loaded, prompts, ignore_eos=True)
    singles = [run(loaded, other_loaded, [ids], ignore_eos=True).rows[0] for ids in prompts]
    assert [row.token_ids for row in batched.rows] == [row.token_ids for row in singles]
    assert [row.text for row in batched.rows] == [row.text for row in singles]


def test_seeded_sampled_batch_row_equals_a_single_run_with_the_row_seed(loaded, other_loaded, prompts):
    batched = run(loaded, other_loaded, prompts, temperature=1.0, seed=5, ignore_eos=True)
    again = run(loaded, other_loaded, prompts, temperature=1.0, seed=5, ignore_eos=True)
    assert [r.token_ids for r in batched.rows] == [r.token_ids for r in again.rows]
    for i, ids in enumerate(prompts):
        single = run(loaded, other_loaded, [ids], temperature=1.0, seed=5 + i, ignore_eos=True)
        assert single.rows[0].token_ids == batched.rows[i].token_ids


def test_eos_ends_one_row_and_the_others_go_on_unchanged(loaded, other_loaded, prompts):
    free = run(loaded, other_loaded, prompts, ignore_eos=True)
    row0 = free.rows[0].token_ids
    stop_at = next(k for k in range(2, STEPS) if row0[k] not in row0[:k])
    eos = frozenset({row0[stop_at]})
    stopped = run(loaded, other_loaded, prompts, eos=eos)
    assert stopped.rows[0].token_ids == row0[: stop_at + 1]
    assert stopped.rows[0].finish_reason == "stop"
    for i in range(1, len(prompts)):
        solo = run(loaded, other_loaded, [prompts[i]], eos=eos).rows[0]
        assert stopped.rows[i].token_ids == solo.token_ids  # the batch shrank; this row did not notice
        assert stopped.rows[i].finish_reason == solo.finish_reason


def test_completions_hold_generated_tokens_only(loaded, other_loaded, prompts, tiny_tokenizer):
    result = run(loaded, other_loaded, prompts, ignore_eos=True)
    for ids, row in zip(prompts, result.rows, strict=True):
        assert len(row.token_ids) == STEPS
        assert row.text == tiny_tokenizer.decode(row.token_ids, skip_special_tokens=True)
        assert not row.text.startswith(tiny_tokenizer.decode(ids))


def test_cancelled_job_stops(loaded, other_loaded, prompts):
    job = lda_job(prompts, max_tokens=STEPS, temperature=0)
    job.cancelled.set()
    result = run_lda(loaded, other_loaded, job)
    assert result.steps == 0 and all(row.finish_reason == "length" for row in result.rows)


def test_memory_estimate_covers_both_kv_caches(loaded, other_loaded, prompts):
    """The estimate's KV bytes are exactly what the two sides' caches hold after the prompts."""
    groups = [RowGroup(ids) for ids in prompts]
    sides = [HFBatch(m.wrapper, groups, loaded.tokenizer.pad_token_id) for m in (loaded, other_loaded)]
    for side in sides:
        side.forward()
    held = sum(
        t.numel() * t.element_size()
        for side in sides
        for layer in side.cache.layers
        for t in (layer.keys, layer.values)
    )
    shape = ModelShape.of(loaded.hf_model, loaded.hf_model.config.num_hidden_layers)
    width = max(map(len, prompts))
    estimate = estimate_lda(
        shape,
        shape,
        rows=len(prompts),
        after_prompt=width,
        before_prompt=width,
        max_tokens=0,
        resident_weights=0,
    )
    assert estimate.kv_cache == held


def test_a_before_model_with_another_vocabulary_is_refused(loaded, other_model_dir, tmp_path):
    from transformers import AutoTokenizer

    folder = tmp_path / "other-vocab"
    shutil.copytree(other_model_dir, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_tokens(["<not-in-the-served-vocabulary>"])
    tokenizer.save_pretrained(folder)
    with pytest.raises(ModelLoadError, match="vocabulary differs"):
        check_same_vocabulary(loaded, load_model(str(folder)))


# -- the endpoints ---------------------------------------------------------------------


def lda(client, path="/v1/lda", status=200, **body):
    response = client.post(path, json=body)
    assert response.status_code == status, response.text
    return response.json()


def test_compat_endpoints_shape_and_batch_equals_singles(client, tiny_tokenizer):
    before = {"system_prompt": "You are terse."}
    common = {"alpha": 2.0, "temperature": 0, "max_new_tokens": 8, "before": before, "ignore_eos": True}
    batch = lda(client, "/generate_lda_batch", prompts=TEXTS, **common)
    assert batch["batch_size"] == len(TEXTS) and batch["alpha"] == 2.0
    assert batch["model_before"].endswith("(other system prompt)")
    for text, result in zip(TEXTS, batch["results"], strict=True):
        single = lda(client, "/generate_lda", prompt=text, **common)
        assert single == result
        assert set(single) == {
            "prompt",
            "formatted_prompt",
            "completion",
            "text",
            "alpha",
            "model_after",
            "model_before",
            "tokens_generated",
            "stopped_early",
        }
        assert single["prompt"] == text and text in single["formatted_prompt"]
        assert single["text"] == single["formatted_prompt"] + single["completion"]
        assert single["tokens_generated"] == 8 and single["stopped_early"] is False
        assert text not in single["completion"]


def chat_text(client, system, user, max_tokens=8):
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user}
    ]
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    return client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]


def test_system_prompt_sides_equal_the_chat_endpoint(client):
    body = {
        "prompt": TEXTS[0],
        "max_tokens": 8,
        "temperature": 0,
        "ignore_eos": True,
        "system_prompt": "Be kind.",
    }
    before = {"system_prompt": "Be rude."}
    after_alone = lda(client, alpha=0.0, before=before, **body)["results"][0]["completion"]
    before_alone = lda(client, alpha=-1.0, before=before, **body)["results"][0]["completion"]
    assert after_alone == chat_text(client, "Be kind.", TEXTS[0])
    assert before_alone == chat_text(client, "Be rude.", TEXTS[0])


def test_interventions_sides_equal_the_completions_endpoint(client):
    steer = [{"type": "add", "layer": 0, "hook_point": "resid_post", "vector": [0.5] * 64, "scale": 4.0}]
    body = {
        "prompt": TEXTS[1],
        "max_tokens": 8,
        "temperature": 0,
        "ignore_eos": True,
        "apply_chat_template": False,
    }
    with_ = lda(client, alpha=0.0, before={"interventions": steer}, **body)["results"][0]["completion"]
    without = lda(client, alpha=-1.0, before={"interventions": steer}, **body)["results"][0]["completion"]

    def completion(interventions):
        request = {"prompt": TEXTS[1], "max_tokens": 8, "temperature": 0, "ignore_eos": True}
        if interventions:
            request["interventions"] = interventions
        return client.post("/v1/completions", json=request).json()["choices"][0]["text"]

    assert with_ == completion(steer) and without == completion(None) and with_ != without


def test_token_stats_and_a_constructed_preference(client, tiny_tokenizer):
    """The after side adds +3 to one token's logit: the stats see exactly that difference, and
    sampling with alpha > 0 picks that token more often than the after side alone does."""
    vocab = len(tiny_tokenizer)
    target = tiny_tokenizer.encode(" the")[0]
    boost = [0.0] * vocab
    boost[target] = 3.0
    before = {"interventions": [{"type": "add", "module": "lm_head.output", "vector": boost}]}
    body = {"prompt": [TEXTS[0]] * 16, "max_tokens": 1, "temperature": 1.0, "seed": 0, "before": before}
    stats = lda(client, alpha=0.0, token_stats=True, **body)["results"]
    for row in stats:
        token = row["tokens"][0]
        assert token["logit_diff_norm"] == pytest.approx(3.0, rel=1e-4)
        assert token["kl"] > 0
        if token["token_id"] == target:
            assert token["logprob_after"] > token["logprob_before"]

    def hits(alpha):
        results = lda(client, alpha=alpha, **body)["results"]
        return sum(r["token_ids"] == [target] for r in results)

    assert hits(4.0) > hits(0.0)


BAD = [
    ({"alpha": 1e6}, "alpha"),
    ({"prompt": ["x"] * 40}, "prompt"),
    ({"before": {"adapter": "off", "prefix": "x"}}, "before"),
    ({"before": {}}, "before"),
    ({"before": {"adapter": "on"}}, "before.adapter"),
    ({"before": {"adapter": "off"}}, "before.adapter"),
    ({"before": {"model": "nope"}}, "before.model"),
    ({"before": {"system_prompt": "x"}, "apply_chat_template": False}, "before.system_prompt"),
    (
        {
            "before": {
                "interventions": [
                    {"type": "add", "layer": 99, "hook_point": "resid_post", "vector": [0.0] * 64}
                ]
            }
        },
        "before.interventions[0].layer",
    ),
    ({"max_tokens": 10_000}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"prompt": []}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"temperature": -1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"seed": -1}, "seed"),
    ({"model": "other-model"}, "model"),
]


@pytest.mark.parametrize(("change", "param"), BAD, ids=[p for _, p in BAD])
def test_bad_lda_requests_name_the_field(client, change, param):
    body = {"prompt": "Hello", "before": {"prefix": "Hi. "}, "max_tokens": 4, **change}
    response = client.post("/v1/lda", json=body)
    assert 400 <= response.status_code < 500, response.text
    assert response.json()["error"]["param"] == param
    assert lda(client, prompt="Hello", before={"prefix": "Hi. "}, max_tokens=2)["results"]  # still serving


def test_no_default_before_side_is_refused_naming_before(client):
    response = client.post("/generate_lda", json={"prompt": "Hello"})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "before"


def test_memory_budget_names_the_batch(tiny_model_dir, tmp_path, loaded):
    weights = ModelShape.of(loaded.hf_model, 2).weight_bytes
    settings = Settings(
        model=str(tiny_model_dir),
        activations_dir=tmp_path / "a",
        vectors_dir=tmp_path / "v",
        memory_budget=weights + 3_000_000,
    )
    with TestClient(create_app(settings)) as client:
        body = {"before": {"prefix": "x"}, "max_tokens": 64, "temperature": 0}
        assert lda(client, prompt="Hello", **body)["results"]
        response = client.post("/v1/lda", json={"prompt": ["Hello"] * 32, **body})
        assert response.status_code == 400
        assert response.json()["error"]["param"] == "prompt"
        assert response.json()["error"]["code"] == "memory_budget_exceeded"


# -- servers with a before model or an adapter -------------------------------------------


def test_lda_before_model_is_the_default_before_side(
    tiny_model_dir, other_model_dir, other_model, tmp_path, tiny_tokenizer
):
    settings = Settings(
        model=str(tiny_model_dir),
        lda_before=str(other_model_dir),
        activations_dir=tmp_path / "a",
        vectors_dir=tmp_path / "v",
    )
    with TestClient(create_app(settings)) as client:
        structure = client.get("/v1/model/structure").json()
        assert structure["lda_before"] == str(other_model_dir)
        body = {
            "prompt": TEXTS[0],
            "max_tokens": STEPS,
            "temperature": 0,
            "ignore_eos": True,
            "apply_chat_template": False,
        }
        result = lda(client, alpha=-1.0, **body)
        assert result["before"] == "model" and result["model_before"] == str(other_model_dir)
        expected = greedy_reference(other_model, tiny_tokenizer.encode(TEXTS[0]))
        assert result["results"][0]["token_ids"] == expected
        named = lda(client, alpha=-1.0, before={"model": str(other_model_dir)}, **body)
        assert named["results"] == result["results"]


def test_adapter_on_and_off_equal_peft_and_the_base_model(
    tiny_model_dir, adapter_dir, reference_model, tmp_path, tiny_tokenizer
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with_adapter = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter_dir
    ).eval()
    settings = Settings(
        model=str(tiny_model_dir),
        adapter=adapter_dir,
        activations_dir=tmp_path / "a",
        vectors_dir=tmp_path / "v",
    )
    ids = tiny_tokenizer.encode(TEXTS[1])
    after_expected = greedy_reference(with_adapter, ids)
    before_expected = greedy_reference(reference_model, ids)
    assert after_expected != before_expected  # the adapter matters
    with TestClient(create_app(settings)) as client:
        body = {
            "prompt": TEXTS[1],
            "max_tokens": STEPS,
            "temperature": 0,
            "ignore_eos": True,
            "apply_chat_template": False,
        }
        after = lda(client, alpha=0.0, **body)  # default before side: the adapter off
        assert after["before"] == "adapter" and after["model_before"].endswith("(adapter off)")
        assert after["results"][0]["token_ids"] == after_expected
        assert lda(client, alpha=-1.0, **body)["results"][0]["token_ids"] == before_expected
        # Ordinary requests run with the adapter on, and LDA left it on.
        plain = client.post(
            "/v1/completions",
            json={
                "prompt": TEXTS[1],
                "max_tokens": STEPS,
                "temperature": 0,
                "ignore_eos": True,
                "logprobs": 0,
            },
        ).json()
        assert [t for t in plain["choices"][0]["logprobs"]["tokens"]] == [
            tiny_tokenizer.decode([t]) for t in after_expected
        ]


def test_an_adapter_folder_that_is_not_one_is_refused(tiny_model_dir, tmp_path):
    with pytest.raises(ModelLoadError, match="adapter_config.json"):
        load_model(str(tiny_model_dir), adapter=tmp_path)


def test_position_specific_interventions_land_on_each_rows_own_positions(client):
    """With left padding, absolute position p of a row is column p + its padding: a batch with
    position-specific edits must equal the same prompts run one by one."""
    steer = [
        {
            "type": "add",
            "layer": 0,
            "hook_point": "resid_post",
            "vector": [1.0] * 64,
            "scale": 6.0,
            "positions": [0, 2],
        },
        {"type": "scale", "layer": 1, "hook_point": "mlp_out", "factor": 0.0, "positions": "prompt"},
    ]
    body = {
        "max_tokens": 6,
        "temperature": 0,
        "ignore_eos": True,
        "apply_chat_template": False,
        "alpha": 1.0,
        "before": {"interventions": steer},
    }
    batch = lda(client, prompt=TEXTS, **body)["results"]
    singles = [lda(client, prompt=text, **body)["results"][0] for text in TEXTS]
    assert [r["token_ids"] for r in batch] == [r["token_ids"] for r in singles]


def test_stop_strings_end_a_row_before_the_stop(client):
    body = {
        "prompt": TEXTS[0],
        "max_tokens": 8,
        "temperature": 0,
        "ignore_eos": True,
        "before": {"prefix": "x "},
    }
    full = lda(client, **body)["results"][0]
    stop = full["completion"][3:6]
    assert stop and full["completion"].find(stop) == 3
    cut = lda(client, stop=stop, **body)["results"][0]
    assert cut["completion"] == full["completion"][:3]
    assert cut["finish_reason"] == "stop" and cut["tokens_generated"] < 8


def test_a_run_cancelled_midway_stops_at_the_next_step(loaded, other_loaded, prompts, monkeypatch):
    import server.engine.loop as loop_module

    job = lda_job(prompts, max_tokens=STEPS, temperature=0, ignore_eos=True)
    choose = loop_module.sample

    calls = []

    def choose_then_cancel(*args):
        calls.append(1)
        if len(calls) == 2 * job.rows + 1:  # the first row's draw in the third step (one per row)
            job.cancelled.set()  # as Engine.lda does when the client goes away
        return choose(*args)

    monkeypatch.setattr(loop_module, "sample", choose_then_cancel)
    result = run_lda(loaded, other_loaded, job)
    assert result.steps == 3 and all(len(row.token_ids) == 3 for row in result.rows)


def test_the_adapter_is_back_on_after_a_failing_before_side(tiny_model_dir, adapter_dir, prompts):
    from server.engine.hf_runtime import adapter_disabled

    loaded = load_model(str(tiny_model_dir), adapter=adapter_dir)
    model = loaded.hf_model
    ids = torch.tensor([prompts[0]])
    with torch.no_grad():
        on = model(ids).logits
        with pytest.raises(RuntimeError, match="boom"):
            with adapter_disabled(model):
                off = model(ids).logits
                raise RuntimeError("boom")
        again = model(ids).logits
    assert not torch.allclose(on, off)
    assert torch.equal(on, again)


def test_an_adapter_for_another_model_is_refused(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    bigger = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=400,
            hidden_size=96,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(bigger, config).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="--adapter"):
        load_model(str(tiny_model_dir), adapter=tmp_path)


def test_a_peft_release_transformers_refuses_is_caught_at_start_up(tiny_model_dir, adapter_dir, monkeypatch):
    """transformers 5.24 wants peft >= 0.22: the adapter loads, then every request that switches
    it off fails. The server refuses to start instead, saying what to install."""
    import transformers.integrations.peft as hf_peft

    monkeypatch.setattr(hf_peft, "MIN_PEFT_VERSION", "99.0")  # what a newer transformers asks for
    with pytest.raises(ModelLoadError, match=r"needs peft >= 99.0, but peft .* is installed.*install.sh"):
        load_model(str(tiny_model_dir), adapter=adapter_dir)


def test_missing_peft_is_caught_at_start_up(adapter_dir, monkeypatch):
    import importlib.metadata

    from server.engine.loading import check_adapter_support

    real_version = importlib.metadata.version

    def version(name):
        if name == "peft":
            raise importlib.metadata.PackageNotFoundError(name)
        return real_version(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    with pytest.raises(ModelLoadError, match="--adapter needs the peft package"):
        check_adapter_support(adapter_dir)


def test_an_adapter_that_cannot_be_switched_off_is_refused_at_start_up(
    tiny_model_dir, adapter_dir, monkeypatch
):
    """Whatever the reason (here: transformers' own check failing as 5.24's does with peft 0.21)."""
    from transformers.integrations import peft as hf_peft

    def refuse(self):
        raise ValueError(
            "The version of PEFT you are using is not compatible, "
            "please use a version that is greater than 0.22.0"
        )

    monkeypatch.setattr(hf_peft.PeftAdapterMixin, "disable_adapters", refuse)
    with pytest.raises(ModelLoadError, match="cannot be switched off .*greater than 0.22.0"):
        load_model(str(tiny_model_dir), adapter=adapter_dir)
