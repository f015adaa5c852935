"""A full disk is one line: writes that hit ENOSPC or a quota name what, where and the free space.

Every write here leaves the previous file whole: atomic writes go to a temporary file in the
same folder, are fsynced and renamed over the target; on any failure the temporary is removed.
An append that fails is cut back to the file's previous length, so no half line is left.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

log = logging.getLogger(__name__)

FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


class DiskFull(RuntimeError):
    """A write failed for want of space or quota; the message is one line saying what and where."""

    def __init__(self, what: str, path: Path, code: int, free: int | None = None) -> None:
        self.what, self.path, self.errno = what, path, code
        self.free = _free_or_unknown(path) if free is None else free
        cause = "disk quota exceeded" if code == errno.EDQUOT else "no space left on the device"
        left = "free space unknown" if self.free < 0 else f"{human_bytes(self.free)} free there"
        super().__init__(f"disk full: could not write {what} to {path} ({cause}; {left})")

    def __reduce__(self) -> tuple:
        """Pickle by the constructor's arguments, so the error crosses process boundaries."""
        return type(self), (self.what, self.path, self.errno, self.free)


def _free_or_unknown(path: Path) -> int:
    """Free bytes where `path` lives, or -1 when even that cannot be asked."""
    try:
        return free_bytes(path)
    except OSError:
        return -1


def free_bytes(path: Path | str) -> int:
    """Bytes free to this user on the filesystem that holds `path` (or its nearest parent)."""
    probe = Path(path).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def human_bytes(count: float) -> str:
    """A byte count as people read it: '0 B', '512 KiB', '1.5 GiB'."""
    for unit in _UNITS:
        if abs(count) < 1024 or unit == _UNITS[-1]:
            return f"{count:.0f} {unit}" if unit == "B" or count >= 100 else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def full_errno(error: BaseException) -> int | None:
    """ENOSPC or EDQUOT when the error, or one it was raised from, is a full disk; else None."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in FULL_ERRNOS:
            return current.errno
        current = current.__cause__ or current.__context__
    return None


def tmp_path(path: Path) -> Path:
    """The temporary file an atomic write of `path` goes through, beside it in the same folder."""
    return path.with_name(f".{path.name}.tmp")


@contextlib.contextmanager
def guard_write(what: str, path: Path | str, tmp: Path | None = None) -> Iterator[None]:
    """Turn a full disk in the block into DiskFull (an inner one kept); on failure remove tmp."""
    try:
        yield
    except BaseException as error:
        if tmp is not None:
            _remove(tmp)
        code = None if isinstance(error, DiskFull) else full_errno(error)
        if code is None:
            raise
        raise DiskFull(what, Path(path), code) from error


def _remove(path: Path) -> None:
    """Remove a temporary file; a failure to do so is logged, never hides the first error."""
    try:
        path.unlink(missing_ok=True)
    except OSError as error:
        log.warning("could not remove the temporary file %s: %s", path, error)


def _sync_folder(folder: Path) -> None:
    """fsync a folder so a rename in it survives a crash (where the platform allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_with(path: Path | str, write: Callable[[BinaryIO], Any], what: str) -> None:
    """Write `path` through `write(handle)`: readers see the old file or the new, never half."""
    path = Path(path)
    tmp = tmp_path(path)
    with guard_write(what, path, tmp):
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    _sync_folder(path.parent)


def atomic_write_bytes(path: Path | str, data: bytes, what: str) -> None:
    """Write bytes to `path` atomically (temporary file, fsync, rename)."""
    atomic_write_with(path, lambda handle: handle.write(data), what)


def atomic_write_text(path: Path | str, text: str, what: str) -> None:
    """Write text (UTF-8) to `path` atomically (temporary file, fsync, rename)."""
    atomic_write_bytes(path, text.encode(), what)


def atomic_torch_save(obj: Any, path: Path | str, what: str) -> None:
    """torch.save `obj` to `path` atomically, so a failed save keeps the previous checkpoint."""
    import torch

    atomic_write_with(path, lambda handle: torch.save(obj, handle), what)


def append_text(path: Path | str, text: str, what: str) -> None:
    """Append text and fsync; a failed append is cut back so the file keeps only whole lines."""
    path = Path(path)
    data = text.encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        with guard_write(what, path):
            try:
                while data:
                    data = data[os.write(fd, data):]
                os.fsync(fd)
            except BaseException:
                _truncate(fd, path, size)
                raise
    finally:
        os.close(fd)


def _truncate(fd: int, path: Path, size: int) -> None:
    """Cut a file back to `size` bytes after a failed append."""
    try:
        os.ftruncate(fd, size)
    except OSError as error:
        log.warning("could not cut %s back to %d bytes: %s", path, size, error)
