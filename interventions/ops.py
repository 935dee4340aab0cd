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
sae_add        ``h + strength * d`` with ``d = W_dec[feature]``    sae, feature, strength
sae_clamp      ``h + (value - f(h)) d``: the SAE feature's         sae, feature, value
               activation ``f(h)`` set to ``value`` along ``d``
sae_ablate     ``sae_clamp`` to 0: the feature's part removed      sae, feature
=============  ==================================================  =====================

The SAE operations edit the residual along the feature's decoder row, as Neuronpedia's and
Goodfire's feature steering do (Templeton et al. 2024, "Scaling Monosemanticity", feature
clamping); ``f(h)`` is the SAE's own encoding of ``h`` (``server/engine/sae.py``), so a
feature that is off is left alone by ``sae_ablate``. Re-encoding the edited value gives
``value`` only as far as ``W_enc[:, feature] . d`` is 1 (the SAE is not exactly invertible).

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


def sae_add(h: torch.Tensor, sae, feature: int, scale: float = 1.0, **_) -> torch.Tensor:
    """``sae``: a :class:`~server.engine.sae.SparseAutoencoder` on ``h``'s device; ``scale``: the strength."""
    return h + (scale * sae.decoder_row(feature)).to(h.dtype)


def sae_clamp(h: torch.Tensor, sae, feature: int, value: float = 0.0, **_) -> torch.Tensor:
    active = sae.feature_activation(h, feature)  # [...], in the SAE's dtype
    return h + ((value - active)[..., None] * sae.decoder_row(feature)).to(h.dtype)


def sae_ablate(h: torch.Tensor, sae, feature: int, **_) -> torch.Tensor:
    return sae_clamp(h, sae, feature, 0.0)


OPERATIONS = {
    "add": add,
    "scale": scale,
    "ablate": ablate,
    "project_out": project_out,
    "clamp": clamp,
    "patch": patch,
    "sae_add": sae_add,
    "sae_clamp": sae_clamp,
    "sae_ablate": sae_ablate,
}


def apply_operation(name: str, h: torch.Tensor, **arguments) -> torch.Tensor:
    """``OPERATIONS[name](h, **arguments)``; ``h``: ``[..., d]``; raises KeyError for an unknown name."""
    return OPERATIONS[name](h, **arguments)
