"""The serving layer: OpenAI requests in, engine jobs out, OpenAI responses back.

One module per endpoint family (``chat``, ``completions``, ``lda``, ``vectors``) over a shared base
(``base``) that owns what they have in common: the model-name check, the
token budget, engine calls with errors in OpenAI shape, and the one SSE
framing. Routes stay thin: they only choose JSON or SSE.
"""

from .base import ServerCapture, Serving, sse_stream
from .chat import ChatServing
from .completions import CompletionServing
from .lda import LdaServing

__all__ = ["ChatServing", "CompletionServing", "LdaServing", "ServerCapture", "Serving", "sse_stream"]
