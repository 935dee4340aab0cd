"""Streamed responses that let go of what they hold the moment they end: SSE streams and
downloads of a stored file that is already open.

:class:`ClosingStreamingResponse` closes its body when the response ends for any reason.
Starlette's own leaves a body whose client left while a ``send`` was waiting (a slow reader)
to the garbage collector's cycle pass: until then the engine job behind an SSE stream kept
generating, and a download kept its file, and with it a deleted capture's disk space.

:func:`file_response` sends a file the activation store opened before the response started
(so a delete meanwhile cannot cut the download short: ``storage/activations.py``), whole, or
one byte range (RFC 9110, section 14): ``Range: bytes=first-last`` (or ``first-``, or
``-suffix``) gets that part with 206 and ``Content-Range``, so a client can resume a large
download; a range past the end gets 416; several ranges, a header this does not read, or an
``If-Range`` (the server sends no validators it could match) get the whole file with 200, as
the RFC allows.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable
from typing import BinaryIO

from fastapi.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send


class ClosingStreamingResponse(StreamingResponse):
    """A StreamingResponse that closes its body (an async generator) and runs ``on_close`` as
    soon as it ends: finished, failed, or its client gone."""

    def __init__(self, *args, on_close: Callable[[], None] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if self.on_close is not None:
                self.on_close()
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()


CHUNK_BYTES = 1 << 20
_ONE_RANGE = re.compile(r"^bytes=(\d{0,18})-(\d{0,18})$", re.IGNORECASE)  # 18 digits: past any file


def _byte_range(header: str | None, size: int) -> tuple[int, int] | None | bool:
    """``(first, last)`` inclusive for one satisfiable range; None for the whole file; False
    for a range that starts past the end (416)."""
    match = _ONE_RANGE.match((header or "").replace(" ", ""))
    if match is None or match.groups() == ("", ""):
        return None
    first, last = match.groups()
    if first == "":  # the last N bytes
        count = int(last)
        return (max(0, size - count), size - 1) if count and size else False
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if start >= size or (last and int(last) < start):
        return False if start >= size else None
    return start, end


def file_response(
    handle: BinaryIO, filename: str, range_header: str | None, if_range: str | None = None
) -> Response:
    """The open file ``handle`` as a download named ``filename``; closed once sent, or as soon
    as the client leaves (or right away, for a 416)."""
    try:
        size = os.fstat(handle.fileno()).st_size
        wanted = None if if_range is not None else _byte_range(range_header, size)
    except BaseException:
        handle.close()
        raise
    headers = {"Accept-Ranges": "bytes", "Content-Disposition": f'attachment; filename="{filename}"'}
    if wanted is False:
        handle.close()
        return Response(status_code=416, headers={**headers, "Content-Range": f"bytes */{size}"})
    first, last = wanted if wanted else (0, size - 1)
    headers["Content-Length"] = str(max(0, last - first + 1))
    if wanted:
        headers["Content-Range"] = f"bytes {first}-{last}/{size}"
    return ClosingStreamingResponse(
        _chunks(handle, first, last - first + 1),
        status_code=206 if wanted else 200,
        media_type="application/octet-stream",
        headers=headers,
        on_close=handle.close,
    )


def _chunks(handle: BinaryIO, first: int, count: int):
    """``count`` bytes from ``first``, a chunk at a time (Starlette runs a plain iterator in its
    thread pool); the response closes the file when it ends."""
    with contextlib.suppress(ValueError):  # closed under it: the client left
        handle.seek(first)
        while count > 0 and (data := handle.read(min(CHUNK_BYTES, count))):
            count -= len(data)
            yield data
