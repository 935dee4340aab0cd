"""The vector store: named vectors (steering directions, means) on disk under ``--vectors-dir``.

Each vector is two files, written atomically: ``<name>.safetensors`` (one 1-D float32
tensor named ``vector``) and ``<name>.json`` (its metadata: model, layer, hook point,
size, norm, how it was made, when). Names are plain (letters, digits, ``_ - .``, at
most 100 characters, not starting with ``.``), so a name can never be a path. The
store is read from disk on every call: vectors survive restarts and need no index.
"""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .files import write_atomically

NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}$")


class UnknownVector(KeyError):
    """No vector with this name."""


class VectorStore:
    def __init__(self, root: Path) -> None:
        self.root = root.expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    @staticmethod
    def valid_name(name: str) -> bool:
        return bool(NAME.fullmatch(name)) and not name.endswith((".json", ".safetensors"))

    def _paths(self, name: str) -> tuple[Path, Path]:
        if not self.valid_name(name):
            raise UnknownVector(name)
        return self.root / f"{name}.safetensors", self.root / f"{name}.json"

    def put(self, name: str, vector: torch.Tensor, **metadata) -> dict:
        tensor_path, meta_path = self._paths(name)
        vector = vector.detach().to("cpu", torch.float32).contiguous()
        meta = {
            "name": name,
            "size": vector.numel(),
            "norm": float(np.sqrt(np.square(vector.numpy(), dtype=np.float64).sum())),  # numpy, not torch
            "created": time.time(),
            **metadata,
        }
        with self._lock:
            write_atomically(tensor_path, lambda tmp: save_file({"vector": vector}, str(tmp)))
            write_atomically(meta_path, lambda tmp: tmp.write_text(json.dumps(meta, indent=2)))
        return meta

    def metadata(self, name: str) -> dict:
        _, meta_path = self._paths(name)
        try:
            return json.loads(meta_path.read_text())
        except FileNotFoundError:
            raise UnknownVector(name) from None

    def vector(self, name: str) -> torch.Tensor:
        tensor_path, _ = self._paths(name)
        try:
            return load_file(str(tensor_path))["vector"]
        except FileNotFoundError:
            raise UnknownVector(name) from None

    def names(self) -> list[str]:
        return sorted(p.stem for p in self.root.glob("*.json") if self.valid_name(p.stem))

    def count(self) -> int:
        return len(self.names())

    def delete(self, name: str) -> None:
        tensor_path, meta_path = self._paths(name)
        with self._lock:
            if not meta_path.exists():
                raise UnknownVector(name)
            meta_path.unlink(missing_ok=True)
            tensor_path.unlink(missing_ok=True)
