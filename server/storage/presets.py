"""Intervention presets: named lists of intervention items, one JSON file each under a root.

Names are plain (as for vectors), files are written atomically, and the store is read
from disk on every call, so presets survive restarts.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

from .files import write_atomically
from .vectors import NAME


class UnknownPreset(KeyError):
    """No preset with this name."""


class PresetStore:
    """Named lists of intervention items, one JSON file each."""

    def __init__(self, root: Path) -> None:
        self.root = root.expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def _path(self, name: str) -> Path:
        if not NAME.fullmatch(name) or name.endswith(".json"):
            raise UnknownPreset(name)
        return self.root / f"{name}.json"

    def put(self, name: str, items: list[dict]) -> None:
        path = self._path(name)
        with self._lock:
            write_atomically(
                path, lambda tmp: tmp.write_text(json.dumps({"name": name, "items": items}, indent=2))
            )

    def get(self, name: str) -> dict:
        try:
            return json.loads(self._path(name).read_text())
        except FileNotFoundError:
            raise UnknownPreset(name) from None

    def names(self) -> list[str]:
        return sorted(p.stem for p in self.root.glob("*.json") if NAME.fullmatch(p.stem))

    def delete(self, name: str) -> None:
        path = self._path(name)
        with self._lock:
            if not path.exists():
                raise UnknownPreset(name)
            path.unlink()
