"""Every code block in README.md and docs/*.md runs as written against a real server.

The fenced blocks are extracted by the line they start on (test ids such as
``README.md:L63``). ```bash/```sh and ```python blocks run against ONE server on the embedded
model, started for this module with its own ``--activations-dir`` and ``--vectors-dir`` in a
temporary directory. Blocks address the server as ``http://127.0.0.1:8000`` or
``localhost:8000``; the only rewrite is that this test puts its server's port in place of
``8000`` in those two addresses.

- Python blocks of one document run in order in one shared namespace, as a reader pasting
  them into one session would. A block that fails fails its own case, with its text, the
  exception and what it printed; a later block of that document that then fails too is
  reported as skipped, naming the failed block it may depend on.
- Bash blocks run with ``bash -euo pipefail`` in the repository root with ``.venv/bin`` first
  on ``PATH``, with a timeout.
- Server-wide capture settings (``POST /v1/interventions``, which a block may turn on) are
  reset before each document's first block, so every document starts from the defaults.
- A block that cannot run here is preceded, on the line before its fence, by exactly
  ``<!-- snippet: skip REASON -->``; it is reported as a skip with that reason.
- Blocks that are not meant to run (sample output, JSON bodies, directory trees) carry a
  non-executable info string (``text``, ``json``); a block without an info string, or with
  one not known here, fails the extractor's own check.

Blocks that need a server with ``--adapter`` (the README's LDA block, lda.md's ``/v1/lda``)
are skipped as such, but a case of their own runs each against this plain server and checks
that it prints the server's 400 message, not a ``KeyError`` or a traceback.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import signal
import subprocess
import sys
import threading
import traceback
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

RUNNABLE = {"bash": "bash", "sh": "bash", "python": "python"}
NOT_RUNNABLE = {"text", "json"}
SKIP_MARKER = re.compile(r"<!-- snippet: skip (?P<reason>\S.*?) -->")
FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
BLOCK_TIMEOUT_S = 120
MIN_RUNNABLE = 12  # blocks that run here; fewer means the extractor or the docs lost some


@dataclass(frozen=True)
class Block:
    doc: str  # path relative to the repository root
    line: int  # 1-based line of the opening fence
    info: str
    text: str
    skip: str | None  # the marker's reason, when the line before the fence is a skip marker

    @property
    def id(self) -> str:
        return f"{self.doc}:L{self.line}"

    @property
    def kind(self) -> str | None:
        return RUNNABLE.get(self.info)


def extract(markdown: str, doc: str) -> list[Block]:
    """The fenced code blocks of one markdown text, in order."""
    lines = markdown.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        fence, indent = opening["fence"], len(opening["indent"])
        info = opening["info"].strip().split()[0] if opening["info"].strip() else ""
        body: list[str] = []
        j = i + 1
        while j < len(lines):
            closing = lines[j].strip()
            if closing.startswith(fence) and set(closing) == {fence[0]}:
                break
            body.append(lines[j][indent:] if lines[j][:indent].strip() == "" else lines[j].lstrip())
            j += 1
        marker = SKIP_MARKER.fullmatch(lines[i - 1].strip()) if i > 0 else None
        blocks.append(Block(doc, i + 1, info, "\n".join(body) + "\n", marker["reason"] if marker else None))
        i = j + 1
    return blocks


def all_blocks() -> list[Block]:
    return [b for path in DOCUMENTS for b in extract(path.read_text(), str(path.relative_to(ROOT)))]


BLOCKS = all_blocks()
CODE_BLOCKS = [b for b in BLOCKS if b.kind is not None]


def for_port(text: str, port: int) -> str:
    """The block as it runs here: the documented port 8000 replaced by the test server's."""
    return text.replace("127.0.0.1:8000", f"127.0.0.1:{port}").replace("localhost:8000", f"localhost:{port}")


def readme_lda_block() -> Block:
    (block,) = [
        b for b in BLOCKS if b.doc == "README.md" and b.kind == "python" and "/generate_lda_batch" in b.text
    ]
    return block


ADAPTER_BLOCKS = [b for b in CODE_BLOCKS if b.skip is not None and "--adapter" in b.skip]


# --- the extractor and the markers (no server needed) --------------------------------------


def test_the_extractor_finds_blocks_lines_and_markers():
    sample = "\n".join(
        [
            "# Title",  # 1
            "```bash",  # 2
            "echo one",
            "```",
            "<!-- snippet: skip needs a GPU -->",  # 5
            "```python",  # 6
            "print(2)",
            "",
            "print(3)",
            "```",
            "````text",  # 11
            "```",
            "````",
        ]
    )
    blocks = extract(sample, "x.md")
    assert [(b.line, b.info, b.skip) for b in blocks] == [
        (2, "bash", None),
        (6, "python", "needs a GPU"),
        (11, "text", None),
    ]
    assert blocks[1].text == "print(2)\n\nprint(3)\n" and blocks[2].text == "```\n"
    assert blocks[1].id == "x.md:L6"


def test_every_block_says_what_it_is_and_every_skip_has_a_reason():
    assert len(DOCUMENTS) > 5
    for block in BLOCKS:
        assert block.info in RUNNABLE or block.info in NOT_RUNNABLE, (
            f"{block.id}: info string {block.info!r}; use bash/sh/python for a block that runs, "
            f"or one of {sorted(NOT_RUNNABLE)} for one that is only read"
        )
        if block.skip is not None:
            assert block.kind is not None, f"{block.id}: a skip marker on a block that never runs"
            assert len(block.skip) >= 10, f"{block.id}: the skip reason {block.skip!r} says too little"
    runnable = [b for b in CODE_BLOCKS if b.skip is None]
    assert len(runnable) >= MIN_RUNNABLE, [b.id for b in runnable]
    assert any(b.kind == "bash" for b in runnable) and any(b.kind == "python" for b in runnable)


def test_every_marker_comment_is_well_formed_and_right_before_a_fence():
    for path in DOCUMENTS:
        lines = path.read_text().splitlines()
        for number, line in enumerate(lines, start=1):
            if not line.strip().startswith("<!-- snippet"):  # prose may quote the marker
                continue
            where = f"{path.relative_to(ROOT)}:L{number}"
            assert SKIP_MARKER.fullmatch(line.strip()), (
                f"{where}: not `<!-- snippet: skip REASON -->`: {line!r}"
            )
            assert number < len(lines) and FENCE.match(lines[number]), (
                f"{where}: the marker is not right before a fence"
            )


def test_the_readme_lda_block_is_marked_as_needing_an_adapter():
    block = readme_lda_block()
    assert block.skip is not None and "--adapter" in block.skip


# --- running the blocks ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def docs_server(server_process, tmp_path_factory):
    root = tmp_path_factory.mktemp("doc-snippets")
    args = [
        "--activations-dir",
        str(root / "activations"),
        "--vectors-dir",
        str(root / "vectors"),
        "--saes-dir",
        str(root / "saes"),
    ]
    with server_process(args, root / "server.log") as server:
        yield server


class _Session:
    """What the blocks of the document being run share: a namespace, and the first failure."""

    doc: str | None = None
    namespace: dict = {}
    failed: str | None = None


def _start_document(block: Block, server) -> None:
    if _Session.doc == block.doc:
        return
    _Session.doc, _Session.namespace, _Session.failed = block.doc, {"__name__": "__main__"}, None
    reply = httpx.post(f"{server.url}/v1/interventions", json={}, timeout=30)  # server-wide capture: off
    assert reply.status_code == 200, reply.text


def _failure(block: Block, code: str, detail: str) -> str:
    header = f"{block.id} ({block.info} block) failed."
    return f"{header}\n--- the block as run ---\n{code}--- what happened ---\n{detail}"


def _run_python(code: str, name: str, namespace: dict) -> tuple[str | None, str]:
    """Runs ``code`` in ``namespace``; returns (the error with its traceback or None, what it printed)."""
    printed = io.StringIO()
    outcome: list[str | None] = []

    def target() -> None:
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
            try:
                exec(compile(code, name, "exec"), namespace)
            except SystemExit as exit_:
                outcome.append(f"SystemExit: {exit_.code}")
                return
            except BaseException:
                outcome.append(traceback.format_exc())
                return
        outcome.append(None)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(BLOCK_TIMEOUT_S)
    if thread.is_alive():
        return f"still running after {BLOCK_TIMEOUT_S} s", printed.getvalue()
    return outcome[0], printed.getvalue()


def _run_bash(code: str) -> tuple[str | None, str]:
    """Runs ``code`` under ``bash -euo pipefail`` in its own process group, all of it stopped on timeout."""
    env = {**os.environ, "PATH": f"{ROOT / '.venv' / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"}
    process = subprocess.Popen(
        ["bash", "-euo", "pipefail", "-c", code],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=BLOCK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the block's children too, not only bash
        stdout, stderr = process.communicate()
        return f"still running after {BLOCK_TIMEOUT_S} s", f"stdout:\n{stdout}\nstderr:\n{stderr}"
    error = None if process.returncode == 0 else f"exit status {process.returncode}"
    return error, f"stdout:\n{stdout}\nstderr:\n{stderr}"


@pytest.mark.parametrize("block", CODE_BLOCKS, ids=[b.id for b in CODE_BLOCKS])
def test_block_runs_as_written(block: Block, request):
    if block.skip is not None:
        pytest.skip(block.skip)
    docs_server = request.getfixturevalue("docs_server")  # started only when a block runs
    _start_document(block, docs_server)
    code = for_port(block.text, docs_server.port)
    if block.kind == "python":
        error, printed = _run_python(code, block.id, _Session.namespace)
    else:
        error, printed = _run_bash(code)
    if error is None:
        return
    detail = (
        f"{error}\n--- output ---\n{printed}\n--- end of the server's log ---\n{docs_server.log_tail(15)}"
    )
    if _Session.failed is not None and block.kind == "python":
        pytest.skip(f"may depend on {_Session.failed}, which failed; this block failed too:\n{detail}")
    if block.kind == "python":
        _Session.failed = block.id
    pytest.fail(_failure(block, code, detail), pytrace=False)


@pytest.mark.parametrize("block", ADAPTER_BLOCKS, ids=[b.id for b in ADAPTER_BLOCKS])
def test_a_block_that_needs_an_adapter_prints_the_servers_refusal_without_one(
    block: Block, docs_server, tmp_path
):
    """Run on this plain server, the block prints the server's 400 message, not a KeyError or a traceback."""
    refusal = httpx.post(
        f"{docs_server.url}/generate_lda_batch",
        json={"prompts": ["Hi."], "before": {"adapter": "off"}},
        timeout=60,
    )
    assert refusal.status_code == 400, refusal.text
    message = refusal.json()["error"]["message"]

    code = for_port(block.text, docs_server.port)
    command = (
        [sys.executable, "-c", code] if block.kind == "python" else ["bash", "-euo", "pipefail", "-c", code]
    )
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert message in output, output
    assert "Traceback" not in output and "KeyError" not in output, output
