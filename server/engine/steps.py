"""One forward step's planned reads and edits, through nnsight, in execution order.

A request may both change values (interventions) and record them (capture). Both
name hook points; :class:`StepPlan` merges them by module and side, sorts them by
the order the model runs them (nnsight refuses a read the model has passed), and
at each forward step reads every planned value once, applies the edits planned for
it (writing the result back into the model's forward), and hands the values to be
recorded: so a capture records values *after* the interventions.

Positions are absolute: the prompt forward covers ``[0, P)``, each later step one
position. ``Edit.positions``: ``all``; ``prompt`` (< P); ``generated`` (>= P);
``last`` (the newest position of each step: the last prompt token, then every
generated one); or a list of absolute positions. ``Edit.steps`` (``[first, end)``)
limits an edit to some forward steps: step 0 is the prompt forward, step k feeds
the k-th generated token.

``patch`` replaces the value at each chosen position with the row an earlier capture
recorded for that same absolute position (positions the capture lacks are left alone).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from interventions import apply_operation

from .capture import first_tensor
from .hooks import HookPoint


@dataclass(frozen=True)
class Edit:
    """One resolved intervention at one hook point."""

    point: HookPoint
    operation: str  # see interventions.ops.OPERATIONS
    positions: str | tuple[int, ...] = "all"
    vector: torch.Tensor | None = None  # [width]; float32 on the CPU until ``placed`` (on the worker)
    scale: float = 1.0
    factor: float = 1.0
    value: float = 0.0
    steps: tuple[int, int] | None = None  # [first, end) forward steps; None: every step
    source: torch.Tensor | None = None  # patch: [captured positions, width]
    source_positions: tuple[int, ...] = ()  # patch: the absolute position of each source row

    def indexes(self, start: int, length: int, prompt_len: int, step: int = 0) -> list[int]:
        """Which of this step's positions (0 .. length-1) the edit touches."""
        if self.steps is not None and not self.steps[0] <= step < self.steps[1]:
            return []
        absolute = range(max(start, 0), start + length)  # negative: left padding, never touched
        if self.positions == "all":
            chosen = absolute
        elif self.positions == "prompt":
            chosen = [p for p in absolute if p < prompt_len]
        elif self.positions == "generated":
            chosen = [p for p in absolute if p >= prompt_len]
        elif self.positions == "last":
            chosen = [start + length - 1]
        else:
            wanted = set(self.positions)
            chosen = [p for p in absolute if p in wanted]
        if self.operation == "patch":
            available = set(self.source_positions)
            chosen = [p for p in chosen if p in available]
        return [p - start for p in chosen]

    def new_values(self, selected: torch.Tensor, start: int, index: list[int]) -> torch.Tensor:
        """The replacement for ``selected`` (``[rows, len(index), ...]``)."""
        if self.operation == "patch":
            row_of = {p: i for i, p in enumerate(self.source_positions)}
            rows = self.source[[row_of[start + j] for j in index]]
            return rows.unsqueeze(0).expand_as(selected)
        arguments = {"vector": self.vector, "scale": self.scale, "factor": self.factor, "value": self.value}
        return apply_operation(self.operation, selected, **arguments)


def placed(edits, model: torch.nn.Module) -> tuple[Edit, ...]:
    """The edits with their vectors and patch sources on the model's device and dtype.

    Called once per job on the engine's worker (the serving layer leaves them float32 on the
    CPU: no other thread may do large tensor work, see docs/architecture.md)."""
    parameter = next(model.parameters())

    def move(tensor):
        return None if tensor is None else tensor.to(parameter.device, parameter.dtype)

    return tuple(replace(e, vector=move(e.vector), source=move(e.source)) for e in edits)


def edit_value(
    value,
    edits: list[Edit],
    start: int,
    length: int,
    prompt_len: int,
    step: int = 0,
    pads: tuple[int, ...] = (),
):
    """The value with every edit applied at its positions; a tuple keeps its other elements.

    ``pads``: the left padding of each row of a padded batch. Column ``c`` of row ``r``
    holds that row's absolute position ``c - pads[r]``, so rows with different padding
    are edited separately; an empty tuple means no padding.
    """
    if isinstance(value, tuple):
        return (edit_value(value[0], edits, start, length, prompt_len, step, pads), *value[1:])
    kept = value.shape[1]
    if kept < length:  # computed for the last positions only (logits, with logits_to_keep)
        start, length = start + length - kept, kept
    groups: dict[int, list[int]] = {}
    for row, pad in enumerate(pads):
        groups.setdefault(pad, []).append(row)
    if len(groups) <= 1:  # every row aligned: one edit over the whole batch
        pad = next(iter(groups), 0)
        return _edit_rows(value, edits, None, start - pad, length, prompt_len - pad, step)
    result = value
    for pad, rows in groups.items():
        result = _edit_rows(result, edits, rows, start - pad, length, prompt_len - pad, step, value)
    return result


def _edit_rows(value, edits, rows, start, length, prompt_len, step, original=None):
    """Apply ``edits`` to ``rows`` (None: all) of ``value``, cloning it once before the first write."""
    original = value if original is None else original
    result = value
    for edit in edits:
        index = edit.indexes(start, length, prompt_len, step)
        if not index:
            continue
        if result is original:
            result = original.clone()
        if rows is None:
            selected = result[:, index]
            result[:, index] = edit.new_values(selected, start, index).to(selected.dtype)
        else:
            row_index = torch.tensor(rows, device=result.device)[:, None]
            col_index = torch.tensor(index, device=result.device)[None, :]
            selected = result[row_index, col_index]
            result[row_index, col_index] = edit.new_values(selected, start, index).to(selected.dtype)
    return result


@dataclass
class _Entry:
    path: str
    kind: str
    order: int
    capture_names: list[str] = field(default_factory=list)
    edits: list[Edit] = field(default_factory=list)


class StepPlan:
    """Reads, edits and hands over the planned values of each forward step in turn."""

    def __init__(
        self, capture_points: tuple[HookPoint, ...], edits: tuple[Edit, ...], prompt_len: int
    ) -> None:
        entries: dict[tuple[str, str], _Entry] = {}
        for point in capture_points:
            entry = entries.setdefault(
                (point.module_path, point.kind), _Entry(point.module_path, point.kind, point.order)
            )
            entry.capture_names.append(point.name)
        for edit in edits:
            point = edit.point
            entry = entries.setdefault(
                (point.module_path, point.kind), _Entry(point.module_path, point.kind, point.order)
            )
            entry.edits.append(edit)
        self.entries = sorted(entries.values(), key=lambda e: e.order)
        self.prompt_len = prompt_len  # of a padded batch: its width
        self.pads: tuple[int, ...] = ()  # left padding of each row of a padded batch (see edit_value)
        self.start = 0  # absolute position of the current step's first token
        self.step = 0  # 0: the prompt forward; k: the step feeding the k-th generated token

    def run_step(self, wrapper, save: bool = False) -> dict:
        """Inside a trace: one step's reads and edits; returns the values to record, by name."""
        length = self.prompt_len if self.start == 0 else 1
        values = {}
        for entry in self.entries:
            envoy = wrapper.get(entry.path)
            value = getattr(envoy, entry.kind)
            if entry.edits:
                value = edit_value(
                    value, entry.edits, self.start, length, self.prompt_len, self.step, self.pads
                )
                setattr(envoy, entry.kind, value)
            for name in entry.capture_names:
                values[name] = value.save() if save else value
        self.start += length
        self.step += 1
        return values

    def keep(self, rows: list[int]) -> None:
        """The batch kept only ``rows`` (in that order)."""
        self.pads = tuple(self.pads[i] for i in rows)

    def shift(self, columns: int) -> None:
        """The batch dropped its first ``columns`` (padding in every row)."""
        self.pads = tuple(p - columns for p in self.pads)
        self.start -= columns


def replace_first(value, tensor: torch.Tensor):
    """``value`` with its first tensor (see ``capture.first_tensor``) replaced by ``tensor``."""
    if isinstance(value, (tuple, list)) and value:
        return type(value)([replace_first(value[0], tensor), *value[1:]])
    return tensor


@dataclass
class BatchMember:
    """One job's rows in a batch, and what it reads and changes there."""

    rows: list[int]  # its rows in the current batch
    edits: tuple[Edit, ...] = ()
    capture: object | None = None  # capture.GenerationCapture (one row: n == 1)
    error: BaseException | None = None  # its capture failed (e.g. disk full): it leaves the batch
    step: int = 0  # its own forward steps so far (0: its prompt); jobs that joined later differ
    prompt_len: int = 0  # its prompt's length (all its rows share the prompt, hence the padding)


class BatchStepPlan:
    """:class:`StepPlan` for a batch of jobs that bring their own edits and captures.

    Each hook point any job names is read once per step, in execution order; each job's
    edits are applied to its own rows only (at its rows' own absolute positions, see
    :func:`edit_value`), and each capturing job gets its row's values, without the left
    padding, handed to its capture inside the trace.
    """

    def __init__(self, members: list[BatchMember], width: int) -> None:
        self.members = members
        self.width = width
        self.pads: tuple[int, ...] = ()  # set by the batch
        self.start = 0
        entries: dict[tuple[str, str], _Entry] = {}
        self._uses: dict[tuple[str, str], list[tuple[BatchMember, list[str], list[Edit]]]] = {}
        for member in members:
            points = member.capture.plan.points if member.capture is not None else ()
            by_entry: dict[tuple[str, str], tuple[list[str], list[Edit]]] = {}
            for point in points:
                key = (point.module_path, point.kind)
                entries.setdefault(key, _Entry(point.module_path, point.kind, point.order))
                by_entry.setdefault(key, ([], []))[0].append(point.name)
            for edit in member.edits:
                key = (edit.point.module_path, edit.point.kind)
                entries.setdefault(key, _Entry(edit.point.module_path, edit.point.kind, edit.point.order))
                by_entry.setdefault(key, ([], []))[1].append(edit)
            for key, (names, edits) in by_entry.items():
                self._uses.setdefault(key, []).append((member, names, edits))
        self.entries = sorted(entries.values(), key=lambda e: e.order)

    def run_step(self, wrapper) -> None:
        """Inside a trace: one step's reads and edits; each capture gets its row's values."""
        length = self.width if self.start == 0 else 1
        captured: dict[int, dict] = {}
        for entry in self.entries:
            envoy = wrapper.get(entry.path)
            value = getattr(envoy, entry.kind)
            uses = self._uses[(entry.path, entry.kind)]
            tensor, cloned = first_tensor(value), False
            for member, _, edits in uses:
                if not edits or not member.rows:
                    continue
                index = torch.tensor(member.rows, device=tensor.device)
                part = tensor.index_select(0, index)
                pad = self.pads[member.rows[0]]  # column c holds absolute position c - pad
                new = edit_value(part, edits, self.start - pad, length, member.prompt_len, member.step)
                if new is part:  # no edit falls on this step
                    continue
                if not cloned:
                    tensor, cloned = tensor.clone(), True
                tensor[index] = new.to(tensor.dtype)
            if cloned:
                setattr(envoy, entry.kind, replace_first(value, tensor))
            for member, names, _ in uses:
                if names and member.rows:
                    row = member.rows[0]
                    cut = (
                        tensor[row : row + 1, self.pads[row] :] if self.start == 0 else tensor[row : row + 1]
                    )
                    captured.setdefault(id(member), {}).update(dict.fromkeys(names, cut))
        for member in self.members:
            if member.capture is not None and member.rows and member.error is None:
                try:
                    member.capture.on_step(captured.get(id(member), {}))
                except Exception as exc:  # this job's failure, not the batch's
                    member.error = exc
            member.step += 1
        self.start += length

    def merge(self, other: BatchStepPlan, mine: int, theirs: int) -> None:
        """Take ``other``'s jobs (their rows after this batch's); each side's rows were
        left-padded by ``mine`` / ``theirs`` more columns (see ``DecodeBatch.merge``)."""
        offset = len(self.pads)
        self.pads = tuple(p + mine for p in self.pads) + tuple(p + theirs for p in other.pads)
        self.start = max(self.start + mine, other.start + theirs)
        for member in other.members:
            member.rows = [r + offset for r in member.rows]
        self.members += other.members
        for entry in other.entries:
            key = (entry.path, entry.kind)
            if key not in self._uses:
                self.entries.append(entry)
            self._uses.setdefault(key, []).extend(other._uses[key])
        self.entries.sort(key=lambda e: e.order)

    def keep(self, rows: list[int]) -> None:
        """The batch kept only ``rows`` (in that order): renumber every job's rows, and forget
        the jobs that left (nothing of theirs is read or kept any more)."""
        new_index = {old: new for new, old in enumerate(rows)}
        self.pads = tuple(self.pads[i] for i in rows)
        for member in self.members:
            member.rows = [new_index[r] for r in member.rows if r in new_index]
        self.members = [m for m in self.members if m.rows]
        for key, uses in list(self._uses.items()):
            uses[:] = [use for use in uses if use[0].rows]
            if not uses:
                del self._uses[key]
        self.entries = [e for e in self.entries if (e.path, e.kind) in self._uses]

    def shift(self, columns: int) -> None:
        """The batch dropped its first ``columns`` (padding in every row)."""
        self.pads = tuple(p - columns for p in self.pads)
        self.start -= columns
