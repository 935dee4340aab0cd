"""Shared fixtures: seeded RNGs, a tiny random chat model, and an app serving it."""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import pytest
import torch

# Tests never reach a model hub; fail fast instead of retrying against a network there isn't.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

from tiny_model import build_tiny_model  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def reference_model(tiny_model_dir):
    """An independent copy of the tiny model, loaded the plain HF way, for reference outputs."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


@pytest.fixture(scope="module")
def activations_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("activations")


@pytest.fixture(scope="module")
def settings(tiny_model_dir, activations_dir):
    from server.config import Settings

    return Settings(
        model=str(tiny_model_dir),
        max_tokens_cap=64,
        max_n=4,
        activations_dir=activations_dir,
        vectors_dir=activations_dir.parent / f"{activations_dir.name}-vectors",
    )


@pytest.fixture(scope="module")
def client(settings):
    from fastapi.testclient import TestClient

    from server.app import create_app

    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def openai_client(client):
    """The official openai client, talking to the in-process app through the TestClient."""
    import openai

    return openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client, max_retries=0)


@pytest.fixture(scope="module")
def served_model(client) -> str:
    return client.get("/v1/models").json()["data"][0]["id"]
