"""A disk that fails under the stores, for the fault tests: every store write goes through
``server.storage.files._open_for_writing``; here its handles fail like a full, read-only or
forbidden disk, after letting ``budget`` bytes through (so a temporary file is half-written
when the error comes, as on a real full disk)."""

from __future__ import annotations

import os
from contextlib import contextmanager


class FailingHandle:
    """A file handle that writes until the shared budget is spent, then raises ``OSError(error)``."""

    def __init__(self, handle, disk: FailingDisk) -> None:
        self.handle = handle
        self.disk = disk

    def write(self, data) -> int:
        data = bytes(data)
        room = max(0, self.disk.budget - self.disk.written)
        if len(data) > room:
            self.handle.write(data[:room])
            self.handle.flush()
            self.disk.written += room
            self.disk.failures += 1
            raise OSError(self.disk.error, os.strerror(self.disk.error))
        self.disk.written += len(data)
        return self.handle.write(data)

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.handle.close()


class FailingDisk:
    def __init__(self, error: int, budget: int) -> None:
        self.error = error
        self.budget = budget
        self.written = 0
        self.failures = 0

    def open(self, fd: int, mode: str):
        return FailingHandle(os.fdopen(fd, mode), self)


@contextmanager
def failing_disk(error: int, budget: int = 0):
    """Within the block, store writes fail with ``error`` once ``budget`` bytes were written."""
    import pytest

    from server.storage import files

    disk = FailingDisk(error, budget)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(files, "_open_for_writing", disk.open)
        yield disk
