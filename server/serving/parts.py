"""The parts every endpoint family is composed of, built once per app.

:class:`ServingParts` holds the engine, the settings, the stores, and the three small
parts of ``serving``: :class:`~server.serving.admission.Admission` (limits),
:class:`~server.serving.capture_planning.CapturePlanning` (capture blocks and the
server-wide capture settings) and
:class:`~server.serving.interventions.InterventionResolver`. ``create_app`` builds it
once; each endpoint family (chat, completions, LDA, vectors) takes what it needs from it,
so all of them share one set of settings and one server-wide capture configuration.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import Settings
from ..engine.engine import Engine
from ..storage import ActivationStore, PresetStore, VectorStore
from .admission import Admission
from .capture_planning import CapturePlanning, ServerCapture
from .interventions import InterventionResolver


@dataclass(frozen=True)
class ServingParts:
    engine: Engine
    settings: Settings
    store: ActivationStore
    vectors: VectorStore
    presets: PresetStore
    admission: Admission
    captures: CapturePlanning
    interventions: InterventionResolver

    @classmethod
    def build(
        cls,
        engine: Engine,
        settings: Settings,
        store: ActivationStore,
        vectors: VectorStore,
        presets: PresetStore,
        server_capture: ServerCapture | None = None,
    ) -> ServingParts:
        return cls(
            engine=engine,
            settings=settings,
            store=store,
            vectors=vectors,
            presets=presets,
            admission=Admission(engine, settings),
            captures=CapturePlanning(engine, store, server_capture or ServerCapture()),
            interventions=InterventionResolver(engine, vectors, store, presets),
        )
