"""Which write lane owns an entity.

Every entity belongs to exactly one lane, so one flusher process writes it:
per-entity order, the lane's entity cache and its batches need no
coordination with other lanes. The rule is documented (README, "Lanes") so
that anyone can tell which flusher writes an entity; a restart may change
``lanes`` freely, since nothing in flight survives a restart unacknowledged.

    lane = CRC-32 (zlib, IEEE 802.3) of the entity id's UTF-8 bytes, mod lanes

CRC-32 is in C (``zlib.crc32``), stable across Python versions and processes
(unlike ``hash()``, which is salted per process), and spreads short ids well.
"""

from __future__ import annotations

import zlib


def lane_of(entity: str, lanes: int) -> int:
    """The lane (0 .. lanes-1) that owns ``entity``."""
    return zlib.crc32(entity.encode()) % lanes if lanes > 1 else 0
