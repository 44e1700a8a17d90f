"""A single-producer single-consumer byte ring in shared memory.

Vocabulary (as in the Disruptor): the producer *claims* space, writes records
and *publishes* them by storing ``WRITE_CURSOR`` once; the consumer *reads* a
run of published records, processes them, then *releases* them by storing
``RELEASE_CURSOR``. Only released bytes may be reused, so the producer never
overwrites a record the consumer has not finished with: when the ring is full
``try_append`` returns False and the producer backs off.

Cursors are touched once per claim and once per read, never per record.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from contextlib import contextmanager

from ipc import layout
from ipc.cursors import Cursor

_RECORD_HEADER = struct.Struct("<iiq")
_PAD_HEADER = struct.Struct("<ii")
_U64 = struct.Struct("<Q")


class RingFull(Exception):
    """A record could not be claimed because the consumer has not caught up."""


class Run:
    """Records read in one pass: parallel lists plus where the pass ended.

    ``payloads`` are views into shared memory, valid until the consumer
    releases past them; copy what must outlive that and call ``detach``.
    """

    __slots__ = ("end", "payloads", "positions", "recv_ns")

    def __init__(self, start: int) -> None:
        self.positions: list[int] = []
        self.recv_ns: list[int] = []
        self.payloads: list[memoryview] = []
        self.end = start

    def __len__(self) -> int:
        return len(self.positions)

    def detach(self) -> None:
        for view in self.payloads:
            view.release()
        self.payloads = []


class Ring:
    """One ring inside a shared buffer at ``offset``.

    ``create=True`` formats the header (owner only); otherwise the header is
    validated. Either side may be used from the same object, but each cursor
    must have one writing process.
    """

    def __init__(
        self, buf: memoryview, offset: int, capacity: int | None = None, *, create: bool = False, name: str = "ring"
    ) -> None:
        self.name = name
        header = buf[offset : offset + layout.HEADER_BYTES]
        if create:
            if capacity is None:
                raise ValueError("capacity is required to create a ring")
            layout.check_capacity(capacity)
            _U64.pack_into(header, layout.MAGIC_OFFSET, layout.MAGIC)
            _U64.pack_into(header, layout.CAPACITY_OFFSET, capacity)
        else:
            (magic,) = _U64.unpack_from(header, layout.MAGIC_OFFSET)
            (stored,) = _U64.unpack_from(header, layout.CAPACITY_OFFSET)
            if magic != layout.MAGIC:
                raise ValueError(f"{name}: no ring at offset {offset} (magic {magic:#x})")
            if capacity is not None and capacity != stored:
                raise ValueError(f"{name}: capacity {stored} != expected {capacity}")
            capacity = stored
        header.release()
        assert capacity is not None
        self.capacity = capacity
        self.max_payload = layout.max_payload(capacity)
        self._mask = capacity - 1
        self._data = buf[offset + layout.DATA_OFFSET : offset + layout.DATA_OFFSET + capacity]
        self.write_cursor = Cursor(buf, offset + layout.WRITE_CURSOR_OFFSET, f"{name}.write")
        self.release_cursor = Cursor(buf, offset + layout.RELEASE_CURSOR_OFFSET, f"{name}.release")
        # Producer-side caches: where the next record goes, and how far it may
        # go before the release cursor has to be re-read.
        self._claim_pos = self.write_cursor.load_acquire()
        self._limit = self.release_cursor.load_acquire() + capacity

    # ------------------------------------------------------------------ producer
    def resume_producer(self) -> None:
        """Re-read the published cursor (a restarted producer continues there;
        anything its predecessor wrote but never published is overwritten)."""
        self._claim_pos = self.write_cursor.load_acquire()
        self._limit = self.release_cursor.load_acquire() + self.capacity

    def try_append(self, payload: bytes, recv_ns: int = 0) -> bool:
        """Write one record after the claimed ones, unpublished. Returns False
        (writing nothing) when the ring lacks room; raises ValueError for a
        payload that could never fit."""
        n = len(payload)
        if n > self.max_payload:
            raise ValueError(f"{self.name}: payload of {n} bytes exceeds {self.max_payload}")
        size = layout.record_size(n)
        pos = self._claim_pos
        idx = pos & self._mask
        tail = self.capacity - idx
        need = size if size <= tail else tail + size
        if pos + need > self._limit:
            self._limit = self.release_cursor.load_acquire() + self.capacity
            if pos + need > self._limit:
                return False
        data = self._data
        if size > tail:
            _PAD_HEADER.pack_into(data, idx, tail, layout.TYPE_PAD)
            pos += tail
            idx = 0
        _RECORD_HEADER.pack_into(data, idx, n, layout.TYPE_DATA, recv_ns)
        start = idx + layout.RECORD_HEADER_BYTES
        data[start : start + n] = payload
        self._claim_pos = pos + size
        return True

    def publish(self) -> int:
        """Make every appended record visible (release) and return the cursor."""
        self.write_cursor.store_release(self._claim_pos)
        return self._claim_pos

    def abort(self) -> None:
        """Forget appended-but-unpublished records."""
        self._claim_pos = self.write_cursor.load_acquire()

    @contextmanager
    def claim(self) -> Iterator[Ring]:
        """``with ring.claim() as w: w.try_append(...)``: publishes on normal
        exit, discards the unpublished records if the block raises."""
        try:
            yield self
        except BaseException:
            self.abort()
            raise
        self.publish()

    @property
    def claimed(self) -> int:
        """Position after the last appended (maybe unpublished) record."""
        return self._claim_pos

    def free_bytes(self) -> int:
        """Bytes the producer could claim right now (re-reads the release cursor)."""
        self._limit = self.release_cursor.load_acquire() + self.capacity
        return self._limit - self._claim_pos

    # ------------------------------------------------------------------ consumer
    def published(self) -> int:
        """The producer's cursor (acquire): records before it are complete."""
        return self.write_cursor.load_acquire()

    def read(self, start: int, end: int, max_records: int) -> Run:
        """Parse up to ``max_records`` records in ``[start, end)``; ``end`` must
        be a published cursor value. Trailing pads are consumed too, so
        ``run.end`` is where the next read starts."""
        run = Run(start)
        data = self._data
        mask = self._mask
        cap = self.capacity
        limit = self.max_payload
        pos = start
        positions, recv, payloads = run.positions, run.recv_ns, run.payloads
        unpack = _RECORD_HEADER.unpack_from
        header = layout.RECORD_HEADER_BYTES
        align = layout.RECORD_ALIGNMENT - 1
        pad, data_type = layout.TYPE_PAD, layout.TYPE_DATA
        n = 0
        # The hot loop of the consumer: locals only, record_size inlined.
        while pos < end:
            idx = pos & mask
            if cap - idx < header:  # only a pad fits in so short a tail
                pos += cap - idx
                continue
            length, rtype, recv_ns = unpack(data, idx)
            if rtype == pad:
                pos += cap - idx
                continue
            if rtype != data_type or length < 0 or length > limit:
                raise ValueError(f"{self.name}: corrupt record at {pos} (type {rtype}, length {length})")
            if n >= max_records:
                break
            positions.append(pos)
            recv.append(recv_ns)
            body = idx + header
            payloads.append(data[body : body + length])
            pos += (header + length + align) & ~align
            n += 1
        run.end = pos
        return run

    def release_to(self, position: int) -> None:
        """Hand bytes before ``position`` back to the producer (release)."""
        self.release_cursor.store_release(position)

    def released(self) -> int:
        """The consumer's cursor (acquire)."""
        return self.release_cursor.load_acquire()

    def close(self) -> None:
        """Release every view into the shared buffer."""
        self._data.release()
        self.write_cursor.detach()
        self.release_cursor.detach()

    def __repr__(self) -> str:
        return (
            f"<Ring {self.name} cap={self.capacity} "
            f"write={self.write_cursor.load_acquire()} released={self.release_cursor.load_acquire()}>"
        )
