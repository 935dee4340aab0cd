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
* ``sse_stream``: the one SSE framing; ``place_activations``, ``leading_capture`` and
  ``activation_fields``: how a stream's chunks carry captured activations.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextvars import ContextVar
from http import HTTPStatus

import torch

from ..engine.capture import CaptureResult
from ..engine.constraints import GrammarError
from ..engine.engine import Engine, RequestTimedOut, remove_captures
from ..engine.job import ChoiceDelta, GenerationJob, GenerationResult
from ..engine.sampler import NonFiniteLogits
from ..engine.scheduler import QueueFull
from ..errors import APIError, internal_error
from ..middleware import note_first_token, note_tokens
from ..protocol import ActivationsRef, ChatMessage, Usage, dump
from ..storage import CaptureTooLarge, UnsafeSaveDir

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


# What model or storage work can fail with that the client is told about (engine_error).
ENGINE_FAILURES = (
    torch.OutOfMemoryError,
    OSError,
    UnsafeSaveDir,
    CaptureTooLarge,
    QueueFull,
    RequestTimedOut,
    NonFiniteLogits,
    GrammarError,
)


def engine_error(exc: BaseException, interventions_param: str = "interventions") -> APIError | None:
    """The client-facing error for a failure of model or storage work, where there is one.
    ``interventions_param``: the request field that holds its interventions."""
    if isinstance(exc, torch.OutOfMemoryError):
        return out_of_memory(exc)
    if isinstance(exc, QueueFull):
        return queue_full(str(exc))
    if isinstance(exc, RequestTimedOut):
        return APIError(str(exc), status=HTTPStatus.GATEWAY_TIMEOUT, code="timeout")
    if isinstance(exc, UnsafeSaveDir):
        return APIError(str(exc), param="capture.save_dir")
    if isinstance(exc, CaptureTooLarge):
        return APIError(str(exc), param="capture", code="capture_too_large")
    if isinstance(exc, OSError):
        return storage_error(exc)
    if isinstance(exc, GrammarError):  # a matcher that failed while decoding
        return APIError(f"structured output: {exc}", code="grammar_error")
    if isinstance(exc, NonFiniteLogits):
        if exc.edited:
            return APIError(str(exc), param=interventions_param, code="non_finite_values")
        return APIError(str(exc), status=HTTPStatus.INTERNAL_SERVER_ERROR, code="non_finite_values")
    return None


async def sse_stream(chunks: AsyncIterator[dict]) -> AsyncIterator[str]:
    """The one SSE framing: ``data: {chunk}`` events; a failure becomes one error event; always ``[DONE]``.

    A disconnected client cancels the task (CancelledError is not caught here),
    which closes the chunk generators and with them the engine's stream.
    """
    delivery = CaptureDelivery()
    _delivery.set(delivery)  # the response's own task: the chunk generators below see it
    try:
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n"
                if chunk.get("activations"):  # it went out: the server asked for the next chunk
                    delivery.sent(chunk["activations"]["id"])
        except APIError as error:
            yield f"data: {json.dumps(error.body())}\n\n"
        except Exception as exc:  # every failure becomes one error event
            error = engine_error(exc)
            if error is None:
                logger.exception("a streamed response failed")
                error = internal_error(exc)
            yield f"data: {json.dumps(error.body())}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()  # the generators below now: their job stops at its next step
        delivery.remove_unsent()  # captures whose ids never went out (the client left first)


async def place_activations(chunks: AsyncIterator[dict], wait_for_capture: bool) -> AsyncIterator[dict]:
    """A stream's chunks with its captured ``activations`` on a chunk that has choices.

    ``chunks``: a stream's chunks, with a chunk without choices carrying ``activations`` where
    the capture became known (before every chunk in trace mode, after the finish in generate
    mode). It rides on the next chunk with choices, or on the finish chunk before it, which
    waits for it where ``wait_for_capture`` (a generate-mode capture also reads the final
    token: one step). A client's usual ``chunk.choices[0]`` thus never meets a chunk without
    choices it did not ask for (only ``stream_options.include_usage`` adds one, last, as
    OpenAI does). Should the stream fail, what is held goes out before the error: a capture
    written to disk always reaches the client."""
    held: dict | None = None  # the finish chunk, waiting for a generate-mode capture
    pending: dict | None = None  # a capture chunk, waiting for a chunk with choices
    try:
        async for chunk in chunks:
            if not chunk["choices"] and "activations" in chunk:
                if held is not None:
                    yield {**held, **_activations_of(chunk)}
                    held = None
                else:
                    pending = chunk
                continue
            if held is not None:
                yield held
                held = None
            if chunk["choices"] and pending is not None:
                chunk, pending = {**chunk, **_activations_of(pending)}, None
            if wait_for_capture and chunk["choices"] and chunk["choices"][0].get("finish_reason") is not None:
                held = chunk
            else:
                yield chunk
    except Exception:
        for known in (held, pending):
            if known is not None:
                yield known
        raise
    for known in (held, pending):
        if known is not None:
            yield known


def _activations_of(chunk: dict) -> dict:
    return {"activations": chunk["activations"], "ndif": chunk["ndif"]}


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


FEATURES = {
    "lda": "logit difference amplification (/v1/lda)",
    "structured_output": "structured output",
    "saes": "SAEs (/v1/saes, capture.saes, the sae_* interventions)",
    "logit_lens": "the logit lens (capture.logit_lens)",
    "attention": "attention patterns (capture.attention)",
    "patching": "patching sweeps (/v1/patching/sweep)",
    "attribution": "gradient attribution (/v1/attribution)",
}


def require_feature(engine: Engine, feature: str, param: str | None) -> None:
    """Refuse (400 naming ``param`` and the backend) a feature the engine's runtime does not run
    (``Engine.unsupported``; docs/scale_out.md lists them): never run on another runtime instead.

    Raises:
        APIError: ``unsupported_on_backend``."""
    if feature in engine.unsupported:
        raise APIError(
            f"{FEATURES[feature]} is not available on the {engine.backend} backend this server runs "
            "(docs/scale_out.md); use a server started with --backend hf",
            param=param,
            code="unsupported_on_backend",
        )


async def example_ids(engine: Engine, example: str | list[ChatMessage], param: str) -> list[int]:
    """The token ids of an example prompt: a string is tokenized as plain text; a message list is
    rendered with the chat template, ready for the assistant's reply.

    Raises:
        APIError: 400 naming ``param`` for an empty example or one past the context window."""
    if isinstance(example, str):
        ids = await engine.encode(example)
    else:
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in example
        ]
        ids = await engine.render_chat(messages)
    if not ids:
        raise APIError("an example must not be empty", param=param)
    if len(ids) > engine.context_length:
        raise APIError("the example is longer than the context window", param=param)
    return ids


async def aligned_example(
    engine: Engine, example, param: str, other: list[int], other_param: str
) -> list[int]:
    """``example``'s token ids (:func:`example_ids`), which must be as many as ``other``'s: a
    patch or a difference of values at one position needs the positions to line up.

    Raises:
        APIError: 400 naming ``param``."""
    ids = await example_ids(engine, example, param)
    if len(ids) != len(other):
        raise APIError(
            f"{param} has {len(ids)} tokens and {other_param} {len(other)}: the positions must line up "
            "(the same number of tokens)",
            param=param,
        )
    return ids


async def single_token(engine: Engine, spec: int | str, param: str) -> int:
    """A token id as a client names it: the id itself, or text that encodes to exactly one token.

    Raises:
        APIError: 400 naming ``param``."""
    if isinstance(spec, int):
        if spec >= engine.vocab_size:
            raise APIError(f"token id {spec} is past the vocabulary ({engine.vocab_size})", param=param)
        return spec
    ids = await engine.encode(spec, add_special_tokens=False)
    if len(ids) != 1:
        raise APIError(f"{spec!r} is {len(ids)} tokens, not one: send a token id, or other text", param=param)
    return ids[0]


async def checked_grammar(engine: Engine, request) -> str | None:
    """The request's structured-output grammar (``response_format`` or ``structured_outputs``),
    checked against the served tokenizer; None when it asks for none.

    Raises:
        APIError: naming the field whose constraint cannot be followed."""
    found = await engine.on_prompt_thread(request.grammar)  # a large schema takes a while
    if found is None:
        return None
    grammar, param = found
    require_feature(engine, "structured_output", param)
    try:
        await engine.check_grammar(grammar)
    except GrammarError as exc:
        raise APIError(f"{param}: this constraint cannot be followed: {exc}", param=param) from exc
    return grammar


async def generate(engine: Engine, job: GenerationJob) -> GenerationResult:
    """The engine's result for ``job``, counted toward the request's metrics; a failure of model
    or storage work becomes its OpenAI error."""
    try:
        result = await engine.generate(job)
    except ENGINE_FAILURES as exc:
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
        capture = item.capture if isinstance(item, GenerationResult) else item
        if isinstance(capture, CaptureResult):
            expect_delivery(capture)
        yield item


class CaptureDelivery:
    """The captures a streamed response received from the engine, until the chunk naming each
    has been sent: the SSE framing (``sse_stream``) marks each id sent once the chunk carrying it
    went out, and when the response ends (finished, failed, or its client gone) removes the
    captures never named to the client, on a thread. One per streamed response (a context
    variable of its task); the engine itself removes captures it never handed over."""

    def __init__(self) -> None:
        self.pending: dict[str, CaptureResult] = {}
        self.delivered: set[str] = set()

    def expect(self, capture: CaptureResult) -> None:
        if capture.id not in self.delivered:  # a trace capture comes again with the final result
            self.pending[capture.id] = capture

    # "Sent" is as far as the server can tell: the chunk was handed to the HTTP server, which
    # drops what it is handed once it noticed the client left. A capture can thus be kept whose
    # chunk was lost with the connection; it is never removed after its id went out.
    def sent(self, capture_id: str) -> None:
        self.pending.pop(capture_id, None)
        self.delivered.add(capture_id)

    def remove_unsent(self) -> None:
        if self.pending:
            lost = list(self.pending.values())
            self.pending.clear()
            asyncio.get_running_loop().run_in_executor(None, remove_captures, lost)


_delivery: ContextVar[CaptureDelivery | None] = ContextVar("capture_delivery", default=None)


def expect_delivery(capture: CaptureResult) -> None:
    """Note a capture whose id the streamed response being produced must still send."""
    delivery = _delivery.get()
    if delivery is not None:
        delivery.expect(capture)
