"""What the vLLM runtime runs in vLLM's worker (``server/engine/vllm_block.py``), without vLLM.

A stand-in for nnsight's envoy tree and ``tracer.iter`` feeds each step's values the way
vLLM's Llama-family layers produce them (``[tokens, width]``; a layer's output a
``(hidden, residual)`` pair), so the block's own logic is checked here, in the main suite:
which place each alias reads, that an edit of ``resid_post`` reaches what the next layer reads
(``hidden + residual``), positions and steps, the spool holding each position once (a
preempted request recomputed from position 0 included), and a trace-mode capture reading the
first step only. The parity suite (``tests/vllm_runtime``) runs the same block inside vLLM.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from interventions import Edit
from server.engine.hooks import HookPoint
from server.engine.vllm_block import (
    SPOOL_FILE,
    Place,
    RequestPlan,
    Site,
    Stage,
    place_of,
    run_request,
    spool_records,
    spool_rows,
)

WIDTH = 4
PROMPT = 3


class _Envoy:
    """A module's envoy: ``output`` as the step left it; what the block assigned, kept."""

    def __init__(self, **children) -> None:
        self.output = None
        self.assigned: list = []
        self.__dict__.update(children)

    def __setattr__(self, name, value):
        if name == "output" and hasattr(self, "assigned"):
            self.assigned.append(value)
        object.__setattr__(self, name, value)


def _model(layers: int = 2):
    return SimpleNamespace(
        model=SimpleNamespace(
            embed_tokens=_Envoy(),
            layers=[_Envoy(self_attn=_Envoy(), mlp=_Envoy()) for _ in range(layers)],
        )
    )


class _Tracer:
    """``tracer.iter[...]``: before handing out step k, every envoy holds step k's value."""

    def __init__(self, model, steps: list[dict[str, object]]) -> None:
        self.model, self.steps, self.asked = model, steps, []

    @property
    def iter(self):
        return self

    def __getitem__(self, selection: slice):
        self.asked.append(selection)
        return self._run(selection)

    def _run(self, selection: slice):
        for step in range(len(self.steps))[selection]:
            for path, value in self.steps[step].items():
                envoy = Place(path, pair=False).envoy(self.model)
                object.__setattr__(envoy, "output", value)
            yield step


def _point(hook: str, layer: int) -> HookPoint:
    place, order = place_of(hook, layer, "model.layers", "model.embed_tokens")
    return HookPoint(f"layers.{layer}.{hook}", place.module, "output", layer, hook, order, WIDTH)


def _pair(tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, WIDTH, generator=generator), torch.randn(tokens, WIDTH, generator=generator)


def _spooled(folder, plan: RequestPlan, name: str) -> torch.Tensor:
    """One name's values across the spool's records, as the server reads them."""
    data = (folder / SPOOL_FILE).read_bytes()
    j = plan.names().index(name)
    records = spool_records(data, len(plan.names()), WIDTH, torch.float32)
    return torch.cat([spool_rows(bytearray(data), r, j, WIDTH, torch.float32) for r in records])


def test_aliases_map_onto_vllms_llama_layout_in_execution_order():
    assert place_of("resid_pre", 0, "model.layers", "model.embed_tokens")[0] == Place(
        "model.embed_tokens", False
    )
    assert place_of("resid_pre", 2, "model.layers", "model.embed_tokens")[0] == Place("model.layers.1", True)
    assert place_of("resid_post", 1, "model.layers", "model.embed_tokens")[0] == Place("model.layers.1", True)
    assert place_of("attn_out", 1, "model.layers", "model.embed_tokens")[0] == Place(
        "model.layers.1.self_attn", False
    )
    assert place_of("mlp_out", 1, "model.layers", "model.embed_tokens")[0] == Place(
        "model.layers.1.mlp", False
    )
    orders = [
        _point(hook, layer).order
        for layer in (0, 1)
        for hook in ("resid_pre", "attn_out", "mlp_out", "resid_post")
    ]
    assert orders == sorted(orders)
    # resid_pre of a layer is the place (and the order) of resid_post of the layer before
    assert _point("resid_pre", 1).order == _point("resid_post", 0).order
    with pytest.raises(KeyError):
        place_of("mlp.down_proj.input", 0, "model.layers", "model.embed_tokens")


def test_resid_post_is_read_summed_and_an_edit_reaches_what_the_next_layer_reads(tmp_path):
    model = _model()
    vector = torch.arange(WIDTH, dtype=torch.float32)
    edit = Edit(_point("resid_post", 0), "add", positions="generated", vector=vector, scale=2.0)
    plan = RequestPlan(
        sites=(Site(Place("model.layers.0", True), (Stage((edit,), ("layers.0.resid_post",)),)),),
        prompt_len=PROMPT,
        spool=str(tmp_path),
    )
    steps = [
        {"model.layers.0": _pair(PROMPT, 0)},
        {"model.layers.0": _pair(1, 1)},
        {"model.layers.0": _pair(1, 2)},
    ]
    run_request(model, _Tracer(model, steps), plan)
    layer = model.model.layers[0]
    # The prompt step is not edited ("generated" positions only): nothing assigned then.
    assert len(layer.assigned) == 2
    for step, (hidden, residual) in zip(steps[1:], layer.assigned, strict=True):
        expected = sum(step["model.layers.0"]) + 2.0 * vector
        torch.testing.assert_close(hidden + residual, expected)  # what the next layer reads
        assert not residual.any()
    spooled = _spooled(tmp_path, plan, "layers.0.resid_post")
    assert spooled.shape == (PROMPT + 2, WIDTH)
    torch.testing.assert_close(spooled[:PROMPT], sum(steps[0]["model.layers.0"]))  # unedited
    after = sum(steps[1]["model.layers.0"]) + 2.0 * vector
    torch.testing.assert_close(spooled[PROMPT:-1], after)  # read after the edit


def test_positions_and_steps_are_absolute_and_a_recomputed_request_is_edited_and_spooled_once(tmp_path):
    model = _model()
    edit = Edit(_point("mlp_out", 0), "scale", positions=(1, 4), factor=0.0, steps=(0, 10))
    plan = RequestPlan(
        sites=(Site(Place("model.layers.0.mlp", False), (Stage((edit,), ("layers.0.mlp_out",)),)),),
        prompt_len=PROMPT,
        spool=str(tmp_path),
    )
    ones = torch.ones
    steps = [
        {"model.layers.0.mlp": ones(PROMPT, WIDTH)},  # positions 0..2
        {"model.layers.0.mlp": ones(1, WIDTH) * 2},  # position 3
        {"model.layers.0.mlp": ones(PROMPT + 2, WIDTH) * 3},  # preempted: recomputed 0..4
        {"model.layers.0.mlp": ones(1, WIDTH) * 4},  # position 5
    ]
    run_request(model, _Tracer(model, steps), plan)
    mlp = model.model.layers[0].mlp
    prompt_step, recomputed = mlp.assigned  # step 1 and step 3 touch neither position 1 nor 4
    assert prompt_step[1].abs().sum() == 0 and prompt_step[[0, 2]].eq(1).all()
    assert recomputed[[1, 4]].abs().sum() == 0 and recomputed[[0, 2, 3]].eq(3).all()
    spooled = _spooled(tmp_path, plan, "layers.0.mlp_out")
    # each position once: 0..2 from the prompt step, 3 from step 1, 4 from the recompute, 5 from step 3
    assert spooled[:, 0].tolist() == [1, 0, 1, 2, 0, 4]


def test_a_trace_capture_reads_the_first_step_only_and_resid_pre_0_is_the_embedding(tmp_path):
    model = _model()
    plan = RequestPlan(
        sites=(Site(Place("model.embed_tokens", False), (Stage((), ("layers.0.resid_pre",)),)),),
        prompt_len=PROMPT,
        read_steps=1,
        spool=str(tmp_path),
    )
    embedded = torch.randn(PROMPT, WIDTH)
    tracer = _Tracer(model, [{"model.embed_tokens": embedded}, {"model.embed_tokens": torch.randn(1, WIDTH)}])
    run_request(model, tracer, plan)
    assert tracer.asked == [slice(None, 1)]  # no edits: the loop stops after the prompt step
    torch.testing.assert_close(_spooled(tmp_path, plan, "layers.0.resid_pre"), embedded)
    assert not model.model.embed_tokens.assigned


def test_a_recomputed_request_is_edited_as_its_steps_were_first(tmp_path):
    """``steps`` and ``positions: last`` select, in a recompute, what they selected the first time:
    the prompt step's last position, and each generated position at its own step."""
    model = _model()
    last = Edit(_point("attn_out", 0), "scale", positions="last", factor=0.0)
    first_two_steps = Edit(_point("attn_out", 0), "scale", factor=-1.0, steps=(0, 2))
    plan = RequestPlan(
        sites=(Site(Place("model.layers.0.self_attn", False), (Stage((last, first_two_steps)),)),),
        prompt_len=PROMPT,
    )
    ones = torch.ones
    steps = [
        {"model.layers.0.self_attn": ones(PROMPT, WIDTH)},  # step 0: positions 0..2
        {"model.layers.0.self_attn": ones(1, WIDTH)},  # step 1: position 3
        {"model.layers.0.self_attn": ones(PROMPT + 2, WIDTH)},  # recompute 0..4 (position 4: step 2)
    ]
    run_request(model, _Tracer(model, steps), plan)
    *_, recomputed = model.model.layers[0].self_attn.assigned
    # position 2 (the prompt step's last) and 3, 4 (each the last of its step) zeroed by "last";
    # positions 0..3 (steps 0 and 1) negated by steps (0, 2); position 4 (step 2) not
    assert recomputed[:, 0].tolist() == [-1, -1, 0, 0, 0]


def test_resid_post_is_read_before_the_next_layers_resid_pre_is_edited(tmp_path):
    """Two aliases at one place: layer 0's resid_post capture does not see an edit of layer 1's
    resid_pre (the HF runtime reads layer 0's output before it edits layer 1's input)."""
    model = _model()
    zero = Edit(_point("resid_pre", 1), "scale", factor=0.0)
    plan = RequestPlan(
        sites=(
            Site(
                Place("model.layers.0", True),
                (Stage((), ("layers.0.resid_post",)), Stage((zero,), ("layers.1.resid_pre",))),
            ),
        ),
        prompt_len=PROMPT,
        read_steps=1,
        spool=str(tmp_path),
    )
    hidden, residual = _pair(PROMPT, 3)
    run_request(model, _Tracer(model, [{"model.layers.0": (hidden, residual)}]), plan)
    torch.testing.assert_close(_spooled(tmp_path, plan, "layers.0.resid_post"), hidden + residual)
    assert not _spooled(tmp_path, plan, "layers.1.resid_pre").any()
    (written,) = model.model.layers[0].assigned
    assert not written[0].any() and not written[1].any()


def test_edit_tensors_are_placed_in_the_values_dtype(tmp_path):
    model = _model()
    vector = torch.full((WIDTH,), 1 / 3)  # float32, as it travels
    plan = RequestPlan(
        sites=(
            Site(
                Place("model.layers.0.mlp", False),
                (Stage((Edit(_point("mlp_out", 0), "add", vector=vector),)),),
            ),
        ),
        prompt_len=PROMPT,
    )
    value = torch.zeros(PROMPT, WIDTH, dtype=torch.float64)
    run_request(model, _Tracer(model, [{"model.layers.0.mlp": value}]), plan)
    (written,) = model.model.layers[0].mlp.assigned
    assert written.dtype == torch.float64
    torch.testing.assert_close(
        written, torch.full((PROMPT, WIDTH), 1 / 3, dtype=torch.float64).to(torch.float32).double()
    )


def test_a_spool_cut_short_mid_record_reads_as_the_records_before_it(tmp_path):
    model = _model()
    plan = RequestPlan(
        sites=(Site(Place("model.layers.0.mlp", False), (Stage((), ("a", "b")),)),),
        prompt_len=PROMPT,
        spool=str(tmp_path),
    )
    steps = [
        {"model.layers.0.mlp": torch.randn(PROMPT, WIDTH)},
        {"model.layers.0.mlp": torch.randn(1, WIDTH)},
    ]
    run_request(model, _Tracer(model, steps), plan)
    data = (tmp_path / SPOOL_FILE).read_bytes()
    records = spool_records(data, 2, WIDTH, torch.float32)
    assert [n for _, n in records] == [PROMPT, 1]
    torch.testing.assert_close(
        _spooled(tmp_path, plan, "b"), torch.cat([s["model.layers.0.mlp"] for s in steps])
    )
    assert [n for _, n in spool_records(data[:-1], 2, WIDTH, torch.float32)] == [PROMPT]
