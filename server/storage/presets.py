"""Intervention presets: named lists of intervention items, one JSON file each under a root.

Names are plain (as for vectors), files are written atomically through the root's directory
handle and never read through a symlink (``files.Directory``), and the store is read from disk
on every call, so presets survive restarts.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

from .files import Directory, read_listing
from .vectors import NAME


class UnknownPreset(KeyError):
    """No preset with this name."""


class DamagedPreset(ValueError):
    """A preset file that is not one the store wrote (unreadable JSON, a symlink)."""


class PresetStore:
    """Named lists of intervention items, one JSON file each."""

    def __init__(self, root: Path) -> None:
        self.folder = Directory.open_root(root)
        self.root = self.folder.path
        self._lock = threading.Lock()
        self.folder.remove_temporaries()

    def close(self) -> None:
        self.folder.close()

    @staticmethod
    def _file(name: str) -> str:
        if not NAME.fullmatch(name) or name.endswith(".json"):
            raise UnknownPreset(name)
        return f"{name}.json"

    def put(self, name: str, items: list[dict]) -> None:
        """Store ``items`` as ``name`` (replacing one of that name in one step); OSError if the
        disk refused (nothing is left half-written)."""
        data = json.dumps({"name": name, "items": items}, indent=2).encode()
        with self._lock:
            self.folder.write_bytes(self._file(name), data)

    def get(self, name: str) -> dict:
        """``{"name", "items"}``; raises UnknownPreset or DamagedPreset."""
        try:
            preset = json.loads(self.folder.read_bytes(self._file(name)))
        except FileNotFoundError:
            raise UnknownPreset(name) from None
        except (OSError, ValueError, RecursionError) as exc:  # RecursionError: nested past json's limit
            raise DamagedPreset(f"{name}: {exc}") from None
        if not isinstance(preset, dict) or not isinstance(preset.get("items"), list):
            raise DamagedPreset(f"{name}: not a preset")
        return preset

    def names(self) -> list[str]:
        """Every preset's name (regular files only: a symlink is never listed)."""
        return [name for name in self.folder.file_stems(".json") if NAME.fullmatch(name)]

    def listing(self) -> tuple[list[dict], list[dict]]:
        """Every preset, and the damaged entries skipped (``{"name", "error"}``)."""
        return read_listing(self.names(), self.get, UnknownPreset, DamagedPreset, "preset store")

    def delete(self, name: str) -> None:
        file = self._file(name)
        with self._lock:
            if not self.folder.unlink(file):
                raise UnknownPreset(name)
