"""/v1/vectors: register, list, read and delete named vectors; build contrastive ones.

A contrastive vector is the difference between how the model represents two sets of
examples at one hook point, per layer:

* ``mean_diff``: the mean over positive examples minus the mean over negative ones;
* ``pca``: the dominant direction of the paired differences (positive i minus
  negative i, uncentred), signed to agree with the mean difference and scaled to the
  mean difference's length along it.

Each example is represented by its value at its last token (``position: "last"``) or
averaged over its tokens (``"mean"``). A string example is tokenized as plain text; a
message list is rendered with the chat template, ready for the assistant's reply.
"""

from __future__ import annotations

import asyncio
import base64
import binascii

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from ..engine.hooks import HookError
from ..errors import APIError
from ..protocol import ContrastiveCreate, PresetCreate, VectorCreate
from .base import ENGINE_FAILURES, engine_error, example_ids
from .parts import ServingParts


class VectorServing:
    """Named vectors and intervention presets (``/v1/interventions/presets``); a preset's items
    are checked by the ``interventions`` part, as a request's would be."""

    def __init__(self, parts: ServingParts) -> None:
        self.engine = parts.engine
        self.settings = parts.settings
        self.vectors = parts.vectors
        self.presets = parts.presets
        self.interventions = parts.interventions

    def _check_room(self, adding: int) -> None:
        if self.vectors.count() + adding > self.settings.max_vectors:
            raise APIError(
                f"the vector store holds at most {self.settings.max_vectors} vectors (--max-vectors)",
                param="name",
            )

    def _check_name(self, name: str) -> None:
        if not self.vectors.valid_name(name):
            raise APIError(
                "name: letters, digits, '_', '-', '.', at most 100 characters, not starting with '.'",
                param="name",
            )

    async def register(self, body: VectorCreate) -> dict:
        self._check_name(body.name)
        if (body.values is None) == (body.safetensors_base64 is None):
            raise APIError("send either values or safetensors_base64", param="values")
        vector = (
            torch.tensor(body.values, dtype=torch.float32)
            if body.values is not None
            else self._decode_safetensors(body.safetensors_base64)
        )
        if not np.isfinite(vector.numpy()).all():  # numpy: off the worker, no torch thread team
            raise APIError(
                "the vector holds NaN or infinite values (in float32: at most 3.4e38 in magnitude)",
                param="values" if body.values is not None else "safetensors_base64",
            )
        if body.hook_point is not None or body.layer is not None:
            if body.hook_point is None or body.layer is None:
                raise APIError("layer and hook_point go together", param="hook_point")
            try:
                (point,) = self.engine.hooks.resolve(
                    layers=[body.layer], hook_points=[body.hook_point], modules=None
                )
            except HookError as exc:
                raise APIError(
                    str(exc), param="layer" if exc.param.startswith("layers") else "hook_point"
                ) from exc
            if point.width != vector.numel():
                raise APIError(
                    f"the vector has {vector.numel()} values; {point.name} has {point.width}", param="values"
                )
        self._check_room(1)
        meta = {
            "model": self.engine.model_id,
            "layer": body.layer,
            "hook_point": body.hook_point,
            "method": "values" if body.values is not None else "safetensors",
            "description": body.description,
        }
        return await self._put(body.name, vector, meta)

    async def _put(self, name: str, vector: torch.Tensor, meta: dict) -> dict:
        try:
            return await asyncio.to_thread(self.vectors.put, name, vector, **meta)
        except OSError as exc:
            raise engine_error(exc) from exc

    @staticmethod
    def _decode_safetensors(text: str) -> torch.Tensor:
        try:
            tensors = load_safetensors(base64.b64decode(text, validate=True))
        except (binascii.Error, ValueError, SafetensorError) as exc:
            raise APIError(f"not base64 of a safetensors file: {exc}", param="safetensors_base64") from exc
        if len(tensors) != 1:
            raise APIError(f"expected one tensor, found {len(tensors)}", param="safetensors_base64")
        (tensor,) = tensors.values()
        if tensor.dim() != 1 or not tensor.is_floating_point():
            raise APIError("expected one 1-D floating-point tensor", param="safetensors_base64")
        return tensor.float()

    def listing(self) -> dict:
        """Every vector's metadata; files that are not vectors of this store are skipped and
        reported under ``damaged`` (``{name, error}``)."""
        data, damaged = self.vectors.listing()
        return {"object": "list", "data": data, "damaged": damaged}

    def read(self, name: str) -> dict:
        meta, values = self.vectors.read(name)
        return {**meta, "values": values.tolist()}

    def delete(self, name: str) -> dict:
        self.vectors.delete(name)
        return {"name": name, "deleted": True}

    async def create_preset(self, body: PresetCreate) -> dict:
        """Validate the items against the served model (as a request would), then store them."""
        if not self.vectors.valid_name(body.name):
            raise APIError("name: letters, digits, '_', '-', '.', at most 100 characters", param="name")
        await self.interventions.resolve(body.items, field="items")
        items = [item.model_dump(exclude_none=True) for item in body.items]
        try:
            await asyncio.to_thread(self.presets.put, body.name, items)
        except OSError as exc:
            raise engine_error(exc) from exc
        return {"name": body.name, "items": items}

    def preset_listing(self) -> dict:
        """Every preset; damaged files are skipped and reported under ``damaged``."""
        data, damaged = self.presets.listing()
        return {"object": "list", "data": data, "damaged": damaged}

    async def contrastive(self, body: ContrastiveCreate) -> dict:
        self._check_name(body.name)
        try:
            points = tuple(
                self.engine.hooks.resolve(layers=body.layers, hook_points=[body.hook_point], modules=None)
            )
        except HookError as exc:
            raise APIError(
                str(exc), param="layers" if exc.param.startswith("layers") else "hook_point"
            ) from exc
        if body.method == "pca" and min(len(body.positive), len(body.negative)) < 2:
            raise APIError("pca needs at least two positive and two negative examples", param="method")
        existing = set(self.vectors.names())
        self._check_room(sum(f"{body.name}-layer{p.layer}" not in existing for p in points))
        positive = [
            await example_ids(self.engine, example, f"positive[{i}]")
            for i, example in enumerate(body.positive)
        ]
        negative = [
            await example_ids(self.engine, example, f"negative[{i}]")
            for i, example in enumerate(body.negative)
        ]
        try:
            pos = await self.engine.collect(positive, points, body.position)
            neg = await self.engine.collect(negative, points, body.position)
        except ENGINE_FAILURES as exc:  # out of memory, the request timeout
            raise engine_error(exc) from exc
        made = []
        for point in points:
            # On the engine's worker: the one thread that may run torch's thread pool.
            vector = await self.engine.compute(
                contrastive_vector, pos[point.name], neg[point.name], body.method
            )
            meta = {
                "model": self.engine.model_id,
                "layer": point.layer,
                "hook_point": body.hook_point,
                "method": f"contrastive:{body.method}",
                "position": body.position,
                "examples": {"positive": len(positive), "negative": len(negative)},
                "description": None,
            }
            made.append(await self._put(f"{body.name}-layer{point.layer}", vector, meta))
        return {"object": "list", "data": made}


def contrastive_vector(positive: torch.Tensor, negative: torch.Tensor, method: str) -> torch.Tensor:
    """[examples, width] x 2 -> [width] (see the module docstring)."""
    mean_diff = positive.mean(0) - negative.mean(0)
    if method == "mean_diff":
        return mean_diff
    pairs = min(len(positive), len(negative))
    differences = positive[:pairs] - negative[:pairs]
    direction = torch.linalg.svd(differences, full_matrices=False).Vh[0]
    along = torch.dot(mean_diff, direction)
    return direction * along  # signed and scaled to the mean difference along it
