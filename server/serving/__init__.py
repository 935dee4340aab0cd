"""The serving layer: OpenAI requests in, engine jobs out, OpenAI responses back.

One module per endpoint family (``chat``, ``completions``, ``lda``, ``vectors``,
``tokens``, ``saes``, ``patching``, ``attribution``), each
composed from small parts rather than a shared base class:

* ``admission``: the limits a request is refused by before any model work (model name,
  token budget, prompt characters, queue room, memory budget, capture size);
* ``capture_planning``: a ``capture`` block (or the server-wide capture settings, set
  through ``/v1/interventions``) -> the engine's capture plan and spec -> ``activations``;
* ``interventions``: ``interventions`` and ``presets`` -> edits on resolved hook points.

``parts.ServingParts`` holds them, built once per app. ``base`` holds the shared
functions: engine calls with errors in OpenAI shape, and the one SSE framing. Routes stay
thin: they only choose JSON or SSE.
"""

from .admission import Admission
from .attribution import AttributionServing
from .base import sse_stream
from .capture_planning import CapturePlanning, ServerCapture
from .chat import ChatServing
from .completions import CompletionServing
from .interventions import InterventionResolver
from .lda import LdaServing
from .parts import ServingParts
from .patching import PatchingServing
from .saes import SaeServing
from .tokens import TokenServing
from .vectors import VectorServing

__all__ = [
    "Admission",
    "AttributionServing",
    "CapturePlanning",
    "ChatServing",
    "CompletionServing",
    "InterventionResolver",
    "LdaServing",
    "ServerCapture",
    "PatchingServing",
    "SaeServing",
    "ServingParts",
    "TokenServing",
    "VectorServing",
    "sse_stream",
]
