"""The browser playground's static files, served at ``/ui`` by the same process.

The page (``static/``: ``index.html``, ``playground.css``, ``js/*.js``) is plain HTML, CSS and JavaScript
modules that the browser runs as they are: no build step, no third-party front-end code, no
request to anything but this server. It talks to the server only through the public HTTP API
(the same endpoints any client uses), with the API key the user types in, kept in the tab's
``sessionStorage``. Why there is no build step: docs/playground.md.

What this module owns: :class:`PlaygroundFiles`, the static-file app mounted at ``/ui``
(by :func:`server.app.create_app`), which adds the headers that keep the page to itself
(a content security policy allowing only this origin, ``nosniff``, no framing) and asks
browsers to revalidate (a server upgrade changes the files under the same names).
The front door lets ``/ui`` through without the API key: the files hold no data, and the
page must load to ask for the key.
"""

from __future__ import annotations

from pathlib import Path

from starlette.staticfiles import StaticFiles
from starlette.types import Message, Receive, Scope, Send

STATIC_DIR = Path(__file__).resolve().parent / "static"  # the page alone: no Python file is served
MOUNT_PATH = "/ui"

SECURITY_HEADERS = {
    # Scripts, styles and requests from this origin only; pictures may be data or blob URLs.
    "content-security-policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",
}


def is_playground_path(path: str) -> bool:
    """Whether ``path`` is one of the playground's files (open without the API key)."""
    return path == MOUNT_PATH or path.startswith(MOUNT_PATH + "/")


class PlaygroundFiles(StaticFiles):
    """Starlette's ``StaticFiles`` over :data:`STATIC_DIR` (``index.html`` for ``/ui/``), plus
    :data:`SECURITY_HEADERS` on every response. Only files inside the folder are served
    (Starlette resolves each path and refuses one that leaves it)."""

    def __init__(self) -> None:
        super().__init__(directory=STATIC_DIR, html=True)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                extra = [(name.encode(), value.encode()) for name, value in SECURITY_HEADERS.items()]
                kept = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"cache-control"]
                message["headers"] = [*kept, *extra]
            await send(message)

        await super().__call__(scope, receive, send_with_headers)
