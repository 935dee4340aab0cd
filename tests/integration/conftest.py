"""Start the real server (``python -m server``) on the embedded model, once per test session."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

STARTUP_TIMEOUT_S = 300  # the first start converts the embedded GGUF (about 20 s on 2 cores)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RunningServer:
    def __init__(self, args: list[str], log_path: Path) -> None:
        self.args = args
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "server", "--port", str(self.port), *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            cwd=log_path.parent,  # default stores (./activations, ./vectors) land here, not in the repo
        )

    def flag(self, name: str) -> str:
        """The value it was started with for ``name`` (e.g. ``--activations-dir``)."""
        return self.args[self.args.index(name) + 1]

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"server not healthy after {STARTUP_TIMEOUT_S} s:\n{self.log_tail()}")

    def __enter__(self) -> RunningServer:
        """``with RunningServer(...) as server``: healthy inside, stopped after, whatever happens."""
        try:
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()


@pytest.fixture(scope="session")
def pick_port():
    """A function that returns a loopback port free now."""
    return free_port


@pytest.fixture(scope="session")
def server_process():
    """The class that starts ``python -m server`` with given flags, for tests that need their own."""
    return RunningServer


@pytest.fixture(scope="session")
def embedded_server(tmp_path_factory):
    args = [
        "--max-tokens-cap",
        "256",
        "--max-prompt-chars",  # a 5-million-character prompt tests tokenizing off the event loop
        "6000000",
        "--activations-dir",
        str(tmp_path_factory.mktemp("activations")),
        "--vectors-dir",
        str(tmp_path_factory.mktemp("vectors")),
    ]
    with RunningServer(args, tmp_path_factory.mktemp("logs") / "server.log") as server:
        yield server


@pytest.fixture(scope="session")
def oai(embedded_server):
    import openai

    return openai.OpenAI(base_url=f"{embedded_server.url}/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="session")
def model_id(oai) -> str:
    return oai.models.list().data[0].id
