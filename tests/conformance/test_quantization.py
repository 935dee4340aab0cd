"""Quantized weights (``--quantization bnb-8bit|bnb-4bit``) on CPU: captures, interventions,
batching and LDA work unchanged, and the memory estimate knows the quantized bytes.

bitsandbytes (the locked release, 0.50.2) quantizes and computes on the CPU, so these run
wherever the tests run. The reference is an independent copy of the same checkpoint loaded
the plain HF way with the same ``BitsAndBytesConfig`` (quantization is deterministic, so
both hold the same values), read and edited with plain PyTorch hooks; where the server's
own prediction of the quantized bytes is checked, the reference is what bitsandbytes really
allocated. Families: Llama (the common layout), Qwen3 (tied embeddings, q/k norms) and GPT-2
(``Conv1D`` projections, which bitsandbytes converts too).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from apps import app_client
from families import FAMILIES, build_family_model
from reference import hf_generate, hooked_greedy, hooked_values

from server.engine.capture import CapturePlan, CaptureSpec
from server.engine.hf_runtime import decode_loop
from server.engine.job import GenerationJob, SamplingParams
from server.engine.lda import LdaJob
from server.engine.loading import ModelLoadError, load_model
from server.engine.memory import ModelShape, estimate
from server.engine.quantization import bnb_config, predicted_weight_bytes
from server.engine.structure import find_layers
from server.storage import ActivationStore

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None,
    reason="bitsandbytes is not installed (scripts/install.sh installs it where a wheel exists)",
)

GREEDY = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, logprobs=0)
TEXTS = ["The quick brown fox jumps over the lazy dog.", "What is the capital of France?"]
CASES = [(family, method) for family in ("llama", "qwen3", "gpt2") for method in ("bnb-4bit", "bnb-8bit")]


@pytest.fixture(scope="module", params=CASES, ids=[f"{f}-{m}" for f, m in CASES])
def case(request):
    return request.param


@pytest.fixture(scope="module")
def model_dir(case, tmp_path_factory) -> Path:
    family, _ = case
    return build_family_model(tmp_path_factory.mktemp(family), FAMILIES[family])


@pytest.fixture(scope="module")
def loaded(case, model_dir):
    return load_model(str(model_dir), dtype="float32", device="cpu", quantization=case[1])


@pytest.fixture(scope="module")
def reference(case, model_dir):
    """An independent copy, quantized the plain HF way with the same settings."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        model_dir,
        dtype=torch.float32,
        device_map="cpu",
        quantization_config=bnb_config(case[1], torch.float32),
    ).eval()


def test_the_projections_are_quantized_and_the_rest_is_not(case, loaded):
    import bitsandbytes as bnb

    model = loaded.hf_model
    kind = bnb.nn.Linear4bit if case[1] == "bnb-4bit" else bnb.nn.Linear8bitLt
    layers = find_layers(model)
    quantized = [name for name, module in model.named_modules() if isinstance(module, kind)]
    assert quantized and all(name.startswith(layers.path) for name in quantized)
    assert not isinstance(model.get_output_embeddings(), kind)  # transformers keeps the unembedding
    assert loaded.dtype == torch.float32 and loaded.quantization == case[1]


def meta_copy(model_dir: Path):
    """The checkpoint's model built on the meta device in float32 (no weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir), dtype=torch.float32)


def test_the_predicted_weight_bytes_are_what_bitsandbytes_allocated(case, model_dir):
    """The prediction the memory table uses (a model built on the meta device) equals the bytes
    measured on a freshly loaded model, packed values and quantization statistics included.
    On a CPU, bitsandbytes repacks 4-bit weights for its kernels at the first forward pass
    (absmax values as bfloat16, no nested statistics): within 10% of the prediction after it."""
    loaded = load_model(str(model_dir), dtype="float32", device="cpu", quantization=case[1])
    meta = meta_copy(model_dir)
    layers = find_layers(meta).count
    served = ModelShape.of(loaded.hf_model, layers)
    predicted = ModelShape.predicted(meta, layers, case[1])
    assert served == predicted
    assert predicted_weight_bytes(meta, case[1]) == served.weight_bytes
    assert served.weight_bytes < ModelShape.of(meta, layers).weight_bytes  # smaller than float32
    assert served.dtype_bytes == 4 and served.dequantized_bytes > 0
    with torch.no_grad():
        loaded.hf_model(torch.tensor([[1, 2, 3]]))
    after_a_forward = ModelShape.of(loaded.hf_model, layers)
    assert after_a_forward.weight_bytes == pytest.approx(predicted.weight_bytes, rel=0.1)
    assert after_a_forward.dequantized_bytes == predicted.dequantized_bytes


def test_generate_capture_equals_plain_hooks_and_stays_in_the_compute_dtype(loop, reference, resolver,
                                                                             prompts, tmp_path):  # fmt: skip
    from safetensors.torch import load_file

    points = resolver.resolve(layers="all", hook_points=["resid_post", "attn_out", "mlp_out"], modules=None)
    spec = CaptureSpec(CapturePlan(points=tuple(points), mode="generate"), ActivationStore(tmp_path), "q")
    (result,) = loop.run([GenerationJob(prompts[1], GREEDY, capture=spec)])
    tokens = prompts[1] + result.choices[0].token_ids
    expected = hooked_values(reference, tokens, [(p.module_path, p.kind) for p in points])
    for point in points:
        value = load_file(result.capture.directory / f"{point.name}.safetensors")[point.name]
        assert value.dtype == torch.float32 and value.shape[0] == len(tokens)
        torch.testing.assert_close(value, expected[(point.module_path, point.kind)], rtol=1e-3, atol=1e-3)


def test_greedy_decoding_equals_hf_generate(loaded, loop, prompts):
    (ours,) = loop.run([GenerationJob(prompts[0], GREEDY)])
    theirs = hf_generate(loaded, GenerationJob(prompts[0], GREEDY))
    assert ours.choices[0].token_ids == theirs.choices[0].token_ids


@pytest.mark.parametrize("operation", ["add", "ablate", "patch"])
def test_an_intervention_equals_a_plain_forward_hook(loop, reference, resolver, prompts, operation):
    from interventions import Edit

    (point,) = resolver.resolve(layers=[1], hook_points=["resid_post"], modules=None)
    generator = torch.Generator().manual_seed(3)
    vector = torch.randn(point.width, generator=generator) * 4
    source = torch.randn(3, point.width, generator=generator) * 4
    if operation == "add":
        edit = Edit(point=point, operation="add", vector=vector, scale=2.0)

        def by_hand(h):
            return h + 2.0 * vector
    elif operation == "ablate":
        edit, by_hand = Edit(point=point, operation="ablate"), torch.zeros_like
    else:
        edit = Edit(point=point, operation="patch", source=source, source_positions=(0, 1, 2))

        def by_hand(h):  # [1, positions, d]: the first 3 prompt positions take the recorded rows
            h[0, :3] = source
            return h

    (ours,) = loop.run([GenerationJob(prompts[1], GREEDY, edits=(edit,))])
    assert ours.choices[0].token_ids == hooked_greedy(
        reference, prompts[1], point.module_path, by_hand, GREEDY.max_tokens
    )


def test_a_batch_equals_each_prompt_alone(loop, prompts):
    together = loop.run([GenerationJob(ids, GREEDY) for ids in prompts])
    for ids, batched in zip(prompts, together, strict=True):
        (alone,) = loop.run([GenerationJob(ids, GREEDY)])
        assert batched.choices[0].token_ids == alone.choices[0].token_ids
        for a, b in zip(batched.choices[0].logprobs, alone.choices[0].logprobs, strict=True):
            assert a.logprob == pytest.approx(b.logprob, abs=1e-3)


def test_lda_with_alpha_zero_equals_plain_decoding(loop, prompts):
    lda = LdaJob(
        after_prompts=(tuple(prompts[0]),), before_prompts=(tuple(prompts[1]),), alpha=0.0, params=GREEDY
    )
    (amplified,) = loop.run(lda.jobs)
    (plain,) = loop.run([GenerationJob(prompts[0], GREEDY)])
    assert amplified.choices[0].token_ids == plain.choices[0].token_ids


def test_the_estimate_counts_the_dequantized_weight_of_a_prompt_forward(loaded):
    shape = ModelShape.of(loaded.hf_model, find_layers(loaded.hf_model).count)
    assert shape.dequantized_bytes > 0
    unquantized = ModelShape(**{**shape.__dict__, "dequantized_bytes": 0})
    added = (
        estimate(shape, prompt_tokens=8, max_tokens=8).activations
        - estimate(unquantized, prompt_tokens=8, max_tokens=8).activations
    )
    assert added == shape.dequantized_bytes


# -- the server ----------------------------------------------------------------------


@pytest.mark.parametrize("method", ["bnb-4bit", "bnb-8bit"])
def test_served_over_http_with_capture_steering_and_lda(method, tmp_path):
    """One family over HTTP (the engine checks above cover the others), with a before model for
    LDA, quantized the same way."""
    from transformers import AutoModelForCausalLM

    model_dir = build_family_model(tmp_path / "model", FAMILIES["llama"])
    with app_client(
        model_dir, tmp_path, lda_before=str(model_dir), quantization=method, max_tokens_cap=16
    ) as client:
        engine = client.app.state.engine
        meta = meta_copy(model_dir)
        # measured as loaded, before the start-up forward (which moves or repacks statistics)
        assert engine.shape == ModelShape.predicted(meta, find_layers(meta).count, method)
        assert engine.before.quantization == method
        structure = client.get("/v1/model/structure").json()
        assert structure["quantization"] == method and structure["dtype"] == "float32"
        assert structure["num_parameters"] == AutoModelForCausalLM.from_pretrained(model_dir).num_parameters()
        body = {
            "messages": [{"role": "user", "content": "Hello there"}],
            "max_tokens": 4,
            "temperature": 0,
            "logprobs": True,
            "capture": {"mode": "generate", "layers": [0, 1], "hook_points": ["resid_post"]},
        }
        plain = client.post("/v1/chat/completions", json=body).json()
        steer = [{"type": "scale", "layer": 0, "hook_point": "mlp_out", "factor": -3.0}]
        response = client.post("/v1/chat/completions", json={**body, "interventions": steer})
        assert response.status_code == 200, response.text
        first = [r["choices"][0]["logprobs"]["content"][0]["logprob"] for r in (plain, response.json())]
        assert first[0] != first[1]  # the intervention did something
        manifest = client.get(f"/v1/activations/{response.json()['activations']['id']}").json()
        assert manifest["quantization"] == method
        lda = client.post("/v1/lda", json={"prompt": "Hello", "alpha": 1.0, "max_tokens": 3})
        assert lda.status_code == 200, lda.text
        assert lda.json()["before"] == "model"


def test_a_checkpoint_quantized_already_is_served_as_it_is(tmp_path):
    """A folder saved 4-bit: served as bnb-4bit without the flag; a different flag is refused
    (transformers would keep the checkpoint's method and only warn)."""
    from transformers import AutoModelForCausalLM

    model_dir = build_family_model(tmp_path / "model", FAMILIES["llama"])
    quantized = AutoModelForCausalLM.from_pretrained(
        model_dir, device_map="cpu", quantization_config=bnb_config("bnb-4bit", torch.float32)
    )
    saved = tmp_path / "saved-4bit"
    quantized.save_pretrained(saved)
    load_model(str(model_dir), device="cpu").tokenizer.save_pretrained(saved)
    assert load_model(str(saved), device="cpu").quantization == "bnb-4bit"
    with pytest.raises(ModelLoadError, match="quantized as bnb-4bit already"):
        load_model(str(saved), device="cpu", quantization="bnb-8bit")


def test_an_unknown_method_is_refused_by_flag():
    from server.__main__ import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--quantization", "bnb-3bit"])
    assert parse_args(["--quantization", "bnb-4bit"]).quantization == "bnb-4bit"


def test_a_missing_bitsandbytes_is_refused_before_loading(monkeypatch, tmp_path):
    from server.__main__ import StartupRefused, preflight
    from server.config import Settings

    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args):
        return None if name == "bitsandbytes" else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    settings = Settings(model=str(tmp_path), quantization="bnb-4bit", device="cpu")
    with pytest.raises(StartupRefused, match="--quantization bnb-4bit needs the bitsandbytes package"):
        preflight(settings, check_port=False)
    with pytest.raises(ModelLoadError, match="bitsandbytes"):
        load_model(str(tmp_path), device="cpu", quantization="bnb-4bit")


def test_the_int8_matmul_warning_is_logged_once_not_every_step(tmp_path):
    """bitsandbytes' LLM.int8() logs a cast warning for every layer on every forward pass; the
    server's logging (configured once by the entry point) shows each such line once."""
    import logging

    from server.logs import ONCE_ONLY_LOGGERS, OncePerMessageFilter, configure_logging

    loaded = load_model(
        str(build_family_model(tmp_path, FAMILIES["llama"])), device="cpu", quantization="bnb-8bit"
    )
    root, noisy = logging.getLogger(), logging.getLogger(ONCE_ONLY_LOGGERS[0])
    saved_handlers, saved_level = root.handlers[:], root.level
    records: list[logging.LogRecord] = []
    collector = logging.Handler()
    collector.emit = records.append
    noisy.addHandler(collector)
    try:
        configure_logging("info")
        decode_loop(loaded).run([GenerationJob([1, 2, 3], GREEDY)])
        decode_loop(loaded).run([GenerationJob([4, 5], GREEDY)])
    finally:
        noisy.removeHandler(collector)
        noisy.filters = [f for f in noisy.filters if not isinstance(f, OncePerMessageFilter)]
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
    assert len(records) == 1 and "float16" in records[0].getMessage()


def test_a_lora_adapter_on_quantized_weights_equals_peft_and_switches_off_for_lda(tmp_path):
    """QLoRA's setting: a LoRA adapter over 4-bit weights. On: what peft's own model over the
    same quantized weights generates; LDA's before side with the adapter off, at alpha -1 (the
    before side alone), generates what the adapter-free quantized model does."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    model_dir = build_family_model(tmp_path / "model", FAMILIES["llama"])
    torch.manual_seed(3)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights=False)
    adapter_dir = tmp_path / "adapter"
    get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), lora).save_pretrained(adapter_dir)

    def quantized():
        config = bnb_config("bnb-4bit", torch.float32)
        return AutoModelForCausalLM.from_pretrained(model_dir, device_map="cpu", quantization_config=config)

    loaded = load_model(str(model_dir), device="cpu", quantization="bnb-4bit", adapter=adapter_dir)
    ids = loaded.tokenizer.encode(TEXTS[0])

    def greedy(model) -> list[int]:
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=GREEDY.max_tokens, do_sample=False)
        return out[0, len(ids) :].tolist()

    with_adapter = greedy(PeftModel.from_pretrained(quantized(), adapter_dir))
    without = greedy(quantized())
    assert with_adapter != without  # the adapter matters
    loop = decode_loop(loaded)
    (on,) = loop.run([GenerationJob(ids, GREEDY)])
    assert on.choices[0].token_ids == with_adapter
    lda = LdaJob(after_prompts=(tuple(ids),), before_prompts=(tuple(ids),), alpha=-1.0, params=GREEDY,
                 weights="adapter_off")  # fmt: skip
    (before_alone,) = loop.run(lda.jobs)
    assert before_alone.choices[0].token_ids == without
    (on_again,) = loop.run([GenerationJob(ids, GREEDY)])
    assert on_again.choices[0].token_ids == with_adapter  # LDA left the adapter on
