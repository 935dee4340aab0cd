"""The FastAPI application: ``create_app(settings)`` is the one way to build it.

The engine (and with it the model) is built in the lifespan and kept on
``app.state``, never in a module global, so tests can build apps side by side.
Loading runs in a thread; the event loop stays free.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI

from .config import Settings
from .engine.engine import Engine
from .engine.memory import format_size
from .errors import Redactor, install_error_handlers
from .metrics import Metrics
from .middleware import FrontDoor
from .playground import MOUNT_PATH, PlaygroundFiles
from .routes import router
from .serving import (
    AttributionServing,
    ChatServing,
    CompletionServing,
    LdaServing,
    PatchingServing,
    SaeServing,
    ServerCapture,
    ServingParts,
    TokenServing,
    VectorServing,
)
from .storage import ActivationStore, PresetStore, VectorStore

logger = logging.getLogger(__name__)


def create_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine = await asyncio.to_thread(Engine.from_settings, settings)
        app.state.engine = engine
        store = ActivationStore(settings.activations_dir, max_capture_bytes=settings.max_capture_bytes)
        app.state.store = store
        metrics.watch(engine, store)
        server_capture = ServerCapture()
        vectors = VectorStore(settings.vectors_dir)
        presets = PresetStore(settings.vectors_dir / "presets")
        parts = ServingParts.build(engine, settings, store, vectors, presets, server_capture)
        app.state.chat = ChatServing(parts)
        app.state.tokens = TokenServing(parts, app.state.chat.models)
        app.state.completions = CompletionServing(parts)
        app.state.vectors = VectorServing(parts)
        app.state.lda = LdaServing(parts)
        app.state.saes = SaeServing(parts)
        app.state.patching = PatchingServing(parts)
        app.state.attribution = AttributionServing(parts)
        app.state.structure = engine.structure()  # static: computed once
        logger.info("serving %s on %s", engine.model_id, engine.loaded.device)
        budget = settings.memory_budget
        if budget is not None and engine.resident_weight_bytes >= budget:
            logger.warning(
                "the weights alone (%s) exceed --memory-budget (%s): every request will be refused",
                format_size(engine.resident_weight_bytes),
                format_size(budget),
            )
        try:
            yield
        finally:
            # Shutdown: uvicorn has given running requests --shutdown-timeout to finish and
            # cancelled the rest (their jobs stop at the next token, captures removed); the
            # worker gets as long again (at least 5 s) to get there.
            await asyncio.to_thread(engine.close, max(settings.shutdown_timeout, 5.0))
            for opened in (store, vectors, presets):  # their root folder handles
                opened.close()
            logger.info("engine stopped")

    metrics = Metrics()
    app = FastAPI(
        title="nnsight-server",
        summary="OpenAI-compatible serving of one nnsight-wrapped model for interpretability research",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    api_key = settings.api_key.get_secret_value() if settings.api_key else None
    app.add_middleware(
        FrontDoor,
        api_key=api_key,
        max_body_size=settings.max_body_size,
        metrics=metrics,
        routes=router.routes,
        redactor=Redactor(
            secrets=[api_key], roots=[settings.activations_dir, settings.vectors_dir, settings.saes_dir]
        ),
    )
    install_error_handlers(app)
    app.include_router(router)
    app.mount(MOUNT_PATH, PlaygroundFiles(), name="playground")
    return app
