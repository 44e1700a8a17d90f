"""A single-producer single-consumer byte ring in shared memory.

Vocabulary (as in the Disruptor): the producer *claims* space, writes records
and *publishes* them by storing ``WRITE_CURSOR`` once; the consumer *reads* a
run of published records, processes them, then *releases* them by storing
``RELEASE_CURSOR``. Only released bytes may be reused, so the producer never
overwrites a record the consumer has not finished with: when the ring is full
``try_append`` returns False (``try_append_packed`` a short count) and the
producer backs off.

Two kinds of records share the layout (``ipc/layout.py``):

* one payload per record (``try_append``, ``read``), for the outcome rings:
  ``read`` follows the chain of lengths with the fewest Python operations
  and checks every header and gathers every arrival time with numpy;
* *packed runs* (``try_append_packed``, ``read_packed``), for the intent
  rings: many items in one record, joined by ``,\n``, so a run costs one
  ``join`` and one copy in, one copy out, and nothing per item in Python.
  The consumer side (taking items in any counts, the durable cursor) is
  ``ipc/runqueue.py``.

Cursors are touched once per claim and once per read, never per record.
"""

from __future__ import annotations

import collections
import struct
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from ipc import layout
from ipc.cursors import Cursor

_RECORD_HEADER = struct.Struct("<iiq")
_RUN_HEADER = struct.Struct("<iiqII")  # the record header, then COUNT and an unused word
_SEPARATOR = layout.RUN_SEPARATOR
_NEWLINE = ord("\n")
_PAD_HEADER = struct.Struct("<ii")
_U64 = struct.Struct("<Q")
_COUNT = struct.Struct("<I")


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
    releases past them (copy what must outlive that and call ``detach``).
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
        """Release the views."""
        collections.deque(map(memoryview.release, self.payloads), maxlen=0)
        self.payloads = []


class Packed:
    """One packed run as read: where it lies, its arrival time, how many
    items it holds and its body (the items joined by
    ``layout.RUN_SEPARATOR``, bytes copied out of the ring). ``taken``: how
    many of its items, from the first, the consumer has already taken.
    ``ends`` (where each item ends in the body) is found on first use: a
    consumer that takes whole runs never needs it."""

    __slots__ = ("_ends", "body", "count", "end", "position", "recv_ns", "taken")

    def __init__(self, position: int, end: int, recv_ns: int, count: int, body: bytes) -> None:
        self.position = position
        self.end = end  # the position after the record
        self.recv_ns = recv_ns
        self.count = count
        self.body = body
        self.taken = 0
        self._ends: np.ndarray | None = None

    def __len__(self) -> int:
        return self.count

    @property
    def ends(self) -> np.ndarray:
        """Where each item ends in ``body`` (int64). Raises ValueError when
        the body's separators do not match the count (corrupt memory)."""
        if self._ends is None:
            newlines = np.flatnonzero(np.frombuffer(self.body, dtype=np.uint8) == _NEWLINE)
            if newlines.size != self.count - 1:
                raise ValueError(
                    f"corrupt packed run at {self.position}: {newlines.size + 1} items in the body, count {self.count}"
                )
            self._ends = np.append(newlines - 1, len(self.body))
        return self._ends

    def start(self, j: int) -> int:
        """Where item ``j`` starts in ``body``."""
        return int(self.ends[j - 1]) + len(_SEPARATOR) if j else 0

    def item(self, j: int) -> bytes:
        """Item ``j`` (a copy; for tests and checks, not the hot path). The
        first and the last are found without the item boundaries."""
        if self.count == 1:
            return self.body
        if not j:
            return self.body[: self.body.index(b"\n") - 1]
        if j == self.count - 1:
            return self.body[self.body.rindex(b"\n") + 1 :]
        return self.body[self.start(j) : int(self.ends[j])]

    def items(self) -> list[bytes]:
        return self.body.split(_SEPARATOR) if self.count > 1 else [self.body]


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
        self.max_item = layout.max_item(capacity)
        self.write_cursor = Cursor(buf, offset + layout.WRITE_CURSOR_OFFSET, f"{name}.write")
        self.release_cursor = Cursor(buf, offset + layout.RELEASE_CURSOR_OFFSET, f"{name}.release")
        self.durable_cursor = Cursor(buf, offset + layout.DURABLE_CURSOR_OFFSET, f"{name}.durable")
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
        payload that could never fit. (One record; for many, ``try_append_packed``.)"""
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

    def try_append_packed(self, payloads: Sequence[bytes], recv_ns: int = 0, positions: list[int] | None = None) -> int:
        """Write ``payloads`` as items of packed runs (``layout.TYPE_RUN``)
        after the claimed records, in order, unpublished, as many as the ring
        has room for; returns how many (all, or a prefix when it filled up).

        Usually one record holds them all: its header and the items joined
        by ``layout.RUN_SEPARATOR``, so the whole run costs one ``join``, one
        vector check and one copy however many items it has; nothing is done
        per item in Python. A run is split where it would cross the end of
        the data area (the tail takes what fits; a pad only when not even
        one item does) or exceed ``max_payload``; only then are the item
        boundaries found (a vector scan for the newlines). ``recv_ns`` is
        every item's arrival time. ``positions``, when given, is extended
        with each written item's position (its run's position plus its index
        in the run). Raises ValueError, writing nothing, for an item with a
        newline or longer than ``max_item``. Nothing is visible before
        ``publish``."""
        n = len(payloads)
        if not n:
            return 0
        body = _SEPARATOR.join(payloads)
        if n > 1:
            newlines = np.flatnonzero(np.frombuffer(body, dtype=np.uint8) == _NEWLINE)
        else:
            newlines = _NO_WORDS if body.find(b"\n") < 0 else np.zeros(1, dtype=np.int64)
        if newlines.size != n - 1:
            raise ValueError(f"{self.name}: a packed item contains a newline (items are joined by ',\\n')")
        ends = None  # where each item ends in body, found only if the run must be split
        if len(body) > self.max_item:
            ends = np.append(newlines - 1, len(body))
            longest = int(np.max(ends - np.append(0, newlines + 1)))
            if longest > self.max_item:
                raise ValueError(f"{self.name}: item of {longest} bytes exceeds {self.max_item}")
        half = self.capacity // 2  # record_size(max_payload): no record is larger
        fixed = layout.RUN_HEADER_BYTES
        done = 0
        start = 0  # where item ``done`` starts in body
        data = self._data
        while done < n:
            pos = self._claim_pos
            idx = pos & self._mask
            tail = self.capacity - idx
            budget = min(tail, half)
            whole = layout.align(fixed + len(body) - start)
            room = self._limit - pos
            if whole > min(budget, room):  # the consumer may have made room since the limit was read
                self._limit = self.release_cursor.load_acquire() + self.capacity
                room = self._limit - pos
            if whole <= min(budget, room):
                k, stop = n - done, len(body)
            else:
                if ends is None:
                    ends = np.append(newlines - 1, len(body))
                k = self._fits(ends, done, start, min(budget, room))
                if k <= 0:  # not even the next item fits before the end of the lap
                    first = layout.align(fixed + int(ends[done]) - start)
                    if room <= tail or first > min(room - tail, half):
                        break  # full: the rest waits
                    _PAD_HEADER.pack_into(data, idx, tail, layout.TYPE_PAD)
                    pos += tail
                    idx = 0
                    k = self._fits(ends, done, start, min(room - tail, half))
                stop = int(ends[done + k - 1])
            length = fixed - layout.RECORD_HEADER_BYTES + stop - start
            _RUN_HEADER.pack_into(data, idx, length, layout.TYPE_RUN, recv_ns, k, 0)
            data[idx + fixed : idx + fixed + stop - start] = (
                body if not start and stop == len(body) else memoryview(body)[start:stop]
            )
            if positions is not None:
                positions += range(pos, pos + k)
            self._claim_pos = pos + layout.align(layout.RECORD_HEADER_BYTES + length)
            start = stop + len(_SEPARATOR)
            done += k
        return done

    @staticmethod
    def _fits(ends: np.ndarray, done: int, start: int, space: int) -> int:
        """How many items from item ``done`` (at ``start`` in the body) one
        record of at most ``space`` bytes holds."""
        return int(np.searchsorted(ends, start + space - layout.RUN_HEADER_BYTES, "right")) - done

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
        ``run.end`` is where the next read starts. Raises ValueError on a
        header no producer writes (corrupt memory, or a wrong ``start``).
        The payloads are views into the ring (``Run.detach``)."""
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

    def release_to(self, position: int, durable: int | None = None) -> None:
        """Hand bytes before ``position`` back to the producer (release).
        ``durable`` (default: ``position``) is the item position below which
        the consumer is done with every item, past ``position`` when it took
        only part of the packed run there; it is stored first, so it never
        trails the release cursor."""
        self.durable_cursor.store_release(position if durable is None else durable)
        self.release_cursor.store_release(position)

    def released(self) -> int:
        """The consumer's release cursor (acquire): a record boundary."""
        return self.release_cursor.load_acquire()

    def durable(self) -> int:
        """The consumer's durable cursor (acquire): every item (or record)
        at a position below it is done with."""
        return self.durable_cursor.load_acquire()

    def read_packed(self, start: int, end: int, max_items: int) -> tuple[list[Packed], int]:
        """The packed runs in ``[start, end)`` (``end`` a published cursor
        value), whole runs until they hold at least ``max_items`` items, and
        where the next read starts (past trailing pads). Each run's body is
        copied out, so it outlives the release and holds no view into the
        segment. One Python step per run, none per item. Raises ValueError
        on a record no packed producer writes."""
        runs: list[Packed] = []
        pos = start
        items = 0
        words, data = self._word_items, self._data
        shift, fixed = layout.WORD_SHIFT, layout.RUN_HEADER_BYTES
        while pos < end and items < max_items:
            idx = pos & self._mask
            head = words[idx >> shift]
            length, record_type = head & layout.LENGTH_MASK, head >> layout.TYPE_SHIFT
            if record_type == layout.TYPE_PAD:
                if idx + length != self.capacity:
                    raise self._corrupt(pos, head)
                pos += length
                continue
            size = layout.align(layout.RECORD_HEADER_BYTES + length)
            if record_type != layout.TYPE_RUN or length > self.max_payload or pos + size > end:
                raise self._corrupt(pos, head)
            (count,) = _COUNT.unpack_from(data, idx + layout.RECORD_HEADER_BYTES)
            body_len = length - (fixed - layout.RECORD_HEADER_BYTES)
            if not count or body_len < (count - 1) * len(_SEPARATOR):
                raise self._corrupt(pos, head)
            at = idx + fixed
            runs.append(Packed(pos, pos + size, words[(idx >> shift) + 1], count, bytes(data[at : at + body_len])))
            items += count
            pos += size
        if pos < end:
            idx = pos & self._mask
            if words[idx >> shift] >> layout.TYPE_SHIFT == layout.TYPE_PAD:
                pos += self.capacity - idx  # a trailing pad: the next read starts on the next lap
        return runs, pos

    def close(self) -> None:
        """Release every view into the shared buffer."""
        self._word_items.release()
        self._words = None  # type: ignore[assignment]
        self._data.release()
        self.write_cursor.detach()
        self.release_cursor.detach()
        self.durable_cursor.detach()

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
