"""A single-producer single-consumer byte ring in shared memory.

Vocabulary (as in the Disruptor): the producer *claims* space, writes records
and *publishes* them by storing ``WRITE_CURSOR`` once; the consumer *reads* a
run of published records, processes them, then *releases* them by storing
``RELEASE_CURSOR``. Only released bytes may be reused, so the producer never
overwrites a record the consumer has not finished with: when the ring is full
``try_append`` returns False (``try_append_run`` a short count) and the
producer backs off.

Cursors are touched once per claim and once per read, never per record. The
bulk paths do per run what can be done per run: ``try_append_run`` computes
every record's place with numpy, copies the whole run in one ``struct`` call
per lap and writes every header with two numpy stores; ``read`` follows the
chain of lengths (the one step that is per record by nature: where record k
starts depends on record k-1) with the fewest Python operations, then checks
every header and gathers every arrival time with numpy.
"""

from __future__ import annotations

import bisect
import collections
import struct
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from itertools import accumulate, repeat
from typing import Any

import numpy as np

from ipc import layout
from ipc.cursors import Cursor

_RECORD_HEADER = struct.Struct("<iiq")
_PAD_HEADER = struct.Struct("<ii")
_U64 = struct.Struct("<Q")


class _Formats(dict[int, str]):
    """A ``struct`` format for one record, by payload length: ``head``
    (the header's codes), the payload, the padding up to the next record.
    A run's format is these joined, so one ``struct`` call writes or reads a
    whole run. Formats of payloads up to ``_CACHED_LENGTHS`` are kept."""

    def __init__(self, head: str) -> None:
        super().__init__()
        self.head = head

    def __missing__(self, n: int) -> str:
        fmt = f"{self.head}{n}s{layout.record_size(n) - layout.RECORD_HEADER_BYTES - n}x"
        if n <= _CACHED_LENGTHS:
            self[n] = fmt
        return fmt


class _RecordSizes(dict[int, int]):
    """``layout.record_size`` as a lookup, so ``map`` runs it in C."""

    def __missing__(self, n: int) -> int:
        size = layout.record_size(n)
        if n <= _CACHED_LENGTHS:
            self[n] = size
        return size


# An ingest sees a handful of distinct lengths up to its largest frame
# (64 KiB): those are kept. Longer payloads build theirs each time rather
# than grow the caches without bound.
_CACHED_LENGTHS = 1 << 16
# A record's payload past its header: the producer copies payloads in
# (numpy writes the headers), the consumer copies them out.
_PAYLOAD_FORMATS = _Formats(f"{layout.RECORD_HEADER_BYTES}x")
_RECORD_SIZES = _RecordSizes()

# Runs shorter than this are appended record by record: the run path's
# fixed cost (a struct format to compile, a few numpy calls) is paid back
# from about 20 records (measured here: 16 records 743 vs 666 ns each,
# 32 records 472 vs 640, 857 records ~200 vs ~430).
_SHORT_RUN = 24

# The consumer's scan (``Ring._scan``) looks at this many words per record it
# may take: 128 bytes, more than an intent's ~96, so one window usually
# covers the run; a shorter guess costs another window, a longer one a scan
# of words the next read scans again.
_SCAN_WORDS_PER_RECORD = 16
_SCAN_MIN_WORDS = 64
# Fewer records than this are walked: the scan's dozen numpy calls cost
# about as much as walking ~60 records (measured here).
_SCAN_MIN_RECORDS = 64
# A chain broken by a header-like payload word after fewer records than this
# is left to the walk, so hostile payloads cannot make the scan quadratic.
_SCAN_MIN_CHAIN = 16
_DATA_WORD = layout.header_word(0)  # the first word of an empty data record
_NO_WORDS = np.empty(0, dtype=np.int64)


class RingFull(Exception):
    """A record could not be claimed because the consumer has not caught up."""


class Run:
    """Records read in one pass: parallel lists plus where the pass ended.

    ``payloads`` are views into shared memory, valid until the consumer
    releases past them (copy what must outlive that and call ``detach``),
    or bytes when the run was read with ``copy=True``.
    """

    __slots__ = ("end", "payloads", "positions", "recv_ns")

    def __init__(self, start: int) -> None:
        self.positions: list[int] = []
        self.recv_ns: list[int] = []
        self.payloads: list[Any] = []  # memoryview, or bytes (copy=True)
        self.end = start

    def __len__(self) -> int:
        return len(self.positions)

    def detach(self) -> None:
        """Release the views (a no-op for copied payloads)."""
        if self.payloads and type(self.payloads[0]) is memoryview:
            collections.deque(map(memoryview.release, self.payloads), maxlen=0)
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
        if (offset + layout.DATA_OFFSET) % layout.WORD_BYTES:
            raise ValueError(f"{name}: offset {offset} does not put the data area on a word boundary")
        self.capacity = capacity
        self.max_payload = layout.max_payload(capacity)
        self._mask = capacity - 1
        self._data = buf[offset + layout.DATA_OFFSET : offset + layout.DATA_OFFSET + capacity]
        # The data area as words, twice: numpy for the vector steps, and a
        # cast memoryview for the chain walk (its items are plain ints,
        # several times cheaper to index one at a time than numpy's).
        self._words: np.ndarray = np.ndarray(
            (capacity >> layout.WORD_SHIFT,), dtype="<i8", buffer=buf, offset=offset + layout.DATA_OFFSET
        )
        self._word_items = self._data.cast("q")
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
        payload that could never fit. (One record; for many, ``try_append_run``.)"""
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

    def try_append_run(
        self, payloads: Sequence[bytes], recv_ns: int | Sequence[int] = 0, positions: list[int] | None = None
    ) -> int:
        """Write ``payloads`` as records after the claimed ones, in order,
        unpublished, as many as the ring has room for; returns how many (all
        of them, or a prefix when the ring filled up).

        ``recv_ns`` is one arrival time for every record or one per payload.
        ``positions``, when given, is extended with each written record's
        position (what the consumer's ``Run.positions`` will say). Raises
        ValueError, writing nothing, when a payload could never fit.

        Per run, not per record: the records' places (and the pad, when the
        run crosses the end of the data area) come from one cumulative sum,
        one ``struct`` call per lap copies every payload, two numpy stores
        write every header; the per-record steps left are C loops, never
        Python bytecode. A short run goes record by record (``try_append``),
        cheaper below ``_SHORT_RUN`` records. Nothing is visible before
        ``publish``, so a producer killed half-way leaves nothing behind."""
        n = len(payloads)
        if not n:
            return 0
        lengths = list(map(len, payloads))
        longest = max(lengths)
        if longest > self.max_payload:
            raise ValueError(f"{self.name}: payload of {longest} bytes exceeds {self.max_payload}")
        if n < _SHORT_RUN:
            return self._append_each(payloads, recv_ns, positions)
        sizes = list(map(_RECORD_SIZES.__getitem__, lengths))
        pos = self._claim_pos
        idx = pos & self._mask
        tail = self.capacity - idx
        # Where each record ends, counted from the claim position. Records
        # that do not fit before the end of the lap go to the start of the
        # next one, after a pad.
        ends = list(accumulate(sizes))
        first_lap = bisect.bisect_right(ends, tail)
        pad = 0
        if first_lap < n:
            pad = tail - (ends[first_lap - 1] if first_lap else 0)
            ends[first_lap:] = accumulate(sizes[first_lap:], initial=tail)
            del ends[first_lap]  # the initial value
        if ends[-1] > self._limit - pos:
            self._limit = self.release_cursor.load_acquire() + self.capacity
        room = self._limit - pos
        count = n if ends[-1] <= room else bisect.bisect_right(ends, room)
        if not count:
            return 0
        data = self._data
        for lap, (a, b) in enumerate(((0, min(first_lap, count)), (first_lap, count))):
            if a >= b:
                continue
            at = ends[a] - sizes[a]  # from the claim position
            if lap and pad:
                _PAD_HEADER.pack_into(data, idx + at - pad, pad, layout.TYPE_PAD)
            image = struct.Struct("<" + "".join(map(_PAYLOAD_FORMATS.__getitem__, lengths[a:b])))
            image.pack_into(data, (idx + at) & self._mask, *(payloads if b - a == n else payloads[a:b]))
        # Every header at once: word indexes from the records' places.
        starts = np.array(ends[:count], dtype=np.int64) - np.array(sizes[:count], dtype=np.int64)
        first_words = ((starts + idx) & self._mask) >> layout.WORD_SHIFT
        words = self._words
        words[first_words + layout.LENGTH_TYPE_WORD] = layout.header_word(np.array(lengths[:count], dtype=np.int64))
        words[first_words + layout.RECV_NS_WORD] = (
            recv_ns if isinstance(recv_ns, int) else np.array(recv_ns[:count], dtype=np.int64)
        )
        if positions is not None:
            positions += (starts + pos).tolist()
        self._claim_pos = pos + ends[count - 1]
        return count

    def _append_each(self, payloads: Sequence[bytes], recv_ns: int | Sequence[int], positions: list[int] | None) -> int:
        """``try_append_run`` for a short run: record by record."""
        count = 0
        for payload, stamp in zip(payloads, repeat(recv_ns) if isinstance(recv_ns, int) else recv_ns):
            if not self.try_append(payload, stamp):
                break
            if positions is not None:  # counted back from the end: a pad may precede the record
                positions.append(self._claim_pos - layout.record_size(len(payload)))
            count += 1
        return count

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

    def read(self, start: int, end: int, max_records: int, *, copy: bool = False) -> Run:
        """Parse up to ``max_records`` records in ``[start, end)``; ``end`` must
        be a published cursor value. Trailing pads are consumed too, so
        ``run.end`` is where the next read starts. Raises ValueError on a
        header no producer writes (corrupt memory, or a wrong ``start``).

        The payloads are views into the ring, or with ``copy=True`` bytes
        copied out of it: valid after the release, nothing to ``detach``, and
        about three times cheaper to make (one ``struct`` call per lap
        instead of one memoryview per record)."""
        run = Run(start)
        pos = start
        left = max_records
        words, shift = self._words, layout.WORD_SHIFT
        while pos < end and left > 0:  # once per lap the span touches: at most twice
            idx = pos & self._mask
            lap_start = pos - idx
            first = idx >> shift
            stop = (min(end, lap_start + self.capacity) - lap_start) >> shift
            starts, after, pad = self._starts(first, stop, left, lap_start)
            if starts.size:
                lengths = words[starts + layout.LENGTH_TYPE_WORD] & layout.LENGTH_MASK
                byte_starts = starts << shift
                run.positions += (byte_starts + lap_start).tolist()
                run.recv_ns += words[starts + layout.RECV_NS_WORD].tolist()
                if copy:  # the records lie end to end: one struct call copies every payload out
                    image = struct.Struct("<" + "".join(map(_PAYLOAD_FORMATS.__getitem__, lengths.tolist())))
                    run.payloads += image.unpack_from(self._data, int(byte_starts[0]))
                else:
                    first_bytes = byte_starts + layout.RECORD_HEADER_BYTES
                    run.payloads += map(
                        self._data.__getitem__, map(slice, first_bytes.tolist(), (first_bytes + lengths).tolist())
                    )
                left -= starts.size
            pos = lap_start + (self.capacity if pad else after << shift)
        if pos < end and not left:
            idx = pos & self._mask
            if self._word_items[idx >> shift] >> layout.TYPE_SHIFT == layout.TYPE_PAD:
                pos += self.capacity - idx  # a trailing pad: the next read starts on the next lap
        run.end = pos
        return run

    def _starts(self, first: int, stop: int, limit: int, lap_start: int) -> tuple[np.ndarray, int, bool]:
        """Where the data records from word ``first`` on start (at most
        ``limit``, all before word ``stop``), the word after the last, and
        whether the lap's pad ended them. A vector scan finds them where
        there are many; a walk takes what it leaves (few records, the pad, a
        bad header), and every header the walk found is checked at once.
        Raises ValueError on a header no producer writes."""
        after = first
        scanned = _NO_WORDS
        if min(limit, (stop - first) // _SCAN_WORDS_PER_RECORD) >= _SCAN_MIN_RECORDS:
            scanned, after = self._scan(first, stop, limit)
        if after >= stop or scanned.size >= limit:
            return scanned, after, False
        found, after = _walk(self._word_items, after, stop, limit - scanned.size)
        walked = np.array(found, dtype=np.int64)
        heads = self._words[walked + layout.LENGTH_TYPE_WORD]
        lengths = heads & layout.LENGTH_MASK  # a negative LENGTH reads as > 2**31: caught below
        types = heads >> layout.TYPE_SHIFT
        pad = bool(types[-1] == layout.TYPE_PAD)
        if pad:  # a pad ends the lap: it spans exactly to the end of the data area
            if (found[-1] << layout.WORD_SHIFT) + int(lengths[-1]) != self.capacity:
                raise self._corrupt(lap_start + (found[-1] << layout.WORD_SHIFT), int(heads[-1]))
            walked, heads, lengths, types = walked[:-1], heads[:-1], lengths[:-1], types[:-1]
        elif after > stop:
            raise ValueError(
                f"{self.name}: the record at {lap_start + (found[-1] << layout.WORD_SHIFT)} runs past the cursor"
            )
        bad = np.flatnonzero((types != layout.TYPE_DATA) | (lengths > self.max_payload))
        if bad.size:
            k = int(bad[0])
            raise self._corrupt(lap_start + (found[k] << layout.WORD_SHIFT), int(heads[k]))
        return (np.concatenate((scanned, walked)) if scanned.size else walked), after, pad

    def _scan(self, first: int, stop: int, limit: int) -> tuple[np.ndarray, int]:
        """The data records from word ``first`` on, at most ``limit``, all
        before word ``stop``, found with vector operations: their word
        indexes and the word after the last.

        Every word that reads as a data record's first word (TYPE_DATA, a
        LENGTH the ring allows) is a candidate; a payload may hold such a
        word too, so the chain of lengths decides: ``first`` starts a
        record, and each next record starts where the one before ends. The
        candidates that chain from ``first`` are therefore exactly the
        records. It stops early at anything that is no data record (the
        lap's pad; a corrupt header) and after a candidate that breaks the
        chain too soon (a payload that looks like a header): the caller
        walks from where it stopped."""
        words = self._words
        found: list[np.ndarray] = []
        count = 0
        i = first
        span = limit * _SCAN_WORDS_PER_RECORD + _SCAN_MIN_WORDS
        while i < stop and count < limit:
            window = words[i : min(stop, i + span)]
            candidates = np.flatnonzero((window - _DATA_WORD).view(np.uint64) <= self.max_payload)
            if not candidates.size or candidates[0]:
                break  # word i is not a data record
            ends = candidates + ((window[candidates] - _DATA_WORD + layout.WORDS_ROUNDING) >> layout.WORD_SHIFT)
            del window  # a view into the segment: dropped before anything can raise
            linked = ends[:-1] == candidates[1:]
            chained = candidates.size if linked.all() else int(linked.argmin()) + 1
            take = min(chained, limit - count)
            found.append(candidates[:take] + i)
            count += take
            after = i + int(ends[take - 1])
            if after > stop:
                raise ValueError(
                    f"{self.name}: the record at word {i + int(candidates[take - 1])} runs past word {stop}"
                )
            i = after
            if chained < candidates.size and take < _SCAN_MIN_CHAIN:
                break  # payloads that look like headers, close together: walking is cheaper
        return (np.concatenate(found) if len(found) > 1 else found[0] if found else _NO_WORDS), i

    def _corrupt(self, position: int, head: int) -> ValueError:
        """The error for a header no producer writes (``head``: its first word)."""
        length, record_type = head & layout.LENGTH_MASK, head >> layout.TYPE_SHIFT
        return ValueError(f"{self.name}: corrupt record at {position} (type {record_type}, length {length})")

    def release_to(self, position: int) -> None:
        """Hand bytes before ``position`` back to the producer (release)."""
        self.release_cursor.store_release(position)

    def released(self) -> int:
        """The consumer's cursor (acquire)."""
        return self.release_cursor.load_acquire()

    def close(self) -> None:
        """Release every view into the shared buffer."""
        self._word_items.release()
        self._words = None  # type: ignore[assignment]
        self._data.release()
        self.write_cursor.detach()
        self.release_cursor.detach()

    def __repr__(self) -> str:
        return (
            f"<Ring {self.name} cap={self.capacity} "
            f"write={self.write_cursor.load_acquire()} released={self.release_cursor.load_acquire()}>"
        )


def _walk(words: Any, first: int, stop: int, limit: int) -> tuple[list[int], int]:
    """Follow the records' lengths from word ``first``: the word index of
    each record (at most ``limit``) that starts before word ``stop``, and
    where the walk ended. The consumer's one per-record Python loop, so it
    does nothing but step; the caller checks every header at once. LENGTH is
    read unsigned, so even a corrupt header moves the walk forward."""
    found: list[int] = []
    append = found.append
    mask, rounding, shift = layout.LENGTH_MASK, layout.WORDS_ROUNDING, layout.WORD_SHIFT
    i = first
    for _ in range(limit):
        if i >= stop:
            break
        append(i)
        i += ((words[i] & mask) + rounding) >> shift
    return found, i
