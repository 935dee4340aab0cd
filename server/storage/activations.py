"""The activation store: one directory per captured request, under ``--activations-dir``.

Layout::

    <root>/[<client subdir>/]<request id>/
        manifest.json                      what was captured, tensor by tensor
        <tensor name>.<safetensors|npy|pt> one file per tensor

Invariants:

* every path comes from the root: a client's subdirectory is relative, made
  of plain names (letters, digits, ``_ - .``, not starting with ``.``, never
  ``act-...``, which names captures), and must resolve inside the root
  (symlinks that lead out are refused);
* files are written under a temporary name and renamed into place, and the
  manifest is written last: a reader never sees a half-written file, and a
  request that fails or is cancelled removes its directory (``abort``);
* request ids are generated here (``act-<hex>``) and looked up by exact
  name, so an id in a URL cannot name anything else.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import threading
import time
import uuid
from pathlib import Path

import torch

from .files import write_atomically as _write_atomically

logger = logging.getLogger(__name__)

FORMATS = ("safetensors", "npy", "pt")
MANIFEST = "manifest.json"
_ID = re.compile(r"^act-[0-9a-f]{32}$")
_DIR_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}$")


class UnsafeSaveDir(ValueError):
    """A client-given directory that is not a plain relative path inside the activations root."""


class UnknownActivation(KeyError):
    """No capture with this id (or no tensor with this name in it)."""


def save_tensor(path: Path, name: str, tensor: torch.Tensor, fmt: str) -> None:
    tensor = tensor.detach().contiguous().cpu()
    if fmt == "safetensors":
        from safetensors.torch import save_file

        _write_atomically(path, lambda tmp: save_file({name: tensor}, str(tmp)))
    elif fmt == "npy":
        import numpy as np

        if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16
            tensor = tensor.float()

        def write_npy(tmp: Path) -> None:
            with tmp.open("wb") as handle:
                np.save(handle, tensor.numpy())

        _write_atomically(path, write_npy)
    elif fmt == "pt":
        _write_atomically(path, lambda tmp: torch.save(tensor, tmp))
    else:
        raise ValueError(f"unknown format {fmt!r}")


class _Appender:
    """A tensor that grows along its first axis, step by step.

    Steps are kept in memory until they hold ``FLUSH_BYTES``, then appended as raw bytes
    to a hidden file beside the final one; so memory stays bounded however many tokens a
    generation captures, and a short capture never touches the disk before its final
    file is written. The appended tensors are kept as given (CPU tensors nobody changes
    afterwards: the capture recorder hands over copies).
    """

    FLUSH_BYTES = 1 << 18

    def __init__(self, directory: Path, name: str) -> None:
        self.path = directory / f".{name}.part"
        self.rows = 0
        self.flushed_rows = 0  # rows already in the hidden file
        self.pending: list[torch.Tensor] = []
        self.pending_bytes = 0
        self.dtype: torch.dtype | None = None
        self.trailing: tuple[int, ...] | None = None

    def append(self, tensor: torch.Tensor) -> None:
        tensor = tensor.detach().cpu()
        if self.dtype is None:
            self.dtype, self.trailing = tensor.dtype, tuple(tensor.shape[1:])
        elif (tensor.dtype, tuple(tensor.shape[1:])) != (self.dtype, self.trailing):
            raise ValueError(
                f"cannot append a {tensor.dtype} {list(tensor.shape)} tensor to {self.path.name}"
            )
        self.pending.append(tensor)
        self.pending_bytes += tensor.numel() * tensor.element_size()
        self.rows += tensor.shape[0]
        if self.pending_bytes >= self.FLUSH_BYTES:
            self.flush()

    def flush(self) -> None:
        """Append the steps held in memory to the hidden file (opened per flush: a capture may
        grow hundreds of tensors at once, more than a process may keep open)."""
        if not self.pending:
            return
        data = torch.cat(self.pending)
        with self.path.open("ab") as handle:
            handle.write(data.reshape(-1).view(torch.uint8).numpy().tobytes())
        self.flushed_rows += data.shape[0]
        self.pending, self.pending_bytes = [], 0

    def tensor(self) -> torch.Tensor:
        """The whole tensor: from memory if it never reached the hidden file, else
        memory-mapped from it (not read into memory at once)."""
        if self.dtype is None:
            return torch.empty(0)
        if self.flushed_rows == 0:
            return torch.cat(self.pending)
        self.flush()
        count = self.rows * int(torch.Size(self.trailing).numel())
        flat = torch.from_file(str(self.path), shared=False, size=count, dtype=self.dtype)
        return flat.view(self.rows, *self.trailing)


class CaptureWriter:
    """Writes one request's tensors and then its manifest; ``abort`` removes all of it.

    A tensor is either written whole (``write``) or grown step by step
    (``append``, then ``close_appended``), which keeps memory flat however
    many tokens a generation captures.
    """

    def __init__(self, store: ActivationStore, request_id: str, directory: Path, fmt: str) -> None:
        self.store = store
        self.request_id = request_id
        self.directory = directory
        self.format = fmt
        self.entries: list[dict] = []
        self.started = time.time()
        self._appenders: dict[str, _Appender] = {}

    def append(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self._appenders:
            self._appenders[name] = _Appender(self.directory, name)
        self._appenders[name].append(tensor)

    def close_appended(self, name: str, **meta) -> None:
        """Turn the appended steps of ``name`` into its file in the request's format."""
        appender = self._appenders.pop(name, None)
        if appender is None:  # nothing was kept (e.g. positions "generated" of an empty completion)
            self.write(name, torch.empty(0), **meta)
            return
        try:
            self.write(name, appender.tensor(), **meta)
        finally:
            appender.path.unlink(missing_ok=True)

    def file_for(self, name: str) -> Path:
        return self.directory / f"{name}.{self.format}"

    def write(self, name: str, tensor: torch.Tensor, **meta) -> None:
        path = self.file_for(name)
        save_tensor(path, name, tensor, self.format)
        self.entries.append(
            {
                "name": name,
                "file": path.name,
                "saved_shape": list(tensor.shape),
                "dtype": str(tensor.dtype).removeprefix("torch."),
                "bytes": path.stat().st_size,
                **meta,
            }
        )

    def finish(self, **manifest) -> dict:
        body = {
            "id": self.request_id,
            "format": self.format,
            "started": self.started,
            "finished": time.time(),
            **manifest,
            "tensors": self.entries,
        }
        # One line: json's C encoder (with indent it falls back to the pure-Python one, about
        # ten times slower for a manifest that lists hundreds of tensors' tokens).
        text = json.dumps(body)
        _write_atomically(self.directory / MANIFEST, lambda tmp: tmp.write_text(text))
        written = sum(entry["bytes"] for entry in self.entries) + len(text.encode())
        self.store.register(self.request_id, self.directory, written)
        return body

    def abort(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


class ActivationStore:
    """Finds, creates and deletes capture directories under one root."""

    def __init__(self, root: Path) -> None:
        self.root = root.expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self._index: dict[str, Path] = {}
        self._lock = threading.Lock()
        self.captures_written = 0  # since start, for /metrics
        self.bytes_written = 0
        for manifest in self.root.rglob(MANIFEST):
            if _ID.fullmatch(manifest.parent.name):
                self._index[manifest.parent.name] = manifest.parent
        self._remove_leftovers()

    def _remove_leftovers(self) -> None:
        """Temporary files and manifest-less capture directories of a run that died mid-write."""
        for pattern in (".*.tmp", ".*.part"):
            for tmp in self.root.rglob(pattern):
                if tmp.is_file() and _ID.fullmatch(tmp.parent.name):  # only ours, inside capture directories
                    tmp.unlink(missing_ok=True)
        for directory in self.root.rglob("act-*"):
            if directory.is_dir() and _ID.fullmatch(directory.name) and not (directory / MANIFEST).exists():
                shutil.rmtree(directory, ignore_errors=True)

    def resolve_subdir(self, subdir: str | None) -> Path:
        """A client-given directory: plain relative names, inside the root, or refused."""
        if not subdir:
            return self.root
        parts = subdir.split("/")
        for part in parts:
            if not _DIR_NAME.fullmatch(part) or part.startswith("act-"):
                raise UnsafeSaveDir(
                    f"save_dir {subdir!r}: use a relative path of plain names (letters, digits, '_', '-', "
                    "'.', not starting with '.', at most 100 characters each, none starting with 'act-')"
                )
        candidate = (self.root / subdir).resolve()  # follows symlinks
        if candidate != self.root and self.root not in candidate.parents:
            raise UnsafeSaveDir(f"save_dir {subdir!r} resolves outside the activations root")
        for path in (candidate, *candidate.parents):
            if path.exists() and not path.is_dir():
                raise UnsafeSaveDir(f"save_dir {subdir!r}: {path.name} is a file")
            if path == self.root:
                break
        return candidate

    def create(self, subdir: str | None, fmt: str) -> CaptureWriter:
        parent = self.resolve_subdir(subdir)
        try:
            parent.mkdir(parents=True, exist_ok=True)
            if parent.resolve() != parent:  # a symlink swapped in after the check
                raise UnsafeSaveDir(f"save_dir {subdir!r} resolves outside the activations root")
            request_id = f"act-{uuid.uuid4().hex}"
            directory = parent / request_id
            directory.mkdir()
        except (FileExistsError, NotADirectoryError) as exc:
            raise UnsafeSaveDir(f"save_dir {subdir!r} cannot be a directory: {exc.strerror}") from exc
        return CaptureWriter(self, request_id, directory, fmt)

    def register(self, request_id: str, directory: Path, written: int) -> None:
        """A finished capture: findable by id from now on, and counted."""
        with self._lock:
            self._index[request_id] = directory
            self.captures_written += 1
            self.bytes_written += written

    def directory(self, request_id: str) -> Path:
        directory = self._index.get(request_id) if _ID.fullmatch(request_id) else None
        if directory is None or not (directory / MANIFEST).is_file():
            raise UnknownActivation(request_id)
        return directory

    def manifest(self, request_id: str) -> dict:
        try:
            return json.loads((self.directory(request_id) / MANIFEST).read_text())
        except FileNotFoundError:  # deleted meanwhile
            raise UnknownActivation(request_id) from None

    def tensor_file(self, request_id: str, name: str) -> Path:
        for entry in self.manifest(request_id)["tensors"]:
            if entry["name"] == name:
                return self.directory(request_id) / entry["file"]
        raise UnknownActivation(f"{request_id}/{name}")

    def delete(self, request_id: str) -> None:
        with self._lock:  # two deletes of one id: one succeeds, the other finds nothing
            directory = self.directory(request_id)
            del self._index[request_id]
            shutil.rmtree(directory, ignore_errors=True)

    def relative(self, path: Path) -> str:
        return str(path.relative_to(self.root))
