"""What the vLLM runtime rests on, checked on vLLM's CPU build against HF transformers.

Runs only where vLLM is installed (``scripts/install_vllm.sh``, then ``.venv-vllm/bin/python -m
pytest -m vllm tests/vllm_runtime``); skipped elsewhere. On a tiny random Llama (head_dim 64: vLLM's CPU
attention refuses 16), through nnsight's vLLM integration with this project's CPU worker
(``server/engine/vllm_cpu.py``):

* greedy tokens equal HF ``generate``'s;
* a decoder layer's output there is a ``(hidden, residual)`` pair whose sum is HF's
  ``hidden_states[i + 1]`` (the residual stream after the layer: our ``resid_post``);
* an edit of the ``hidden`` part reaches the next layer (it reads ``hidden + residual``), and a
  steered and a plain request traced together, as vLLM batches them, each equal their solo runs.
"""

from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("NNSIGHT_SERVER_REQUIRE_VLLM"):  # .ci/run: vLLM missing there is a failure
    import vllm  # noqa: F401
else:
    pytest.importorskip("vllm", reason="vLLM is not installed here (scripts/install_vllm.sh)")
pytestmark = pytest.mark.vllm

from tiny_model import build_tiny_model  # noqa: E402

PROMPT = "Hello there, how are you today?"
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny-vllm"), num_layers=2, hidden=256)


@pytest.fixture(scope="module")
def engine(folder):
    from server.engine.vllm_cpu import cpu_vllm

    model = cpu_vllm(str(folder), dtype="float32", max_model_len=256, gpu_memory_utilization=0.1)
    yield model
    model.vllm_entrypoint.llm_engine.engine_core.shutdown()  # now, not at exit (pytest's streams are gone)


@pytest.fixture(scope="module")
def reference(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder)


def generated(engine, prompt: str, steer: torch.Tensor | None = None) -> list[int]:
    with engine.trace(prompt, temperature=0.0, max_tokens=MAX_TOKENS) as tracer:
        if steer is not None:
            hidden, residual = engine.model.layers[0].output
            engine.model.layers[0].output = (hidden + steer, residual)
        result = tracer.result.save()
    return list(result.outputs[0].token_ids)


def test_greedy_tokens_equal_hf_generate(engine, reference):
    model, tokenizer = reference
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False)[0, ids.shape[1] :]
    assert generated(engine, PROMPT) == expected.tolist()


def test_a_layer_output_pair_sums_to_hf_resid_post(engine, reference):
    model, tokenizer = reference
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        states = model(ids, output_hidden_states=True).hidden_states
    # One name per saved value: nnsight brings back saved names only (not a list or tuple of them).
    with engine.trace(PROMPT, temperature=0.0, max_tokens=1):
        hidden_0 = engine.model.layers[0].output[0].save()
        residual_0 = engine.model.layers[0].output[1].save()
        hidden_1 = engine.model.layers[1].output[0].save()
        residual_1 = engine.model.layers[1].output[1].save()
    torch.testing.assert_close(hidden_0 + residual_0, states[1][0], atol=1e-5, rtol=1e-5)
    # HF's last hidden state has the final norm applied; the residual stream is before it.
    with torch.no_grad():
        last = model.model.norm(hidden_1 + residual_1)
    torch.testing.assert_close(last, states[2][0], atol=1e-5, rtol=1e-5)


def test_a_steered_and_a_plain_request_together_equal_their_solo_runs(engine):
    steer = torch.zeros(256)
    steer[:32] = 8.0
    alone_plain = generated(engine, PROMPT)
    alone_steered = generated(engine, PROMPT, steer)
    assert alone_steered != alone_plain  # the edit reaches what the next layer reads
    with engine.trace(temperature=0.0, max_tokens=MAX_TOKENS) as tracer:
        with tracer.invoke(PROMPT):
            hidden, residual = engine.model.layers[0].output
            engine.model.layers[0].output = (hidden + steer, residual)
            steered = tracer.result.save()
        with tracer.invoke(PROMPT):
            plain = tracer.result.save()
    assert list(steered.outputs[0].token_ids) == alone_steered
    assert list(plain.outputs[0].token_ids) == alone_plain
