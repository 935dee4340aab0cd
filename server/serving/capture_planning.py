"""Capture planning: a request's ``capture`` block (or the server-wide capture settings)
becomes the engine's :class:`~server.engine.capture.CapturePlan`, then its
:class:`~server.engine.capture.CaptureSpec`; a finished capture becomes the response's
``activations`` reference.

The server-wide capture settings (:class:`ServerCapture`) are set through
``/v1/interventions``, a route kept under that old name for clients of the earlier
server; they apply to every request that sends no ``capture`` of its own, and ``ndif``
overrides them per request. They are read and replaced on the event loop only.

Everything is checked against the served model and the activation store before any
work: hook points, layers and modules resolve (400 naming ``capture.<field>``), the save
directory stays inside ``--activations-dir``. The engine writes the capture; this part
only plans it.
"""

from __future__ import annotations

import logging

from ..engine.attention import PatternPoint
from ..engine.capture import CapturePlan, CaptureResult, CaptureSpec, LensRead, ReasoningMarks, SaeRead
from ..engine.engine import Engine
from ..engine.hooks import HookError
from ..engine.loading import DTYPES
from ..errors import APIError
from ..protocol import ActivationsRef, CaptureRequest, NdifOverrides, ServerCaptureConfig, dump
from ..storage import ActivationStore, UnsafeSaveDir
from .base import require_feature

logger = logging.getLogger(__name__)


def extra_step(plan: CapturePlan | None) -> int:
    """1 when a capture feeds the final generated token through the model (generate mode)."""
    return int(plan is not None and plan.mode == "generate")


class ServerCapture:
    """The server-wide capture settings (set through ``/v1/interventions``), one per app and
    shared by every endpoint.

    Read and replaced on the event loop only.
    """

    def __init__(self) -> None:
        self.config = ServerCaptureConfig()


class CapturePlanning:
    """Plans one request's capture against the served model, the activation store and the
    server-wide capture settings; installs new server-wide settings."""

    def __init__(self, engine: Engine, store: ActivationStore, server_capture: ServerCapture) -> None:
        self.engine = engine
        self.store = store
        self.server_capture = server_capture

    def effective_capture(
        self, capture: CaptureRequest | None, overrides: NdifOverrides | None
    ) -> CaptureRequest | None:
        """The request's own ``capture``, else the server-wide settings (with ``ndif`` overrides)."""
        if capture is not None:
            if overrides is not None:
                raise APIError(
                    "ndif overrides the server-wide capture settings; with capture, use capture.save_dir",
                    param="ndif",
                )
            return capture
        config = self.server_capture.config
        if not config.enabled:
            return None
        if overrides is not None and not overrides.per_request_subdir:
            raise APIError(
                "per_request_subdir false is not supported: every capture gets its own directory",
                param="ndif.per_request_subdir",
            )
        effective = config.for_request(overrides)
        try:
            self.store.resolve_subdir(effective.save_dir)
        except UnsafeSaveDir as exc:
            raise APIError(str(exc), param="ndif.save_dir") from exc
        return effective

    def configure_server_capture(self, config: ServerCaptureConfig) -> ServerCaptureConfig:
        """Validate and install new server-wide capture settings."""
        if not config.per_request_subdir:
            raise APIError(
                "per_request_subdir false is not supported: every capture gets its own directory",
                param="per_request_subdir",
            )
        if not config.include_metadata_json:
            raise APIError(
                "include_metadata_json false is not supported: the manifest is always written",
                param="include_metadata_json",
            )
        try:
            self.engine.hooks.resolve(layers=config.layers, hook_points=config.hook_points, modules=None)
            self.store.resolve_subdir(config.save_dir)
        except HookError as exc:
            raise APIError(str(exc), param=exc.param) from exc
        except UnsafeSaveDir as exc:
            raise APIError(str(exc), param="save_dir") from exc
        self.server_capture.config = config
        logger.info("server-wide capture settings: %s", config.model_dump())
        return config

    def capture_plan(self, capture: CaptureRequest | None, n: int) -> CapturePlan | None:
        """Validate a request's ``capture`` block against the served model, before any work."""
        if capture is None:
            return None
        if capture.mode == "generate" and n > 1:
            raise APIError('capture mode "generate" records one choice: send n=1', param="n")
        if capture.positions == "generated" and capture.mode != "generate":
            raise APIError('positions "generated" needs capture mode "generate"', param="capture.positions")
        derived_only = (
            capture.saes or capture.logit_lens is not None or capture.attention is not None
        ) and not (capture.hook_points or capture.modules or capture.layers is not None)
        try:
            points = (
                []
                if derived_only
                else self.engine.hooks.resolve(
                    layers=capture.layers, hook_points=capture.hook_points, modules=capture.modules
                )
            )
            self.store.resolve_subdir(capture.save_dir)
        except HookError as exc:
            raise APIError(str(exc), param=f"capture.{exc.param}") from exc
        except UnsafeSaveDir as exc:
            raise APIError(str(exc), param="capture.save_dir") from exc
        logits = self.engine.hooks.logits_module
        if capture.mode == "generate" and any(p.module_path == logits and p.kind == "output" for p in points):
            raise APIError(
                f"{logits}.output in generate mode: generation computes logits for the last position only; "
                "capture them in trace mode, or ask for logprobs",
                param="capture.modules",
            )
        return CapturePlan(
            save_dir=capture.save_dir,
            points=tuple(points),
            mode=capture.mode,
            positions=capture.positions,
            sample_hidden=capture.sample_hidden,
            sample_method=capture.sample_hidden_method,
            sample_seed=capture.sample_hidden_seed,
            dtype=DTYPES[capture.dtype] if capture.dtype else None,
            format=capture.format,
            saes=self._sae_reads(capture),
            lens=self._lens_read(capture),
            **self._patterns(capture),
        )

    def _patterns(self, capture: CaptureRequest) -> dict:
        """``capture.attention`` (and ``attention_heads``): the attention modules to tap."""
        if capture.attention is None:
            if capture.attention_heads is not None:
                raise APIError(
                    "attention_heads needs attention (the layers)", param="capture.attention_heads"
                )
            return {}
        require_feature(self.engine, "attention", "capture.attention")
        layout, heads = self.engine.layout, self.engine.shape.heads
        if not self.engine.reads_attention_patterns:
            raise APIError(
                "this model's attention modules do not go through transformers' attention interface; "
                "patterns cannot be read",
                param="capture.attention",
            )
        try:
            layers = self.engine.hooks.layer_indexes(capture.attention, "attention")
        except HookError as exc:
            raise APIError(str(exc), param=f"capture.{exc.param}") from exc
        chosen = None
        if capture.attention_heads is not None:
            chosen = tuple(sorted(set(capture.attention_heads)))
            if chosen[-1] >= heads:
                raise APIError(
                    f"head {chosen[-1]} is out of range: the model has {heads}",
                    param="capture.attention_heads",
                )
        points = tuple(
            PatternPoint(
                f"attention.layers.{layer}.pattern",
                f"{layout.path}.{layer}.{layout.attention}",
                layer,
                chosen,
            )
            for layer in layers
        )
        return {"patterns": points, "pattern_heads": heads if chosen is None else len(chosen)}

    def _sae_reads(self, capture: CaptureRequest) -> tuple[SaeRead, ...]:
        """``capture.saes``: each loaded SAE, with how many features to keep per position."""
        if not capture.saes:
            if capture.sae_top_k != CaptureRequest.model_fields["sae_top_k"].default:
                raise APIError("sae_top_k needs saes (the SAEs to read)", param="capture.sae_top_k")
            return ()
        require_feature(self.engine, "saes", "capture.saes")
        reads = []
        for i, name in enumerate(dict.fromkeys(capture.saes)):
            try:
                served = self.engine.saes.get(name)
            except KeyError:
                raise APIError(
                    f"no SAE named {name!r} is loaded (see GET /v1/saes)", param=f"capture.saes[{i}]"
                ) from None
            if capture.sae_top_k > served.sae.d_sae:
                raise APIError(
                    f"sae_top_k {capture.sae_top_k} is more than {name!r} has features ({served.sae.d_sae})",
                    param="capture.sae_top_k",
                )
            reads.append(SaeRead(name, served.point, served.sae, capture.sae_top_k))
        return tuple(reads)

    def _lens_read(self, capture: CaptureRequest) -> LensRead | None:
        """``capture.logit_lens``: each chosen layer's ``resid_post`` through the final norm and head."""
        if capture.logit_lens is None:
            if capture.logit_lens_top_k != CaptureRequest.model_fields["logit_lens_top_k"].default:
                raise APIError(
                    "logit_lens_top_k needs logit_lens (the layers)", param="capture.logit_lens_top_k"
                )
            return None
        require_feature(self.engine, "logit_lens", "capture.logit_lens")
        unembed = self.engine.unembedding
        if unembed is None:
            raise APIError(
                "the served model has no unembedding module for the lens", param="capture.logit_lens"
            )
        if capture.logit_lens_top_k > self.engine.vocab_size:
            raise APIError("logit_lens_top_k is more than the vocabulary", param="capture.logit_lens_top_k")
        try:
            points = self.engine.hooks.resolve(
                layers=self.engine.hooks.layer_indexes(capture.logit_lens, "logit_lens"),
                hook_points=["resid_post"],
                modules=None,
            )
        except HookError as exc:
            raise APIError(str(exc), param=f"capture.{exc.param}") from exc
        return LensRead(tuple(points), capture.logit_lens_top_k, unembed)

    def capture_spec(
        self, plan: CapturePlan | None, request, completion_id: str, reasoning: ReasoningMarks | None = None
    ) -> CaptureSpec | None:
        """The job's capture: the plan, the activation store to write through, and what the
        request adds to the manifest (its interventions and presets as it named them, and where
        its reasoning is; the engine adds the model and the sampling)."""
        if plan is None:
            return None
        facts = {
            "interventions": [dump(item) for item in request.interventions or []],
            "presets": list(request.presets or []),
        }
        return CaptureSpec(plan, self.store, completion_id, facts, reasoning)

    def activations_ref(self, capture: CaptureResult | None) -> ActivationsRef | None:
        """The response's ``activations``: where a finished capture's manifest and tensors are."""
        if capture is None:
            return None
        return ActivationsRef(
            id=capture.id,
            manifest=f"/v1/activations/{capture.id}",
            directory=self.store.relative(capture.directory),
            tensors=list(capture.tensors),
        )
