"""What runs inside vLLM's worker for one request: its edits and capture reads, step by step.

The vLLM runtime (``vllm_engine.py``) traces each request through nnsight with a block that
only calls :func:`run_request`; nnsight ships that call to vLLM's worker (this module by
reference: it is installed there too; the :class:`RequestPlan` by value), where it runs
inside the request's forward passes, on the request's own rows (nnsight narrows every value
to the invoke's tokens while vLLM batches requests together).

Hook points on vLLM's module tree (the alias table, docs/hook_points.md). vLLM's Llama-family
decoder layer (Llama, Mistral, Qwen2, Qwen3, SmolLM) returns a ``(hidden, residual)`` pair
whose sum is the residual stream after the layer (HF's ``hidden_states[i + 1]``); the next
layer, and the final norm, read the sum. So:

=============  ===================================================  ==========================
alias          read from                                            an edit writes
=============  ===================================================  ==========================
resid_pre i    ``embed_tokens`` output (i = 0), else ``layers.{i-1}``  the same place
               output summed
resid_post i   ``layers.{i}`` output, ``hidden + residual``         ``(edited, zeros)``: the
                                                                    next layer reads ``edited``
attn_out i     ``layers.{i}.self_attn`` output                      the tensor itself
mlp_out i      ``layers.{i}.mlp`` output                            the tensor itself
=============  ===================================================  ==========================

Values are ``[tokens this step, width]`` (vLLM flattens a batch over tokens): the prompt at
step 0, one token at each later step. Positions are absolute (the prompt covers ``[0, P)``),
as :class:`interventions.Edit` expects; a step that feeds more than one token after the first
is vLLM recomputing a preempted request from position 0: its positions are edited as the steps
that first fed them were.

A capture's values are appended, step by step, to one spool file in a folder the server made
for the request: one record per step (each position once, every hook point's values, in the
model's dtype; :func:`spool_records` reads it), each value written as it is read: nothing
accumulates in the worker, and the server turns the spool into the activation store's files
(``vllm_engine.py``).
Only the first rank writes (with tensor parallelism every rank holds the whole value: vLLM's
row-parallel layers all-reduce their outputs).
"""

from __future__ import annotations

import os
import struct
import warnings
from dataclasses import dataclass, replace

import torch

from interventions import Edit

# The order of the places a layer's hook points are read or edited at, within a step.
_PLACE_ORDER = {"attn_out": 0, "mlp_out": 1, "resid_post": 2}


@dataclass(frozen=True)
class Place:
    """One location in vLLM's module tree: ``module`` (a path under the traced model, e.g.
    ``model.layers.3``) and how its value is read: ``pair`` (a layer's ``(hidden, residual)``,
    summed) or ``tensor``."""

    module: str
    pair: bool

    def envoy(self, model):
        envoy = model
        for part in self.module.split("."):
            envoy = envoy[int(part)] if part.isdigit() else getattr(envoy, part)
        return envoy


@dataclass(frozen=True)
class Stage:
    """One hook point's work at a place, in a step: its edits (in order), then the capture
    tensors read there (after those edits, as on the HF runtime)."""

    edits: tuple[Edit, ...] = ()
    names: tuple[str, ...] = ()


@dataclass(frozen=True)
class Site:
    """One place and its stages in execution order: where two aliases share a place
    (``resid_post`` of layer i and ``resid_pre`` of layer i + 1), ``resid_post``'s stage comes
    first, so its read does not see ``resid_pre``'s edits (the HF runtime reads layer i's
    output before it edits layer i + 1's input)."""

    place: Place
    stages: tuple[Stage, ...]


@dataclass(frozen=True)
class RequestPlan:
    """One request's worker-side work: ``sites`` in execution order, the prompt length, how
    many steps the capture reads (None: all), and the spool folder (None: no capture)."""

    sites: tuple[Site, ...]
    prompt_len: int
    read_steps: int | None = None
    spool: str | None = None

    def names(self) -> list[str]:
        """The capture tensors a spool record holds, in its order."""
        return [name for site in self.sites for stage in site.stages for name in stage.names]


def place_of(hook: str, layer: int, layers_path: str, embed_path: str) -> tuple[Place, int]:
    """Where alias ``hook`` of ``layer`` lives in vLLM's Llama-family tree, and its order key.

    Raises:
        KeyError: ``hook`` is not one of the aliases mapped on vLLM.
    """
    if hook == "resid_pre":
        if layer == 0:
            return Place(embed_path, pair=False), -1
        return Place(f"{layers_path}.{layer - 1}", pair=True), (layer - 1) * 3 + _PLACE_ORDER["resid_post"]
    child = {"attn_out": "self_attn", "mlp_out": "mlp", "resid_post": None}[hook]
    module = f"{layers_path}.{layer}" + (f".{child}" if child else "")
    return Place(module, pair=child is None), layer * 3 + _PLACE_ORDER[hook]


def run_request(model, tracer, plan: RequestPlan) -> None:
    """The request's block (runs in vLLM's worker): at every step, each site in order.

    The loop over steps is open-ended (``tracer.iter[:]``) unless only a trace-mode capture
    reads (its first steps); nnsight ends it when the request ends, with a warning per request
    that says so, silenced here (it is this loop's normal end)."""
    _quiet_open_loops()
    rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    edits = any(stage.edits for site in plan.sites for stage in site.stages)
    steps = tracer.iter[:] if edits else tracer.iter[: plan.read_steps]
    record = _Record(plan.spool)
    try:
        _run_steps(model, steps, plan, rank0, record)
    finally:
        record.close()


def _run_steps(model, steps, plan: RequestPlan, rank0: bool, record: _Record) -> None:
    spooled = 0  # positions already in the spool
    fed = 0  # positions fed in so far
    placed: dict[int, Edit] = {}  # each edit with its tensors on the model's device and dtype
    for step in steps:
        reading = plan.spool is not None and rank0 and (plan.read_steps is None or step < plan.read_steps)
        start = None
        for site in plan.sites:
            envoy = site.place.envoy(model)
            output = envoy.output
            if site.place.pair:
                hidden, residual = output[0], output[1]
                value = hidden + residual
            else:
                value = output
            length = value.shape[0]
            if start is None:
                start = fed if (step > 0 and length == 1) else 0
                segments = _segments(start, length, plan.prompt_len, step)
            edited = False
            for stage in site.stages:
                for edit in stage.edits:
                    if id(edit) not in placed:
                        placed[id(edit)] = _placed(edit, value)
                    edit = placed[id(edit)]
                    index = _indexes(edit, segments, start, plan.prompt_len)
                    if index:
                        rows = torch.tensor(index, device=value.device)
                        new = edit.new_values(value[rows][None], start, index)[0]
                        value = value.index_copy(0, rows, new.to(value.dtype))
                        edited = True
                if reading and stage.names and spooled < start + length:
                    new_rows = value[max(0, spooled - start) :]
                    for _ in stage.names:  # bytes now: vLLM's next norm adds into some values in place
                        record.add(new_rows)
            if edited:
                envoy.output = (value, torch.zeros_like(value)) if site.place.pair else value
        record.end_step()
        if start is not None:
            fed = start + length
            spooled = max(spooled, fed)


def _segments(start: int, length: int, prompt_len: int, step: int) -> list[tuple[int, int, int]]:
    """The forward steps a step's positions were first fed at, as ``(start, length, step)``: the
    step itself, or, where vLLM recomputes a preempted request from position 0, the prompt
    (step 0) and each generated position at its own step, so that ``positions`` and ``steps``
    select what they selected the first time."""
    if step == 0 or start > 0 or length == 1:
        return [(start, length, step)]
    return [(0, prompt_len, 0)] + [(p, 1, p - prompt_len + 1) for p in range(prompt_len, length)]


def _indexes(edit: Edit, segments, start: int, prompt_len: int) -> list[int]:
    """Which of this step's positions (relative to ``start``) ``edit`` touches."""
    return [s + i - start for s, n, k in segments for i in edit.indexes(s, n, prompt_len, k)]


def _placed(edit: Edit, value: torch.Tensor) -> Edit:
    """``edit`` with its vector and patch source on ``value``'s device and in its dtype (they
    travel to the worker as float32 CPU tensors)."""

    def move(tensor):
        return None if tensor is None else tensor.to(value.device, value.dtype)

    return replace(edit, vector=move(edit.vector), source=move(edit.source))


_quieted = False


def _quiet_open_loops() -> None:
    global _quieted
    if not _quieted:
        warnings.filterwarnings("ignore", message=r".*was never reached: the loop asked for a step")
        _quieted = True


SPOOL_FILE = "steps.raw"
_HEADER = struct.Struct("<q")  # a record's positions


class _Record:
    """The spool file's writer: one record per step, its header (the step's new positions) then
    each name's ``[n, width]`` values in :meth:`RequestPlan.names` order, each written as it is
    read (one value in memory at a time); the file opened once per step that reads."""

    def __init__(self, folder: str | None) -> None:
        self.path = None if folder is None else os.path.join(folder, SPOOL_FILE)
        self.fd: int | None = None

    def add(self, values: torch.Tensor) -> None:
        if self.fd is None:
            flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW
            self.fd = os.open(self.path, flags, 0o600)
            _write_all(self.fd, _HEADER.pack(values.shape[0]))
        _write_all(self.fd, values.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy())

    def end_step(self) -> None:
        self.close()

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _write_all(fd: int, data) -> None:
    """All of ``data`` (a write may take less: at most about 2 GiB at once on Linux)."""
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view) :]


def spool_records(buffer, names: int, width: int, dtype: torch.dtype) -> list[tuple[int, int]]:
    """Where each record of a spool (``buffer``: its bytes, e.g. a memory map) holds its values:
    ``(offset of its data, positions)``, in the order the steps wrote them. A record cut short
    (a worker that died mid-write) ends the list.

    Read one name's rows with :func:`spool_rows`."""
    records, offset, size = [], 0, len(buffer)
    while offset + _HEADER.size <= size:
        (positions,) = _HEADER.unpack_from(buffer, offset)
        data = offset + _HEADER.size
        end = data + positions * names * width * dtype.itemsize
        if positions < 0 or end > size:
            break
        records.append((data, positions))
        offset = end
    return records


def spool_rows(buffer, record: tuple[int, int], name: int, width: int, dtype: torch.dtype) -> torch.Tensor:
    """Name number ``name``'s ``[positions, width]`` values in one record (a view of ``buffer``)."""
    data, positions = record
    if positions == 0:
        return torch.empty((0, width), dtype=dtype)
    offset = data + name * positions * width * dtype.itemsize
    flat = torch.frombuffer(buffer, dtype=dtype, count=positions * width, offset=offset)
    return flat.view(positions, width)
