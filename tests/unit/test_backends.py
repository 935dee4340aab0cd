"""``--backend``: what is refused before anything loads, and what the vLLM runtime refuses per request.

The vLLM runtime itself runs in ``tests/vllm_runtime`` (where vLLM is installed); these parts
need no vLLM: the start-up checks, the hook points mapped on vLLM's layout, and the serving
layer's refusal of a feature the runtime does not run.
"""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest

from server.__main__ import StartupRefused, preflight
from server.config import Settings
from server.engine.engine import Engine
from server.engine.hooks import HookError
from server.engine.loading import ModelLoadError
from server.engine.structure import LayerLayout
from server.engine.vllm_engine import UNSUPPORTED, VLLMHooks, check_backend_settings
from server.errors import APIError
from server.serving.base import require_feature


def _settings(tiny_model_dir, **fields) -> Settings:
    return Settings(model=str(tiny_model_dir), **fields)


def test_vllm_flags_need_the_vllm_backend(tiny_model_dir):
    for fields in ({"tensor_parallel_size": 2}, {"distributed_executor_backend": "ray"}):
        with pytest.raises(ModelLoadError, match="need --backend vllm"):
            check_backend_settings(_settings(tiny_model_dir, **fields))
    check_backend_settings(_settings(tiny_model_dir))  # the defaults pass


def test_the_vllm_backend_without_vllm_says_how_to_install_it(tiny_model_dir, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a)
    )
    with pytest.raises(StartupRefused, match="scripts/install_vllm.sh"):
        preflight(_settings(tiny_model_dir, backend="vllm"), check_port=False)


@pytest.mark.parametrize(
    ("fields", "flag"),
    [
        ({"quantization": "bnb-4bit"}, "--quantization"),
        ({"lda_before": "embedded"}, "--lda-before"),
        ({"memory_budget": "8GiB"}, "--memory-budget"),
        ({"device": "cuda:1"}, "--device"),
    ],
)
def test_hf_loading_flags_are_refused_with_the_vllm_backend(tiny_model_dir, monkeypatch, fields, flag):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name == "vllm" else real(name, *a)
    )
    with pytest.raises(ModelLoadError, match=flag):
        check_backend_settings(_settings(tiny_model_dir, backend="vllm", **fields))


def test_hook_points_on_vllm_are_the_four_aliases():
    hooks = VLLMHooks(LayerLayout("model.layers", 3, "self_attn", "mlp"), 8, "Qwen3ForCausalLM")
    points = hooks.resolve(layers=[0, -1], hook_points=["resid_post", "resid_pre"], modules=None)
    assert [p.name for p in points] == [
        "layers.0.resid_pre",
        "layers.0.resid_post",
        "layers.2.resid_pre",
        "layers.2.resid_post",
    ]
    assert [p.module_path for p in points] == [
        "model.embed_tokens",
        "model.layers.0",
        "model.layers.1",
        "model.layers.2",
    ]
    assert {p.width for p in points} == {8}
    refusals = [
        ({"layers": None, "hook_points": None, "modules": ["model.norm.output"]}, "modules"),
        (
            {"layers": [0], "hook_points": ["resid_post", "mlp.down_proj.input"], "modules": None},
            "hook_points[1]",
        ),
        ({"layers": [3], "hook_points": ["resid_post"], "modules": None}, "layers[0]"),
    ]
    for request, param in refusals:
        with pytest.raises(HookError) as refused:
            hooks.resolve(**request)
        assert refused.value.param == param
        assert param != "hook_points[1]" or "vllm" in str(refused.value)
    other = VLLMHooks(LayerLayout("transformer.h", 2, "attn", "mlp"), 8, "GPT2LMHeadModel")
    with pytest.raises(HookError, match="not mapped for GPT2LMHeadModel"):
        other.resolve(layers=[0], hook_points=["resid_post"], modules=None)


def test_a_feature_the_runtime_does_not_run_is_a_400_naming_the_field_and_the_backend():
    assert Engine.unsupported == frozenset()  # the HF runtime runs everything
    vllm = SimpleNamespace(backend="vllm", unsupported=UNSUPPORTED)
    for feature, param in (
        ("lda", None),
        ("structured_output", "response_format"),
    ):
        require_feature(Engine, feature, param)  # nothing refused on hf
        with pytest.raises(APIError) as refused:
            require_feature(vllm, feature, param)
        error = refused.value
        assert (error.status, error.param, error.code) == (400, param, "unsupported_on_backend")
        assert "vllm backend" in error.message


def test_logprobs_take_the_top_k_and_leave_out_an_extra_sampled_token():
    from server.engine.vllm_engine import _logprob

    def lp(logprob: float, rank: int):
        return SimpleNamespace(logprob=logprob, rank=rank)

    # vLLM's dict: the top 2 and the sampled token (not among them; its rank ties the second's)
    step = {5: lp(-0.1, 1), 7: lp(-1.0, 2), 9: lp(-1.0, 2)}
    chosen = _logprob(step, 9, 2)
    assert (chosen.token_id, chosen.logprob, chosen.top) == (9, -1.0, ((5, -0.1), (7, -1.0)))
    # the sampled token among the top: two entries, both kept
    assert _logprob({5: lp(-0.1, 1), 7: lp(-1.0, 2)}, 7, 2).top == ((5, -0.1), (7, -1.0))
    assert _logprob({9: lp(-3.0, 40)}, 9, 0).top == ()


def test_one_failing_choice_cancels_the_others_before_the_error_is_raised():
    import asyncio

    from server.engine.vllm_engine import _all_or_none

    ended: list[str] = []

    async def fails():
        await asyncio.sleep(0.01)
        raise ValueError("worker error")

    async def runs_long():
        try:
            await asyncio.sleep(10)
        finally:
            ended.append("cleaned up")

    async def main():
        with pytest.raises(ValueError, match="worker error"):
            await _all_or_none([fails(), runs_long()])
        assert ended == ["cleaned up"]  # before the error reached the caller

    asyncio.run(main())


def test_a_long_prompt_record_is_replayed_in_bounded_pieces():
    from server.engine.vllm_engine import SPOOL_CHUNK, _pieces

    records = [(0, 2 * SPOOL_CHUNK + 10), (100, 1), (200, 1)]
    pieces = list(_pieces(records, 2 * SPOOL_CHUNK + 11))  # the last record is past what was fed
    assert [end - first for _, first, end in pieces] == [SPOOL_CHUNK, SPOOL_CHUNK, 10, 1]
    assert [record for record, _, _ in pieces] == [records[0]] * 3 + [records[1]]


def test_cleanup_runs_to_its_end_however_often_its_caller_is_cancelled():
    import asyncio

    from server.engine.vllm_engine import _to_the_end

    steps: list[str] = []

    async def cleanup():
        await asyncio.sleep(0.05)
        steps.append("aborted")
        await asyncio.sleep(0.05)
        steps.append("closed")

    async def main():
        task = asyncio.ensure_future(_to_the_end(cleanup()))
        for _ in range(3):
            await asyncio.sleep(0.02)
            task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert steps == ["aborted", "closed"]

    asyncio.run(main())
