"""The one error shape every client sees, and the handlers that enforce it.

Every 4xx/5xx body is ``{"error": {"message", "type", "param", "code"}}`` as in
the OpenAI API. Code anywhere in the server raises :class:`APIError` (naming
``param`` when a field is to blame); FastAPI's validation and HTTP errors are
translated by the handlers installed with :func:`install_error_handlers`.
"""

from __future__ import annotations

import json
import logging
import re
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .storage import UnknownActivation, UnknownPreset, UnknownVector

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


def internal_error(exc: BaseException) -> APIError:
    """What a client sees of a failure nobody expected (the traceback goes to the log)."""
    return APIError(f"internal error: {type(exc).__name__}", status=HTTPStatus.INTERNAL_SERVER_ERROR)


def error_body(message: str, *, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# pydantic names the branch of a union it tried in the location ("str", "list[TextContentPart]",
# "function-after[...]"); those are not field names, and the parameter ends before them.
_UNION_BRANCH = re.compile(r"^(str|int|float|bool|none|bytes)$|\[")


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
    first = max(same_param, key=lambda e: len(e.get("loc", ())))
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
        return exc.response()

    @app.exception_handler(UnknownActivation)
    async def _unknown_activation(_: Request, exc: UnknownActivation) -> JSONResponse:
        return APIError(
            f"no stored activations named {exc.args[0]!r}", status=HTTPStatus.NOT_FOUND, code="not_found"
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
        logger.info("rejected request: %s", error.message)
        return error.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == HTTPStatus.REQUEST_ENTITY_TOO_LARGE:  # raised by the front door's receive
            from .middleware import body_too_large

            return body_too_large(request.app.state.settings.max_body_size).response()
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        return APIError(detail, status=exc.status_code).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Starlette re-raises after this handler and the server logs the traceback
        # ("Exception in ASGI application"); logging it here too would print it twice.
        return internal_error(exc).response()
