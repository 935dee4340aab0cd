"""The activation store: one folder per captured request, under ``--activations-dir``.

Layout::

    <root>/[<client subdir>/]<request id>/
        manifest.json                      what was captured: the positions and tokens once,
                                           then one compact entry per tensor
        <tensor name>.<safetensors|npy|pt> one file per tensor

The store is a small transactional database on the file system (why files and not SQLite:
``docs/architecture.md``, "The stores"):

* every file is written under a temporary name, flushed and renamed into place, and the
  manifest is written last: it is a capture's commit record. A folder without one is a
  capture that never finished; it is removed at start-up with any temporary file (a run
  killed mid-write), and a request that fails or is cancelled removes its folder (``abort``);
* every operation goes through directory handles opened from the root without following a
  symlink (``files.Directory``): a client's subdirectory, or any folder under the root,
  replaced by a symlink is refused, never followed, and a capture folder once created stays
  the one written to whatever happens to its path;
* a client's subdirectory is relative, made of plain names (letters, digits, ``_ - .``, not
  starting with ``.``, never ``act-...``, which names captures);
* request ids are generated here (``act-<hex>``) and looked up by exact name; a manifest's
  ``file`` entries must name regular files in their own capture folder, nothing else;
* a download opens its file before the response starts: deleting the capture meanwhile lets
  it finish whole (the open file outlives its name), or it never starts (404).
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import re
import threading
import time
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import BinaryIO

import torch

from .files import Directory, UnsafeEntry

logger = logging.getLogger(__name__)

FORMATS = ("safetensors", "npy", "pt")
MANIFEST = "manifest.json"
MANIFEST_VERSION = 2  # 2: positions and tokens once per capture, not per tensor
_ID = re.compile(r"^act-[0-9a-f]{32}$")
_DIR_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}$")
_PART_SUFFIX = ".part"


class UnsafeSaveDir(ValueError):
    """A client-given directory that is not a plain relative path inside the activations root."""


class UnknownActivation(KeyError):
    """No capture with this id (or no tensor with this name in it)."""


class DamagedActivation(UnknownActivation):
    """A capture whose folder or files are not what the store wrote (a symlink, a manifest entry
    naming something outside its folder, unreadable JSON): refused, and logged."""


class CaptureTooLarge(ValueError):
    """A capture's files and manifest came to more than ``--max-capture-bytes``; it was removed."""


def serialize_tensor(handle: BinaryIO, name: str, tensor: torch.Tensor, fmt: str) -> None:
    """Write ``tensor`` (stored as ``name``) to an open file in one of :data:`FORMATS`."""
    tensor = tensor.detach().contiguous().cpu()
    if fmt == "safetensors":
        from safetensors.torch import save

        handle.write(save({name: tensor}))
    elif fmt == "npy":
        import numpy as np

        if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16
            tensor = tensor.float()
        np.save(handle, tensor.numpy())
    elif fmt == "pt":
        torch.save(tensor, handle)
    else:
        raise ValueError(f"unknown format {fmt!r}")


def deserialize_tensor(handle: BinaryIO, name: str, fmt: str) -> torch.Tensor:
    """The tensor ``name`` from an open file written by :func:`serialize_tensor`."""
    if fmt == "safetensors":
        from safetensors.torch import load

        return load(handle.read())[name]
    if fmt == "npy":
        import numpy as np

        return torch.from_numpy(np.load(handle, allow_pickle=False))
    return torch.load(handle, weights_only=True)


class _Appender:
    """A tensor that grows along its first axis, step by step.

    Steps are kept in memory until they hold ``FLUSH_BYTES``, then appended as raw bytes
    to a hidden file beside the final one; so memory stays bounded however many tokens a
    generation captures, and a short capture never touches the disk before its final
    file is written. The appended tensors are kept as given (CPU tensors nobody changes
    afterwards: the capture recorder hands over copies).
    """

    FLUSH_BYTES = 1 << 18

    def __init__(self, directory: Directory, name: str) -> None:
        self.directory = directory
        self.name = f".{name}{_PART_SUFFIX}"
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
            raise ValueError(f"cannot append a {tensor.dtype} {list(tensor.shape)} tensor to {self.name}")
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
        first = self.flushed_rows == 0
        self.directory.append(self.name, data.reshape(-1).view(torch.uint8).numpy().tobytes(), create=first)
        self.flushed_rows += data.shape[0]
        self.pending, self.pending_bytes = [], 0

    def tensor(self) -> torch.Tensor:
        """The whole tensor: from memory if it never reached the hidden file, else
        memory-mapped from it (a private copy-on-write map: not read into memory at once)."""
        if self.dtype is None:
            return torch.empty(0)
        if self.flushed_rows == 0:
            return torch.cat(self.pending)
        self.flush()
        with self.directory.open_file(self.name) as handle:
            mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
        flat = torch.frombuffer(mapped, dtype=self.dtype)
        return flat.view(self.rows, *self.trailing)

    def remove(self) -> None:
        self.directory.unlink(self.name)


class CaptureWriter:
    """Writes one request's tensors and then its manifest; ``abort`` removes all of it.

    A tensor is either written whole (``write``) or grown step by step (``append``, then
    ``close_appended``), which keeps memory flat however many tokens a generation captures.
    Holds two directory handles (the capture's folder and its parent) until it finishes or
    aborts.
    """

    def __init__(
        self,
        store: ActivationStore,
        request_id: str,
        parts: tuple[str, ...],
        parent: Directory,
        directory: Directory,
        fmt: str,
    ) -> None:
        self.store = store
        self.request_id = request_id
        self.parts = parts  # its parent folder under the root
        self.parent = parent
        self.folder = directory
        self.directory = directory.path  # where it is, for responses
        self.format = fmt
        self.entries: list[dict] = []
        self.written = 0  # bytes of the files written so far
        self.started = time.time()
        self._appenders: dict[str, _Appender] = {}

    def append(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self._appenders:
            self._appenders[name] = _Appender(self.folder, name)
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
            appender.remove()

    def write(self, name: str, tensor: torch.Tensor, **meta) -> None:
        file = f"{name}.{self.format}"
        size = self.folder.write(file, lambda handle: serialize_tensor(handle, name, tensor, self.format))
        self.written += size
        self._check_size(0)
        self.entries.append(
            {
                "name": name,
                "file": file,
                "saved_shape": list(tensor.shape),
                "dtype": str(tensor.dtype).removeprefix("torch."),
                "bytes": size,
                **meta,
            }
        )

    def _check_size(self, more: int) -> None:
        limit = self.store.max_capture_bytes
        if limit is not None and self.written + more > limit:
            raise CaptureTooLarge(
                f"the capture came to {self.written + more} bytes with its manifest, more than "
                f"--max-capture-bytes ({limit}); it was removed. Capture fewer layers, hook points "
                "or positions, or sample_hidden."
            )

    def finish(self, **manifest) -> dict:
        """Write the manifest (the capture's commit record) and make the capture findable."""
        body = {
            "id": self.request_id,
            "manifest_version": MANIFEST_VERSION,
            "format": self.format,
            "started": self.started,
            "finished": time.time(),
            **manifest,
            "tensors": self.entries,
        }
        # One line: json's C encoder (with indent it falls back to the pure-Python one, about
        # ten times slower for a manifest that lists hundreds of tensors).
        data = json.dumps(body).encode()
        self._check_size(len(data))
        self.written += self.folder.write_bytes(MANIFEST, data)
        self.store.register(self.request_id, self.parts, self.entries, self.written)
        self._close()
        return body

    def abort(self) -> None:
        if self.parent.fd >= 0:
            self.parent.remove_tree(self.request_id)
        self._close()

    def _close(self) -> None:
        self.folder.close()
        self.parent.close()


class ActivationStore:
    """Finds, creates and deletes capture folders under one root (see the module docstring).

    ``max_capture_bytes``: the most one capture may write, manifest included (None: no limit);
    a capture that comes to more is removed and raises :class:`CaptureTooLarge`.
    """

    FILE_INDEX_SIZE = 256  # captures whose tensor -> file maps are kept (downloads skip the manifest)

    def __init__(self, root: Path, max_capture_bytes: int | None = None) -> None:
        self.folder = Directory.open_root(root)
        self.root = self.folder.path
        self.max_capture_bytes = max_capture_bytes
        self._index: dict[str, tuple[str, ...]] = {}  # id -> its parent's parts under the root
        self._files: OrderedDict[str, dict[str, str]] = OrderedDict()  # id -> {tensor: file}
        self._lock = threading.Lock()
        self.captures_written = 0  # since start, for /metrics
        self.bytes_written = 0
        self._scan()

    def close(self) -> None:
        self.folder.close()

    def _scan(self) -> None:
        """Index the finished captures; remove what a run that died mid-write left (temporary
        files, capture folders without a manifest). Symlinks are never followed."""
        for path, folders, _ in os.walk(self.root, followlinks=False):
            parts = Path(path).relative_to(self.root).parts
            captures = [name for name in folders if _ID.fullmatch(name)]
            folders[:] = [name for name in folders if name not in captures]
            if not captures:
                continue
            try:
                parent = self.folder.descend(parts)
            except OSError:
                continue  # swapped meanwhile; not ours to touch
            with parent:
                for name in captures:
                    try:
                        with parent.child(name) as capture:
                            finished = capture.is_file(MANIFEST)
                            if finished:
                                capture.remove_temporaries()
                                for entry in capture.entries():
                                    if entry.name.endswith(_PART_SUFFIX) and entry.name.startswith("."):
                                        capture.unlink(entry.name)
                    except OSError:
                        continue
                    if finished:
                        self._index[name] = parts
                    else:
                        logger.info("removing an unfinished capture %s", "/".join((*parts, name)))
                        parent.remove_tree(name)

    def resolve_subdir(self, subdir: str | None) -> tuple[str, ...]:
        """A client-given directory as plain names under the root; refused if a name is not
        plain, or if a folder of it that exists is a symlink or a file.

        Raises:
            UnsafeSaveDir: what is wrong, to tell the client.
        """
        if not subdir:
            return ()
        parts = tuple(subdir.split("/"))
        for part in parts:
            if not _DIR_NAME.fullmatch(part) or part.startswith("act-"):
                raise UnsafeSaveDir(
                    f"save_dir {subdir!r}: use a relative path of plain names (letters, digits, '_', '-', "
                    "'.', not starting with '.', at most 100 characters each, none starting with 'act-')"
                )
        current = Directory(os.dup(self.folder.fd), self.root)
        try:
            for part in parts:
                try:
                    following = current.child(part)
                except FileNotFoundError:
                    break  # made when the capture is written
                except (UnsafeEntry, NotADirectoryError) as exc:
                    raise UnsafeSaveDir(f"save_dir {subdir!r}: {part!r} is a symlink or a file") from exc
                current.close()
                current = following
        finally:
            current.close()
        return parts

    def create(self, subdir: str | None, fmt: str) -> CaptureWriter:
        """A new capture folder (its parents made as needed, none followed through a symlink).

        Raises:
            UnsafeSaveDir: ``subdir`` is not plain, or a folder on its way is a symlink or a file.
            OSError: the disk refused (full, read-only, permissions).
        """
        parts = self.resolve_subdir(subdir)
        try:
            parent = self.folder.descend(parts, create=True)
        except (UnsafeEntry, FileExistsError, NotADirectoryError) as exc:
            raise UnsafeSaveDir(f"save_dir {subdir!r} cannot be a folder here: {exc.strerror}") from exc
        request_id = f"act-{uuid.uuid4().hex}"
        try:
            directory = parent.make_child(request_id)
        except BaseException:
            parent.close()
            raise
        return CaptureWriter(self, request_id, parts, parent, directory, fmt)

    def register(self, request_id: str, parts: tuple[str, ...], entries: list[dict], written: int) -> None:
        """A finished capture (in the folder ``parts`` under the root): findable by id from now on,
        and counted."""
        with self._lock:
            self._index[request_id] = parts
            self._remember_files(request_id, {entry["name"]: entry["file"] for entry in entries})
            self.captures_written += 1
            self.bytes_written += written

    def _remember_files(self, request_id: str, files: dict[str, str]) -> None:
        self._files[request_id] = files
        self._files.move_to_end(request_id)
        while len(self._files) > self.FILE_INDEX_SIZE:
            self._files.popitem(last=False)

    def _open(self, request_id: str) -> Directory:
        """The capture's folder, opened from the root without following a symlink.

        Raises:
            UnknownActivation: no such finished capture.
            DamagedActivation: its folder is a symlink now.
        """
        parts = self._index.get(request_id) if _ID.fullmatch(request_id) else None
        if parts is None:
            raise UnknownActivation(request_id)
        try:
            directory = self.folder.descend((*parts, request_id))
        except FileNotFoundError:
            raise UnknownActivation(request_id) from None
        except OSError as exc:
            raise self._damaged(request_id, exc) from None
        try:
            finished = directory.is_file(MANIFEST)
        except OSError as exc:
            directory.close()
            raise self._damaged(request_id, exc) from None
        if not finished:
            directory.close()
            raise UnknownActivation(request_id)
        return directory

    def _damaged(self, what: str, exc: BaseException) -> DamagedActivation:
        logger.warning("refused a damaged capture entry %s: %s", what, exc)
        return DamagedActivation(what)

    def directory(self, request_id: str) -> Path:
        """Where a finished capture's folder is (for messages; never used to reach a file)."""
        with self._open(request_id) as directory:
            return directory.path

    def manifest(self, request_id: str) -> dict:
        """The capture's manifest, checked: each ``file`` a plain name in its own folder.

        Raises:
            UnknownActivation: no such capture (or deleted meanwhile).
            DamagedActivation: the manifest is not the store's (unreadable, or names a path).
        """
        with self._open(request_id) as directory:
            try:
                manifest = json.loads(directory.read_bytes(MANIFEST))
            except FileNotFoundError:  # deleted meanwhile
                raise UnknownActivation(request_id) from None
            except (OSError, ValueError) as exc:
                raise self._damaged(request_id, exc) from None
        files = self._checked_files(request_id, manifest)
        with self._lock:
            self._remember_files(request_id, files)
        return manifest

    def _checked_files(self, request_id: str, manifest: object) -> dict[str, str]:
        try:
            files = {entry["name"]: entry["file"] for entry in manifest["tensors"]}
            if manifest["format"] not in FORMATS:
                raise ValueError(f"format {manifest['format']!r}")
        except (TypeError, KeyError, ValueError) as exc:
            raise self._damaged(request_id, exc) from None
        for file in files.values():
            if not isinstance(file, str) or "/" in file or file.startswith(".") or file == MANIFEST:
                raise self._damaged(request_id, ValueError(f"a file entry names {file!r}"))
        return files

    def _file_of(self, request_id: str, name: str) -> str:
        with self._lock:
            files = self._files.get(request_id)
            if files is not None:
                self._files.move_to_end(request_id)
        if files is None:
            self.manifest(request_id)
            files = self._files.get(request_id, {})
        if name not in files:
            raise UnknownActivation(f"{request_id}/{name}")
        return files[name]

    def open_tensor(self, request_id: str, name: str) -> tuple[BinaryIO, str]:
        """The tensor's file, opened for reading, and its file name. The caller closes it; a
        delete meanwhile does not cut the read short.

        Raises:
            UnknownActivation: no such capture or tensor.
            DamagedActivation: the file is a symlink or not a regular file.
        """
        file = self._file_of(request_id, name)
        with self._open(request_id) as directory:
            try:
                return directory.open_file(file), file
            except FileNotFoundError:
                raise UnknownActivation(f"{request_id}/{name}") from None
            except OSError as exc:
                raise self._damaged(f"{request_id}/{name}", exc) from None

    def load_tensor(self, request_id: str, name: str, fmt: str) -> torch.Tensor:
        """The stored tensor itself (for ``patch``); raises as :meth:`open_tensor`, and
        DamagedActivation for a file that does not hold it in ``fmt``."""
        handle, _ = self.open_tensor(request_id, name)
        with handle:
            try:
                return deserialize_tensor(handle, name, fmt)
            except Exception as exc:  # safetensors, numpy and pickle each raise their own
                raise self._damaged(f"{request_id}/{name}", exc) from None

    def delete(self, request_id: str) -> None:
        with self._lock:  # two deletes of one id: one succeeds, the other finds nothing
            parts = self._index.get(request_id) if _ID.fullmatch(request_id) else None
            if parts is None:
                raise UnknownActivation(request_id)
            del self._index[request_id]
            self._files.pop(request_id, None)
        try:
            parent = self.folder.descend(parts)
        except OSError:
            return  # its folder is gone or was swapped for a symlink: nothing of ours to remove
        with parent:
            parent.remove_tree(request_id)

    def relative(self, path: Path) -> str:
        return str(path.relative_to(self.root))
