"""Cursors: int64 positions in shared memory, the only place they are touched.

Memory-ordering argument (why plain numpy loads and stores are enough here):

* Each cursor is an 8-byte aligned int64 (see ``ipc.layout``). On x86-64 an
  aligned 8-byte ``mov`` is single-copy atomic, so a reader never sees a torn
  value.
* x86-64 is TSO: stores become visible in program order and loads are not
  reordered with older loads. So a producer that writes a payload and *then*
  stores the cursor (``store_release``) publishes the payload before the
  cursor; a consumer that loads the cursor (``load_acquire``) and *then* reads
  the payload sees at least what was published.
* The compiler cannot reorder across these points either: every payload write
  and every cursor access is a separate call into C (mmap slice assignment,
  numpy item set/get) with side effects the interpreter must execute in order.
* Each cursor has exactly one writing process, so no read-modify-write is
  needed and nothing here has to be a fetch-add.

On weakly ordered CPUs (aarch64, POWER) a plain store is *not* a release. The
module refuses nothing there but logs a warning once; swapping this file for
one built on the ``atomics`` package (real acquire/release; DESIGN.md measured ~4.5 us per
operation measured here versus ~0.1 us) is the designed upgrade path. Callers
touch cursors once per batch of records, so even that cost would be amortised.
"""

from __future__ import annotations

import logging
import platform
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

_TSO_MACHINES = {"x86_64", "amd64", "AMD64", "i686", "i386"}
if platform.machine() not in _TSO_MACHINES:  # pragma: no cover - not this machine
    log.warning(
        "ipc.cursors relies on x86-64 store ordering; on %s use an atomics-backed cursor module", platform.machine()
    )


class Cursor:
    """One int64 position at a fixed offset of a shared buffer."""

    __slots__ = ("_cell", "name")

    def __init__(self, buffer: Any, offset: int, name: str = "cursor") -> None:
        if offset % 8:
            raise ValueError(f"{name} offset {offset} is not 8-byte aligned")
        self._cell = np.ndarray((1,), dtype=np.int64, buffer=buffer, offset=offset)
        self.name = name

    def load_acquire(self) -> int:
        """Read the position. Every write the cursor's writer made before its
        matching ``store_release`` is visible after this returns (x86 TSO)."""
        return int(self._cell[0])

    def store_release(self, value: int) -> None:
        """Publish ``value``. Every write this process made before the call is
        visible to a reader that observes the new value. Only the cursor's one
        writer may call this, and only with a value not below the current one."""
        self._cell[0] = value

    def detach(self) -> None:
        """Drop the view so the underlying mmap can be closed."""
        self._cell = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        value = "released" if self._cell is None else self.load_acquire()
        return f"<Cursor {self.name}={value}>"


class Counters:
    """A block of int64 counters each written by exactly one process.

    Same ordering argument as ``Cursor``; counters are statistics, so readers
    tolerate seeing one counter a moment before another.
    """

    __slots__ = ("_cells",)

    def __init__(self, buffer: Any, offset: int, count: int) -> None:
        if offset % 8:
            raise ValueError(f"counter block offset {offset} is not 8-byte aligned")
        self._cells = np.ndarray((count,), dtype=np.int64, buffer=buffer, offset=offset)

    def get(self, i: int) -> int:
        """Load counter ``i`` (acquire on x86-64)."""
        return int(self._cells[i])

    def set(self, i: int, value: int) -> None:
        """Store counter ``i`` (release on x86-64); single writer only."""
        self._cells[i] = value

    def add(self, i: int, delta: int) -> None:
        """Increment counter ``i``; the caller must be its only writer, so a
        load followed by a store cannot lose an update."""
        self._cells[i] += delta

    def add_block(self, first: int, deltas: Any) -> None:
        """Add an int64 array to counters ``first .. first + len(deltas)``
        (one numpy operation); the caller must be their only writer."""
        self._cells[first : first + len(deltas)] += deltas

    def snapshot(self) -> list[int]:
        """All counters as Python ints (a copy; not atomic as a whole)."""
        values: list[int] = self._cells.tolist()
        return values

    def detach(self) -> None:
        """Drop the view so the underlying mmap can be closed."""
        self._cells = None  # type: ignore[assignment]
