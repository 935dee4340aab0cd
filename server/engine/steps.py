"""One forward step's planned reads and edits through nnsight, for every row group of a batch.

Used by the HF runtime (``hf_runtime.py``) inside its traced forward. Each hook point any
group names is read once per step, in the order the model runs them (nnsight refuses a
read the model has passed); each group's edits (``interventions.Edit``) are applied to
its own rows only, at its rows' own absolute positions (left padding shifts them, see
:func:`edit_value`), and the result is written back into the forward; each group that
reads gets its first row's values, after the edits and without the padding, handed to
its ``on_values`` once the forward has run (:meth:`BatchStepPlan.deliver`), with the
attention patterns it asked for (``attention.py``). So a capture records values *after*
the edits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from interventions import Edit

from .attention import AttentionTap, tapping
from .hooks import first_tensor
from .runtime import RowGroup


def edit_value(value, edits: list[Edit], start: int, length: int, prompt_len: int, step: int = 0):
    """The value (``[rows, length, ...]``, rows aligned) with every edit applied at its positions.

    ``start``: the absolute position of column 0 (negative: left padding, never touched).
    A value computed for its last positions only (logits with ``logits_to_keep``) is
    edited there. Clones the value once, before the first write; returns it unchanged
    (the same object) when no edit falls on this step."""
    kept = value.shape[1]
    if kept < length:
        start, length = start + length - kept, kept
    result = value
    for edit in edits:
        index = edit.indexes(start, length, prompt_len, step)
        if not index:
            continue
        if result is value:
            result = value.clone()
        selected = result[:, index]
        result[:, index] = edit.new_values(selected, start, index).to(selected.dtype)
    return result


def replace_first(value, tensor: torch.Tensor):
    """``value`` with its first tensor (see ``hooks.first_tensor``) replaced by ``tensor``."""
    if isinstance(value, (tuple, list)) and value:
        return type(value)([replace_first(value[0], tensor), *value[1:]])
    return tensor


@dataclass
class _Member:
    """A row group's place in the batch."""

    group: RowGroup
    rows: list[int]  # its rows in the current batch
    step: int = 0  # its own forward steps so far (0: its prompt); groups that joined later differ


@dataclass
class _Entry:
    path: str
    kind: str
    order: int


class BatchStepPlan:
    """The reads and edits of every row group in a batch, one forward step at a time."""

    def __init__(self, groups: list[RowGroup], width: int) -> None:
        self.members: list[_Member] = []
        self.width = width
        self.pads: tuple[int, ...] = ()  # left padding of each row (set by the batch)
        self.start = 0  # the absolute column of the current step's first token, before padding
        self.fed: int | None = None  # columns the coming step feeds, where not the usual (resume)
        self.skips: list[tuple[str, torch.Tensor]] = []  # the coming step: modules not run, their outputs
        self.entries: list[_Entry] = []
        self._values: dict[int, dict[str, torch.Tensor]] = {}  # this step's, per member, until delivered
        self._uses: dict[tuple[str, str], list[tuple[_Member, list[str], list[Edit]]]] = {}
        row = 0
        for group in groups:
            self._add(_Member(group, list(range(row, row + group.n))))
            row += group.n

    def _add(self, member: _Member) -> None:
        self.members.append(member)
        by_entry: dict[tuple[str, str], tuple[list[str], list[Edit]]] = {}
        for point in member.group.reads:
            by_entry.setdefault(self._entry(point), ([], []))[0].append(point.name)
        for edit in member.group.edits:
            by_entry.setdefault(self._entry(edit.point), ([], []))[1].append(edit)
        for key, (names, edits) in by_entry.items():
            self._uses.setdefault(key, []).append((member, names, edits))

    def _entry(self, point) -> tuple[str, str]:
        key = (point.module_path, point.kind)
        if key not in self._uses:
            self._uses[key] = []
            self.entries.append(_Entry(point.module_path, point.kind, point.order))
            self.entries.sort(key=lambda e: e.order)
        return key

    @property
    def columns_fed(self) -> int:
        """Columns the coming step feeds: the prompts (``width``) first, then one per step; a
        batch resumed after a cached prefix feeds the rest of its prompts (``fed``)."""
        if self.fed is not None:
            return self.fed
        return self.width if self.start == 0 else 1

    @property
    def empty(self) -> bool:
        """Nothing to read, edit or skip: the step needs no trace."""
        return not self.entries and not self.skips

    def run_step(self, wrapper) -> None:
        """Inside a trace: one step's skips, reads and edits; the values wait for :meth:`deliver`.
        Skipped modules come first in the forward pass (a patching sweep's early layers)."""
        for path, replacement in self.skips:
            wrapper.get(path).skip(replacement)
        length = self.columns_fed
        values = self._values
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
                new = edit_value(part, edits, self.start - pad, length, member.group.prompt_len, member.step)
                if new is part:  # no edit falls on this step
                    continue
                if not cloned:
                    tensor, cloned = tensor.clone(), True
                tensor[index] = new.to(tensor.dtype)
            if cloned:
                setattr(envoy, entry.kind, replace_first(value, tensor))
            for member, names, _ in uses:
                if names and member.rows and self._reads_now(member):
                    row = member.rows[0]
                    cut = (
                        tensor[row : row + 1, self.pads[row] :] if self.start == 0 else tensor[row : row + 1]
                    )
                    values.setdefault(id(member), {}).update(dict.fromkeys(names, cut))

    def attention_taps(self, model) -> tapping:
        """For the coming forward: a tap on each attention module a reading group wants a pattern
        of (its first row); the patterns join the group's values (``deliver``)."""
        taps: dict = {}
        for member in self.members:
            if not member.group.patterns or not member.rows or not self._reads_now(member):
                continue
            row = member.rows[0]
            columns = self.start + self.columns_fed
            fed = columns - max(self.start, self.pads[row])  # the row's own positions fed this step
            first = columns - fed - self.pads[row]
            wanted = member.group.pattern_rows(fed) if member.group.pattern_rows else (first, first + fed)
            if wanted[1] <= wanted[0]:
                continue  # no pattern row is kept at this step
            into = self._values.setdefault(id(member), {})
            for point in member.group.patterns:
                tap = AttentionTap(point.name, row, columns, self.pads[row], point.heads, into, wanted)
                taps.setdefault(model.get_submodule(point.module_path), []).append(tap)
        return tapping(taps)

    def deliver(self) -> None:
        """After a forward (traced or not): each reading group gets this step's values, then
        every group's step count moves on (``advance``)."""
        values, self._values = self._values, {}
        for member in self.members:
            group = member.group
            if group.on_values is not None and group.error is None and self._reads_now(member):
                try:
                    group.on_values(values.get(id(member), {}))
                except Exception as exc:  # this group's failure, not the batch's
                    group.error = exc
        self.advance()

    def advance(self) -> None:
        """One step ran (traced or not): every group's step count and the columns move on; a
        group done reading (trace-mode capture) and editing nothing stops being traced."""
        self.start += self.columns_fed
        self.fed = None
        self.skips = []
        for member in self.members:
            member.step += 1
            steps = member.group.read_steps
            if not member.group.edits and steps is not None and member.step == steps:  # reads no more
                self._forget(lambda use, member=member: use[0] is member)

    def _forget(self, gone) -> None:
        """Drop the uses ``gone(use)`` picks, and the hook points no one uses any more."""
        for key, uses in list(self._uses.items()):
            uses[:] = [use for use in uses if not gone(use)]
            if not uses:
                del self._uses[key]
        self.entries = [e for e in self.entries if (e.path, e.kind) in self._uses]

    @staticmethod
    def _reads_now(member: _Member) -> bool:
        steps = member.group.read_steps
        reads = member.group.reads or member.group.patterns
        return bool(reads) and (steps is None or member.step < steps)

    def merge(self, other: BatchStepPlan, mine: int, theirs: int) -> None:
        """Take ``other``'s groups (their rows after this batch's); each side's rows were
        left-padded by ``mine`` / ``theirs`` more columns (see ``HFBatch.merge``)."""
        offset = len(self.pads)
        self.pads = tuple(p + mine for p in self.pads) + tuple(p + theirs for p in other.pads)
        self.start = max(self.start + mine, other.start + theirs)
        for member in other.members:
            self._add(_Member(member.group, [r + offset for r in member.rows], member.step))

    def keep(self, rows: list[int]) -> None:
        """The batch kept only ``rows`` (in that order): renumber every group's rows, and
        forget the groups that left (nothing of theirs is read or kept any more)."""
        new_index = {old: new for new, old in enumerate(rows)}
        self.pads = tuple(self.pads[i] for i in rows)
        for member in self.members:
            member.rows = [new_index[r] for r in member.rows if r in new_index]
        self.members = [m for m in self.members if m.rows]
        self._forget(lambda use: not use[0].rows)

    def shift(self, columns: int) -> None:
        """The batch dropped its first ``columns`` (padding in every row)."""
        self.pads = tuple(p - columns for p in self.pads)
        self.start -= columns
