"""Operations end to end on the embedded model: start_server.sh's cycle (tmux and the background
fallback), the refusals of start, deploy_remote.sh's dry run, and SIGTERM during requests."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from server.ports import port_free

ROOT = Path(__file__).resolve().parents[2]
KEY = "sk-ops-test-7f3a9c"


class Script:
    """start_server.sh with its state, log and tmux session in a test's own places."""

    def __init__(self, tmp_path: Path, port: int, *, tmux: bool) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{self.port}"
        self.session = f"nnsight-test-{self.port}"
        self.state = tmp_path / "state"
        self.log = self.state / f"{self.session}.log"  # the default: one log per session
        self.activations = tmp_path / "activations"
        self.env = {
            **os.environ,
            "NNSIGHT_SERVER_VENV": sys.prefix,  # the environment running the tests
            "NNSIGHT_SERVER_STATE_DIR": str(self.state),
            "NNSIGHT_SERVER_SESSION": self.session,
            "NNSIGHT_SERVER_NO_TMUX": "" if tmux else "1",
            "TMUX_TMPDIR": str(tmp_path),  # a tmux server of the test's own
        }
        for name in ("NNSIGHT_SERVER_API_KEY", "NNSIGHT_SERVER_LOG", "TMUX"):
            self.env.pop(name, None)

    def tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", *args], env=self.env, capture_output=True, text=True).stdout

    def leftovers(self) -> list[str]:
        """What start left in the state directory besides a running server's state file and log."""
        if not self.state.exists():
            return []
        kept = {f"{self.session}.state", self.log.name}
        return sorted(p.name for p in self.state.iterdir() if p.name not in kept)

    def __call__(self, *args: str, timeout: float = 420) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["bash", str(ROOT / "start_server.sh"), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def pid(self) -> int:
        lines = (self.state / f"{self.session}.state").read_text().splitlines()
        return int(dict(line.split("=", 1) for line in lines)["pid"])


def alive(pid: int) -> bool:
    """Running (an exited process its parent has not reaped yet, a zombie, is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def command_lines() -> str:
    """Every process's command line on this machine (where a secret must not appear)."""
    out = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            out.append(cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:
            pass
    return "\n".join(out)


WITH_AND_WITHOUT_TMUX = pytest.mark.parametrize(
    "tmux",
    [
        pytest.param(True, id="tmux", marks=pytest.mark.skipif(not shutil.which("tmux"), reason="no tmux")),
        pytest.param(False, id="background"),
    ],
)


@WITH_AND_WITHOUT_TMUX
def test_start_status_stop_cycle(tmp_path, pick_port, tmux):
    script = Script(tmp_path, pick_port(), tmux=tmux)
    started = script(
        "start",
        "--port",
        str(script.port),
        "--api-key",
        KEY,
        "--activations-dir",
        str(script.activations),
        "--vectors-dir",
        str(tmp_path / "vectors"),
    )
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        assert f"healthy: {script.url}" in started.stdout
        pid = script.pid()
        assert alive(pid)
        if tmux:
            assert script.session in script.tmux("list-sessions", "-F", "#{session_name}")
            assert KEY not in script.tmux("show-environment", "-g")  # the tmux server never saw it
        assert KEY not in command_lines()  # handed over in the environment, not on a command line
        assert script.leftovers() == []  # the environment file was read and deleted

        # Only key holders are served; /health is open.
        assert httpx.get(f"{script.url}/health").status_code == 200
        assert httpx.get(f"{script.url}/v1/models").status_code == 401
        client = openai.OpenAI(base_url=f"{script.url}/v1", api_key=KEY, max_retries=0, timeout=120)
        reply = client.chat.completions.create(
            model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "Hi"}], max_tokens=4
        )
        assert reply.usage.completion_tokens == 4
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{script.url}/v1", api_key="nope", max_retries=0).models.list()

        status = script("status")
        assert status.returncode == 0, status.stdout + status.stderr
        assert f"running, pid {pid}" in status.stdout and "health: 200" in status.stdout
        script.env["NNSIGHT_SERVER_API_KEY"] = KEY  # status reads /metrics with the key, as clients do
        status = script("status")
        assert "tokens: " in status.stdout and "queue: 0 waiting of 64" in status.stdout

        again = script("start", "--port", str(script.port))
        assert again.returncode == 1 and "already running" in again.stderr
        logs = script("logs", "-n", "200")
        assert logs.returncode == 0 and "POST /v1/chat/completions 200" in logs.stdout
    finally:
        stopped = script("stop")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert not alive(pid)
    assert not (script.state / f"{script.session}.state").exists()
    assert script.leftovers() == []  # no pid file, no environment file left behind
    if tmux:
        assert script.session not in script.tmux("list-sessions", "-F", "#{session_name}")
    assert port_free("127.0.0.1", script.port)  # as a new server would bind it
    assert KEY not in script.log.read_text()
    status = script("status")
    assert status.returncode == 3 and "not running" in status.stdout
    assert script("stop").returncode == 0  # stopping nothing is fine


def test_start_refuses_a_port_in_use_and_leaves_nothing(tmp_path, pick_port):
    script = Script(tmp_path, pick_port(), tmux=False)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", script.port))
        busy.listen()
        result = script("start", "--port", str(script.port))
    assert result.returncode == 1 and f"port {script.port} on 127.0.0.1 is in use" in result.stderr
    assert not (script.state / f"{script.session}.state").exists()
    assert script.leftovers() == []


@WITH_AND_WITHOUT_TMUX
def test_a_server_that_dies_on_start_up_is_reported_with_its_log(tmp_path, pick_port, tmux):
    script = Script(tmp_path, pick_port(), tmux=tmux)
    broken = tmp_path / "broken-adapter"  # looks like one; found broken only when the server loads it
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{}")
    result = script("start", "--port", str(script.port), "--adapter", str(broken), "--api-key", KEY)
    assert result.returncode == 1
    assert "exited during start-up" in result.stderr and "could not load it" in result.stderr
    assert not (script.state / f"{script.session}.state").exists()
    assert script.leftovers() == []  # no environment file (with the key) left behind


# -- refusals before anything starts ------------------------------------------------------------

QUICK_S = 60  # no model loads on these paths: they answer in seconds (the limit is for a loaded CI box)


def nothing_started(script: Script) -> bool:
    return not script.state.exists() or sorted(p.name for p in script.state.iterdir()) == []


@pytest.mark.parametrize(
    "args",
    [["--help"], ["start", "--help"], ["start", "--port", "1", "-h"], ["stop", "--help"], ["help"]],
)
def test_help_anywhere_prints_both_option_lists_and_starts_nothing(tmp_path, pick_port, args):
    script = Script(tmp_path, pick_port(), tmux=False)
    result = script(*args, timeout=QUICK_S)
    assert result.returncode == 0, result.stderr
    assert "./start_server.sh [start] [flags]" in result.stdout  # the script's own options
    assert "--max-tokens-cap" in result.stdout and "--memory-budget" in result.stdout  # the server's
    assert nothing_started(script)


@pytest.mark.parametrize(
    "args, message",
    [
        (["strat"], "unknown command 'strat'"),
        (["start", "--bogus"], "unrecognized arguments: --bogus"),
        (["run", "--dtype", "float64"], "invalid choice: 'float64'"),
        (["start", "--max-tokens-cap", "lots"], "--max-tokens-cap (or NNSIGHT_SERVER_MAX_TOKENS_CAP): Input"),
        (["stop", "--port", "8001"], "'stop' takes no server flags"),
        (["start", "-f"], "-f and -n are flags of 'logs'"),
    ],
)
def test_unknown_commands_and_flags_are_refused_at_once(tmp_path, pick_port, args, message):
    script = Script(tmp_path, pick_port(), tmux=False)
    result = script(*args, timeout=QUICK_S)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.splitlines()) <= 3  # the verdict, not argparse's whole usage
    assert nothing_started(script)


@pytest.mark.parametrize("command", ["start", "run"])
def test_a_missing_model_folder_is_refused_before_anything_starts(tmp_path, pick_port, command):
    script = Script(tmp_path, pick_port(), tmux=False)
    result = script(command, "--port", str(script.port), "--model", str(tmp_path / "nope"), timeout=QUICK_S)
    assert result.returncode == 1
    assert "no such model folder" in result.stderr and "Traceback" not in result.stderr
    assert nothing_started(script)


def test_run_checks_the_port_before_loading_the_model(tmp_path, pick_port):
    script = Script(tmp_path, pick_port(), tmux=False)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", script.port))
        busy.listen()
        result = script("run", "--port", str(script.port), timeout=QUICK_S)
    assert result.returncode == 1 and f"port {script.port} on 127.0.0.1 is in use" in result.stderr


def test_the_server_itself_refuses_in_one_line_before_loading(tmp_path, pick_port):
    """`python -m server` (what tmux runs) checks the same things first: one line, no traceback."""
    port = pick_port()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port))
        busy.listen()
        for flags, message in [
            (["--port", str(port)], f"port {port} on 127.0.0.1 is in use"),
            (["--port", str(pick_port()), "--model", str(tmp_path / "nope")], "no such model folder"),
            (["--port", str(pick_port()), "--lda-before", "./nope"], "--lda-before ./nope: no such model"),
            (["--port", str(pick_port()), "--adapter", str(tmp_path)], "not a PEFT adapter folder"),
        ]:
            result = subprocess.run(
                [sys.executable, "-m", "server", *flags], capture_output=True, text=True, timeout=QUICK_S
            )
            assert result.returncode == 1
            (line,) = result.stderr.strip().splitlines()
            assert "ERROR server [-] not starting: " in line and message in line


def test_stop_from_another_checkout_leaves_that_server_alone(tmp_path, pick_port):
    """Two clones on one account share ~/.nnsight_server: a state file names its checkout, and
    only that checkout's script stops its server."""
    script = Script(tmp_path, pick_port(), tmux=False)
    other_server = subprocess.Popen(["sleep", "600"])
    try:
        started = subprocess.run(
            ["ps", "-o", "lstart=", "-p", str(other_server.pid)],
            env={**os.environ, "LC_ALL": "C", "TZ": "UTC"}, capture_output=True, text=True,
        ).stdout  # fmt: skip
        started = " ".join(started.split())
        script.state.mkdir(mode=0o700)
        state = script.state / f"{script.session}.state"
        state.write_text(
            f"pid={other_server.pid}\nstarted={started}\ntmux=\nsession={script.session}\n"
            f"url=http://127.0.0.1:{script.port}\nlog={script.log}\nshutdown=30\n"
            "checkout=/srv/other-clone\n"
        )
        for command in ("stop", "restart"):
            result = script(command, timeout=QUICK_S)
            assert result.returncode == 1
            assert "started from another checkout, /srv/other-clone" in result.stderr
            assert other_server.poll() is None and state.exists()
        status = script("status", timeout=QUICK_S)
        assert "checkout: /srv/other-clone" in status.stdout
        again = script("start", "--port", str(script.port), timeout=QUICK_S)
        assert again.returncode == 1 and "another checkout" in again.stderr
    finally:
        other_server.kill()


@pytest.mark.skipif(not shutil.which("tmux"), reason="no tmux")
def test_stop_with_a_stale_state_file_touches_nothing_else(tmp_path, pick_port):
    """After a reboot, pids and tmux session ids are reused: stop must not act on them."""
    script = Script(tmp_path, pick_port(), tmux=True)
    script.tmux("new-session", "-d", "-s", "users-work", "sleep 600")
    session_id = script.tmux("display-message", "-p", "-t", "users-work", "#{session_id}").strip()
    bystander = subprocess.Popen(["sleep", "600"])
    try:
        script.state.mkdir(mode=0o700)
        (script.state / f"{script.session}.state").write_text(
            f"pid={bystander.pid}\nstarted=Mon Jan  1 00:00:00 2001\ntmux={session_id}\n"
            f"session={script.session}\nurl=http://127.0.0.1:{script.port}\nlog={script.log}\nshutdown=30\n"
        )
        stopped = script("stop")
        assert stopped.returncode == 0 and "was not running" in stopped.stdout
        assert bystander.poll() is None  # not signalled
        assert "users-work" in script.tmux("list-sessions", "-F", "#{session_name}")
        assert not (script.state / f"{script.session}.state").exists()
    finally:
        bystander.kill()
        script.tmux("kill-server")


def test_deploy_remote_dry_run_prints_every_step_and_no_secret():
    env = {**os.environ, "NNSIGHT_SERVER_API_KEY": KEY}
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "deploy_remote.sh"), "--dry-run", "gpu-box", "--port", "8001",
         "--local-port", "9001", "--dir", "srv/nn", "--",
         "--model", "Qwen/Qwen3-0.6B", "--dtype", "bfloat16"],
        env=env, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    commands = [line[2:] for line in result.stdout.splitlines() if line.startswith("+ ")]
    assert commands[0].startswith("ssh gpu-box mkdir")
    assert commands[1].startswith("rsync -az --delete") and commands[1].endswith("gpu-box:srv/nn/")
    assert "restart --session nnsight-server --port 8001 --model Qwen/Qwen3-0.6B --dtype bfloat16" in (
        commands[2].replace("\\ ", " ")
    )
    assert "read -r NNSIGHT_SERVER_API_KEY" in commands[2].replace("\\ ", " ")
    assert "-L 9001:127.0.0.1:8001 gpu-box" in commands[3]
    assert "ready: http://127.0.0.1:9001/v1" in result.stdout
    assert KEY not in result.stdout + result.stderr


@pytest.mark.parametrize(
    "args, message",
    [([], "HOST is missing"), (["a", "b"], "one HOST only"), (["h", "--", "--port", "1"], "--port")],
)
def test_deploy_remote_refuses_bad_arguments(args, message):
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "deploy_remote.sh"), "--dry-run", *args],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 2 and message in result.stderr


# -- SIGTERM ---------------------------------------------------------------------------------------


class StreamInFlight:
    """A streamed chat request with a generate-mode capture, running in a thread; started once its
    first generated token has arrived. ``chunks``: the SSE data lines; ``errors``: what broke it."""

    def __init__(self, url: str, max_tokens: int) -> None:
        self.chunks: list[str] = []
        self.errors: list[Exception] = []
        first = threading.Event()
        self.worker = threading.Thread(
            target=_stream_until_first_token,
            args=(url, _generate_with_capture(max_tokens), self.chunks, first, self.errors),
        )
        self.worker.start()
        assert first.wait(120), "no first token within 120 s"


def _stream_until_first_token(url: str, body: dict, chunks: list, first: threading.Event, errors: list):
    try:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=300) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    chunks.append(line[6:])
                    if '"content":"' in line and '"content":""' not in line:
                        first.set()
    except httpx.HTTPError as exc:
        errors.append(exc)
    finally:
        first.set()


def _no_partial_files(root: Path) -> None:
    for directory in root.rglob("act-*"):
        assert (directory / "manifest.json").is_file(), f"{directory} has no manifest"
    assert not [p for p in root.rglob(".*") if p.suffix in (".tmp", ".part")]


def _generate_with_capture(max_tokens: int) -> dict:
    return {
        "messages": [{"role": "user", "content": "Count to a hundred."}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
        "capture": {"hook_points": ["resid_post"], "layers": [0, 15], "mode": "generate"},
    }


def test_sigterm_lets_a_running_request_finish_and_takes_no_new_ones(server_process, tmp_path):
    activations = tmp_path / "activations"
    args = ["--activations-dir", str(activations), "--shutdown-timeout", "120"]
    with server_process(args, tmp_path / "server.log") as server:
        stream = StreamInFlight(server.url, 48)
        server.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the listening socket closes at once
            try:
                httpx.get(f"{server.url}/health", timeout=5)
            except httpx.ConnectError:
                break
            time.sleep(0.1)
        else:
            pytest.fail("still taking connections 30 s after SIGTERM")
        assert stream.worker.is_alive()  # while the running request goes on
        stream.worker.join(240)
        returncode = server.process.wait(120)
    assert not stream.errors
    assert stream.chunks[-1] == "[DONE]"
    events = [json.loads(chunk) for chunk in stream.chunks[:-1]]
    finishes = [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]]
    assert finishes == ["length"]
    activations_ref = next(e["activations"] for e in events if e.get("activations"))
    assert (activations / activations_ref["directory"] / "manifest.json").is_file()
    _no_partial_files(activations)
    assert returncode in (0, -signal.SIGTERM)
    log = server.log_path.read_text()
    assert "engine stopped" in log


def test_sigterm_past_the_shutdown_timeout_cancels_and_removes_partial_captures(server_process, tmp_path):
    activations = tmp_path / "activations"
    args = ["--activations-dir", str(activations), "--shutdown-timeout", "1", "--max-tokens-cap", "4096"]
    with server_process(args, tmp_path / "server.log") as server:
        stream = StreamInFlight(server.url, 2000)
        assert list(activations.rglob("act-*"))  # the capture is being written
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        returncode = server.process.wait(60)
        took = time.monotonic() - signalled
        stream.worker.join(30)
    chunks = stream.chunks
    assert returncode in (0, -signal.SIGTERM)
    assert took < 20  # 1 s of grace, then the job stops at its next token
    assert "[DONE]" not in chunks or not any('"finish_reason":"length"' in c for c in chunks)
    assert not list(activations.rglob("act-*"))  # the unfinished capture was removed
    _no_partial_files(activations)
