"""What the benchmark scripts share: starting the real server and waiting for it."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT_S = 300


def add_model_arguments(parser) -> None:
    """``--model``, ``--dtype`` and ``--device``, as the server takes them."""
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="auto")


def model_flags(args) -> list[str]:
    """The model arguments again, for a child process (a server or a measuring subprocess)."""
    return ["--model", args.model, "--dtype", args.dtype, "--device", args.device]


def start_server(args, *flags: str) -> tuple[subprocess.Popen, str]:
    """``python -m server`` on a free loopback port with ``args``' model, dtype and device and
    ``flags``; returns the process and its URL once ``/health`` answers."""
    sys.path.insert(0, str(ROOT / "tests"))
    from integration.conftest import free_port  # the tests' own helper

    port = free_port()
    command = [
        sys.executable,
        "-m",
        "server",
        "--port",
        str(port),
        *model_flags(args),
        "--log-level",
        "warning",
        *flags,
    ]
    process = subprocess.Popen(command, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.5)
    process.kill()
    raise SystemExit(f"server did not become healthy in {STARTUP_TIMEOUT_S} s")


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_process(process: subprocess.Popen, timeout: float = 60) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout`` seconds."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextlib.contextmanager
def running_server(
    command: list[str],
    url: str,
    health: str = "/health",
    log: Path | None = None,
    startup_timeout: float = STARTUP_TIMEOUT_S,
) -> Iterator[subprocess.Popen]:
    """Run any HTTP server ``command`` for the length of the block, once ``url + health`` answers
    200 (within ``startup_timeout`` seconds), and stop it however the block ends. Its output goes
    to ``log`` if given (its tail is printed if it fails to start), else to this process's."""
    sink = open(log, "wb") if log else None  # noqa: SIM115 (closed below, after the process)
    process = subprocess.Popen(command, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT if sink else None)
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if process.poll() is not None:
                raise SystemExit(f"{command[0]} exited with {process.returncode}{_log_tail(log)}")
            try:
                if httpx.get(f"{url}{health}", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"{url} did not become healthy in {startup_timeout:g} s{_log_tail(log)}")
            time.sleep(0.5)
        yield process
    finally:
        stop_process(process)
        if sink:
            sink.close()


def _log_tail(log: Path | None, lines: int = 20) -> str:
    if log is None or not log.is_file():
        return ""
    return "; its log ends:\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def print_figures(figures: dict) -> None:
    """A measurement's figures as indented JSON, floats to three decimals."""
    import json

    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in figures.items()}, indent=2))
