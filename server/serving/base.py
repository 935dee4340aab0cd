"""What the endpoint families share, as plain functions: engine calls, errors, the one SSE framing.

Not a base class: each endpoint family (``chat``, ``completions``, ``lda``, ``vectors``)
holds the parts it needs as attributes (``admission.Admission``,
``capture_planning.CapturePlanning``, ``interventions.InterventionResolver``) and calls
these functions.

* ``generate`` / ``stream``: the engine's calls, counted toward the request's metrics
  (``middleware.note_tokens``, ``note_first_token``); ``generate`` turns a failure of
  model or storage work into its OpenAI error.
* ``engine_error`` and its factories (``out_of_memory``, ``storage_error``,
  ``queue_full``): the one mapping from such a failure to the error the client gets.
* ``sse_stream``: the one SSE framing; ``closing_chunk``, ``leading_capture`` and
  ``activation_fields``: how a stream's chunks carry usage and captured activations.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from http import HTTPStatus

import torch

from ..engine.capture import CaptureResult
from ..engine.engine import Engine, RequestTimedOut
from ..engine.job import ChoiceDelta, GenerationJob, GenerationResult
from ..engine.scheduler import QueueFull
from ..errors import APIError, internal_error
from ..middleware import note_first_token, note_tokens
from ..protocol import ActivationsRef, Usage, dump
from ..storage import UnsafeSaveDir

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


def closing_chunk(base: dict, usage_: Usage | None, activations: ActivationsRef | None) -> dict | None:
    """The last chunk of a stream, with no choices: the usage (if asked) and a generate-mode capture."""
    extra = activation_fields(activations)
    if usage_ is not None:
        extra["usage"] = dump(usage_)
    return {**base, "choices": [], **extra} if extra else None


async def leading_capture(items, trace: bool) -> tuple[CaptureResult | None, AsyncIterator]:
    """A trace-mode capture comes first in its job's stream (written right after the prompt
    step): take it, so the first chunk can name it; the returned iterator goes on from there
    (and closes ``items`` when it is closed: a client that leaves cancels the job)."""
    if not trace:
        return None, items
    first = await anext(items)
    captured = first if isinstance(first, CaptureResult) else None

    async def rest():
        try:
            if captured is None:
                yield first
            async for item in items:
                yield item
        finally:
            await items.aclose()

    return captured, rest()


def activation_fields(ref: ActivationsRef | None) -> dict:
    """``activations``, and the same object under ``ndif`` for clients of the earlier server."""
    return {} if ref is None else {"activations": dump(ref), "ndif": dump(ref)}


async def generate(engine: Engine, job: GenerationJob) -> GenerationResult:
    """The engine's result for ``job``, counted toward the request's metrics; a failure of model
    or storage work becomes its OpenAI error."""
    try:
        result = await engine.generate(job)
    except (torch.OutOfMemoryError, OSError, UnsafeSaveDir, QueueFull, RequestTimedOut) as exc:
        raise engine_error(exc) from exc
    note_first_token(job.first_token_at)
    note_tokens(result.prompt_tokens, result.completion_tokens)
    return result


async def stream(
    engine: Engine, job: GenerationJob
) -> AsyncIterator[ChoiceDelta | CaptureResult | GenerationResult]:
    """The engine's stream (a trace-mode capture, deltas, then the result), counted toward
    the request's metrics."""
    async for item in engine.stream(job):
        note_first_token(job.first_token_at)
        if isinstance(item, GenerationResult):
            note_tokens(item.prompt_tokens, item.completion_tokens)
        yield item
