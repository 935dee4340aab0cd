"""Activation capture, owned by the engine: a plan, values fed step by step, one manifest.

A :class:`CapturePlan` says what to read (hook points in execution order), in which
mode (``trace``: the prompt forward only; ``generate``: every token fed in), which
positions to keep, whether to keep a subset of hidden units, and the storage dtype.
A job carries a :class:`CaptureSpec`: the plan, the sink it writes through (the
activation store: anything with ``create(save_dir, format) -> writer``) and what the
request adds to the manifest. The decode loop gives the job's rows to the runtime with
the plan's reads; the runtime hands each step's values to the job's
:class:`CaptureRecorder`, which reduces them, moves them to the CPU (one copy per step)
and appends them to the writer, which holds at most 256 KiB per tensor before it appends to
disk: so neither accelerator nor host memory grows with the tokens. The recorder writes
the manifest (the one place that does) and returns a typed :class:`CaptureResult`.

A plan may also ask for values *derived* on the device from what it reads, stored beside
the raw ones: an SAE's top features at every position (:class:`SaeRead`:
``saes.<name>.indices`` / ``.values`` ``[pos, k]`` and ``.error_norm`` ``[pos]``) and the
logit lens of chosen layers (:class:`LensRead`: ``logit_lens.layers.<L>.indices`` /
``.logprobs`` ``[pos, k]``) and attention patterns (``patterns``, ``attention.py``:
``attention.layers.<L>.pattern``, ``[query pos, heads, key pos]``, keys up to the last
position the capture can reach, zeros past each query's own). The hook points they read
are stored only where the plan's ``points`` name them too.

Values are ``[1, pos, ...]`` tensors of the job's first row (a module that returns a
tuple is read at its first element); stored tensors are ``[pos, ...]``. In generate
mode the loop runs one extra step so that the final generated token is fed in too:
position p of a stored tensor is token p of prompt + completion.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from .attention import PatternPoint
from .hooks import HookPoint, first_tensor
from .interrupt import JobInterrupted


@dataclass(frozen=True)
class SaeRead:
    """Store an SAE's ``top_k`` most active features (and its reconstruction error norm) at every
    kept position of its hook point (``sae``: a :class:`~server.engine.sae.SparseAutoencoder`)."""

    name: str
    point: HookPoint
    sae: Any
    top_k: int

    def tensor_names(self) -> tuple[str, str, str]:
        return (f"saes.{self.name}.indices", f"saes.{self.name}.values", f"saes.{self.name}.error_norm")


@dataclass(frozen=True)
class LensRead:
    """Store the logit lens (``top_k`` tokens and logprobs) of each layer's ``resid_post``
    (``points``) at every kept position; ``unembed``: a :class:`~server.engine.lens.Unembedding`."""

    points: tuple[HookPoint, ...]
    top_k: int
    unembed: Any

    @staticmethod
    def tensor_names(point: HookPoint) -> tuple[str, str]:
        return (f"logit_lens.layers.{point.layer}.indices", f"logit_lens.layers.{point.layer}.logprobs")


@dataclass(frozen=True)
class CapturePlan:
    points: tuple[HookPoint, ...]
    mode: str = "trace"  # "trace": the prompt forward only; "generate": every token fed in
    positions: str = "all"
    sample_hidden: int | None = None  # keep this many units of the last dimension
    sample_method: str = "random"  # "random" (seeded subset) | "first"
    sample_seed: int = 0
    dtype: torch.dtype | None = None  # storage dtype; None: the model's
    format: str = "safetensors"
    save_dir: str | None = None  # inside the activation store's root
    saes: tuple[SaeRead, ...] = ()
    lens: LensRead | None = None
    patterns: tuple[PatternPoint, ...] = ()
    pattern_heads: int = 0  # heads each pattern keeps (for the size estimate)

    @property
    def reads(self) -> tuple[HookPoint, ...]:
        """Every hook point the capture reads (stored ones, and those SAEs and the lens read), in
        execution order."""
        found = {point.name: point for point in self.points}
        for read in self.saes:
            found.setdefault(read.point.name, read.point)
        for point in self.lens.points if self.lens else ():
            found.setdefault(point.name, point)
        return tuple(sorted(found.values(), key=lambda p: (p.order, p.name)))

    def derived_row_bytes(self) -> int:
        """Bytes the SAE and lens tensors store per position (int64 indices, float32 values)."""
        sae = sum(read.top_k * (8 + 4) + 4 for read in self.saes)
        lens = len(self.lens.points) * self.lens.top_k * (8 + 4) if self.lens else 0
        return sae + lens

    def derived_count(self) -> int:
        """How many SAE and lens tensors the capture stores."""
        return 3 * len(self.saes) + (2 * len(self.lens.points) if self.lens else 0) + len(self.patterns)

    def max_keys(self, prompt_len: int, max_tokens: int) -> int:
        """Key positions a stored pattern has: every position a query can see (the prompt in
        trace mode; prompt and every token fed in generate mode)."""
        generated = self.mode == "generate" and self.positions != "prompt"  # "prompt": queries < P only
        return prompt_len + (max_tokens if generated else 0)

    def pattern_device_bytes(self, prompt_len: int, dtype_bytes: int) -> int:
        """Bytes the patterns of the prompt step hold on the device until they are stored: every
        tapped layer's kept query rows over the prompt's keys."""
        rows = {"all": prompt_len, "prompt": prompt_len, "last": 1, "generated": 0}[self.positions]
        return len(self.patterns) * self.pattern_heads * rows * prompt_len * dtype_bytes

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
    positions = kept_positions(plan, prompt_len, max_tokens)
    itemsize = (plan.dtype or model_dtype).itemsize

    def kept(width: int) -> int:  # sample_hidden keeps that many units of the last dimension
        return width if plan.sample_hidden is None else min(width, plan.sample_hidden)

    raw = sum(kept(point.width) for point in plan.points) * positions * itemsize
    patterns = len(plan.patterns) * plan.pattern_heads * plan.max_keys(prompt_len, max_tokens) * itemsize
    return raw + (plan.derived_row_bytes() + patterns) * positions


def kept_positions(plan: CapturePlan, prompt_len: int, max_tokens: int) -> int:
    """How many positions each of the capture's tensors holds at most."""
    generated = max_tokens if plan.mode == "generate" else 0
    return {
        "all": prompt_len + generated,
        "prompt": prompt_len,
        "generated": generated,
        "last": 1,
    }[plan.positions]


# A manifest's size, about (the written one is counted exactly against --max-capture-bytes):
# its fixed facts (model, sampling, the request's interventions), one compact entry per tensor,
# per kept position its index, token id and token text (JSON-escaped; most tokens are short),
# and the sampled unit indices once per width.
MANIFEST_BASE_BYTES = 8192
MANIFEST_ENTRY_BYTES = 384
MANIFEST_POSITION_BYTES = 48


def manifest_bytes(plan: CapturePlan, prompt_len: int, max_tokens: int) -> int:
    """About how many bytes the capture's manifest takes (see the constants above)."""
    widths = {point.width for point in plan.points} if plan.sample_hidden is not None else set()
    return (
        MANIFEST_BASE_BYTES
        + (len(plan.points) + plan.derived_count()) * MANIFEST_ENTRY_BYTES
        + kept_positions(plan, prompt_len, max_tokens) * MANIFEST_POSITION_BYTES
        + sum(min(width, plan.sample_hidden) for width in widths) * 8
    )


class CaptureSink(Protocol):
    """Where captures are written: the activation store (``server/storage/activations.py``)."""

    def create(self, save_dir: str | None, fmt: str): ...

    def delete(self, capture_id: str) -> None: ...


@dataclass(frozen=True)
class CaptureSpec:
    """A job's capture: what to read (``plan``), where to write (``sink``), and the request's
    own manifest facts (``request_facts``: e.g. its interventions and presets as sent)."""

    plan: CapturePlan
    sink: CaptureSink
    completion_id: str
    request_facts: dict[str, Any] = field(default_factory=dict)
    reasoning: ReasoningMarks | None = None  # mark the answer's reasoning positions


@dataclass(frozen=True)
class ReasoningMarks:
    """How to find a reasoning block in the fed-in token ids (``--reasoning-parser``): the tags'
    token ids (None where a tag is not one token: then nothing is marked) and whether the
    template opened the block in the prompt."""

    parser: str
    start_id: int | None
    end_id: int | None
    opens_in_prompt: bool

    def span(self, token_ids: list[int], prompt_len: int) -> list[int] | None:
        """``[first, end)`` absolute positions of the answer's reasoning, tags included (None:
        no block, or tags that are not single tokens). Ends at the last position fed in when
        the answer stopped inside its reasoning."""
        if self.end_id is None or (self.start_id is None and not self.opens_in_prompt):
            return None
        answer = token_ids[prompt_len:]
        if not answer or not (self.opens_in_prompt or answer[0] == self.start_id):
            return None  # nothing generated (trace mode), or an answer without a block
        try:
            return [prompt_len, prompt_len + answer.index(self.end_id) + 1]
        except ValueError:
            return [prompt_len, len(token_ids)]


@dataclass(frozen=True)
class CaptureResult:
    """A written capture: its id, its directory, its tensors' names and the manifest itself."""

    id: str
    directory: Path
    tensors: tuple[str, ...]
    manifest: dict
    sink: CaptureSink | None = field(default=None, repr=False, compare=False)

    def remove(self) -> None:
        """Delete the capture (its id never reached a client). KeyError if it is gone already."""
        if self.sink is not None:
            self.sink.delete(self.id)


def reduce_values(values: list, plan: CapturePlan, positions: slice) -> list[torch.Tensor]:
    """[1, pos, ...] values -> stored [pos', ...] CPU tensors, in order.

    Values of one shape and dtype are reduced together (kept positions, the plan's hidden
    units, its storage dtype) and leave the device in one copy. The results are fresh
    tensors (views into that copy), never the model's own.
    Raises ValueError for a value that is not ``[1, pos, ...]``.
    """
    tensors = [first_tensor(value).detach() for value in values]
    groups: dict[tuple, list[int]] = {}
    for i, tensor in enumerate(tensors):
        if tensor.dim() < 2 or tensor.shape[0] != 1:
            raise ValueError(f"expected a [1, pos, ...] tensor, got shape {list(tensor.shape)}")
        groups.setdefault((tuple(tensor.shape), tensor.dtype, tensor.device), []).append(i)
    stored: list[torch.Tensor | None] = [None] * len(tensors)
    for (shape, dtype, device), indexes in groups.items():
        joined = torch.cat([tensors[i][:, positions] for i in indexes])  # [k, pos', ...], a new tensor
        units = plan.unit_indices(shape[-1]) if len(shape) > 2 else None
        if units is not None:
            joined = joined.index_select(-1, units.to(device))
        joined = joined.to("cpu", dtype=plan.dtype or dtype)
        for i, tensor in zip(indexes, joined.unbind(0), strict=True):
            stored[i] = tensor
    return stored


def derived_values(
    plan: CapturePlan, values: dict, keep: slice, max_keys: int = 0
) -> list[tuple[str, torch.Tensor]]:
    """The SAE, lens and pattern tensors of one step (``values``: ``{name: [1, pos, ...]}``;
    ``keep``: the positions kept; ``max_keys``: a pattern's stored key positions), computed on
    the values' device, returned on the CPU."""
    out: list[tuple[str, torch.Tensor]] = []
    for point in plan.patterns:
        pattern = values[point.name][0]  # [kept queries, heads, keys so far]: computed for ``keep`` only
        padded = torch.nn.functional.pad(pattern, (0, max_keys - pattern.shape[-1]))
        out.append((point.name, padded.to("cpu", plan.dtype or padded.dtype)))
    for read in plan.saes:
        x = first_tensor(values[read.point.name])[0, keep].reshape(-1, read.sae.d_in)  # [pos', d_in]
        found = read.sae.top_features(x, read.top_k)
        out += zip(read.tensor_names(), (found.indices, found.values, found.error_norm), strict=True)
    if plan.lens is not None:
        for point in plan.lens.points:
            ids, logprobs = plan.lens.unembed.top(first_tensor(values[point.name])[0, keep], plan.lens.top_k)
            out += zip(LensRead.tensor_names(point), (ids, logprobs), strict=True)
    return out


def derived_facts(plan: CapturePlan) -> list[tuple[str, dict]]:
    """Each SAE and lens tensor's name and what the manifest says of it."""
    facts: list[tuple[str, dict]] = []
    for read in plan.saes:
        where = {"layer": read.point.layer, "hook_point": read.point.hook, "sae": read.name}
        for name, kind in zip(
            read.tensor_names(), ("sae_indices", "sae_values", "sae_error_norm"), strict=True
        ):
            facts.append((name, {**where, "kind": kind, "top_k": read.top_k}))
    for point in plan.patterns:
        heads = None if point.heads is None else list(point.heads)
        facts.append(
            (
                point.name,
                {
                    "layer": point.layer,
                    "kind": "attention_pattern",
                    "heads": heads,
                    "layout": "query, head, key",
                },
            )
        )
    for point in plan.lens.points if plan.lens else ():
        for name, kind in zip(LensRead.tensor_names(point), ("lens_indices", "lens_logprobs"), strict=True):
            facts.append(
                (
                    name,
                    {"layer": point.layer, "hook_point": point.hook, "kind": kind, "top_k": plan.lens.top_k},
                )
            )
    return facts


def tensor_facts(point: HookPoint, original_shape, units: torch.Tensor | None) -> dict:
    """What the manifest says of one tensor besides what the writer knows (file, shape, dtype,
    bytes). The positions and tokens are the capture's, listed once (``capture_facts``)."""
    return {
        "layer": point.layer,
        "hook_point": point.hook,
        "module": f"{point.module_path}.{point.kind}",
        "original_shape": original_shape,
        "sampled_units": units is not None,
    }


def capture_facts(
    positions: list[int], token_ids: list[int], tokens: list[str], units: dict[int, torch.Tensor]
) -> dict:
    """What the manifest says once for all its tensors: the absolute positions each tensor's
    rows hold, their token ids and texts, and (``sample_hidden``) the kept unit indices per
    original width (``{"576": [...]}``)."""
    return {
        "token_positions": positions,
        "token_ids": token_ids,
        "tokens": tokens,
        "unit_indices": {str(width): kept.tolist() for width, kept in units.items()} or None,
    }


class CaptureRecorder:
    """Hands each forward step's values, reduced and on the CPU, to the capture's writer.

    Step 0 is the prompt forward (``[1, P, ...]``); each later step is the one token fed
    in at that step (``[1, 1, ...]``). ``positions: "last"`` keeps only the latest step's
    value in memory. The writer (and with it the capture's directory) is opened by the
    first step, on the worker thread: a request cancelled before it ran leaves nothing.
    """

    def __init__(
        self, spec: CaptureSpec, prompt_len: int, facts: dict[str, Any], max_tokens: int = 0
    ) -> None:
        self.spec = spec
        self.plan = spec.plan
        self.prompt_len = prompt_len
        self.max_keys = spec.plan.max_keys(prompt_len, max_tokens)  # a stored pattern's key positions
        self.facts = facts  # what the engine knows for the manifest (model, dtype, sampling, ...)
        self._writer = None
        self.position = 0  # absolute position of the next value
        self.kept: list[int] = []  # absolute positions written so far
        self.shapes: dict[str, list[int]] = {}  # one step's original shape per tensor
        self.units: dict[str, torch.Tensor | None] = {}
        self.latest: dict[str, torch.Tensor] = {}  # positions "last": the latest step only

    @property
    def trace(self) -> bool:
        """Trace mode: it reads the prompt step only, and is written right after it."""
        return self.plan.mode == "trace"

    @property
    def reads_steps(self) -> int | None:
        """How many forward steps it reads: the prompt only in trace mode, else all."""
        return 1 if self.trace else None

    def pattern_rows(self, length: int) -> tuple[int, int]:
        """The absolute ``[first, end)`` positions this step keeps (``length`` fed): the rows an
        attention pattern is computed for (``RowGroup.pattern_rows``)."""
        keep = self._kept_slice(self.position, length)
        return self.position + keep.start, self.position + max(keep.start, keep.stop)

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
            self._writer = self.spec.sink.create(self.plan.save_dir, self.plan.format)
        return self._writer

    def abort(self) -> None:
        """Remove whatever this capture wrote (its request failed or is gone)."""
        if self._writer is not None:
            self._writer.abort()

    def on_step(self, values: dict[str, torch.Tensor], length: int | None = None) -> None:
        """Take one step's values (``{name: [1, positions fed, ...]}``) and hand them to the writer.

        ``length``: the positions fed in; by default the prompt at the first step, then one (a
        caller replaying stored steps may hand over several generated positions at once)."""
        if length is None:
            length = self.prompt_len if self.position == 0 else 1  # tokens fed in at this step
        patterns = {point.name for point in self.plan.patterns}  # computed for the kept rows only
        for name, value in values.items():
            if name not in patterns and first_tensor(value).shape[1] != length:
                raise ValueError(
                    f"{name} does not hold one value per position fed in (shape {list(value.shape)})"
                )
        keep = self._kept_slice(self.position, length)
        if self.plan.positions == "last":
            self.kept = [self.position + length - 1]
        else:
            self.kept += range(self.position + keep.start, self.position + keep.stop)
        self.position += length
        if keep.stop <= keep.start:
            return
        points = self.plan.points
        if not self.shapes:  # the first step that keeps something: for the manifest
            for point in points:
                tensor = first_tensor(values[point.name])
                self.shapes[point.name] = list(tensor.shape)
                self.units[point.name] = (
                    self.plan.unit_indices(tensor.shape[-1]) if tensor.dim() > 2 else None
                )
        stored = reduce_values([values[p.name] for p in points], self.plan, keep)
        for point, tensor in zip(points, stored, strict=True):
            self._keep(point.name, tensor)
        for name, tensor in derived_values(self.plan, values, keep, self.max_keys):
            self._keep(name, tensor)

    def _keep(self, name: str, tensor: torch.Tensor) -> None:
        if self.plan.positions == "last":
            self.latest[name] = tensor
        else:
            self.writer.append(name, tensor)

    def finish(
        self, token_ids: list[int], tokens: list[str], stop: Callable[[], bool] = lambda: False
    ) -> CaptureResult:
        """Close every tensor file and write the manifest; ``token_ids`` covers every position
        fed in (prompt + completion in generate mode, the prompt in trace mode).

        Raises:
            JobInterrupted: ``stop()`` became true between two files (the caller aborts).
            OSError: the store could not write (the caller aborts).
        """
        kept_ids = [token_ids[p] for p in self.kept]
        kept_tokens = [tokens[p] for p in self.kept]
        sampled: dict[int, torch.Tensor] = {}
        for point in self.plan.points:
            if stop():
                raise JobInterrupted
            if point.name in self.latest:
                self.writer.append(point.name, self.latest.pop(point.name))
            shape = self.shapes.get(point.name)
            units = self.units.get(point.name)
            if units is not None:
                sampled[shape[-1]] = units
            original = None if shape is None else [shape[0], self.position, *shape[2:]]
            self.writer.close_appended(point.name, **tensor_facts(point, original, units))
        for name, facts in derived_facts(self.plan):
            if stop():
                raise JobInterrupted
            if name in self.latest:
                self.writer.append(name, self.latest.pop(name))
            self.writer.close_appended(name, **facts)
        plan = self.plan
        marks = self.spec.reasoning
        reasoning = (
            None
            if marks is None
            else {
                "parser": marks.parser,
                "positions": marks.span(token_ids, self.prompt_len),
            }
        )
        manifest = self.writer.finish(
            mode=plan.mode,
            positions=plan.positions,
            **self.facts,
            completion_id=self.spec.completion_id,
            **self.spec.request_facts,
            sample_hidden=plan.sample_hidden,
            sample_hidden_method=plan.sample_method,
            sample_hidden_seed=plan.sample_seed,
            **({"reasoning": reasoning} if reasoning is not None else {}),
            **capture_facts(self.kept, kept_ids, kept_tokens, sampled),
        )
        return CaptureResult(
            id=manifest["id"],
            directory=self.writer.directory,
            tensors=tuple(entry["name"] for entry in manifest["tensors"]),
            manifest=manifest,
            sink=self.spec.sink,
        )
