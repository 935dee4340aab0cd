"""Activation capture: a plan of hook points, read through the nnsight wrapper, reduced, stored.

A :class:`CapturePlan` says what to read (hook points in execution order),
which positions to keep, whether to keep a subset of hidden units, and the
storage dtype. :func:`capture_prompt` runs one traced forward pass over the
prompt on the served wrapper (``mode: "trace"``) and hands each value,
detached and moved to the CPU, to the request's writer.

Values are ``[batch, pos, ...]`` tensors; a module that returns a tuple (an
attention block returns ``(output, weights)``) is read at its first element.
Stored tensors are ``[pos, ...]`` (the batch of one dropped).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .hooks import HookPoint


@dataclass(frozen=True)
class CapturePlan:
    points: tuple[HookPoint, ...]
    mode: str = "trace"  # "trace": the prompt forward only
    positions: str = "all"
    sample_hidden: int | None = None  # keep this many units of the last dimension
    sample_method: str = "random"  # "random" (seeded subset) | "first"
    sample_seed: int = 0
    dtype: torch.dtype | None = None  # storage dtype; None: the model's
    format: str = "safetensors"
    save_dir: str | None = None  # inside the activation store's root

    def unit_indices(self, width: int) -> torch.Tensor | None:
        """Which hidden units to keep for a last dimension of ``width`` (sorted), or None for all."""
        if self.sample_hidden is None or self.sample_hidden >= width:
            return None
        if self.sample_method == "first":
            return torch.arange(self.sample_hidden)
        generator = torch.Generator().manual_seed(self.sample_seed)
        return torch.randperm(width, generator=generator)[: self.sample_hidden].sort().values


def stored_bytes(plan: CapturePlan, prompt_len: int, max_tokens: int, model_dtype: torch.dtype) -> int:
    """Bytes of tensor data a capture writes at most (file headers and manifest aside).

    Trace mode reads the prompt; generate mode every token fed in, the final generated one
    included (prompt + max_tokens positions when no choice ends early).
    """
    generated = max_tokens if plan.mode == "generate" else 0
    positions = {
        "all": prompt_len + generated,
        "prompt": prompt_len,
        "generated": generated,
        "last": 1,
    }[plan.positions]
    itemsize = (plan.dtype or model_dtype).itemsize

    def kept(width: int) -> int:  # sample_hidden keeps that many units of the last dimension
        return width if plan.sample_hidden is None else min(width, plan.sample_hidden)

    return sum(kept(point.width) for point in plan.points) * positions * itemsize


def first_tensor(value) -> torch.Tensor:
    while isinstance(value, (tuple, list)) and value:
        value = value[0]
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"expected a tensor, got {type(value).__name__}")
    return value


def reduce_value(
    value, plan: CapturePlan, positions: slice
) -> tuple[torch.Tensor, list[int], torch.Tensor | None]:
    """[1, pos, ...] value -> (stored [pos', ...] CPU tensor, original shape, kept unit indices)."""
    tensor = first_tensor(value).detach()
    original = list(tensor.shape)
    if tensor.dim() < 2 or tensor.shape[0] != 1:
        raise ValueError(f"expected a [1, pos, ...] tensor, got shape {original}")
    tensor = tensor[0, positions]
    indices = plan.unit_indices(tensor.shape[-1]) if tensor.dim() >= 2 else None
    if indices is not None:
        tensor = tensor.index_select(-1, indices.to(tensor.device))
    tensor = tensor.to("cpu", dtype=plan.dtype or tensor.dtype, copy=True)
    return tensor, original, indices


def prompt_positions(plan: CapturePlan, prompt_len: int) -> slice:
    return slice(prompt_len - 1, prompt_len) if plan.positions == "last" else slice(0, prompt_len)


def capture_prompt(
    wrapper, prompt_ids: list[int], plan: CapturePlan, logits_module: str | None, edits: tuple = ()
) -> dict:
    """One traced forward over the prompt; every planned value (after any edits), in execution order.

    Unless the logits themselves are planned, the forward computes them for the last
    position only (``logits_to_keep=1``), as generation does: a long prompt's full
    ``[pos, vocab]`` logits are often its largest tensor.
    """
    from .steps import StepPlan, placed

    model = wrapper._module
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    extra = {}
    wants_logits = any(p.module_path == logits_module for p in plan.points)
    if not wants_logits and "logits_to_keep" in inspect.signature(model.forward).parameters:
        extra["logits_to_keep"] = 1
    steps = StepPlan(plan.points, placed(edits, model), len(prompt_ids))
    saved: dict = {}  # filled inside the block: nnsight runs it as its own code, so mutate, don't rebind
    with torch.no_grad(), wrapper.trace(ids, attention_mask=torch.ones_like(ids), **extra):
        saved.update(steps.run_step(wrapper, save=True))
    return saved


def tensor_facts(
    point: HookPoint,
    original_shape,
    positions: list[int],
    token_ids: list[int],
    tokens: list[str],
    units: torch.Tensor | None,
) -> dict:
    """What the manifest says of one tensor besides what the writer knows (file, shape, dtype, bytes)."""
    return {
        "layer": point.layer,
        "hook_point": point.hook,
        "module": f"{point.module_path}.{point.kind}",
        "original_shape": original_shape,
        "positions": positions,
        "token_ids": token_ids,
        "tokens": tokens,
        "unit_indices": None if units is None else units.tolist(),
    }


def write_prompt_capture(
    saved: dict, plan: CapturePlan, prompt_ids: list[int], token_text: Callable, writer, **manifest
) -> dict:
    """Reduce and store every value of a trace-mode capture, then its manifest."""
    positions = prompt_positions(plan, len(prompt_ids))
    kept = list(range(positions.start, positions.stop))
    token_ids = [prompt_ids[p] for p in kept]
    tokens = [token_text(t) for t in token_ids]
    for point in plan.points:
        tensor, original, units = reduce_value(saved.pop(point.name), plan, positions)
        writer.write(point.name, tensor, **tensor_facts(point, original, kept, token_ids, tokens, units))
    return writer.finish(mode=plan.mode, positions=plan.positions, **manifest)


class GenerationCapture:
    """Hands each forward step's values, reduced and on the CPU, to the request's writer.

    Step 0 is the prompt forward (``[1, P, ...]``); each later step is the one
    token fed in at that step (``[1, 1, ...]``). The decode monitor runs one
    extra step so that the final generated token is fed in too: position p of
    a stored tensor is token p of prompt + completion. Values are appended to
    disk step by step (``CaptureWriter.append``), so neither accelerator nor
    host memory grows with the number of tokens; ``positions: "last"`` keeps
    only the latest step's value in memory.

    The writer (and with it the capture's directory) is opened by the first
    step, on the worker thread: a request cancelled before it ran leaves nothing.
    """

    def __init__(self, plan: CapturePlan, open_writer: Callable, prompt_len: int, **manifest) -> None:
        self.plan = plan
        self._open_writer = open_writer
        self._writer = None
        self.prompt_len = prompt_len
        self.manifest = manifest  # request-level facts for the manifest (model, completion id, ...)
        self.position = 0  # absolute position of the next value
        self.kept: list[int] = []  # absolute positions written so far
        self.shapes: dict[str, list[int]] = {}  # one step's original shape per tensor
        self.units: dict[str, torch.Tensor | None] = {}
        self.latest: dict[str, torch.Tensor] = {}  # positions "last": the latest step only

    def _kept_slice(self, start: int, length: int) -> slice:
        if self.plan.positions == "last":
            return slice(length - 1, length)
        if self.plan.positions == "prompt":
            return slice(0, max(0, min(length, self.prompt_len - start)))
        if self.plan.positions == "generated":
            return slice(min(length, max(0, self.prompt_len - start)), length)
        return slice(0, length)

    @property
    def writer(self):
        if self._writer is None:
            self._writer = self._open_writer()
        return self._writer

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()

    def on_step(self, values: dict) -> None:
        length = self.prompt_len if self.position == 0 else 1  # tokens fed in at this step
        for name, value in values.items():
            if first_tensor(value).shape[1] != length:
                raise ValueError(
                    f"{name} does not hold one value per position fed in (shape {list(value.shape)})"
                )
        keep = self._kept_slice(self.position, length)
        if self.plan.positions == "last":
            self.kept = [self.position + length - 1]
        else:
            self.kept += range(self.position + keep.start, self.position + keep.stop)
        for point in self.plan.points:
            if keep.stop <= keep.start:
                continue
            tensor, original, units = reduce_value(values[point.name], self.plan, keep)
            self.shapes[point.name] = original
            self.units[point.name] = units
            if self.plan.positions == "last":
                self.latest[point.name] = tensor
            else:
                self.writer.append(point.name, tensor)
        self.position += length

    def finish(self, token_ids: list[int], tokens: list[str]) -> dict:
        """Close every tensor file and write the manifest; ``token_ids`` covers prompt + completion."""
        for point in self.plan.points:
            if point.name in self.latest:
                self.writer.append(point.name, self.latest.pop(point.name))
            shape = self.shapes.get(point.name)
            units = self.units.get(point.name)
            original = None if shape is None else [shape[0], self.position, *shape[2:]]
            kept_ids = [token_ids[p] for p in self.kept]
            kept_tokens = [tokens[p] for p in self.kept]
            self.writer.close_appended(
                point.name, **tensor_facts(point, original, self.kept, kept_ids, kept_tokens, units)
            )
        return self.writer.finish(mode=self.plan.mode, positions=self.plan.positions, **self.manifest)
