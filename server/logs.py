"""The server's log format, configured once by the entry point, with the request id on every line.

:data:`request_id` is a context variable: the front door (``server.middleware``) sets it for
each HTTP request, rejected ones included, and the engine's worker runs each piece of queued
work in the context it was submitted from (a batch under the ids of all its requests, joined
by ``+``), so a line logged anywhere about a request names it::

    2026-11-30 10:00:00,123 INFO server.access [req-3f9c...] POST /v1/chat/completions 200 ...

Lines about no request (start-up, shutdown) show ``[-]``.
"""

from __future__ import annotations

import logging
import sys
from contextvars import ContextVar

request_id: ContextVar[str] = ContextVar("nnsight_server_request_id", default="-")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"


class RequestIdFilter(logging.Filter):
    """Adds ``record.request_id`` (the current request's id, or ``-``) to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


def configure_logging(level: str) -> None:
    """Send every logger's records to stderr in :data:`LOG_FORMAT` (called once, by ``main``)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
