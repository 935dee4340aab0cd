"""Stopping a forward pass between two layers once nobody wants its result.

The decode loop checks cancellation between steps; one step can still be long: a 7,000-token
prompt's forward pass (a trace capture, echo scoring, a contrastive example) takes tens of
seconds on a CPU. A :class:`LayerGate` puts a forward pre-hook on every decoder layer that
raises :class:`JobInterrupted` when the running forward's ``stop`` says so (every job in
it was cancelled or timed out), so such a request stops within one layer's time. The hook
costs one Python call and an Event check per layer per forward (about a microsecond); with no
``stop`` set it returns at once. Only the engine's worker thread runs forwards, so one slot
holds the current ``stop``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch


class JobInterrupted(Exception):
    """Work stopped part-way (between layers of a forward pass, or between files of a capture)
    because every job it was for was cancelled or timed out."""


class LayerGate:
    """Pre-hooks on ``layers`` that end the running forward once ``stop()`` is true."""

    def __init__(self, layers: Iterable[torch.nn.Module]) -> None:
        self._stop: Callable[[], bool] | None = None
        self._handles = [layer.register_forward_pre_hook(self._check) for layer in layers]

    def _check(self, module: torch.nn.Module, args) -> None:
        if self._stop is not None and self._stop():
            raise JobInterrupted

    @contextmanager
    def watching(self, stop: Callable[[], bool]) -> Iterator[None]:
        """Forwards run inside the block end (JobInterrupted) once ``stop()`` is true."""
        previous, self._stop = self._stop, stop
        try:
            yield
        finally:
            self._stop = previous

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
