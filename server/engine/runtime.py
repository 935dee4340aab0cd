"""The runtime contract: what the decode loop needs from whatever runs the model.

The loop (``loop.py``) owns the jobs: sampling, stopping, text, per-row state, capture
plans and edits, all runtime-free. A *runtime* owns the weights and runs forward steps
over batches of rows with a KV cache, applying each row group's planned reads and edits
at hook points. :class:`~server.engine.hf_runtime.HFRuntime` (HF transformers through
nnsight, left-padded rows, ``DynamicCache``) is the first implementation; a vLLM one
(rows are requests, activations flattened over tokens) implements the same methods.

Shapes: ``rows`` is the batch's row count; logits are float32 ``[rows, vocab]``, the
next-token logits of each row's last position; ``tokens`` are long ``[rows]``. Values
handed to ``RowGroup.on_values`` are ``[1, positions fed this step, ...]`` tensors of the
group's first row, after the group's edits, without padding: step 0 feeds the prompt
(``P`` positions), each later step one token. Rows keep their order; ``keep`` and
``merge`` renumber them as described there.

The contract in full (docs/architecture.md draws it):

``Runtime.place(edits) -> edits``
    The edits with their tensors on the runtime's device and dtype (once per job).
``Runtime.start(weights, groups) -> RuntimeBatch``
    A batch of the groups' rows (each group ``n`` rows of one prompt, in order), nothing
    run yet. ``weights`` names which weights run it: ``"served"``, ``"adapter_off"``
    (the served weights, LoRA adapter off) or ``"before_model"`` (LDA's second checkpoint).
``RuntimeBatch.forward() -> logits``
    One forward step over the pending input (the prompts first, then one token per row),
    reading and editing what the groups planned, then handing each reading group its values
    (``on_values``, after the forward); a group whose ``on_values`` raised gets the exception
    in ``error`` (the other groups go on). Attention patterns (``RowGroup.patterns``) come
    with the values, ``[1, query rows kept, heads, keys]`` (``RowGroup.pattern_rows``).
``RuntimeBatch.append(tokens)``
    The chosen tokens become the next step's input, one per row.
``RuntimeBatch.keep(rows)``
    Keep only these rows (indexes into the batch, in order); their cache goes with them.
``RuntimeBatch.merge(other)``
    Take another batch's rows after this one's (both just had ``append``); ``can_merge``
    says whether this batch can take rows at all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Protocol

import torch

from interventions import Edit

from .attention import PatternPoint
from .hooks import HookPoint

WEIGHTS = ("served", "adapter_off", "before_model")


@dataclass
class RowGroup:
    """One job's rows on one side of a batch: ``n`` rows of one prompt, with their reads and edits."""

    prompt_ids: Sequence[int]
    n: int = 1
    edits: tuple[Edit, ...] = ()  # applied to these rows only, at their own positions
    reads: tuple[HookPoint, ...] = ()  # values handed to on_values at each step (first row only)
    patterns: tuple[PatternPoint, ...] = ()  # attention patterns handed to on_values too (first row only)
    # the absolute [first, end) positions whose pattern rows to compute, given the positions fed
    # this step (default: all of them); the recorder keeps no others
    pattern_rows: Callable[[int], tuple[int, int]] | None = None
    read_steps: int | None = None  # read at the first k forward steps only; None: every step
    on_values: Callable[[dict[str, torch.Tensor]], None] | None = None
    full_logits: bool = False  # the prompt step computes logits at every position (a read needs them)
    error: BaseException | None = field(default=None, repr=False)  # set when on_values failed

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)


class RuntimeBatch(Protocol):
    """Rows decoding together on one set of weights (see the module docstring)."""

    @property
    def rows(self) -> int: ...

    @property
    def can_merge(self) -> bool: ...

    def forward(self) -> torch.Tensor: ...

    def append(self, tokens: torch.Tensor) -> None: ...

    def keep(self, rows: list[int]) -> None: ...

    def merge(self, other: RuntimeBatch) -> None: ...


class Runtime(Protocol):
    """Loads nothing itself once built; runs forward steps for the loop on the worker thread."""

    device: torch.device
    joins_running_batches: bool  # whether new rows can merge into a running batch (merge)

    def start(self, weights: str, groups: list[RowGroup]) -> RuntimeBatch: ...

    def place(self, edits: tuple[Edit, ...]) -> tuple[Edit, ...]: ...

    def interrupted_when(self, stop: Callable[[], bool]) -> AbstractContextManager[None]:
        """Forwards run inside the block end with ``interrupt.JobInterrupted`` once ``stop()``
        is true (checked between layers)."""
        ...
