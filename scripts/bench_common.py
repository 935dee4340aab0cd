"""What the benchmark scripts share: starting the real server and waiting for it."""

from __future__ import annotations

import subprocess
import sys
import time
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
