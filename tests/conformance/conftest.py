"""Fixtures shared by the conformance modules: each module defines ``loaded`` (the served model
of its parametrized case) and ``TEXTS``; these build the engine's decode loop, the hook-point
resolver and the tokenized prompts on top of it."""

from __future__ import annotations

import pytest

from server.engine.hf_runtime import decode_loop
from server.engine.hooks import HookResolver
from server.engine.structure import find_layers


@pytest.fixture(scope="module")
def loop(loaded):
    return decode_loop(loaded)


@pytest.fixture(scope="module")
def resolver(loaded) -> HookResolver:
    return HookResolver(loaded.hf_model, find_layers(loaded.hf_model))


@pytest.fixture(scope="module")
def prompts(loaded, request) -> list[list[int]]:
    """The module's ``TEXTS``, tokenized by the served model's tokenizer."""
    return [loaded.tokenizer.encode(text) for text in request.module.TEXTS]
