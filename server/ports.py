"""Whether the server's port is free, and what to say when it is not (standard library only)."""

from __future__ import annotations

import socket


def port_free(host: str, port: int) -> bool:
    """Whether a listening socket could bind ``host:port`` now (as uvicorn binds: SO_REUSEADDR)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def port_in_use(host: str, port: int) -> str:
    """What a user is told when ``host:port`` is taken (by the server and by start_server.sh)."""
    return (
        f"port {port} on {host} is in use (another server? see: ss -ltnp 'sport = :{port}'); "
        "choose another with --port"
    )
