"""Sending a stored file that is already open: whole, or one byte range (RFC 9110, section 14).

The activation store opens a tensor's file before the response starts, so a delete meanwhile
cannot cut the download short (``storage/activations.py``); this streams from that open file.
A ``Range: bytes=first-last`` (or ``first-``, or ``-suffix``) header gets that part with 206
and ``Content-Range``, so a client can resume a large download; a range past the end gets
416; several ranges, or a header this does not read, get the whole file with 200, as the RFC
allows a server to do.
"""

from __future__ import annotations

import os
import re
from typing import BinaryIO

from fastapi.responses import Response, StreamingResponse

CHUNK_BYTES = 1 << 20
_ONE_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


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


def file_response(handle: BinaryIO, filename: str, range_header: str | None) -> Response:
    """The open file ``handle`` as a download named ``filename`` (closed when sent, or when the
    client leaves)."""
    size = os.fstat(handle.fileno()).st_size
    headers = {"Accept-Ranges": "bytes", "Content-Disposition": f'attachment; filename="{filename}"'}
    wanted = _byte_range(range_header, size)
    if wanted is False:
        handle.close()
        return Response(status_code=416, headers={**headers, "Content-Range": f"bytes */{size}"})
    first, last = wanted if wanted else (0, size - 1)
    headers["Content-Length"] = str(max(0, last - first + 1))
    if wanted:
        headers["Content-Range"] = f"bytes {first}-{last}/{size}"
    return StreamingResponse(
        _chunks(handle, first, last - first + 1),
        status_code=206 if wanted else 200,
        media_type="application/octet-stream",
        headers=headers,
    )


def _chunks(handle: BinaryIO, first: int, count: int):
    """``count`` bytes from ``first``, a chunk at a time (Starlette runs a plain iterator in its
    thread pool); the file is closed at the end or when the client goes away."""
    with handle:
        handle.seek(first)
        while count > 0 and (data := handle.read(min(CHUNK_BYTES, count))):
            count -= len(data)
            yield data
