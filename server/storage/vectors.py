"""The vector store: named vectors (steering directions, means) on disk under ``--vectors-dir``.

Each vector is one file, ``<name>.safetensors``: a 1-D float32 tensor named ``vector``, with
its metadata (model, layer, hook point, size, norm, how it was made, when) as JSON in the
file's own header (safetensors' ``__metadata__``, key ``meta``). Values and metadata are thus
one atomic unit: a write lands whole by one rename, and a reader sees the whole old or the
whole new vector, never new values under old metadata. Names are plain (letters, digits,
``_ - .``, at most 100 characters, not starting with ``.``), so a name can never be a path;
files are reached through the root's directory handle without following a symlink
(``files.Directory``). The store is read from disk on every call: vectors survive restarts and
need no index. A store written before 2026-11-30 (values and a ``<name>.json`` beside them) is
converted at start-up.
"""

from __future__ import annotations

import json
import logging
import re
import struct
import threading
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from .files import Directory, read_listing

logger = logging.getLogger(__name__)

NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}$")
SUFFIX = ".safetensors"
MAX_HEADER_BYTES = 1 << 20  # a vector's header is a few hundred bytes


class UnknownVector(KeyError):
    """No vector with this name."""


class DamagedVector(ValueError):
    """A file in the store that is not a vector the store wrote (unreadable, no metadata, a symlink)."""


def header_metadata(data: bytes) -> dict[str, str]:
    """A safetensors file's ``__metadata__`` (its header: an 8-byte little-endian length, then
    that many bytes of JSON; https://github.com/huggingface/safetensors#format).

    Raises:
        DamagedVector: not a safetensors header.
    """
    try:
        (length,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + length])
        metadata = header.get("__metadata__") or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise ValueError("its __metadata__ is not a map of strings")
        return metadata
    except (struct.error, ValueError, AttributeError, RecursionError) as exc:
        raise DamagedVector(f"not a safetensors file: {exc}") from None


def _meta(metadata: dict[str, str]) -> dict:
    """The store's metadata in a header's ``__metadata__`` (DamagedVector if it is not there)."""
    try:
        meta = json.loads(metadata["meta"])
    except (KeyError, ValueError, RecursionError) as exc:
        raise DamagedVector(f"no metadata: {exc}") from None
    if not isinstance(meta, dict):
        raise DamagedVector("its metadata is not an object")
    return meta


class VectorStore:
    """Named 1-D vectors with their metadata, one safetensors file each (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.folder = Directory.open_root(root)
        self.root = self.folder.path
        self._lock = threading.Lock()
        self.folder.remove_temporaries()
        self._convert_legacy()

    def close(self) -> None:
        self.folder.close()

    @staticmethod
    def valid_name(name: str) -> bool:
        return bool(NAME.fullmatch(name)) and not name.endswith((".json", SUFFIX))

    def _file(self, name: str) -> str:
        if not self.valid_name(name):
            raise UnknownVector(name)
        return name + SUFFIX

    def put(self, name: str, vector: torch.Tensor, **metadata) -> dict:
        """Store ``vector`` (any shape, flattened to ``[size]`` float32) as ``name``, replacing
        one of that name in one step; returns its metadata (``size``, ``norm``: its L2 norm,
        ``created``: Unix seconds, and ``metadata``).

        Raises:
            UnknownVector: the name is not a plain one.
            OSError: the disk refused (nothing is left half-written).
        """
        file = self._file(name)
        vector = vector.detach().to("cpu", torch.float32).contiguous().reshape(-1)
        meta = {
            "name": name,
            "size": vector.numel(),
            "norm": float(np.sqrt(np.square(vector.numpy(), dtype=np.float64).sum())),  # numpy, not torch
            "created": time.time(),
            **metadata,
        }
        data = save({"vector": vector}, metadata={"meta": json.dumps(meta)})
        with self._lock:
            self.folder.write_bytes(file, data)
        return meta

    def _read(self, name: str) -> bytes:
        try:
            return self.folder.read_bytes(self._file(name))
        except FileNotFoundError:
            raise UnknownVector(name) from None
        except OSError as exc:  # a symlink or not a regular file
            raise DamagedVector(f"{name}: {exc}") from None

    def metadata(self, name: str) -> dict:
        """Its metadata, from the file's header alone (a listing reads no values).

        Raises UnknownVector (no such vector) or DamagedVector (a file that is not one)."""
        try:
            with self.folder.open_file(self._file(name)) as handle:
                head = handle.read(8)
                (length,) = struct.unpack("<Q", head) if len(head) == 8 else (0,)
                if length > MAX_HEADER_BYTES:
                    raise DamagedVector(f"{name}: a header of {length} bytes")
                return _meta(header_metadata(head + handle.read(length)))
        except FileNotFoundError:
            raise UnknownVector(name) from None
        except DamagedVector:
            raise
        except (OSError, KeyError, ValueError) as exc:  # a symlink, not a file; no metadata
            raise DamagedVector(f"{name}: {exc}") from None

    def vector(self, name: str) -> torch.Tensor:
        """The values, ``[size]`` float32; raises as :meth:`metadata`."""
        try:
            return load(self._read(name))["vector"]
        except (SafetensorError, KeyError) as exc:
            raise DamagedVector(f"{name}: {exc}") from None

    def read(self, name: str) -> tuple[dict, torch.Tensor]:
        """Metadata and values from one read of the one file (never a mix of two versions)."""
        data = self._read(name)
        try:
            return _meta(header_metadata(data)), load(data)["vector"]
        except DamagedVector as exc:
            raise DamagedVector(f"{name}: {exc}") from None
        except (SafetensorError, KeyError, ValueError) as exc:
            raise DamagedVector(f"{name}: {exc}") from None

    def names(self) -> list[str]:
        """Every stored vector's name (regular files only: a symlink is never listed)."""
        return [name for name in self.folder.file_stems(SUFFIX) if self.valid_name(name)]

    def listing(self) -> tuple[list[dict], list[dict]]:
        """Every vector's metadata, and the damaged entries skipped (``{"name", "error"}``)."""
        return read_listing(self.names(), self.metadata, UnknownVector, DamagedVector, "vector store")

    def count(self) -> int:
        return len(self.names())

    def delete(self, name: str) -> None:
        file = self._file(name)
        with self._lock:
            if not self.folder.unlink(file):
                raise UnknownVector(name)

    def _convert_legacy(self) -> None:
        """Values in ``<name>.safetensors`` and metadata in ``<name>.json`` (stores written before
        2026-11-30) become one file each."""
        for entry in self.folder.entries():
            name = entry.name.removesuffix(".json")
            if not (entry.name.endswith(".json") and entry.kind == "file"):
                continue
            if not self.valid_name(name) or not self.folder.is_file(name + SUFFIX):
                continue
            try:
                meta = json.loads(self.folder.read_bytes(entry.name))
                values = load(self.folder.read_bytes(name + SUFFIX))["vector"]
                if "meta" in header_metadata(self.folder.read_bytes(name + SUFFIX)):
                    continue  # already one file
                if not isinstance(meta, dict):
                    raise ValueError("its metadata is not an object")
            except (OSError, ValueError, KeyError, SafetensorError) as exc:
                logger.warning("vector store: left %s as it was (%s)", entry.name, exc)
                continue
            data = save({"vector": values.float().reshape(-1)}, metadata={"meta": json.dumps(meta)})
            self.folder.write_bytes(name + SUFFIX, data)
            self.folder.unlink(entry.name)
            logger.info("vector store: %s converted to one file", name)
