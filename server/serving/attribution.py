"""``POST /v1/attribution``: gradients of a next-token metric at chosen hook points.

Checked before any work (400 naming the field): the target's tokens are one token each, hook
points and layers resolve (floating-point values only), a reference prompt has as many tokens
as the prompt, the forward and backward pass fit ``--memory-budget``. The passes run on the
engine's worker (``server/engine/attribution.py``), within the request timeout and cancelled
with the client.

The response gives, per hook point, ``scores`` and ``gradient_norms`` (``[layers][positions]``)
and the positions' tokens; with ``save_tensors`` the activations, gradients and scores are also stored
as a capture (``activations``, as a capture names them: ``GET /v1/activations/{id}``).
"""

from __future__ import annotations

from ..engine.attribution import Target
from ..engine.hooks import HookError
from ..engine.memory import estimate_backward, format_size
from ..errors import APIError
from ..protocol_analysis import AttributionRequest, LogprobTarget
from ..storage import CaptureTooLarge
from .base import (
    ENGINE_FAILURES,
    aligned_example,
    engine_error,
    example_ids,
    require_feature,
    single_token,
)
from .parts import ServingParts


class AttributionServing:
    """Gradient attribution over HTTP."""

    def __init__(self, parts: ServingParts) -> None:
        self.engine = parts.engine
        self.admission = parts.admission
        self.store = parts.store
        self.captures = parts.captures

    async def attribute(self, body: AttributionRequest) -> dict:
        engine = self.engine
        require_feature(engine, "attribution", None)
        self.admission.check_model(body.model)
        prompt = await example_ids(engine, body.prompt, "prompt")
        reference = None
        if body.reference_prompt is not None:
            reference = await aligned_example(
                engine, body.reference_prompt, "reference_prompt", prompt, "prompt"
            )
        target = await self._target(body)
        try:
            layers = engine.hooks.layer_indexes(body.layers)
            points = tuple(engine.hooks.resolve(layers=layers, hook_points=body.hook_points, modules=None))
        except HookError as exc:
            raise APIError(str(exc), param=exc.param) from exc
        for point in points:
            if not point.floating:
                raise APIError(
                    f"{point.name} holds integers, not activations: it has no gradient", param="hook_points"
                )
        self._check_memory(len(prompt))
        if body.save_tensors:
            self._check_size(points, len(prompt))
        self.admission.check_queue()
        sink = self.store if body.save_tensors else None
        facts = {"target": body.target.model_dump(), "hook_points": body.hook_points}
        try:
            result, capture = await engine.attribute(prompt, points, target, reference, sink, facts)
        except CaptureTooLarge as exc:  # the manifest tipped it over
            raise APIError(str(exc), param="save_tensors", code="capture_too_large") from exc
        except ENGINE_FAILURES as exc:
            raise engine_error(exc) from exc
        by_name = {item.point.name: item for item in result.points}
        results = []
        for hook in body.hook_points:
            items = [by_name[f"layers.{layer}.{hook}"] for layer in layers]
            results.append(
                {
                    "hook_point": hook,
                    "layers": layers,
                    "scores": [item.scores.tolist() for item in items],
                    "gradient_norms": [item.gradient_norms.tolist() for item in items],
                }
            )
        ref = self.captures.activations_ref(capture)
        return {
            "object": "attribution",
            "model": engine.model_id,
            "method": "attribution_patching" if reference is not None else "activation_x_gradient",
            "target": {"type": target.kind, "token_id": target.token, "other_token_id": target.other},
            "metric": result.metric,
            "reference_metric": result.reference_metric,
            "tokens": [engine.token_text(t) for t in prompt],
            "results": results,
            "activations": None if ref is None else ref.model_dump(),
        }

    async def _target(self, body: AttributionRequest) -> Target:
        if isinstance(body.target, LogprobTarget):
            return Target("logprob", await single_token(self.engine, body.target.token, "target.token"))
        correct = await single_token(self.engine, body.target.correct, "target.correct")
        incorrect = await single_token(self.engine, body.target.incorrect, "target.incorrect")
        return Target("logit_diff", correct, incorrect)

    def _check_size(self, points, prompt_tokens: int) -> None:
        """Refuse, before any work, a ``save_tensors`` that would write more than ``--max-capture-bytes``:
        each point's activation and gradient (float32) and its scores."""
        limit = self.store.max_capture_bytes
        size = sum((2 * point.width + 1) * prompt_tokens * 4 for point in points)
        if limit is not None and size > limit:
            raise APIError(
                f"saving would write about {format_size(size)}, more than --max-capture-bytes "
                f"({format_size(limit)}): fewer layers or hook points, or save_tensors false",
                param="save_tensors",
                code="capture_too_large",
            )

    def _check_memory(self, prompt_tokens: int) -> None:
        """Refuse a prompt whose forward and backward pass would not fit ``--memory-budget``."""
        room = self.engine.scheduler.memory_room
        if room is None:
            return
        need = estimate_backward(self.engine.shape, prompt_tokens)
        if need > room:
            raise APIError(
                f"a forward and backward pass over {prompt_tokens} tokens needs about {format_size(need)} "
                f"beside the weights; --memory-budget leaves {format_size(room)}: shorten the prompt",
                param="prompt",
                code="memory_budget_exceeded",
            )
