"""HTTP routes: parse, call the serving layer, pick JSON or SSE. Nothing else."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from .errors import APIError
from .protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    Health,
    ModelList,
)
from .serving import Serving

router = APIRouter()

_ERROR_RESPONSES = {
    code: {"description": "OpenAI error shape: {error: {message, type, param, code}}"}
    for code in (400, 404, 422, 500, 503)
}

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def serving(request: Request) -> Serving:
    return request.app.state.serving


@router.get("/health", response_model=Health)
async def health(request: Request) -> Health:
    return Health(model=serving(request).engine.model_id)


@router.get("/v1/models", response_model=ModelList)
async def list_models(request: Request) -> ModelList:
    return serving(request).models()


@router.get("/v1/model/structure", responses=_ERROR_RESPONSES)
async def model_structure(request: Request) -> dict:
    return request.app.state.structure


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=_ERROR_RESPONSES)
async def chat_completions(body: ChatCompletionRequest, request: Request):
    service = serving(request)
    job = service.prepare_chat(body)
    if body.stream:
        return StreamingResponse(
            service.chat_stream(body, job), media_type="text/event-stream", headers=_SSE_HEADERS
        )
    return await service.chat(body, job)


@router.post("/v1/completions", response_model=CompletionResponse, responses=_ERROR_RESPONSES)
async def completions(body: CompletionRequest, request: Request):
    service = serving(request)
    prompts = service.prepare_completion(body)
    if body.stream:
        return StreamingResponse(
            service.completion_stream(body, prompts), media_type="text/event-stream", headers=_SSE_HEADERS
        )
    return await service.completion(body, prompts)


__all__ = ["router", "APIError"]
