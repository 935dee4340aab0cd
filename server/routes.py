"""HTTP routes: parse, call the serving layer, pick JSON or SSE. Nothing else."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import APIRouter, Request, Response
from fastapi.responses import RedirectResponse, StreamingResponse

from .protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ContrastiveCreate,
    DetokenizeRequest,
    DetokenizeResponse,
    Health,
    ModelCard,
    ModelList,
    PresetCreate,
    SaeLoad,
    ServerCaptureConfig,
    ServerCaptureResponse,
    TokenizeRequest,
    TokenizeResponse,
    VectorCreate,
)
from .protocol_analysis import AttributionRequest, PatchingSweepRequest
from .protocol_lda import (
    GenerateLdaBatchRequest,
    GenerateLdaBatchResponse,
    GenerateLdaRequest,
    GenerateLdaResponse,
    LdaRequest,
    LdaResponse,
)
from .responses import ClosingStreamingResponse, file_response
from .serving import sse_stream

logger = logging.getLogger(__name__)

router = APIRouter()

T = TypeVar("T")

_ERROR_RESPONSES = {
    code: {"description": "OpenAI error shape: {error: {message, type, param, code}}"}
    for code in (400, 404, 405, 500, 503)
}

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

CLIENT_CLOSED_REQUEST = 499  # nginx's code; the client never sees it


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T | Response:
    """Await ``work``, cancelling it if the client hangs up first (its job then stops at the next token).

    Streams need no such help: Starlette cancels a streaming response whose client left.
    """
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    logger.info("client disconnected from %s; request cancelled", request.url.path)
    return Response(status_code=CLIENT_CLOSED_REQUEST)


def _sse(chunks) -> StreamingResponse:
    return ClosingStreamingResponse(sse_stream(chunks), media_type="text/event-stream", headers=_SSE_HEADERS)


@router.get("/", include_in_schema=False)
async def root() -> RedirectResponse:
    """The bare address opens the playground (a relative redirect: it works through a tunnel)."""
    return RedirectResponse("ui/", status_code=307)


@router.get("/health", response_model=Health)
async def health(request: Request) -> Health:
    return Health(model=request.app.state.engine.model_id)


@router.get("/metrics", include_in_schema=False)
def metrics(request: Request) -> Response:  # a plain def: collectors run in the thread pool
    body, content_type = request.app.state.metrics.render()
    return Response(body, media_type=content_type)


@router.get("/v1/models", response_model=ModelList)
async def list_models(request: Request) -> ModelList:
    return request.app.state.chat.models()


@router.get("/v1/models/{model:path}", response_model=ModelCard, responses=_ERROR_RESPONSES)
async def retrieve_model(model: str, request: Request) -> ModelCard:
    return request.app.state.tokens.model(model)


@router.post("/tokenize", response_model=TokenizeResponse, responses=_ERROR_RESPONSES)
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    return await request.app.state.tokens.tokenize(body)


@router.post("/detokenize", response_model=DetokenizeResponse, responses=_ERROR_RESPONSES)
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    return await request.app.state.tokens.detokenize(body)


@router.get("/v1/model/structure")
async def model_structure(request: Request) -> dict:
    return request.app.state.structure


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=_ERROR_RESPONSES)
async def chat_completions(body: ChatCompletionRequest, request: Request):
    chat = request.app.state.chat
    prepared = await chat.prepare(body)
    if body.stream:
        return _sse(chat.chunks(prepared))
    return await cancel_on_disconnect(request, chat.respond(prepared))


@router.post("/v1/completions", response_model=CompletionResponse, responses=_ERROR_RESPONSES)
async def completions(body: CompletionRequest, request: Request):
    service = request.app.state.completions
    prepared = await service.prepare(body)
    if body.stream:
        return _sse(service.chunks(prepared))
    return await cancel_on_disconnect(request, service.respond(prepared))


@router.post("/v1/lda", response_model=LdaResponse, responses=_ERROR_RESPONSES)
async def lda(body: LdaRequest, request: Request):
    return await cancel_on_disconnect(request, request.app.state.lda.lda(body))


@router.post("/generate_lda", response_model=GenerateLdaResponse, responses=_ERROR_RESPONSES)
async def generate_lda(body: GenerateLdaRequest, request: Request):
    return await cancel_on_disconnect(request, request.app.state.lda.generate_one(body))


@router.post("/generate_lda_batch", response_model=GenerateLdaBatchResponse, responses=_ERROR_RESPONSES)
async def generate_lda_batch(body: GenerateLdaBatchRequest, request: Request):
    return await cancel_on_disconnect(request, request.app.state.lda.generate_batch(body))


@router.post("/v1/interventions/presets", responses=_ERROR_RESPONSES)
async def create_preset(body: PresetCreate, request: Request) -> dict:
    return await request.app.state.vectors.create_preset(body)


@router.get("/v1/interventions/presets")
async def list_presets(request: Request) -> dict:
    return await asyncio.to_thread(request.app.state.vectors.preset_listing)


@router.get("/v1/interventions/presets/{name}", responses=_ERROR_RESPONSES)
async def read_preset(name: str, request: Request) -> dict:
    return await asyncio.to_thread(request.app.state.vectors.presets.get, name)


@router.delete("/v1/interventions/presets/{name}", responses=_ERROR_RESPONSES)
async def delete_preset(name: str, request: Request) -> dict:
    await asyncio.to_thread(request.app.state.vectors.presets.delete, name)
    return {"name": name, "deleted": True}


@router.get("/v1/interventions", response_model=ServerCaptureResponse)
async def get_server_capture(request: Request) -> ServerCaptureResponse:
    return ServerCaptureResponse(config=request.app.state.chat.captures.server_capture.config)


@router.post("/v1/interventions", response_model=ServerCaptureResponse, responses=_ERROR_RESPONSES)
async def set_server_capture(body: ServerCaptureConfig, request: Request) -> ServerCaptureResponse:
    return ServerCaptureResponse(config=request.app.state.chat.captures.configure_server_capture(body))


@router.get("/v1/activations/{activation_id}", responses=_ERROR_RESPONSES)
async def activation_manifest(activation_id: str, request: Request) -> dict:
    return await asyncio.to_thread(_store(request).manifest, activation_id)


@router.get("/v1/activations/{activation_id}/{name}", responses=_ERROR_RESPONSES)
async def activation_tensor(activation_id: str, name: str, request: Request) -> Response:
    """The tensor's file (or one byte range of it), opened before the response starts."""
    handle, file = await asyncio.to_thread(_store(request).open_tensor, activation_id, name)
    return file_response(handle, file, request.headers.get("range"), request.headers.get("if-range"))


@router.delete("/v1/activations/{activation_id}", responses=_ERROR_RESPONSES)
async def delete_activation(activation_id: str, request: Request) -> dict:
    await asyncio.to_thread(_store(request).delete, activation_id)
    return {"id": activation_id, "deleted": True}


def _store(request: Request):
    return request.app.state.store


@router.post("/v1/vectors", responses=_ERROR_RESPONSES)
async def create_vector(body: VectorCreate, request: Request) -> dict:
    return await request.app.state.vectors.register(body)


@router.post("/v1/vectors/contrastive", responses=_ERROR_RESPONSES)
async def create_contrastive_vectors(body: ContrastiveCreate, request: Request) -> dict:
    return await request.app.state.vectors.contrastive(body)


@router.get("/v1/vectors")
async def list_vectors(request: Request) -> dict:
    return await asyncio.to_thread(request.app.state.vectors.listing)


@router.get("/v1/vectors/{name}", responses=_ERROR_RESPONSES)
async def read_vector(name: str, request: Request) -> dict:
    return await asyncio.to_thread(request.app.state.vectors.read, name)


@router.delete("/v1/vectors/{name}", responses=_ERROR_RESPONSES)
async def delete_vector(name: str, request: Request) -> dict:
    return await asyncio.to_thread(request.app.state.vectors.delete, name)


@router.get("/v1/saes")
async def list_saes(request: Request) -> dict:
    return request.app.state.saes.listing()


@router.post("/v1/saes", responses=_ERROR_RESPONSES)
async def load_sae(body: SaeLoad, request: Request) -> dict:
    return await request.app.state.saes.load(body)


@router.get("/v1/saes/{name}", responses=_ERROR_RESPONSES)
async def read_sae(name: str, request: Request) -> dict:
    return request.app.state.saes.describe(name)


@router.delete("/v1/saes/{name}", responses=_ERROR_RESPONSES)
async def unload_sae(name: str, request: Request) -> dict:
    return await request.app.state.saes.unload(name)


@router.post("/v1/patching/sweep", responses=_ERROR_RESPONSES)
async def patching_sweep(body: PatchingSweepRequest, request: Request):
    return await cancel_on_disconnect(request, request.app.state.patching.sweep(body))


@router.post("/v1/attribution", responses=_ERROR_RESPONSES)
async def attribution(body: AttributionRequest, request: Request):
    return await cancel_on_disconnect(request, request.app.state.attribution.attribute(body))
