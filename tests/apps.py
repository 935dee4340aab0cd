"""An app serving a model folder in process, for tests that need a server of their own.

``app_client(model_dir, work, **settings)`` is a ``TestClient`` over ``create_app`` with the
activation and vector stores under ``work``; use it as a context manager (the lifespan loads
the model on enter and stops the engine on exit).
"""

from __future__ import annotations

from pathlib import Path


def app_client(model_dir: Path, work: Path, **settings):
    from fastapi.testclient import TestClient

    from server.app import create_app
    from server.config import Settings

    config = Settings(
        model=str(model_dir), activations_dir=work / "activations", vectors_dir=work / "vectors", **settings
    )
    return TestClient(create_app(config))
