"""What both endpoint families share: checks, engine calls, and the one SSE framing.

Token budget rule: a request asking for more than ``--max-tokens-cap`` tokens,
or for more than fit in the context window after its prompt, is refused with
a 400 naming ``max_tokens`` (never silently clamped); a request that names no
limit gets whatever fits, up to the cap.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from http import HTTPStatus

import torch

from ..config import Settings
from ..engine.capture import CapturePlan, GenerationCapture, stored_bytes
from ..engine.engine import Engine, RequestTimedOut
from ..engine.generation import ChoiceDelta, GenerationJob, GenerationResult
from ..engine.hooks import HookError
from ..engine.loading import DTYPES
from ..engine.memory import estimate, format_size
from ..engine.scheduler import QueueFull
from ..engine.steps import Edit
from ..errors import APIError, internal_error
from ..middleware import note_first_token, note_tokens
from ..protocol import (
    ActivationsRef,
    CaptureRequest,
    InterventionRequest,
    ModelCard,
    ModelList,
    NdifOverrides,
    ServerCaptureConfig,
    Usage,
    dump,
    now,
)
from ..storage import ActivationStore, PresetStore, UnknownActivation, UnsafeSaveDir, VectorStore
from .interventions import resolve_interventions

logger = logging.getLogger(__name__)


def usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


def out_of_memory(exc: BaseException) -> APIError:
    return APIError(
        f"out of memory: {exc}. Reduce max_tokens, n, the prompt or what is captured.",
        status=HTTPStatus.INSUFFICIENT_STORAGE,
        code="out_of_memory",
    )


def storage_error(exc: OSError) -> APIError:
    return APIError(
        f"could not store the activations: {exc.strerror or exc}",
        status=HTTPStatus.INSUFFICIENT_STORAGE,
        code="storage_error",
    )


RETRY_AFTER_S = 1


def queue_full(message: str) -> APIError:
    return APIError(
        f"the server is busy: {message}; retry shortly",
        status=HTTPStatus.TOO_MANY_REQUESTS,
        code="queue_full",
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


def engine_error(exc: BaseException) -> APIError | None:
    """The client-facing error for a failure of model or storage work, where there is one."""
    if isinstance(exc, torch.OutOfMemoryError):
        return out_of_memory(exc)
    if isinstance(exc, QueueFull):
        return queue_full(str(exc))
    if isinstance(exc, RequestTimedOut):
        return APIError(str(exc), status=HTTPStatus.GATEWAY_TIMEOUT, code="timeout")
    if isinstance(exc, UnsafeSaveDir):
        return APIError(str(exc), param="capture.save_dir")
    if isinstance(exc, OSError):
        return storage_error(exc)
    return None


async def sse_stream(chunks: AsyncIterator[dict]) -> AsyncIterator[str]:
    """The one SSE framing: ``data: {chunk}`` events; a failure becomes one error event; always ``[DONE]``.

    A disconnected client cancels the task (CancelledError is not caught here),
    which closes the chunk generators and with them the engine's stream.
    """
    try:
        async for chunk in chunks:
            yield f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n"
    except APIError as error:
        yield f"data: {json.dumps(error.body())}\n\n"
    except Exception as exc:  # every failure becomes one error event
        error = engine_error(exc)
        if error is None:
            logger.exception("a streamed response failed")
            error = internal_error(exc)
        yield f"data: {json.dumps(error.body())}\n\n"
    yield "data: [DONE]\n\n"


def extra_step(plan: CapturePlan | None) -> int:
    """1 when a capture feeds the final generated token through the model (generate mode)."""
    return int(plan is not None and plan.mode == "generate")


def closing_chunk(base: dict, usage_: Usage | None, activations: ActivationsRef | None) -> dict | None:
    """The last chunk of a stream, with no choices: the usage (if asked) and a generate-mode capture."""
    extra = activation_fields(activations)
    if usage_ is not None:
        extra["usage"] = dump(usage_)
    return {**base, "choices": [], **extra} if extra else None


def activation_fields(ref: ActivationsRef | None) -> dict:
    """``activations``, and the same object under ``ndif`` for clients of the earlier server."""
    return {} if ref is None else {"activations": dump(ref), "ndif": dump(ref)}


class ServerCapture:
    """The server-wide capture settings (``/v1/interventions``), shared by every endpoint.

    Read and replaced on the event loop only.
    """

    def __init__(self) -> None:
        self.config = ServerCaptureConfig()


class Serving:
    """Shared by the endpoint families: model identity, budget checks, engine calls."""

    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        store: ActivationStore,
        server_capture: ServerCapture,
        vectors: VectorStore,
        presets: PresetStore,
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.store = store
        self.server_capture = server_capture
        self.vectors = vectors
        self.presets = presets
        self.created = now()
        self._model_names = {engine.model_id, settings.model, engine.loaded.source}

    def check_model(self, model: str | None) -> None:
        if model and model not in self._model_names:
            raise APIError(
                f"The model `{model}` does not exist; this server serves `{self.engine.model_id}`.",
                status=HTTPStatus.NOT_FOUND,
                param="model",
                code="model_not_found",
            )

    def models(self) -> ModelList:
        card = ModelCard(
            id=self.engine.model_id,
            created=self.created,
            root=self.engine.loaded.source,
            max_model_len=self.engine.context_length,
        )
        return ModelList(data=[card])

    def token_budget(
        self, prompt_len: int, requested: int | None, param: str, prompt_param: str, reserve: int = 0
    ) -> int:
        """How many tokens this request may generate, or a 400 naming the parameter at fault.

        ``reserve``: positions the request needs beyond its tokens (a generate-mode capture
        feeds its final token through the model once more).
        """
        window = self.engine.context_length - reserve
        cap = self.settings.max_tokens_cap
        room = window - prompt_len
        if room < 0 or (room == 0 and requested != 0):  # requested == 0: scoring an echoed prompt
            raise APIError(
                f"This model's maximum context length is {window} tokens, and the prompt has "
                f"{prompt_len} tokens, leaving no room for a completion. Shorten the prompt.",
                param=prompt_param,
                code="context_length_exceeded",
            )
        if requested is None:
            return min(cap, room)
        if requested > cap:
            raise APIError(
                f"{param} is {requested}, above this server's cap of {cap} tokens per request "
                "(--max-tokens-cap).",
                param=param,
            )
        if requested > room:
            raise APIError(
                f"This model's maximum context length is {window} tokens. However, you requested "
                f"{prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} for the "
                f"completion). Reduce {param} or the prompt.",
                param=param,
                code="context_length_exceeded",
            )
        return requested

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

    async def resolve_interventions(
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
            resolve_interventions, self.engine, self.vectors, self.store, self.presets, items, presets, field
        )

    def capture_plan(self, capture: CaptureRequest | None, n: int) -> CapturePlan | None:
        """Validate a request's ``capture`` block against the served model, before any work."""
        if capture is None:
            return None
        if capture.mode == "generate" and n > 1:
            raise APIError('capture mode "generate" records one choice: send n=1', param="n")
        if capture.positions == "generated" and capture.mode != "generate":
            raise APIError('positions "generated" needs capture mode "generate"', param="capture.positions")
        try:
            points = self.engine.hooks.resolve(
                layers=capture.layers, hook_points=capture.hook_points, modules=capture.modules
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
        )

    def check_memory(
        self,
        *,
        prompt_tokens: int,
        max_tokens: int,
        n: int,
        plan: CapturePlan | None,
        scoring: bool,
        prompt_param: str,
        max_tokens_param: str,
    ) -> int:
        """Refuse, before it runs, a request whose estimated peak exceeds --memory-budget (or
        whose capture would write more than --max-capture-bytes).

        Returns the bytes the request adds beyond the resident weights (the scheduler keeps a
        batch's sum within the budget)."""
        if plan is not None:
            self.check_capture_size(plan, prompt_tokens, max_tokens)
        budget = self.settings.memory_budget

        def need(tokens: int = max_tokens, rows: int = n, capture: CapturePlan | None = plan):
            points = capture.points if capture else ()
            return estimate(
                self.engine.shape,
                prompt_tokens=prompt_tokens,
                max_tokens=tokens + extra_step(capture),
                n=rows,
                capture_widths=tuple(p.width for p in points),
                capture_positions=prompt_tokens if points else 0,
                scoring=scoring,
                resident_weights=self.engine.resident_weight_bytes,
            )

        full = need()
        if budget is None or full.total <= budget:
            return full.total - full.weights
        # Name the first knob whose reduction alone would make the request fit, else the prompt.
        fixes = [
            ("capture", plan is not None, lambda: need(capture=None)),
            (max_tokens_param, max_tokens > 1, lambda: need(tokens=1)),
            ("n", n > 1, lambda: need(rows=1)),
        ]
        blame = next(
            (name for name, applies, reduced in fixes if applies and reduced().total <= budget), prompt_param
        )
        raise APIError(
            f"this request needs about {format_size(full.total)} ({full.describe()}), more than the "
            f"server's --memory-budget of {format_size(budget)}. Reduce {blame}"
            + (" (fewer layers or hook points, or sample_hidden)" if blame == "capture" else "")
            + ".",
            param=blame,
            code="memory_budget_exceeded",
        )

    def check_capture_size(self, plan: CapturePlan, prompt_tokens: int, max_tokens: int) -> None:
        limit = self.settings.max_capture_bytes
        size = stored_bytes(plan, prompt_tokens, max_tokens, self.engine.loaded.dtype)
        if size > limit:
            raise APIError(
                f"this capture would write up to {format_size(size)}, more than this server's "
                f"--max-capture-bytes of {format_size(limit)}. Capture fewer layers or hook points, "
                "fewer positions, sample_hidden, a smaller dtype, or generate fewer tokens.",
                param="capture",
                code="capture_too_large",
            )

    def check_prompt_chars(self, chars: int, param: str) -> None:
        """Refuse a request with more prompt text than --max-prompt-chars, before tokenizing it."""
        limit = self.settings.max_prompt_chars
        if chars > limit:
            raise APIError(
                f"{chars} characters of prompt text in one request; this server takes at most "
                f"{limit} (--max-prompt-chars)",
                param=param,
                code="prompt_too_long",
            )

    async def begin_capture(
        self, job: GenerationJob, plan: CapturePlan | None, request_id: str, request
    ) -> ActivationsRef | None:
        """Start a request's capture: a trace-mode capture runs now and is described at once;
        a generate-mode capture rides along with ``job`` and is described from its result.
        ``request`` (chat or completion) gives the manifest its interventions and presets."""
        if plan is None:
            return None

        def open_writer():  # called on the worker, when the capture really starts
            return self.store.create(plan.save_dir, plan.format)

        params = job.params
        facts = {
            "model": self.engine.model_id,
            "dtype": str(self.engine.loaded.dtype).removeprefix("torch."),
            # What it takes to generate the same tokens again (a seed makes sampling repeatable).
            "sampling": {
                "temperature": params.temperature,
                "top_p": params.top_p,
                "top_k": params.top_k,
                "seed": params.seed,
                "max_tokens": params.max_tokens,
                "n": params.n,
                "stop": list(params.stop),
                "ignore_eos": params.ignore_eos,
            },
            # The edits as the request gave them (stored vectors and presets by name).
            "interventions": [dump(item) for item in request.interventions or []],
            "presets": list(request.presets or []),
            "adapter": self.engine.loaded.adapter,
            "completion_id": request_id,
            "sample_hidden": plan.sample_hidden,
            "sample_hidden_method": plan.sample_method,
            "sample_hidden_seed": plan.sample_seed,
        }
        if plan.mode == "generate":
            job.capture = GenerationCapture(plan, open_writer, len(job.prompt_ids), **facts)
            return None
        try:
            manifest = await self.engine.capture_prompt(job.prompt_ids, plan, open_writer, job.edits, **facts)
        except (torch.OutOfMemoryError, OSError, UnsafeSaveDir) as exc:
            raise engine_error(exc) from exc
        return self.activations_ref(manifest)

    def discard(self, ref: ActivationsRef | None) -> None:
        """Remove a trace-mode capture whose request then failed or was cancelled: no one gets its id."""
        if ref is not None:
            with contextlib.suppress(UnknownActivation):
                self.store.delete(ref.id)

    def activations_ref(self, manifest: dict) -> ActivationsRef:
        return ActivationsRef(
            id=manifest["id"],
            manifest=f"/v1/activations/{manifest['id']}",
            directory=self.store.relative(self.store.directory(manifest["id"])),
            tensors=[entry["name"] for entry in manifest["tensors"]],
        )

    def check_queue(self, jobs: int = 1) -> None:
        """429 now, before a stream starts, when the engine's queue has no room for ``jobs`` more
        (a request that arrives in the meantime can still take the last place)."""
        scheduler = self.engine.scheduler
        room = scheduler.room()
        if room < jobs:
            waiting = scheduler.max_queue - room
            raise queue_full(f"{waiting} requests are already waiting (--max-queue {scheduler.max_queue})")

    async def generate(self, job: GenerationJob) -> GenerationResult:
        try:
            result = await self.engine.generate(job)
        except (torch.OutOfMemoryError, OSError, UnsafeSaveDir, QueueFull, RequestTimedOut) as exc:
            raise engine_error(exc) from exc
        note_first_token(job.first_token_at)
        note_tokens(result.prompt_tokens, result.completion_tokens)
        return result

    async def stream(self, job: GenerationJob) -> AsyncIterator[ChoiceDelta | GenerationResult]:
        """The engine's stream (deltas, then the result), counted toward the request's metrics."""
        async for item in self.engine.stream(job):
            note_first_token(job.first_token_at)
            if isinstance(item, GenerationResult):
                note_tokens(item.prompt_tokens, item.completion_tokens)
            yield item
