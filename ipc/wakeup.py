"""Kernel wake-ups between processes: an eventfd, never a spin.

``signal()`` adds 1 to the counter (one ``write`` syscall); ``wait``
blocks in ``select`` until the counter is non-zero or the timeout passes, then
drains it. Many signals before a wait collapse into one wake-up, which is
what a batching consumer wants. The descriptor is non-blocking so a signal
can never block its sender, and can be registered with an asyncio loop.
"""

from __future__ import annotations

import os
import select


class Wakeup:
    """An eventfd shared by the processes that inherit it."""

    __slots__ = ("_fds", "_owned", "fd")

    def __init__(self, fd: int | None = None) -> None:
        self._owned = fd is None
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) if fd is None else fd
        self._fds = (self.fd,)

    def signal(self) -> None:
        """Wake whoever waits. Never blocks; a saturated counter still wakes."""
        try:
            os.eventfd_write(self.fd, 1)
        except BlockingIOError:  # counter at its maximum: a wake-up is pending anyway
            pass

    def wait(self, timeout: float | None) -> bool:
        """Block up to ``timeout`` seconds (None: forever) for a signal.
        Returns True if signalled; the counter is drained either way.

        ``select`` rather than ``poll``: its timeout has microsecond
        resolution where poll/epoll round up to whole milliseconds, which
        would stretch a 10 ms window by up to 10%."""
        timeout = None if timeout is None else max(0.0, timeout)
        ready, _, _ = select.select(self._fds, (), (), timeout)
        self.drain()
        return bool(ready)

    def drain(self) -> int:
        """Reset the counter without blocking; returns how many signals it held."""
        try:
            return os.eventfd_read(self.fd)
        except BlockingIOError:
            return 0

    def close(self) -> None:
        """Close the descriptor if this object created it."""
        if self._owned and self.fd >= 0:
            os.close(self.fd)
        self.fd = -1

    def __repr__(self) -> str:
        return f"<Wakeup fd={self.fd}>"
