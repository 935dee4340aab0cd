"""Declarative interventions: what to change in the model's values, as data, never as code.

A client names where (a hook point), when (positions) and what (an operation with its
vector or numbers); the server resolves that into :class:`Edit` objects and applies them
through nnsight while the request runs (``server/engine/edits.py``). Nothing persists
past the request: the edits live in the request's own trace.

This package holds the operations themselves, as small pure functions over a
``[..., d]`` tensor; issue 4 adds the vector store, contrastive vectors and presets.
"""

from .ops import OPERATIONS, apply_operation

__all__ = ["OPERATIONS", "apply_operation"]
