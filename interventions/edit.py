"""A resolved intervention: one operation at one hook point, at chosen positions and steps.

The serving layer turns a request's ``interventions`` (:mod:`interventions.request`)
into :class:`Edit` objects (``server/serving/interventions.py`` resolves hook points,
stored vectors and patch sources); a runtime applies them to the rows of the request
that asked, inside that request's forward steps (``server/engine/steps.py`` for the
HF + nnsight runtime). Nothing persists past the request.

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

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from .ops import apply_operation

if TYPE_CHECKING:  # the engine's resolved hook point; only its attributes are used here
    from server.engine.hooks import HookPoint
    from server.engine.sae import SparseAutoencoder


@dataclass(frozen=True)
class Edit:
    """One resolved intervention at one hook point (``point``: module path, input/output, width)."""

    point: HookPoint
    operation: str  # a key of interventions.ops.OPERATIONS
    positions: str | tuple[int, ...] = "all"
    vector: torch.Tensor | None = None  # [width]; float32 on the CPU until ``placed`` (on the worker)
    scale: float = 1.0
    factor: float = 1.0
    value: float = 0.0
    steps: tuple[int, int] | None = None  # [first, end) forward steps; None: every step
    source: torch.Tensor | None = None  # patch: [captured positions, width]
    source_positions: tuple[int, ...] = ()  # patch: the absolute position of each source row
    sae: SparseAutoencoder | None = None  # sae_*: the SAE (on the model's device), read at ``point``
    feature: int = 0  # sae_*: the feature's index

    def indexes(self, start: int, length: int, prompt_len: int, step: int = 0) -> list[int]:
        """Which of this step's positions (0 .. length-1) the edit touches.

        ``start``: the absolute position of the step's first column (negative columns are
        left padding and never touched); ``length``: the columns in this step."""
        if self.steps is not None and not self.steps[0] <= step < self.steps[1]:
            return []
        absolute = range(max(start, 0), start + length)
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
        """The replacement for ``selected`` (``[rows, len(index), ...]``, the columns ``index``
        of a step whose first column is absolute position ``start``)."""
        arguments = {
            "vector": self.vector,
            "scale": self.scale,
            "factor": self.factor,
            "value": self.value,
            "sae": self.sae,
            "feature": self.feature,
        }
        if self.operation == "patch":
            row_of = {p: i for i, p in enumerate(self.source_positions)}
            arguments["source"] = self.source[[row_of[start + j] for j in index]]
        return apply_operation(self.operation, selected, **arguments)


def placed(edits, model: torch.nn.Module) -> tuple[Edit, ...]:
    """The edits with their vectors and patch sources on the model's device and dtype.

    Called once per job on the engine's worker (the serving layer leaves them float32 on the
    CPU: no other thread may do large tensor work, see docs/architecture.md). The dtype is the
    model's compute dtype: its first floating-point parameter (quantized weights are integers)."""
    parameter = next(p for p in model.parameters() if p.is_floating_point())

    def move(tensor):
        return None if tensor is None else tensor.to(parameter.device, parameter.dtype)

    return tuple(replace(e, vector=move(e.vector), source=move(e.source)) for e in edits)
