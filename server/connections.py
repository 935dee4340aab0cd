"""HTTP connections that cannot be held open by a client that stalls.

uvicorn closes a keep-alive connection that sits idle between requests after
``--keep-alive-timeout`` seconds, but its timer stops at the first byte of a next request,
and a fresh connection has none: a client that connects and sends nothing, or part of its
headers, or part of its body, held a connection (and a file descriptor) for good.
:class:`TimedH11Protocol` closes such a connection after ``--read-timeout`` seconds without
a byte while a request is incomplete (nginx's ``client_header_timeout`` and
``client_body_timeout`` work the same way). Once a request is read whole, no timer runs: a
generation may take as long as ``--request-timeout`` allows.
"""

from __future__ import annotations

import asyncio
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

logger = logging.getLogger(__name__)


class TimedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a read timeout while a request is incomplete (see the module
    docstring). ``read_timeout`` is set on the class by :func:`protocol_with_read_timeout`."""

    read_timeout: float = 30.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._read_deadline: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state in (h11.IDLE, h11.SEND_BODY):  # part of a request so far
            self._arm()
        else:
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        if self.read_timeout > 0:
            self._read_deadline = self.loop.call_later(self.read_timeout, self._stalled)

    def _disarm(self) -> None:
        if self._read_deadline is not None:
            self._read_deadline.cancel()
            self._read_deadline = None

    def _stalled(self) -> None:
        self._read_deadline = None
        if self.transport.is_closing() or self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):
            return
        if self.conn.their_state is h11.IDLE and self.cycle is not None and not self.cycle.response_complete:
            return  # a response is being written (pipelining aside, nothing is read meanwhile)
        logger.info(
            "closing a connection from %s: no data for %g s with a request incomplete (--read-timeout)",
            "{}:{}".format(*self.client) if self.client else "?",
            self.read_timeout,
        )
        self.transport.close()


def protocol_with_read_timeout(read_timeout: float) -> type[TimedH11Protocol]:
    """The protocol class for uvicorn's ``http`` setting, with this read timeout (0: none)."""
    return type("TimedH11Protocol", (TimedH11Protocol,), {"read_timeout": read_timeout})
