"""Turning a request's ``interventions`` (and named ``presets``) into edits on resolved hook points.

Everything a client can get wrong is refused here with a 400 naming the field
(``interventions[i].<field>``, ``presets[i]``): unknown hook points, layers out of range,
vectors of the wrong size or made for another model, unknown vectors, presets or
activation ids, tensors that cannot be patched in. The edits themselves are applied by
``server/engine/steps.py`` (the HF runtime).

Presets (``server/storage/presets.py``) are validated against the model when they are
saved and again when they are used.

:class:`InterventionResolver` is the part the endpoints hold: it runs
:func:`resolve_interventions` in a thread, since stored vectors, presets and patch
sources are read from disk.
"""

from __future__ import annotations

import asyncio
import math

import numpy as np
import torch
from pydantic import ValidationError

from interventions import Edit

from ..engine.engine import Engine
from ..engine.hooks import HookError
from ..errors import APIError
from ..protocol import InterventionRequest
from ..storage import (
    ActivationStore,
    DamagedActivation,
    DamagedPreset,
    DamagedVector,
    PresetStore,
    UnknownActivation,
    UnknownPreset,
    UnknownVector,
    VectorStore,
)
from .base import require_feature


class InterventionResolver:
    """Resolves a request's presets and interventions against the served model and the stores."""

    def __init__(
        self, engine: Engine, vectors: VectorStore, activations: ActivationStore, presets: PresetStore
    ) -> None:
        self.engine = engine
        self.vectors = vectors
        self.activations = activations
        self.presets = presets

    async def resolve(
        self,
        items: list[InterventionRequest] | None,
        presets: list[str] | None = None,
        field: str = "interventions",
    ) -> tuple[Edit, ...]:
        """A request's presets, then its interventions, as edits; refused with 400 if invalid.

        In a thread: stored vectors, presets and patch sources are read from disk.
        """
        if not items and not presets:
            return ()
        return await asyncio.to_thread(
            resolve_interventions,
            self.engine,
            self.vectors,
            self.activations,
            self.presets,
            items,
            presets,
            field,
        )


def resolve_interventions(
    engine: Engine,
    vectors: VectorStore,
    activations: ActivationStore,
    presets: PresetStore,
    items: list[InterventionRequest] | None,
    preset_names: list[str] | None = None,
    field: str = "interventions",
) -> tuple[Edit, ...]:
    """``field``: the request field the items came from, for error messages."""
    edits: list[Edit] = []
    for j, name in enumerate(preset_names or ()):
        try:
            stored = [InterventionRequest.model_validate(raw) for raw in presets.get(name)["items"]]
        except UnknownPreset:
            raise APIError(
                f"no preset named {name!r} (see GET /v1/interventions/presets)", param=f"presets[{j}]"
            ) from None
        except (DamagedPreset, ValidationError) as exc:  # a file edited or planted by hand
            raise APIError(f"the preset {name!r} is damaged: {exc}", param=f"presets[{j}]") from None
        for i, item in enumerate(stored):
            edits += _resolve_item(engine, vectors, activations, item, f"presets[{j}].items[{i}]")
    for i, item in enumerate(items or ()):
        edits += _resolve_item(engine, vectors, activations, item, f"{field}[{i}]")
    return tuple(edits)


def _resolve_item(
    engine: Engine, vectors: VectorStore, activations: ActivationStore, item: InterventionRequest, param: str
) -> list[Edit]:
    if item.type.startswith("sae_") or item.sae is not None or item.feature is not None:
        return [_sae_edit(engine, item, param)]
    _refuse_unused(item, param)
    points = _points(engine, item, param)
    for point in points:
        if not point.floating:
            raise APIError(
                f"{point.name} holds integers (token ids, positions), not activations: it cannot be edited",
                param=f"{param}.{'module' if item.module else 'hook_point'}",
            )
    positions = item.positions if isinstance(item.positions, str) else tuple(item.positions)
    steps = tuple(item.steps) if item.steps is not None else None
    if item.type == "patch":
        if len(points) != 1:
            raise APIError("patch takes one layer (or one module)", param=f"{param}.layers")
        source, source_positions = _patch_source(engine, activations, item, points[0], param)
        return [
            Edit(points[0], "patch", positions, steps=steps, source=source, source_positions=source_positions)
        ]
    if item.type in ("add", "project_out", "clamp") and item.vector is None:
        raise APIError(f"{item.type} needs a vector", param=f"{param}.vector")
    if item.type == "scale" and item.factor is None:
        raise APIError("scale needs a factor", param=f"{param}.factor")
    values = _vector_values(engine, vectors, item.vector, f"{param}.vector")
    _check_numbers(item, values, engine.loaded.dtype, param)
    edits = []
    for point in points:
        vector = None
        if values is not None:
            if values.numel() != point.width:
                raise APIError(
                    f"vector has {values.numel()} values; {point.name} has {point.width}",
                    param=f"{param}.vector",
                )
            # Kept float32 on the CPU: it reaches the model's device and dtype on the engine's worker
            # (steps.Edit), the one thread that may run torch's thread pool (docs/architecture.md).
            vector = values
        edits.append(
            Edit(
                point,
                item.type,
                positions,
                vector,
                item.scale,
                1.0 if item.factor is None else item.factor,
                item.value,
                steps=steps,
            )
        )
    return edits


# What each operation reads (besides where it acts); any other field set to something other than
# its default is refused: it would change nothing. Defaults are accepted, since a capture's
# manifest records (and a client may replay) every field.
USES = {
    "add": {"vector", "scale"},
    "scale": {"factor"},
    "ablate": {"vector"},
    "project_out": {"vector"},
    "clamp": {"vector", "value"},
    "patch": {"activation_id", "tensor"},
    "sae_add": {"sae", "feature", "strength"},
    "sae_clamp": {"sae", "feature", "value"},
    "sae_ablate": {"sae", "feature"},
}
DEFAULTS = {
    "vector": None,
    "scale": 1.0,
    "factor": None,
    "value": 0.0,
    "activation_id": None,
    "tensor": None,
    "sae": None,
    "feature": None,
    "strength": 1.0,
}


def _refuse_unused(item: InterventionRequest, param: str) -> None:
    """Refuse (400 naming it) a field ``item.type`` does not read, set to other than its default."""
    for field, default in DEFAULTS.items():
        if field not in USES[item.type] and getattr(item, field) != default:
            raise APIError(
                f"{item.type} does not use {field} (it reads {', '.join(sorted(USES[item.type]))})",
                param=f"{param}.{field}",
            )


def _sae_edit(engine: Engine, item: InterventionRequest, param: str) -> Edit:
    """An SAE operation: it acts at the SAE's own hook point, on one of its features."""
    if not item.type.startswith("sae_"):
        raise APIError(
            f"sae and feature go with sae_add, sae_clamp or sae_ablate, not {item.type}", param=f"{param}.sae"
        )
    require_feature(engine, "saes", f"{param}.sae")
    for field in ("layer", "layers", "hook_point", "module", "vector", "activation_id", "tensor"):
        if getattr(item, field) is not None:
            raise APIError(
                f"{item.type} acts at its SAE's hook point, along a feature's decoder row: leave {field} out",
                param=f"{param}.{field}",
            )
    _refuse_unused(item, param)
    if item.sae is None:
        raise APIError(f"{item.type} needs sae (a loaded SAE's name, GET /v1/saes)", param=f"{param}.sae")
    if item.feature is None:
        raise APIError(f"{item.type} needs feature (the feature's index)", param=f"{param}.feature")
    try:
        served = engine.saes.get(item.sae)
    except KeyError:
        raise APIError(
            f"no SAE named {item.sae!r} is loaded (see GET /v1/saes)", param=f"{param}.sae"
        ) from None
    if item.feature >= served.sae.d_sae:
        raise APIError(
            f"feature {item.feature} is out of range: {item.sae!r} has {served.sae.d_sae} features",
            param=f"{param}.feature",
        )
    _check_numbers(item, None, engine.loaded.dtype, param)
    positions = item.positions if isinstance(item.positions, str) else tuple(item.positions)
    return Edit(
        served.point,
        item.type,
        positions,
        scale=item.strength,
        value=item.value,
        steps=tuple(item.steps) if item.steps is not None else None,
        sae=served.sae,
        feature=item.feature,
    )


def _check_numbers(item: InterventionRequest, values: torch.Tensor | None, dtype: torch.dtype, param: str):
    """Refuse numbers that are finite in JSON but not in the model's dtype, before they reach it:
    ``scale``/``factor``/``value`` or vector entries beyond the dtype's range (float16: 65504),
    an ``add`` whose ``scale x vector`` overflows, and a ``project_out``/``clamp`` vector too
    short to give a direction in that dtype (``v / |v|`` needs ``|v|^2`` to be a normal number
    there: e.g. ``[1e-45, 0, ...]`` has no length at all in float32). numpy, not torch: this runs
    off the engine's worker (docs/architecture.md, "One thread for torch's thread pool").

    Raises:
        APIError: 400 naming the field.
    """
    finfo = torch.finfo(dtype)
    name = str(dtype).removeprefix("torch.")
    for field in ("scale", "factor", "value", "strength"):
        number = getattr(item, field)
        if number is not None and not (math.isfinite(number) and abs(number) <= finfo.max):
            raise APIError(
                f"{field} {number!r} is outside what the model's dtype ({name}) holds (at most "
                f"{finfo.max:.4g} in magnitude)",
                param=f"{param}.{field}",
            )
    if values is None or values.numel() == 0:
        return
    array = values.numpy()  # float32, on the CPU
    largest = float(np.abs(array).max())
    if not (math.isfinite(largest) and largest <= finfo.max):
        raise APIError(
            f"the vector holds values outside what the model's dtype ({name}) holds (at most "
            f"{finfo.max:.4g} in magnitude)",
            param=f"{param}.vector",
        )
    if item.type == "add" and abs(item.scale) * largest > finfo.max:
        raise APIError(
            f"scale x vector reaches {abs(item.scale) * largest:.4g}, more than the model's dtype "
            f"({name}) holds ({finfo.max:.4g})",
            param=f"{param}.vector" if abs(item.scale) <= 1 else f"{param}.scale",
        )
    if item.type in ("project_out", "clamp"):
        # float16 flushes small entries to zero; bfloat16 has float32's range.
        in_dtype = array.astype(np.float16) if dtype == torch.float16 else array
        length = float(np.linalg.norm(in_dtype.astype(np.float64)))
        if length < math.sqrt(finfo.tiny):
            raise APIError(
                f"{item.type} needs a direction: this vector's length ({length:.3g}) is too small "
                f"for the model's dtype ({name}; at least {math.sqrt(finfo.tiny):.3g}); scale it up "
                "(the direction is what counts)",
                param=f"{param}.vector",
            )


def _points(engine: Engine, item: InterventionRequest, param: str):
    if (item.module is None) == (item.hook_point is None):
        raise APIError("name either hook_point (with layer or layers) or module", param=param)
    if item.layer is not None and item.layers is not None:
        raise APIError("name layer or layers, not both", param=f"{param}.layers")
    layers = [item.layer] if item.layer is not None else item.layers
    try:
        if item.module is not None:
            return engine.hooks.resolve(layers=None, hook_points=None, modules=[item.module])
        if layers is None:
            raise APIError("hook_point needs layer or layers", param=f"{param}.layer")
        return engine.hooks.resolve(layers=layers, hook_points=[item.hook_point], modules=None)
    except HookError as exc:
        layer_field = "layer" if item.layer is not None else "layers"  # the field the client sent
        field = {"hook_points": "hook_point", "modules": "module"}.get(exc.param.split("[")[0], layer_field)
        raise APIError(str(exc), param=f"{param}.{field}") from exc


def _vector_values(engine: Engine, vectors: VectorStore, vector, param: str) -> torch.Tensor | None:
    """Inline numbers, or a stored vector by name (made for this model)."""
    if vector is None:
        return None
    if not isinstance(vector, str):
        return torch.tensor(vector, dtype=torch.float32)
    try:
        meta, values = vectors.read(vector)
    except UnknownVector:
        raise APIError(f"no stored vector named {vector!r} (see GET /v1/vectors)", param=param) from None
    except DamagedVector as exc:
        raise APIError(f"the stored vector {vector!r} is damaged: {exc}", param=param) from None
    if meta.get("model") not in (None, engine.model_id):
        raise APIError(
            f"vector {vector!r} was made for model {meta['model']!r}, not {engine.model_id!r}", param=param
        )
    return values


def _patch_source(engine: Engine, activations: ActivationStore, item: InterventionRequest, point, param: str):
    """The captured tensor to patch in, and the absolute positions its rows hold."""
    if item.activation_id is None or item.tensor is None:
        raise APIError(
            "patch needs activation_id and tensor (from an earlier capture)", param=f"{param}.activation_id"
        )
    try:
        manifest = activations.manifest(item.activation_id)
        entry = next(t for t in manifest["tensors"] if t["name"] == item.tensor)
        source = activations.load_tensor(item.activation_id, item.tensor, manifest["format"])
    except DamagedActivation:
        raise APIError(
            f"the captured tensor {item.tensor!r} of {item.activation_id!r} is damaged (not as the "
            "server wrote it)",
            param=f"{param}.activation_id",
        ) from None
    except (UnknownActivation, StopIteration):
        raise APIError(
            f"no captured tensor {item.tensor!r} under activation id {item.activation_id!r}",
            param=f"{param}.activation_id",
        ) from None
    if manifest.get("model") not in (None, engine.model_id):
        raise APIError("that capture was made with another model", param=f"{param}.activation_id")
    if entry.get("sampled_units") or entry.get("unit_indices") is not None:  # manifests 2 and 1
        raise APIError(
            "cannot patch from a capture with sample_hidden (units are missing)", param=f"{param}.tensor"
        )
    if source.dim() != 2 or source.shape[-1] != point.width:
        raise APIError(
            f"the captured tensor has shape {list(source.shape)}; "
            f"{point.name} needs [positions, {point.width}]",
            param=f"{param}.tensor",
        )
    # Manifest version 2 lists the positions once; version 1 (before 2026-11-30) per tensor.
    positions = manifest.get("token_positions", entry.get("positions"))
    if not isinstance(positions, list) or len(positions) != source.shape[0]:
        raise APIError(
            f"the capture {item.activation_id!r} is damaged: its positions do not match its tensor",
            param=f"{param}.activation_id",
        )
    return source, tuple(positions)  # converted where used, on the engine's worker
