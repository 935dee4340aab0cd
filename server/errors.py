"""The one error shape every client sees, and the handlers that enforce it.

Every 4xx/5xx body is ``{"error": {"message", "type", "param", "code"}}`` as in
the OpenAI API. Code anywhere in the server raises :class:`APIError` (naming
``param`` when a field is to blame); FastAPI's validation and HTTP errors are
translated by the handlers installed with :func:`install_error_handlers`.

A failure nobody expected (:func:`internal_error`) is a 500 whose message names the
exception's class and message and the request id that names its traceback in the log.
The message first passes through the current request's :class:`Redactor` (set by the front
door): the API key and file paths outside the server's own folders never reach a client.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable
from contextvars import ContextVar
from http import HTTPStatus
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .logs import request_id
from .storage import (
    DamagedActivation,
    DamagedPreset,
    DamagedVector,
    UnknownActivation,
    UnknownPreset,
    UnknownVector,
)

logger = logging.getLogger(__name__)


class APIError(Exception):
    """An error for the client, carried up to the HTTP layer unchanged."""

    def __init__(
        self,
        message: str,
        *,
        status: int = HTTPStatus.BAD_REQUEST,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        message, param = _printable(message), None if param is None else _printable(param)
        super().__init__(message)
        self.headers = headers
        self.message = message
        self.status = int(status)
        self.type = type or _default_type(self.status)
        self.param = param
        self.code = code

    def body(self) -> dict:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _printable(text: str) -> str:
    """``text`` as valid Unicode: a lone surrogate a client sent (and a message quotes) becomes
    its escape, ``\\ud800``, so the error can always be encoded as UTF-8 JSON."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _default_type(status: int) -> str:
    if status == HTTPStatus.UNAUTHORIZED:
        return "authentication_error"
    if status == HTTPStatus.NOT_FOUND:
        return "not_found_error"
    if status == HTTPStatus.TOO_MANY_REQUESTS:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


# Absolute POSIX paths (or ~/...) inside a message: a quoted one whole (spaces and all), a bare
# one from a slash that no word character, dot, dash or slash precedes, up to a space, quote,
# bracket or separator. '//' starts no path, so URLs stay as they are.
_QUOTED_PATH = re.compile(r"""(?P<quote>['"])(?P<path>~?/(?!/)[^'"\n]*)(?P=quote)""")
_BARE_PATH = re.compile(r"""(?<![\w.~/-])(?P<path>~?/(?!/)[^\s'"`()\[\]{}<>,;]+)""")
REDACTED_PATH = "<path>"
REDACTED_SECRET = "<redacted>"


class Redactor:
    """Takes what a client must not see out of an error message: ``secrets`` (the API key) and
    absolute file paths outside ``roots`` (the activation and vector stores), which become
    ``<path>``; paths inside a root are kept, since the client named them."""

    def __init__(self, secrets: Iterable[str | None] = (), roots: Iterable[Path] = ()) -> None:
        self.secrets = sorted({s for s in secrets if s}, key=len, reverse=True)
        self.roots = [Path(os.path.realpath(root)) for root in roots]

    def _inside(self, text: str) -> bool:
        resolved = Path(os.path.realpath(os.path.expanduser(text)))
        return any(resolved == root or resolved.is_relative_to(root) for root in self.roots)

    def __call__(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, REDACTED_SECRET)
        text = _QUOTED_PATH.sub(
            lambda m: m[0] if self._inside(m["path"]) else f"{m['quote']}{REDACTED_PATH}{m['quote']}", text
        )
        return _BARE_PATH.sub(lambda m: m[0] if self._inside(m["path"]) else REDACTED_PATH, text)


# The current request's redactor (the front door sets it); outside a request every path goes.
current_redactor: ContextVar[Redactor | None] = ContextVar("nnsight_server_redactor", default=None)

MAX_INTERNAL_MESSAGE = 500  # characters of the exception's message a client sees


def unauthorized(reason: str) -> APIError:
    return APIError(
        f"{reason}: send this server's API key as `Authorization: Bearer <key>`.",
        status=HTTPStatus.UNAUTHORIZED,
        code="invalid_api_key",
        headers={"WWW-Authenticate": "Bearer"},
    )


def body_too_large(limit: int) -> APIError:
    return APIError(
        f"the request body is larger than this server's limit of {limit} bytes (--max-body-size)",
        status=HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
        code="request_too_large",
    )


def internal_error(exc: BaseException) -> APIError:
    """What a client sees of a failure nobody expected: the exception's class and message (with
    secrets and outside paths removed) and the request id under which the log has the traceback."""
    detail = (current_redactor.get() or Redactor())(str(exc).strip())
    if len(detail) > MAX_INTERNAL_MESSAGE:
        detail = detail[:MAX_INTERNAL_MESSAGE] + "..."
    what = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
    return APIError(
        f"internal error: {what} (request id {request_id.get()}; the server log has the traceback)",
        status=HTTPStatus.INTERNAL_SERVER_ERROR,
        code="internal_error",
    )


def error_body(message: str, *, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# pydantic names the branch of a union it tried in the location ("str", "list[TextContentPart]",
# "function-after[...]"); those are not field names, and the parameter ends before them.
# A union branch's or a constrained type's tag in a location ("str", "constrained-str",
# "list[...]", "function-after[...]"): where the field's own name ends.
_UNION_BRANCH = re.compile(r"^(constrained-)?(str|int|float|bool|none|bytes)$|\[")


def _param_from_location(loc: tuple) -> str | None:
    """('body', 'messages', 0, 'role') -> 'messages[0].role'."""
    out = ""
    for part in loc:
        if part in ("body", "query", "path") and not out:
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        elif _UNION_BRANCH.search(str(part)):
            break
        else:
            out += f".{part}" if out else str(part)
    return out or None


def validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    if not errors:
        return APIError("invalid request", code="invalid_value")
    if errors[0].get("type") == "json_invalid":
        return APIError(f"request body is not valid JSON: {errors[0].get('msg')}", code="invalid_json")
    param = _param_from_location(tuple(errors[0].get("loc", ())))
    # A union reports one error per branch; the deepest one says most about what was wrong.
    same_param = [e for e in errors if _param_from_location(tuple(e.get("loc", ()))) == param]
    # A branch of the right type whose value is wrong ("too short") says more than "not a str".
    right_type = [e for e in same_param if not str(e.get("type", "")).endswith("_type")]
    first = max(right_type or same_param, key=lambda e: len(e.get("loc", ())))
    message = first.get("msg", "invalid request")
    if param:
        message = f"{param}: {message}"
    others = len(errors) - len(same_param)
    if others:
        message += f" (and {others} more error(s))"
    return APIError(message, param=param, code="invalid_value")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        level = logging.WARNING if exc.status >= 500 else logging.INFO
        logger.log(level, "rejected request: %s %s", exc.status, exc.message)
        return exc.response()

    @app.exception_handler(UnknownActivation)
    async def _unknown_activation(_: Request, exc: UnknownActivation) -> JSONResponse:
        return APIError(
            f"no stored activations named {exc.args[0]!r}", status=HTTPStatus.NOT_FOUND, code="not_found"
        ).response()

    @app.exception_handler(DamagedActivation)
    @app.exception_handler(DamagedVector)
    @app.exception_handler(DamagedPreset)
    async def _damaged(_: Request, exc: Exception) -> JSONResponse:
        # A file under a root that the store did not write as it is (a symlink, a manifest naming
        # another path, unreadable JSON): refused, never followed; the store logged it.
        return APIError(
            f"the stored entry {exc.args[0]!s} is damaged (not as this server wrote it); refused",
            status=HTTPStatus.NOT_FOUND,
            code="damaged_entry",
        ).response()

    @app.exception_handler(UnknownVector)
    async def _unknown_vector(_: Request, exc: UnknownVector) -> JSONResponse:
        return APIError(
            f"no stored vector named {exc.args[0]!r}",
            status=HTTPStatus.NOT_FOUND,
            param="name",
            code="not_found",
        ).response()

    @app.exception_handler(UnknownPreset)
    async def _unknown_preset(_: Request, exc: UnknownPreset) -> JSONResponse:
        return APIError(
            f"no preset named {exc.args[0]!r}", status=HTTPStatus.NOT_FOUND, param="name", code="not_found"
        ).response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        error = validation_error(exc)
        logger.info("rejected request: %s %s", error.status, error.message)
        return error.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == HTTPStatus.REQUEST_ENTITY_TOO_LARGE:  # raised by the front door's receive
            return body_too_large(request.app.state.settings.max_body_size).response()
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        return APIError(detail, status=exc.status_code).response()

    # No handler for Exception: Starlette would answer it in its outermost middleware and then
    # re-raise, and the server would close the connection. It reaches the front door instead
    # (server.middleware), which logs it under the request id and answers the 500.
