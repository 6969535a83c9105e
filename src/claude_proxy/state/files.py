"""Writing files the user owns: atomically, with the mode they had, and a backup beside them.

A half-written settings file would break the program that reads it, so every write goes to a
temporary file in the same folder, is flushed to disk, and then renamed over the original.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import stat
import time
from pathlib import Path

BACKUP_INFIX = ".claude-proxy-backup-"


def read_regular(path: Path) -> bytes:
    """The bytes of `path`, a regular file (through links); OSError otherwise. A FIFO or a
    device is refused at once instead of read: reading a FIFO waits for a writer forever."""
    import errno

    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb", closefd=False) as file:
            return file.read()
    finally:
        os.close(fd)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def write_atomically(
    path: Path, data: bytes, mode: int, owner: tuple[int, int] | None = None
) -> None:
    """Replace `path` with `data` (mode `mode`, and `owner`'s uid and gid if given) in one rename;
    on failure nothing changes."""
    import tempfile

    fd, partial = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as file:
            if owner is not None:
                os.fchown(file.fileno(), *owner)  # before the mode: chown may clear set-id bits
            os.fchmod(file.fileno(), mode)  # exactly this mode, whatever the umask
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(partial)
        raise
    _sync_folder(path.parent)


def backup(path: Path) -> Path:
    """Copy `path` to `<name>.claude-proxy-backup-<time>` beside it, with the same mode."""
    data, mode = path.read_bytes(), mode_of(path)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in itertools.count():
        copy = path.with_name(f"{path.name}{BACKUP_INFIX}{stamp}{f'-{n}' if n else ''}")
        try:
            fd = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        except FileExistsError:
            continue  # two runs in one second keep both backups
        with os.fdopen(fd, "wb") as file:
            os.fchmod(file.fileno(), mode)
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        return copy
    raise AssertionError("unreachable")


def _sync_folder(folder: Path) -> None:
    """Make the rename itself durable (a crash right after it must not bring the old file back)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot sync a folder; the rename has happened either way
    finally:
        os.close(fd)
