"""/v1/saes: list, load and unload the sparse autoencoders the server serves.

An SAE loads from a folder under ``--saes-dir`` (SAELens' format, ``server/engine/sae.py``):
the folder is reached one plain name at a time, never through a symlink or ``..``
(``storage/files.py``), its two files are read in a thread, and the weights become tensors on
the engine's worker, on the model's device. Loaded SAEs serve ``capture.saes`` and the
``sae_*`` interventions until they are unloaded.
"""

from __future__ import annotations

import asyncio
import errno
from http import HTTPStatus

from ..engine.sae import CFG_FILE, MAX_CFG_BYTES, NAME, WEIGHTS_FILE, SaeError
from ..errors import APIError
from ..protocol import SaeLoad
from ..storage.files import Directory, UnsafeEntry
from .base import ENGINE_FAILURES, engine_error, require_feature
from .parts import ServingParts


class SaeServing:
    """The served SAEs over HTTP; the set itself is the engine's (``Engine.saes``)."""

    def __init__(self, parts: ServingParts) -> None:
        self.engine = parts.engine
        self.root = parts.settings.saes_dir

    def listing(self) -> dict:
        return {"object": "list", "data": self.engine.saes.listing()}

    def describe(self, name: str) -> dict:
        try:
            return self.engine.saes.get(name).describe()
        except KeyError:
            raise not_found(f"no SAE named {name!r} is loaded") from None

    async def load(self, body: SaeLoad) -> dict:
        require_feature(self.engine, "saes", "folder")
        if not NAME.match(body.name):
            raise APIError(
                "name: letters, digits, '_', '-', '.', at most 64, not starting with '.'", param="name"
            )
        if body.name in self.engine.saes:
            raise APIError(f"an SAE named {body.name!r} is loaded already (DELETE it first)", param="name")
        cfg, weights = await asyncio.to_thread(self._read, body.folder)
        try:
            return await self.engine.compute(self.engine.add_sae, body.name, cfg, weights, body.folder)
        except SaeError as exc:
            param = "name" if exc.field == "name" else "folder"
            raise APIError(f"{body.folder}: {exc}" if param == "folder" else str(exc), param=param) from None
        except ENGINE_FAILURES as exc:  # out of memory on the device
            raise engine_error(exc) from exc

    def _read(self, folder: str) -> tuple[bytes, bytes]:
        """The folder's two files, read without leaving ``--saes-dir``.

        Raises:
            APIError: 400 naming ``folder``."""
        parts = tuple(folder.strip("/").split("/"))
        if folder.startswith("/") or any(part in ("", ".", "..") or part.startswith(".") for part in parts):
            raise APIError(
                "folder: a relative path under the server's --saes-dir, no '..' or hidden names",
                param="folder",
            )
        try:
            with Directory.open_root(self.root) as root, root.descend(parts) as directory:
                with directory.open_file(CFG_FILE) as handle:
                    cfg = handle.read(MAX_CFG_BYTES + 1)
                if len(cfg) > MAX_CFG_BYTES:
                    raise APIError(f"{CFG_FILE} is larger than {MAX_CFG_BYTES} bytes", param="folder")
                return cfg, directory.read_bytes(WEIGHTS_FILE)
        except FileNotFoundError:
            raise APIError(
                f"no SAE at {folder!r} under --saes-dir (a folder with {CFG_FILE} and {WEIGHTS_FILE})",
                param="folder",
            ) from None
        except UnsafeEntry:
            raise APIError(
                f"{folder!r} passes through a symlink or something not a plain folder or file", param="folder"
            ) from None
        except OSError as exc:
            if exc.errno in (
                errno.EACCES,
                errno.EPERM,
                errno.EISDIR,
                errno.ENOTDIR,
                errno.ENAMETOOLONG,
                errno.EINVAL,
            ):
                raise APIError(f"{folder!r} cannot be read: {exc.strerror}", param="folder") from None
            raise

    async def unload(self, name: str) -> dict:
        if name not in self.engine.saes:
            raise not_found(f"no SAE named {name!r} is loaded")
        try:
            await self.engine.compute(self.engine.remove_sae, name)
        except KeyError:  # unloaded meanwhile
            raise not_found(f"no SAE named {name!r} is loaded") from None
        return {"name": name, "deleted": True}


def not_found(message: str) -> APIError:
    return APIError(message, status=HTTPStatus.NOT_FOUND, param="name", code="not_found")
