"""Shared-memory segments backed by ``memfd_create``.

Why memfd and not a named ``/dev/shm`` segment: a memfd has no name, so there
is nothing to unlink and nothing to leak. The kernel frees the pages when the
last descriptor and the last mapping are gone, which holds even when every
process is killed with SIGKILL. The supervisor creates the segment and hands
the descriptor to its workers with ``pass_fds``; workers map it and only ever
close their own mapping. There is no resource tracker to fight, either.
"""

from __future__ import annotations

import mmap
import os


class Segment:
    """A mapped shared-memory segment. ``create`` owns it; ``attach`` borrows it."""

    __slots__ = ("_map", "buf", "fd", "owner", "size")

    def __init__(self, fd: int, size: int, owner: bool) -> None:
        self.fd = fd
        self.size = size
        self.owner = owner
        self._map: mmap.mmap | None = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self.buf = memoryview(self._map)

    @classmethod
    def create(cls, size: int, name: str = "batchscheduler") -> Segment:
        """Allocate a zero-filled segment of ``size`` bytes (close-on-exec fd)."""
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            return cls(fd, size, owner=True)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def attach(cls, fd: int, size: int) -> Segment:
        """Map a segment whose descriptor was inherited from the owner."""
        actual = os.fstat(fd).st_size
        if actual != size:
            raise ValueError(f"shared segment fd {fd} is {actual} bytes, expected {size}")
        return cls(fd, size, owner=False)

    def close(self) -> None:
        """Unmap and close the descriptor. Every view into ``buf`` (numpy
        cursors, ring views) must have been released first, else BufferError."""
        if self._map is None:
            return
        self.buf.release()
        self._map.close()
        self._map = None
        os.close(self.fd)

    def __repr__(self) -> str:
        state = "closed" if self._map is None else f"fd={self.fd}"
        return f"<Segment {self.size} bytes {state} {'owner' if self.owner else 'attached'}>"
