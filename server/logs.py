"""The server's log format, configured once by the entry point, with the request id on every line.

:data:`request_id` is a context variable: the front door (``server.middleware``) sets it for
each HTTP request, rejected ones included, and the engine's worker runs each piece of queued
work in the context it was submitted from (a batch under the ids of all its requests, joined
by ``+``), so a line logged anywhere about a request names it::

    2026-11-30 10:00:00,123 INFO server.access [req-3f9c...] POST /v1/chat/completions 200 ...

Lines about no request (start-up, shutdown) show ``[-]``. Libraries that log the same line on
every forward pass (:data:`ONCE_ONLY_LOGGERS`) have each distinct line shown once.
"""

from __future__ import annotations

import logging
import sys
from contextvars import ContextVar

request_id: ContextVar[str] = ContextVar("nnsight_server_request_id", default="-")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"


# Libraries that log the same line on every forward pass: each distinct line is shown once.
# bitsandbytes' LLM.int8() matmul (``--quantization bnb-8bit``) says for every layer and step
# that it casts bfloat16/float32 inputs to float16.
ONCE_ONLY_LOGGERS = ("bitsandbytes.autograd._functions",)


class RequestIdFilter(logging.Filter):
    """Adds ``record.request_id`` (the current request's id, or ``-``) to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


class OncePerMessageFilter(logging.Filter):
    """Lets each distinct message through once (at most ``limit`` distinct ones are kept)."""

    def __init__(self, limit: int = 1000) -> None:
        super().__init__()
        self.limit = limit
        self._seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self._seen:
            return False
        if len(self._seen) < self.limit:
            self._seen.add(message)
        return True


def configure_logging(level: str) -> None:
    """Send every logger's records to stderr in :data:`LOG_FORMAT` (called once, by ``main``)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    for name in ONCE_ONLY_LOGGERS:
        noisy = logging.getLogger(name)
        if not any(isinstance(f, OncePerMessageFilter) for f in noisy.filters):
            noisy.addFilter(OncePerMessageFilter())
