"""The front door every HTTP request passes first: request id, API key, access log, request metrics.

* **Request id**: a client's ``X-Request-ID`` is kept when it is a plain token (letters,
  digits, ``._:-``, at most 128), otherwise one is made (``req-<hex>``); either way it
  is sent back in the ``X-Request-ID`` response header and names the request in the log.
* **API key** (``--api-key``): every path but ``/health``, ``/`` and the playground's
  static files (``/ui``, no data in them) needs ``Authorization: Bearer
  <key>`` (what the ``openai`` client sends); otherwise a 401 in the OpenAI error shape.
  Keys are compared in constant time, as SHA-256 digests (so not even their lengths
  leak), and never logged.
* **Body size** (``--max-body-size``): a declared ``Content-Length`` above the limit is
  refused with a 413 in the OpenAI shape before a byte is read; a body sent without one
  (chunked) is cut off as it arrives, the moment it passes the limit (an HTTPException
  from ``receive``, which FastAPI passes on to the error handlers unchanged).
* **Access log**: one line per request as it ends, on the ``server.access`` logger
  (``/health`` and ``/metrics`` at DEBUG: pollers would drown the rest). The request id
  is set in :data:`server.logs.request_id` for the whole request, so every line logged
  about it (refusals, the engine's worker) carries it too.
* **Unexpected failures**: an exception no handler turned into a response is logged with
  its traceback and answered here with a 500 (:func:`~server.errors.internal_error`: the
  exception's message without secrets, and the request id); the connection stays usable.
  A failure after the response has started cannot be answered: the response is left
  unfinished, and the server closes the connection.
* **Metrics**: the same facts go to :class:`~server.metrics.Metrics`.

Serving code adds tokens and the first token's time to the current request's
:class:`RequestRecord` through :func:`note_tokens` and :func:`note_first_token`; the
record travels in a context variable, which tasks and threads started for the request
inherit.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import uuid
from collections.abc import Sequence
from contextvars import ContextVar
from http import HTTPStatus

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import APIError, Redactor, body_too_large, current_redactor, internal_error, unauthorized
from .logs import request_id as log_request_id
from .metrics import Metrics, RequestRecord
from .playground import is_playground_path

logger = logging.getLogger(__name__)
access_log = logging.getLogger("server.access")

OPEN_PATHS = frozenset({"/health", "/"})  # "/" only redirects to the playground
QUIET_PATHS = frozenset({"/health", "/metrics"})
_CLIENT_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


_current: ContextVar[RequestRecord | None] = ContextVar("nnsight_server_request", default=None)


def note_tokens(prompt_tokens: int, completion_tokens: int) -> None:
    """Count a finished generation's tokens toward the current request (if any)."""
    record = _current.get()
    if record is not None:
        record.prompt_tokens += prompt_tokens
        record.completion_tokens += completion_tokens


def note_first_token(at: float | None) -> None:
    """The earliest first-token time of the current request's jobs (``time.monotonic()``)."""
    record = _current.get()
    if (
        record is not None
        and at is not None
        and (record.first_token_at is None or at < record.first_token_at)
    ):
        record.first_token_at = at


def request_id(given: str | None) -> str:
    if given and _CLIENT_REQUEST_ID.fullmatch(given):
        return given
    return f"req-{uuid.uuid4().hex[:24]}"


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def is_open(path: str) -> bool:
    """Whether ``path`` is served without the API key."""
    return path in OPEN_PATHS or is_playground_path(path)


class FrontDoor:
    """Pure ASGI middleware (no response buffering: streams pass through untouched)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        api_key: str | None,
        max_body_size: int,
        metrics: Metrics,
        routes: Sequence[BaseRoute] = (),
        redactor: Redactor | None = None,
    ) -> None:
        self.app = app
        self.redactor = redactor or Redactor(secrets=[api_key])
        self.routes = routes  # to name the endpoint of a request refused before routing
        self._key_digest = None if api_key is None else _digest(api_key)
        self.max_body_size = max_body_size
        self.metrics = metrics

    def _refusal(self, scope: Scope, headers: Headers) -> APIError | None:
        if self._key_digest is not None and not is_open(scope["path"]):
            scheme, _, given = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not given.strip():
                return unauthorized("missing API key")
            if not hmac.compare_digest(_digest(given.strip()), self._key_digest):
                return unauthorized("incorrect API key")
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_size:
            return body_too_large(self.max_body_size)
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":  # no websocket routes; none gets past the key either
            if self._refusal(scope, Headers(scope=scope)) is not None:
                await send({"type": "websocket.close", "code": 1008})
                return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        # The path as sent (percent-encoded, so a log line cannot be forged with an encoded newline).
        path = scope.get("raw_path", b"").decode("latin-1").partition("?")[0] or scope["path"]
        record = RequestRecord(request_id(headers.get("x-request-id")), scope["method"], path)

        received = 0

        async def receive_within_limit() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_size:
                    raise HTTPException(HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
            return message

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                record.status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", record.id.encode())]
            await send(message)

        tokens = (_current.set(record), log_request_id.set(record.id), current_redactor.set(self.redactor))
        self.metrics.in_progress.inc()
        try:
            refusal = self._refusal(scope, headers)
            if refusal is not None:
                await refusal.response()(scope, receive, send_with_id)
            else:
                await self.app(scope, receive_within_limit, send_with_id)
        except Exception as exc:
            logger.exception("unexpected error in %s %s", record.method, record.path)
            if record.status is None:
                await internal_error(exc).response()(scope, receive, send_with_id)
            # else: a response under way cannot be completed; returning without finishing it makes
            # the server close the connection (logged once, here, with the request id).
        except BaseException:  # cancelled: nothing more can be sent
            if record.status is None:
                record.status = HTTPStatus.INTERNAL_SERVER_ERROR
            raise
        finally:
            self.metrics.in_progress.dec()
            self._finish(record, scope)
            for var, token in zip((_current, log_request_id, current_redactor), tokens, strict=True):
                var.reset(token)

    def _endpoint(self, scope: Scope) -> str:
        """The route template the request matched, also for one refused before routing (401, 413)."""
        route = scope.get("route")
        if route is None:
            route = next((r for r in self.routes if r.matches(scope)[0] == Match.FULL), None)
        return getattr(route, "path", None) or "unmatched"

    def _finish(self, record: RequestRecord, scope: Scope) -> None:
        endpoint = self._endpoint(scope)
        duration = record.elapsed()
        self.metrics.observe(record, endpoint, duration)
        level = logging.DEBUG if scope["path"] in QUIET_PATHS else logging.INFO
        if access_log.isEnabledFor(level):
            client = scope.get("client")
            access_log.log(
                level,
                "%s %s %s client=%s prompt_tokens=%d completion_tokens=%d duration=%.3fs",
                record.method,
                record.path,
                record.status,
                f"{client[0]}:{client[1]}" if client else "-",
                record.prompt_tokens,
                record.completion_tokens,
                duration,
            )
