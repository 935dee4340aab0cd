"""Files under the server's roots, written so that a reader never sees half of one and read so
that nothing outside a root is ever reached.

A :class:`Directory` is an open directory handle. Every operation on it is relative to that
handle (``openat`` and friends, through ``dir_fd``) and never follows a symlink: a child
directory is opened with ``O_NOFOLLOW``, a file is opened with ``O_NOFOLLOW`` and must be a
regular file. So a folder under a root that another process replaces by a symlink, or a
symlink planted beside our files, is refused (:class:`UnsafeEntry`) instead of followed, and
a directory once opened stays the same directory whatever happens to its path.

Writes go to a temporary name in the same directory (``.<name>.<random>.tmp``), are flushed
to the disk (``fsync``) and renamed into place; the temporary file never outlives a failure.
Needs a POSIX system (Linux, macOS): Windows has no ``openat``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, NamedTuple, TypeVar

logger = logging.getLogger(__name__)
T = TypeVar("T")

_DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
# O_NONBLOCK: opening a FIFO planted under a name would otherwise wait for a writer forever
# (it is then refused as not a regular file); reads of regular files never block on it.
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
_APPEND_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
TEMPORARY_SUFFIX = ".tmp"


def _open_for_writing(fd: int, mode: str) -> BinaryIO:
    """The one place a store file is opened for writing (the fault tests fill the disk here)."""
    return os.fdopen(fd, mode)


class UnsafeEntry(OSError):
    """A name under a root that is a symlink, or not the kind of entry expected (a folder where
    a file should be, a device, ...): refused, never followed."""


def _check_name(name: str) -> None:
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise UnsafeEntry(errno.EINVAL, f"not a plain name: {name!r}")


def _refused(exc: OSError, name: str) -> OSError:
    """``O_NOFOLLOW`` on a symlink fails with ELOOP (EMLINK on FreeBSD; ENOTDIR for a symlink
    opened as a directory): say what it is."""
    if exc.errno in (errno.ELOOP, errno.EMLINK, errno.ENOTDIR):
        return UnsafeEntry(exc.errno, f"{name!r} is a symlink or not a plain entry; refused")
    return exc


class Entry(NamedTuple):
    """A name in a folder and its kind: ``"file"`` (a regular file), ``"dir"`` or ``"other"``."""

    name: str
    kind: str


def _kind(entry: os.DirEntry) -> str:
    if entry.is_file(follow_symlinks=False):
        return "file"
    return "dir" if entry.is_dir(follow_symlinks=False) else "other"


class Directory:
    """An open directory under a root (see the module docstring). Close it when done (or use
    it as a context manager); the handle costs one file descriptor."""

    def __init__(self, fd: int, path: Path) -> None:
        self.fd = fd
        self.path = path  # for messages and responses only: never used to reach a file

    @classmethod
    def open_root(cls, path: Path) -> Directory:
        """A server root (created if missing). The root itself may be reached through a symlink
        (the operator's choice, resolved once, here); nothing under it is."""
        if os.open not in os.supports_dir_fd or os.scandir not in os.supports_fd:
            raise OSError(errno.ENOSYS, "the stores need a POSIX system (openat): on Windows, run under WSL")
        path = path.expanduser().resolve()
        path.mkdir(parents=True, exist_ok=True)
        return cls(os.open(path, _DIRECTORY_FLAGS & ~os.O_NOFOLLOW), path)

    def __enter__(self) -> Directory:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # -- folders -------------------------------------------------------------------

    def child(self, name: str, create: bool = False) -> Directory:
        """The folder ``name`` in this one (made if ``create``), opened without following a symlink.

        Raises:
            UnsafeEntry: it is a symlink or not a folder.
            FileNotFoundError: it does not exist (and ``create`` is false).
        """
        _check_name(name)
        if create:
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, 0o755, dir_fd=self.fd)
        try:
            return Directory(os.open(name, _DIRECTORY_FLAGS, dir_fd=self.fd), self.path / name)
        except OSError as exc:
            raise _refused(exc, name) from None

    def descend(self, parts: tuple[str, ...], create: bool = False) -> Directory:
        """The folder at ``parts`` below this one, each step opened as :meth:`child` does (a new
        handle even for no parts)."""
        current = Directory(os.dup(self.fd), self.path)
        for part in parts:
            with current:
                current = current.child(part, create=create)
        return current

    def make_child(self, name: str) -> Directory:
        """A new folder ``name`` (FileExistsError if anything has that name), opened."""
        _check_name(name)
        os.mkdir(name, 0o755, dir_fd=self.fd)
        return self.child(name)

    def entries(self) -> list[Entry]:
        """What this folder holds: each name and its kind, ``"file"`` (regular), ``"dir"`` or
        ``"other"`` (a symlink, a FIFO, ...), never following a symlink.

        Scans a handle of its own: ``os.scandir(fd)`` reads through a duplicate of ``fd``, which
        shares the read position, so two threads listing through one handle would split the
        entries between them. The kinds are read while that handle is open (a ``DirEntry`` may
        need it to stat, on file systems that do not report types)."""
        fd = os.open(".", _DIRECTORY_FLAGS & ~os.O_NOFOLLOW, dir_fd=self.fd)
        try:
            with os.scandir(fd) as scan:
                return [Entry(entry.name, _kind(entry)) for entry in scan]
        finally:
            os.close(fd)

    def file_stems(self, suffix: str) -> list[str]:
        """The names of the regular files here that end in ``suffix``, without it, sorted (a
        symlink is not a regular file: never listed)."""
        return sorted(
            entry.name.removesuffix(suffix)
            for entry in self.entries()
            if entry.name.endswith(suffix) and entry.kind == "file"
        )

    def remove_tree(self, name: str) -> None:
        """Remove the folder ``name`` and the files in it (a capture's folder holds files only;
        anything else in it is left, and the folder with it). Missing is fine."""
        try:
            directory = self.child(name)
        except (FileNotFoundError, UnsafeEntry):
            return
        with directory:
            for entry in directory.entries():
                if entry.kind != "dir":
                    directory.unlink(entry.name)
        with contextlib.suppress(FileNotFoundError, OSError):
            os.rmdir(name, dir_fd=self.fd)

    # -- files ---------------------------------------------------------------------

    def open_file(self, name: str) -> BinaryIO:
        """A regular file in this folder, opened for reading (a download keeps reading it whole
        even if it is deleted meanwhile).

        Raises:
            FileNotFoundError: no such file.
            UnsafeEntry: it is a symlink or not a regular file.
        """
        _check_name(name)
        try:
            fd = os.open(name, _READ_FLAGS, dir_fd=self.fd)
        except OSError as exc:
            raise _refused(exc, name) from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise UnsafeEntry(errno.EINVAL, f"{name!r} is not a regular file; refused")
            return os.fdopen(fd, "rb")
        except BaseException:
            os.close(fd)
            raise

    def read_bytes(self, name: str) -> bytes:
        with self.open_file(name) as handle:
            return handle.read()

    def is_file(self, name: str) -> bool:
        """Whether ``name`` is a regular file here (a symlink is not)."""
        try:
            return stat.S_ISREG(os.stat(name, dir_fd=self.fd, follow_symlinks=False).st_mode)
        except (FileNotFoundError, NotADirectoryError):
            return False

    def write(self, name: str, write: Callable[[BinaryIO], object]) -> int:
        """``write(handle)`` into a temporary file, flushed to the disk and renamed onto ``name``
        (replacing what was there in one step); returns the file's size in bytes. On any failure
        (disk full, read-only, no permission) the temporary file is removed and the error raised.
        """
        _check_name(name)
        temporary = f".{name}.{secrets.token_hex(4)}{TEMPORARY_SUFFIX}"
        fd = os.open(temporary, _CREATE_FLAGS, 0o644, dir_fd=self.fd)
        try:
            handle = _open_for_writing(fd, "wb")
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(temporary, dir_fd=self.fd)
            raise
        try:
            with handle:
                write(handle)
                handle.flush()
                os.fsync(handle.fileno())
                size = os.fstat(handle.fileno()).st_size
            os.replace(temporary, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary, dir_fd=self.fd)
            raise
        return size

    def write_bytes(self, name: str, data: bytes) -> int:
        return self.write(name, lambda handle: handle.write(data))

    def append(self, name: str, data: bytes, create: bool = False) -> None:
        """Append ``data`` to the file ``name``, never through a symlink; ``create``: it must not
        exist yet (made here: a file planted under that name, or a hard link to one elsewhere,
        is refused with FileExistsError instead of appended to)."""
        _check_name(name)
        try:
            fd = os.open(name, _APPEND_FLAGS | (os.O_EXCL if create else 0), 0o644, dir_fd=self.fd)
        except OSError as exc:
            raise _refused(exc, name) from None
        try:
            handle = _open_for_writing(fd, "ab")
        except BaseException:
            os.close(fd)
            raise
        with handle:
            handle.write(data)

    def unlink(self, name: str) -> bool:
        """Remove the file (or symlink) ``name``; False if there was none."""
        _check_name(name)
        try:
            os.unlink(name, dir_fd=self.fd)
        except FileNotFoundError:
            return False
        return True

    def remove_temporaries(self) -> int:
        """Remove this folder's leftover temporary files (of a process that died mid-write)."""
        removed = 0
        for entry in self.entries():
            if entry.name.startswith(".") and entry.name.endswith(TEMPORARY_SUFFIX):
                removed += self.unlink(entry.name)
        return removed


def read_listing(
    names: list[str], read: Callable[[str], T], missing: type[Exception], damaged: type[Exception], what: str
) -> tuple[list[T], list[dict]]:
    """``read(name)`` for each name: what was read, and the damaged entries skipped
    (``{"name", "error"}``, logged); a name that went missing meanwhile is left out."""
    found, skipped = [], []
    for name in names:
        try:
            found.append(read(name))
        except missing:  # deleted while listing
            continue
        except damaged as exc:
            logger.warning("%s: skipped a damaged entry: %s", what, exc)
            skipped.append({"name": name, "error": str(exc)})
    return found, skipped
