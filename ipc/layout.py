"""Byte layout of a ring: the only module that knows offsets.

A ring is a header followed by a power-of-two data area. Every cursor sits on
its own 64-byte cache line so the writer of one never invalidates the line the
reader of another is polling (false sharing: each store would invalidate
the other process's cached line).

Ring header (``HEADER_BYTES`` = 256)::

    0               8               16                               64
    +---------------+---------------+--------------------------------+
    | MAGIC  u64    | CAPACITY u64  |            (unused)            |
    +---------------+---------------+--------------------------------+
 64 | WRITE_CURSOR i64   -- written only by the producer             |
    +----------------------------------------------------------------+
128 | RELEASE_CURSOR i64 -- written only by the consumer             |
    +----------------------------------------------------------------+
192 | DURABLE_CURSOR i64 -- written only by the consumer             |
    +----------------------------------------------------------------+
256 | data area: CAPACITY bytes, records laid end to end             |

A record (8-byte aligned, ``record_size(n)`` bytes in all)::

    0            4            8                          16
    +------------+------------+--------------------------+-----------------+
    | LENGTH i32 | TYPE   i32 | RECV_NS i64 (monotonic)  | payload ... pad |
    +------------+------------+--------------------------+-----------------+

A *packed run* (``TYPE_RUN``) carries many items in one record: its
payload is ``COUNT u32 | (unused) u32 | BODY``, where BODY is the items
joined by ``,\n`` (``RUN_SEPARATOR``). Items never hold a newline (compact
JSON never does; the producer checks), so the separators are exactly the
newlines of BODY and a consumer finds item boundaries only when it needs
them: JSON items joined that way are already the inside of the array a batch
sends, so a whole run is taken as one slice. Item j of the run at position P
has the *item position* P + j: unique and ordered, since a record is longer
than its count (``RUN_HEADER_BYTES`` plus 2 bytes per item but one).

``RELEASE_CURSOR`` is where the producer may reuse bytes up to (a record
boundary: a consumer releases a run only once it took every item).
``DURABLE_CURSOR`` >= ``RELEASE_CURSOR`` is the item position below which
the consumer is done with every item, so it may point inside a run the
consumer took only part of. The consumer stores DURABLE before RELEASE.

``TYPE_PAD`` fills the tail of the data area when the next record would not
fit before the end; the reader skips straight to the start of the next lap.
A pad needs only its first 8 bytes, so it fits in any tail (tails are
multiples of 8 because every record is).

Read as little-endian int64 words (how the bulk paths see it), a record is
word 0 = ``LENGTH | TYPE << 32`` (``header_word``), word 1 = RECV_NS, then
the payload words; the next record starts ``(LENGTH + 23) >> 3`` words on.

Publication is by cursor, not by length word: the producer writes whole
records and only then moves ``WRITE_CURSOR`` past them. A producer killed
mid-record never moved the cursor, so the half-written bytes are invisible and
its successor simply writes over them.
"""

from __future__ import annotations

import sys
from typing import Any

if sys.byteorder != "little":  # pragma: no cover - not this machine
    raise ImportError("ipc.layout reads record headers as little-endian words; this machine is big-endian")

MAGIC = 0x31304E4952534253  # b"BSRING01" little-endian
CACHE_LINE = 64

MAGIC_OFFSET = 0
CAPACITY_OFFSET = MAGIC_OFFSET + 8
WRITE_CURSOR_OFFSET = CACHE_LINE
RELEASE_CURSOR_OFFSET = WRITE_CURSOR_OFFSET + CACHE_LINE
DURABLE_CURSOR_OFFSET = RELEASE_CURSOR_OFFSET + CACHE_LINE
HEADER_BYTES = DURABLE_CURSOR_OFFSET + CACHE_LINE
DATA_OFFSET = HEADER_BYTES

RECORD_ALIGNMENT = 8
LENGTH_OFFSET = 0
TYPE_OFFSET = LENGTH_OFFSET + 4
RECV_NS_OFFSET = TYPE_OFFSET + 4
RECORD_HEADER_BYTES = RECV_NS_OFFSET + 8

TYPE_DATA = 1
TYPE_PAD = 2
TYPE_RUN = 3

# A packed run: the record header, then COUNT (u32) and an unused u32, then
# the items joined by RUN_SEPARATOR.
RUN_HEADER_BYTES = RECORD_HEADER_BYTES + 8
RUN_SEPARATOR = b",\n"

# Bulk access reads the data area as little-endian int64 words: a record
# starts on a word (``RECORD_ALIGNMENT``), its LENGTH and TYPE are the low
# and high halves of its first word and RECV_NS is its second word. A run of
# records is then written and parsed with a few numpy operations on word
# indexes instead of one ``struct`` call per record.
WORD_BYTES = RECORD_ALIGNMENT
WORD_SHIFT = 3  # log2(WORD_BYTES)
assert WORD_BYTES == 1 << WORD_SHIFT
LENGTH_TYPE_WORD = LENGTH_OFFSET // WORD_BYTES
RECV_NS_WORD = RECV_NS_OFFSET // WORD_BYTES
TYPE_SHIFT = 8 * (TYPE_OFFSET - LENGTH_OFFSET)
LENGTH_MASK = (1 << TYPE_SHIFT) - 1
# record_words(n) == (n + WORDS_ROUNDING) >> WORD_SHIFT: header plus payload, rounded up to whole words.
WORDS_ROUNDING = RECORD_HEADER_BYTES + RECORD_ALIGNMENT - 1

# 4 KiB (one page) is the smallest ring the layout accepts: room for a few
# small records, and small enough that tests wrap it often (the engine asks
# for at least 64 KiB, a few of its largest frames: its ring_bytes option).
# 1 GiB is far past any sane memory bound and keeps positions well inside
# int64 for centuries.
MIN_CAPACITY = 1 << 12
MAX_CAPACITY = 1 << 30


def align(n: int) -> int:
    """Round ``n`` up to the record alignment."""
    return (n + RECORD_ALIGNMENT - 1) & ~(RECORD_ALIGNMENT - 1)


def record_size(payload_len: int) -> int:
    """Bytes a record with a ``payload_len``-byte payload occupies in the ring."""
    return align(RECORD_HEADER_BYTES + payload_len)


def header_word(payload_len: Any, record_type: int = TYPE_DATA) -> Any:
    """The first word of a record: LENGTH in the low half, TYPE in the high
    half (an int, or an int64 array of lengths)."""
    return payload_len | record_type << TYPE_SHIFT


def max_item(capacity: int) -> int:
    """Largest item a packed run may carry: a run of one must fit in a
    record (``max_payload``)."""
    return max_payload(capacity) - (RUN_HEADER_BYTES - RECORD_HEADER_BYTES)


def ring_bytes(capacity: int) -> int:
    """Total bytes of a ring (header plus data area) of ``capacity``."""
    return HEADER_BYTES + capacity


def check_capacity(capacity: int) -> None:
    """Raise ValueError unless ``capacity`` is a power of two within bounds."""
    if capacity < MIN_CAPACITY or capacity > MAX_CAPACITY or capacity & (capacity - 1):
        raise ValueError(
            f"ring capacity must be a power of two between {MIN_CAPACITY} and {MAX_CAPACITY} bytes, got {capacity}"
        )


def max_payload(capacity: int) -> int:
    """Largest payload one record may carry: half the ring, so a pad plus the
    record always fits once the consumer has caught up."""
    return capacity // 2 - RECORD_HEADER_BYTES
