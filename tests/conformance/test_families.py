"""Architecture conformance: every family in ``families.py``, served by the real engine and
checked against references that do not go through it.

References: an independent copy of the same checkpoint loaded the plain HF way, read with
``output_hidden_states`` and plain PyTorch forward hooks, edited with plain forward hooks,
decoded with HF ``generate`` (``tests/reference.py``) or full forward passes; a batch is
checked against each of its prompts alone.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from families import FAMILIES, build_family_model
from reference import hf_generate, hooked_greedy, hooked_values

from server.engine.capture import CapturePlan, CaptureSpec
from server.engine.hooks import HookResolver
from server.engine.job import GenerationJob, SamplingParams
from server.engine.lda import LdaJob
from server.engine.loading import load_model
from server.engine.memory import ModelShape, estimate
from server.engine.structure import find_layers
from server.storage import ActivationStore

ROOT = Path(__file__).resolve().parents[2]
ALIASES = ("resid_pre", "resid_post", "attn_out", "mlp_out")
TEXTS = [  # prompts of different lengths (all longer than a sliding window of 6)
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France?",
    "Interpretability research studies the internals of neural networks, one layer at a time.",
]
GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    return FAMILIES[request.param]


@pytest.fixture(scope="module")
def model_dir(family, tmp_path_factory) -> Path:
    return build_family_model(tmp_path_factory.mktemp(family.name), family)


@pytest.fixture(scope="module")
def loaded(model_dir):
    return load_model(str(model_dir), dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def reference(model_dir):
    """An independent copy of the checkpoint, loaded the plain HF way."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture
def store(tmp_path) -> ActivationStore:
    return ActivationStore(tmp_path / "activations")


def hooked(model, ids: list[int], points) -> dict[str, torch.Tensor]:
    """Each point's value ``[positions, ...]`` from plain PyTorch hooks on one forward over ``ids``."""
    values = hooked_values(model, ids, [(p.module_path, p.kind) for p in points])
    return {p.name: values[(p.module_path, p.kind)] for p in points}


def stored(result, name: str) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(result.directory / f"{name}.safetensors")[name]


def every_point(resolver):
    return resolver.resolve(layers="all", hook_points=list(ALIASES), modules=None)


# -- hook points ---------------------------------------------------------------------


def test_aliases_resolve_to_the_family_modules(family, resolver):
    points = resolver.resolve(layers=[0], hook_points=list(ALIASES), modules=None)
    assert {p.hook: f"{p.module_path}.{p.kind}" for p in points} == family.modules


def test_the_docs_table_shows_what_the_aliases_resolve_to(family):
    """docs/hook_points.md has one row per family with the module each alias reads."""
    text = (ROOT / "docs" / "hook_points.md").read_text()
    row = next((line for line in text.splitlines() if line.startswith(f"| {family.name} |")), None)
    assert row is not None, f"docs/hook_points.md has no row for {family.name}"
    for alias, path in family.modules.items():
        documented = path.replace(f"{family.layers}.0", f"{family.layers}.{{i}}")
        assert f"`{documented}`" in row, (alias, documented, row)


# -- captures ------------------------------------------------------------------------


def test_trace_capture_equals_hidden_states_and_plain_hooks(loop, reference, resolver, prompts, store):
    points = every_point(resolver)
    ids = prompts[2]
    spec = CaptureSpec(CapturePlan(points=tuple(points), mode="trace"), store, "conformance")
    (result,) = loop.run([GenerationJob(ids, SamplingParams(max_tokens=1, temperature=0), capture=spec)])
    capture = result.capture
    expected = hooked(reference, ids, points)
    for point in points:
        torch.testing.assert_close(stored(capture, point.name), expected[point.name], rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        hidden = reference(torch.tensor([ids]), output_hidden_states=True).hidden_states
    layers = resolver.layout.count
    # hidden_states[0] is what layer 0 receives; [i + 1] what layer i returns (the last one is
    # after the final norm in most families, so it is checked by the hooks above only).
    torch.testing.assert_close(stored(capture, "layers.0.resid_pre"), hidden[0][0], rtol=1e-4, atol=1e-5)
    for layer in range(layers - 1):
        torch.testing.assert_close(
            stored(capture, f"layers.{layer}.resid_post"), hidden[layer + 1][0], rtol=1e-4, atol=1e-5
        )


def test_generate_capture_equals_a_forward_over_prompt_and_completion(
    loop, reference, resolver, prompts, store
):
    points = every_point(resolver)
    ids = prompts[1]
    spec = CaptureSpec(CapturePlan(points=tuple(points), mode="generate"), store, "conformance")
    (result,) = loop.run([GenerationJob(ids, GREEDY, capture=spec)])
    tokens = ids + result.choices[0].token_ids
    expected = hooked(reference, tokens, points)
    for point in points:
        value = stored(result.capture, point.name)
        assert value.shape[0] == len(tokens)
        torch.testing.assert_close(value, expected[point.name], rtol=1e-4, atol=1e-4)


def test_the_residual_stream_is_the_sum_the_docs_name(family, loop, resolver, prompts, store):
    """resid_post = resid_pre + the two blocks' contributions (docs/hook_points.md says which
    values those are per family: attn_out and mlp_out, or the post-norms' outputs)."""
    hooks = ["resid_pre", "resid_post", *family.residual_terms]
    points = resolver.resolve(layers="all", hook_points=hooks, modules=None)
    spec = CaptureSpec(CapturePlan(points=tuple(points), mode="trace"), store, "conformance")
    (result,) = loop.run([GenerationJob(prompts[0], SamplingParams(max_tokens=1), capture=spec)])
    for layer in range(resolver.layout.count):
        value = {hook: stored(result.capture, f"layers.{layer}.{hook}") for hook in hooks}
        total = value["resid_pre"] + value[family.residual_terms[0]] + value[family.residual_terms[1]]
        torch.testing.assert_close(value["resid_post"], total, rtol=1e-4, atol=1e-5)


def test_a_router_over_flattened_tokens_is_refused_by_name(tmp_path):
    """Qwen3-MoE's router (``mlp.gate``) sees the tokens flattened over batch and positions: it
    is not a ``[batch, pos, ...]`` value, so naming it is a 400 for ``hook_points``, never a
    wrong tensor. (Not parametrized: only this family has such a module.)"""
    from transformers import AutoModelForCausalLM

    from server.engine.hooks import HookError

    model = AutoModelForCausalLM.from_pretrained(build_family_model(tmp_path, FAMILIES["qwen3_moe"]))
    resolver = HookResolver(model, find_layers(model))
    with pytest.raises(HookError, match="cannot be captured") as refused:
        resolver.resolve(layers=[0], hook_points=["mlp.gate.output"], modules=None)
    assert refused.value.param == "hook_points[0]"


# -- decoding ------------------------------------------------------------------------


def test_greedy_and_seeded_sampling_equal_hf_generate(loaded, loop, prompts):
    sampled = SamplingParams(max_tokens=6, temperature=0.9, top_p=0.95, seed=11, n=2, ignore_eos=True)
    for params in (GREEDY, sampled):
        job = GenerationJob(prompts[0], params)
        (ours,) = loop.run([job])
        theirs = hf_generate(loaded, GenerationJob(prompts[0], params))
        assert [c.token_ids for c in ours.choices] == [c.token_ids for c in theirs.choices]


def test_a_batch_of_different_lengths_equals_each_prompt_alone(loop, prompts):
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=0)
    together = loop.run([GenerationJob(ids, params) for ids in prompts])
    for ids, batched in zip(prompts, together, strict=True):
        (alone,) = loop.run([GenerationJob(ids, params)])
        assert batched.choices[0].token_ids == alone.choices[0].token_ids
        for a, b in zip(batched.choices[0].logprobs, alone.choices[0].logprobs, strict=True):
            assert a.logprob == pytest.approx(b.logprob, abs=1e-4)


def test_a_job_joining_a_running_batch_gets_what_it_gets_alone(family, loop, prompts):
    """Families whose cache can take new rows (no sliding-window layers) merge a newcomer into
    the running batch; the others finish the batch first. Either way: the same tokens."""
    late = GenerationJob(prompts[0], GREEDY)
    offers = []

    def take_more(free: int):
        offers.append(free)
        return [late] if len(offers) == 2 else []

    first = GenerationJob(prompts[2], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
    outcomes: dict[int, object] = {}
    loop.run([first], on_done=lambda job, outcome: outcomes.update({id(job): outcome}), take_more=take_more,
             max_rows=8)  # fmt: skip
    (alone_late,) = loop.run([GenerationJob(prompts[0], GREEDY)])
    (alone_first,) = loop.run([GenerationJob(prompts[2], first.params)])
    assert outcomes[id(first)].choices[0].token_ids == alone_first.choices[0].token_ids
    if family.sliding_window:  # never offered a place: the newcomer waits for the batch to end
        assert offers == [] and id(late) not in outcomes
    else:
        assert outcomes[id(late)].choices[0].token_ids == alone_late.choices[0].token_ids


def test_lda_with_alpha_zero_equals_plain_decoding(loop, prompts):
    lda = LdaJob(
        after_prompts=(tuple(prompts[0]), tuple(prompts[1])),
        before_prompts=(tuple(prompts[2]), tuple(prompts[0])),
        alpha=0.0,
        params=GREEDY,
    )
    amplified = loop.run(lda.jobs)
    for ids, result in zip(prompts[:2], amplified, strict=True):
        (plain,) = loop.run([GenerationJob(ids, GREEDY)])
        assert result.choices[0].token_ids == plain.choices[0].token_ids


# -- interventions -------------------------------------------------------------------


def reference_greedy(model, ids: list[int], module_path: str, edit) -> list[int]:
    return hooked_greedy(model, ids, module_path, edit, GREEDY.max_tokens)


OPERATIONS = {
    # name: (alias, Edit fields, the same edit on [positions, d])
    "add": ("resid_post", {"scale": 4.0}, lambda h, v: h + 4.0 * v),
    "scale": ("attn_out", {"factor": -2.0}, lambda h, v: h * -2.0),
    "ablate": ("mlp_out", {}, lambda h, v: torch.zeros_like(h)),
    "project_out": ("resid_post", {}, lambda h, v: h - (h @ (v / v.norm()))[..., None] * (v / v.norm())),
    "clamp": (
        "resid_post",
        {"value": 8.0},
        lambda h, v: h + (8.0 - h @ (v / v.norm()))[..., None] * (v / v.norm()),
    ),
}


@pytest.mark.parametrize("operation", sorted(OPERATIONS))
def test_each_operation_equals_a_plain_forward_hook(loaded, loop, reference, resolver, prompts, operation):
    from interventions import Edit

    alias, fields, edit = OPERATIONS[operation]
    (point,) = resolver.resolve(layers=[1], hook_points=[alias], modules=None)
    vector = torch.randn(point.width, generator=torch.Generator().manual_seed(3)) * 3
    uses_vector = operation in ("add", "project_out", "clamp")
    job_edit = Edit(point=point, operation=operation, vector=vector if uses_vector else None, **fields)
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=0)
    (ours,) = loop.run([GenerationJob(prompts[1], params, edits=(job_edit,))])
    expected = reference_greedy(reference, prompts[1], point.module_path, lambda h: edit(h, vector))
    assert ours.choices[0].token_ids == expected
    (plain,) = loop.run([GenerationJob(prompts[1], params)])
    assert ours.choices[0].logprobs[0].logprob != plain.choices[0].logprobs[0].logprob  # it did something


def test_patch_equals_a_plain_forward_hook(loop, reference, resolver, prompts):
    """``patch`` writes recorded rows at their absolute positions (here: the prompt's first 3)."""
    from interventions import Edit

    (point,) = resolver.resolve(layers=[1], hook_points=["resid_post"], modules=None)
    source = torch.randn(3, point.width, generator=torch.Generator().manual_seed(5)) * 3
    patch = Edit(point=point, operation="patch", source=source, source_positions=(0, 1, 2))
    (ours,) = loop.run([GenerationJob(prompts[1], GREEDY, edits=(patch,))])

    def write_rows(h):  # [1, positions, d]
        h[0, :3] = source
        return h

    assert ours.choices[0].token_ids == reference_greedy(reference, prompts[1], point.module_path, write_rows)


# -- memory --------------------------------------------------------------------------


def test_the_memory_estimate_covers_the_kv_cache_it_predicts(loaded, reference, prompts):
    """The estimate's KV-cache term is at or above the cache HF really holds after prompt +
    max_tokens positions (sliding-window layers hold less than the estimate assumes)."""
    from transformers import DynamicCache

    ids = prompts[2]
    max_tokens = 40
    cache = DynamicCache(config=reference.config)
    with torch.no_grad():
        reference(torch.tensor([ids + [ids[-1]] * max_tokens]), past_key_values=cache, use_cache=True)
    held = sum(
        t.numel() * t.element_size()
        for layer in cache.layers
        for t in (layer.keys, layer.values)
        if t is not None
    )
    shape = ModelShape.of(loaded.hf_model, find_layers(loaded.hf_model).count)
    assert estimate(shape, prompt_tokens=len(ids), max_tokens=max_tokens).kv_cache >= held > 0


# -- the server ----------------------------------------------------------------------


def test_served_over_http_with_capture_and_an_intervention(family, model_dir, resolver, tmp_path):
    from fastapi.testclient import TestClient

    from server.app import create_app
    from server.config import Settings

    settings = Settings(
        model=str(model_dir),
        max_tokens_cap=16,
        activations_dir=tmp_path / "activations",
        vectors_dir=tmp_path / "vectors",
    )
    with TestClient(create_app(settings)) as client:
        body = {
            "messages": [{"role": "user", "content": "Hello there"}],
            "max_tokens": 4,
            "temperature": 0,
            "capture": {"mode": "generate", "layers": "all", "hook_points": list(ALIASES)},
            "interventions": [{"type": "scale", "layer": 0, "hook_point": "mlp_out", "factor": 0.5}],
        }
        response = client.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        tensors = response.json()["activations"]["tensors"]
        assert len(tensors) == len(ALIASES) * resolver.layout.count
        # requests join a running batch, else (sliding windows) they wait 10 ms for each other
        assert client.app.state.engine.scheduler.batch_window_s == (0.01 if family.sliding_window else 0)


# -- the logit lens and attention patterns ---------------------------------------------


def test_the_last_layers_lens_is_the_models_own_prediction(loaded, loop, reference, resolver, prompts, store):
    from server.engine.capture import LensRead
    from server.engine.lens import unembedding_of

    last = resolver.layout.count - 1
    points = tuple(resolver.resolve(layers=[last], hook_points=["resid_post"], modules=None))
    lens = LensRead(points, 5, unembedding_of(loaded.wrapper, loaded.hf_model, resolver))
    spec = CaptureSpec(CapturePlan(points=(), mode="trace", lens=lens), store, "conformance")
    ids = prompts[1]
    (result,) = loop.run([GenerationJob(ids, SamplingParams(max_tokens=1, temperature=0), capture=spec)])
    with torch.no_grad():  # the model's own logits, soft-capped where the family caps them
        expected = reference(torch.tensor([ids])).logits[0].float().log_softmax(-1).topk(5, dim=-1)
    torch.testing.assert_close(
        stored(result.capture, f"logit_lens.layers.{last}.logprobs"), expected.values, rtol=1e-4, atol=1e-4
    )
    assert (
        stored(result.capture, f"logit_lens.layers.{last}.indices")[:, 0].tolist()
        == expected.indices[:, 0].tolist()
    )


def test_attention_patterns_equal_eager_output_attentions(model_dir, loop, resolver, prompts, store):
    """Generate mode over a prompt longer than the sliding windows: every layer's pattern of every
    token fed in equals HF's eager ``output_attentions`` over prompt and completion."""
    from transformers import AutoModelForCausalLM

    from server.engine.attention import PatternPoint

    assert loop.runtime.reads_patterns
    layout = resolver.layout
    points = tuple(
        PatternPoint(f"attention.layers.{i}.pattern", f"{layout.path}.{i}.{layout.attention}", i)
        for i in range(layout.count)
    )
    plan = CapturePlan(points=(), mode="generate", patterns=points, pattern_heads=1)
    ids = prompts[2]
    (result,) = loop.run([GenerationJob(ids, GREEDY, capture=CaptureSpec(plan, store, "conformance"))])
    every = ids + result.choices[0].token_ids
    eager = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        expected = eager(torch.tensor([every]), output_attentions=True).attentions
    for point in points:
        pattern = stored(result.capture, point.name)
        assert pattern.shape[0] == pattern.shape[2] == len(every)
        torch.testing.assert_close(pattern, expected[point.layer][0].transpose(0, 1), rtol=1e-4, atol=1e-5)


def test_attribution_gradients_equal_autograd(loaded, loop, reference, resolver, prompts):
    """Gradients of the last position's top logprob at every layer's resid_post, through nnsight's
    backward, against a plain ``backward`` on the independent copy."""
    from server.engine.attribution import Target, run_attribution

    points = tuple(resolver.resolve(layers="all", hook_points=["resid_post"], modules=None))
    ids = prompts[1]
    result = run_attribution(
        loaded.wrapper, resolver.embedding_module, ids, points, Target("logprob", 7), None, None, True
    )
    kept, handles = {}, []
    for point in points:

        def keep(_m, _a, out, name=point.name) -> None:
            value = out[0] if isinstance(out, tuple) else out
            value.retain_grad()
            kept[name] = value

        handles.append(reference.get_submodule(point.module_path).register_forward_hook(keep))
    try:
        with torch.enable_grad():
            metric = reference(torch.tensor([ids])).logits[0, -1].float().log_softmax(-1)[7]
            metric.backward()
    finally:
        for handle in handles:
            handle.remove()
        reference.zero_grad(set_to_none=True)
    assert result.metric == pytest.approx(float(metric.detach()), abs=1e-4)
    for item in result.points:
        torch.testing.assert_close(item.gradient, kept[item.point.name].grad[0], rtol=1e-3, atol=1e-6)


def test_patching_sweep_cells_equal_hooked_runs(loaded, loop, reference, resolver, prompts):
    """Each cell (resid_post of the last layer, every position) against the corrupted run with that
    value replaced by a plain hook. Batches skip the layers before the last one (standing in the
    corrupted run's output for them); families with sliding windows feed the whole prompt, the
    others resume after the corrupted run's cached prefix."""
    from server.engine.patching import Cell, run_sweep

    corrupted = prompts[1]
    clean = list(corrupted)
    clean[2] = clean[3]  # one token differs
    last = resolver.layout.count - 1
    (point,) = resolver.resolve(layers=[last], hook_points=["resid_post"], modules=None)
    cells = [Cell(point, p) for p in range(len(corrupted))]
    outputs = tuple(resolver.resolve(layers="all", hook_points=["resid_post"], modules=None))
    assert loop.runtime.skips_layers  # the batches skip every layer before the last one
    result = run_sweep(loop.runtime, clean, corrupted, cells, 5, 9, rows=4, layer_outputs=outputs)
    module = reference.get_submodule(point.module_path)
    seen = {}

    def keep(_m, _a, out) -> None:
        seen["clean"] = (out[0] if isinstance(out, tuple) else out).clone()

    handle = module.register_forward_hook(keep)
    with torch.no_grad():
        reference(torch.tensor([clean]))
    handle.remove()
    for cell, score in zip(cells, result.cells, strict=True):

        def patch(_m, _a, out, p=cell.position):
            tensor = (out[0] if isinstance(out, tuple) else out).clone()
            tensor[:, p] = seen["clean"][:, p]
            return (tensor, *out[1:]) if isinstance(out, tuple) else tensor

        handle = module.register_forward_hook(patch)
        try:
            with torch.no_grad():
                logits = reference(torch.tensor([corrupted])).logits[0, -1]
        finally:
            handle.remove()
        assert score == pytest.approx(float(logits[5] - logits[9]), abs=1e-4), cell.position


def test_transformerlens_sublayer_names_read_what_is_added_to_the_residual(family, resolver):
    """``blocks.L.hook_mlp_out`` is what the MLP adds to the residual stream: after the norm that
    follows the MLP where the family has one (Gemma 2/3, OLMo 2), the MLP's output elsewhere."""
    from server.engine.sae import sae_hook_point

    sandwich = resolver.has_module(f"{resolver.layout.path}.0.post_feedforward_layernorm")
    mlp = sae_hook_point("blocks.0.hook_mlp_out", resolver)
    attention = sae_hook_point("blocks.0.hook_attn_out", resolver)
    if sandwich:
        assert (mlp.hook, attention.hook) == (
            "post_feedforward_layernorm.output",
            "post_attention_layernorm.output",
        )
    else:
        assert (mlp.hook, attention.hook) == ("mlp_out", "attn_out")
    assert family.name not in ("gemma2", "gemma3_text", "olmo2") or sandwich
