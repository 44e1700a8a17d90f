"""The data directory's lock: one engine (or one tool that starts its
database) per data directory, whatever its socket path.

``lock`` takes an exclusive ``flock`` on ``<data_dir>/engine.lock`` and
writes the holder's pid into it; the lock lasts until the returned file
descriptor is closed (or the process dies). The supervisor holds it for the
engine's life; ``tools/enginedb`` holds it while a tool runs a stopped
engine's PostgreSQL.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_FILE = "engine.lock"


class Busy(Exception):
    """Another process holds the lock; ``holder`` is the pid it wrote (or "unknown")."""

    def __init__(self, path: Path, holder: str) -> None:
        super().__init__(f"pid {holder} holds {path}")
        self.path = path
        self.holder = holder


def lock(data: Path) -> int:
    """Lock ``data``; returns the lock's fd. Raises OSError when the lock
    file cannot be opened (a symlink there is refused, never followed) and
    Busy when another process holds it."""
    path = data / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise Busy(path, holder) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
