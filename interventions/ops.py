"""The intervention operations, as pure functions over the last dimension of a tensor.

Each takes ``h`` (``[..., d]``, the selected positions of a value) and returns the new
values; ``vector`` is ``[d]`` in ``h``'s dtype and device.

=============  ==================================================  =====================
operation      result                                              needs
=============  ==================================================  =====================
add            ``h + scale * vector``                              vector, scale
scale          ``h * factor``                                      factor
ablate         ``0``, or ``vector`` (a stored mean) when given     (vector)
project_out    ``h - (h . u) u`` with ``u = vector / |vector|``    vector
clamp          ``h + (value - h . u) u``: component along u set    vector, value
patch          ``source``: the rows an earlier capture recorded    source
               for the same absolute positions
=============  ==================================================  =====================

Which positions and steps an operation touches is the :class:`~interventions.edit.Edit`'s
business; an operation only maps the selected values to new ones.
"""

from __future__ import annotations

import torch


def _unit(vector: torch.Tensor) -> torch.Tensor:
    return vector / vector.norm()


def add(h: torch.Tensor, vector: torch.Tensor, scale: float = 1.0, **_) -> torch.Tensor:
    return h + scale * vector


def scale(h: torch.Tensor, factor: float, **_) -> torch.Tensor:
    return h * factor


def ablate(h: torch.Tensor, vector: torch.Tensor | None = None, **_) -> torch.Tensor:
    return torch.zeros_like(h) if vector is None else vector.expand_as(h).clone()


def project_out(h: torch.Tensor, vector: torch.Tensor, **_) -> torch.Tensor:
    u = _unit(vector)
    return h - (h @ u)[..., None] * u


def clamp(h: torch.Tensor, vector: torch.Tensor, value: float = 0.0, **_) -> torch.Tensor:
    u = _unit(vector)
    return h + (value - h @ u)[..., None] * u


def patch(h: torch.Tensor, source: torch.Tensor, **_) -> torch.Tensor:
    """``source``: ``[positions, d]``, one recorded row per selected position of ``h``."""
    return source.expand_as(h)


OPERATIONS = {
    "add": add,
    "scale": scale,
    "ablate": ablate,
    "project_out": project_out,
    "clamp": clamp,
    "patch": patch,
}


def apply_operation(name: str, h: torch.Tensor, **arguments) -> torch.Tensor:
    """``OPERATIONS[name](h, **arguments)``; ``h``: ``[..., d]``; raises KeyError for an unknown name."""
    return OPERATIONS[name](h, **arguments)
