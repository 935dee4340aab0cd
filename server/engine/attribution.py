"""Gradient attribution: how a next-token metric depends on chosen hook points, per position.

One forward pass over the prompt with gradient tracking, through the nnsight wrapper, and one
backward pass from the metric, read with nnsight's gradient support (``with metric.backward():``
then ``value.grad``, requested in reverse forward order, nnsight 0.8). The model's weights never
need gradients: they are frozen (``requires_grad`` off, so no weight gradient is ever
allocated) and the embedding output is made the one leaf that tracks them, so every later value
has a gradient.

Per hook point and position the result holds the gradient's norm and a score:

* ``activation_x_gradient``: ``a . da`` summed over the value's units (gradient x input;
  Shrikumar et al. 2016, Simonyan et al. 2013);
* ``attribution_patching`` (with a reference prompt of the same length):
  ``(a_reference - a) . da``, the first-order estimate of how the metric moves when the
  reference run's value is patched in at that position (Nanda 2023, "Attribution Patching";
  Syed et al. 2023).

The metric is a float32 function of the last position's logits: a token's log-probability,
or the logit difference of two tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .capture import CaptureResult
from .hooks import HookPoint, first_tensor
from .interrupt import JobInterrupted
from .runtime import RowGroup


@dataclass(frozen=True)
class Target:
    """``logprob``: ``log_softmax(logits)[token]``; ``logit_diff``: ``logits[token] - logits[other]``."""

    kind: str
    token: int
    other: int | None = None

    def of(self, logits: torch.Tensor) -> torch.Tensor:
        """``[vocab]`` logits -> the metric (a float32 scalar)."""
        logits = logits.float()
        if self.kind == "logprob":
            return logits.log_softmax(-1)[self.token]
        return logits[self.token] - logits[self.other]


@dataclass(frozen=True)
class PointAttribution:
    """One hook point's result: ``scores`` and ``gradient_norms`` float32 ``[positions]``;
    ``activation`` and ``gradient`` ``[positions, ...]`` (float32, CPU) where kept."""

    point: HookPoint
    scores: torch.Tensor
    gradient_norms: torch.Tensor
    activation: torch.Tensor | None = None
    gradient: torch.Tensor | None = None


@dataclass(frozen=True)
class AttributionResult:
    metric: float
    reference_metric: float | None
    points: list[PointAttribution]


def freeze(model: torch.nn.Module) -> None:
    """Weights that never need a gradient (the server never trains): none is ever allocated."""
    model.requires_grad_(False)


def run_attribution(
    wrapper,
    embedding_path: str,
    prompt_ids: list[int],
    points: tuple[HookPoint, ...],
    target: Target,
    reference: dict[str, torch.Tensor] | None,
    reference_metric: float | None,
    keep_tensors: bool,
) -> AttributionResult:
    """The metric's gradient at each of ``points`` (in execution order) over ``prompt_ids``, on
    the worker. ``reference``: each point's value ``[positions, ...]`` in a reference run of the
    same length (scores are then attribution patching's); ``keep_tensors``: return every
    activation and gradient too. Stopped between layers like any model work
    (``Runtime.interrupted_when``)."""
    freeze(wrapper._module)  # again: PEFT switches its adapter's weights back on when it re-enables it
    device = next(wrapper._module.parameters()).device
    ids = torch.tensor([prompt_ids], device=device)
    kept: list[torch.Tensor] = []  # filled inside the trace: lists made outside it outlive it
    grads: list[torch.Tensor] = []  # in reverse forward order, as nnsight serves them
    metrics: list[torch.Tensor] = []
    with torch.enable_grad():
        with wrapper.trace(ids):
            wrapper.get(embedding_path).output.requires_grad_(True)
            for point in points:
                kept.append(first_tensor(getattr(wrapper.get(point.module_path), point.kind)))
            metric = target.of(wrapper.output.logits[0, -1])
            metrics.append(metric.detach())
            with metric.backward():
                for value in reversed(kept):
                    grads.append(value.grad)
    metric_value = metrics[0]
    results = []
    for point, value, grad in zip(points, kept, reversed(grads), strict=True):
        activation, gradient = value[0].detach().float(), grad[0].float()  # [positions, ...]
        source = activation if reference is None else reference[point.name].float() - activation
        flat = (source * gradient).flatten(1)
        results.append(
            PointAttribution(
                point,
                scores=flat.sum(-1).cpu(),
                gradient_norms=gradient.flatten(1).norm(dim=-1).cpu(),
                activation=activation.cpu() if keep_tensors else None,
                gradient=gradient.cpu() if keep_tensors else None,
            )
        )
    return AttributionResult(float(metric_value), reference_metric, results)


def attribute(
    runtime,
    wrapper,
    embedding_path: str,
    prompt_ids: list[int],
    points: tuple[HookPoint, ...],
    target: Target,
    reference_ids: list[int] | None,
    sink,
    facts: dict,
    stop: Callable[[], bool],
) -> tuple[AttributionResult, CaptureResult | None]:
    """A whole attribution request on the worker: the reference run's values and metric (if
    ``reference_ids``), the attribution, and with ``sink`` (the activation store) every
    activation, gradient and score written as one capture (``facts``: the manifest's other
    fields). Nothing is left on disk if writing fails.

    Raises:
        JobInterrupted: ``stop()`` became true between the two passes."""
    reference = reference_metric = None
    if reference_ids is not None:
        found: dict[str, torch.Tensor] = {}
        group = RowGroup(reference_ids, reads=points, on_values=found.update)
        logits = runtime.start("served", [group]).forward()
        if group.error is not None:
            raise group.error
        reference = {name: first_tensor(value)[0] for name, value in found.items()}
        reference_metric = float(target.of(logits[0]))
    if stop():
        raise JobInterrupted
    result = run_attribution(
        wrapper, embedding_path, prompt_ids, points, target, reference, reference_metric, sink is not None
    )
    if sink is None:
        return result, None
    return result, write_attribution(sink, result, prompt_ids, facts)


def write_attribution(sink, result: AttributionResult, prompt_ids: list[int], facts: dict) -> CaptureResult:
    """Each point's activation (``<point>``), gradient (``grad.<point>``) and scores
    (``scores.<point>``), ``[positions, ...]`` float32, and a manifest, as one capture."""
    writer = sink.create(None, "safetensors")
    try:
        for item in result.points:
            where = {"layer": item.point.layer, "hook_point": item.point.hook}
            writer.write(item.point.name, item.activation, **where, kind="activation")
            writer.write(f"grad.{item.point.name}", item.gradient, **where, kind="gradient")
            writer.write(f"scores.{item.point.name}", item.scores, **where, kind="attribution_scores")
        written = writer.finish(
            mode="attribution",
            token_positions=list(range(len(prompt_ids))),
            token_ids=list(prompt_ids),
            metric=result.metric,
            reference_metric=result.reference_metric,
            **facts,
        )
    except BaseException:
        writer.abort()
        raise
    names = tuple(entry["name"] for entry in written["tensors"])
    return CaptureResult(written["id"], writer.directory, names, written, sink)
