"""The shared segment's map: a control block, then one ring pair per
(ingest, lane).

Segment layout (every region starts on a 4 KiB page)::

    +------------------------------------------------------------------+
    | control block (CONTROL_BYTES)                                     |
    |   config words        -- written by the supervisor                |
    |   flusher[l] counters -- written by flusher lane l                |
    |   ingest[i] counters  -- written by ingest i                      |
    |   worker slots        -- written by the supervisor                |
    |   histograms[l]       -- written by flusher lane l                |
    +------------------------------------------------------------------+
    | pair (0, 0): intent ring  (producer ingest 0, consumer lane 0)    |
    |              outcome ring (producer lane 0, consumer ingest 0)    |
    +------------------------------------------------------------------+
    | pair (0, 1): ...  one pair per (ingest i, lane l), i major        |

SPSC stays SPSC: ingest i is the only writer of intent ring [i][l] and
lane l its only reader; lane l is the only writer of outcome ring [i][l].
Every int64 here has exactly one writing process (see ``ipc.cursors``).
"""

from __future__ import annotations

from ipc import layout
from ipc.cursors import Counters
from ipc.ring import Ring

PAGE = 4096
MAX_INGESTS = 64
MAX_LANES = 64


class Config:
    """Runtime-tunable words, written by the supervisor, read by workers."""

    EPOCH = 0  # bumped after every change, so readers notice cheaply
    WINDOW_US = 1
    MAX_BATCH = 2
    ADAPTIVE = 3
    DRAINING = 4  # 1 once shutdown began: flush now, accept nothing new
    MIN_BATCH = 5
    DATABASE = 6  # the supervisor's view of the database process: 1 up, 0 down (restarting)
    DB_RESTARTS = 7  # times the supervisor restarted the embedded PostgreSQL
    STARTED_NS = 8  # wall time the supervisor started (uptime, in every report)
    COUNT = 10


class Flusher:
    """Counters written by the flusher."""

    BATCHES = 0
    INTENTS = 1  # records cut into batches (duplicates included)
    COMMITTED = 2  # intents newly committed
    DUPLICATES = 3  # resends answered with their original outcome
    DEAD_LETTERED = 4
    TIME_CUTS = 5
    SIZE_CUTS = 6
    DRAIN_CUTS = 7
    LAST_FLUSH_WALL_NS = 8
    LAST_BATCH_SIZE = 9
    BATCH_LIMIT = 10  # current (adaptive) size limit
    BREAKER = 11  # 0 closed, 1 open, 2 half-open
    DB_ERRORS = 12
    CONSECUTIVE_FAILURES = 13
    LATENCY_EWMA_US = 14  # first-received to commit, smoothed
    FALLBACKS = 15  # batches re-run intent by intent after a data error
    READY_NS = 16  # wall time the flusher came up (connected to the database)
    SLOW_PATH = 17  # batches written by the reading path (cache miss, resend, stale cache)
    DB_CONNECTED = 18  # 1 while the flusher holds a working connection, 0 after a connection error
    COUNT = 24


class Ingest:
    """Counters written by one ingest process."""

    RECEIVED = 0
    REJECTED = 1
    CONNECTIONS_OPEN = 2
    CONNECTIONS_TOTAL = 3
    REPLIES = 4
    PAUSED = 5  # 1 while reading is paused by a full ring
    READY_NS = 6  # wall time this ingest started serving
    BACKPRESSURE_US = 7  # time spent paused on a full ring, ended pauses only
    PAUSED_SINCE_NS = 8  # CLOCK_MONOTONIC when the current pause began; 0 when not paused
    COUNT = 10


class Worker:
    """Per-worker slot written by the supervisor."""

    PID = 0
    RESTARTS = 1
    LAST_EXIT = 2  # raw returncode of the last exit (negative = signal)
    STARTED_NS = 3
    # 1 once the supervisor asked this worker to stop (drain, recycling):
    # a SIGTERM without it is the kernel's parent-death signal. (getppid()
    # cannot tell: while the dying supervisor's other threads live, the
    # worker is reparented to one of them, under the same pid.)
    STOP_ASKED = 4
    COUNT = 5


_CONFIG_OFFSET = 0
_FLUSHER_OFFSET = _CONFIG_OFFSET + 8 * Config.COUNT
_INGEST_OFFSET = _FLUSHER_OFFSET + 8 * Flusher.COUNT * MAX_LANES
_WORKERS_OFFSET = _INGEST_OFFSET + 8 * Ingest.COUNT * MAX_INGESTS
# Worker slot l is flusher lane l (l < lanes), slot lanes + i is ingest i.
_HISTOGRAMS_OFFSET = _WORKERS_OFFSET + 8 * Worker.COUNT * (MAX_LANES + MAX_INGESTS)
# Histogram words of one lane (written by that lane only): fixed buckets plus
# a sum per histogram; engine.observe owns which word is which bucket.
HISTOGRAM_WORDS = 96
CONTROL_BYTES = -(-(_HISTOGRAMS_OFFSET + 8 * HISTOGRAM_WORDS * MAX_LANES) // PAGE) * PAGE


def _page_align(n: int) -> int:
    return -(-n // PAGE) * PAGE


class SegmentMap:
    """Where everything lives for ``ingests`` x ``lanes`` ring pairs of the given sizes."""

    def __init__(self, ingests: int, lanes: int, ring_bytes: int, outcome_bytes: int) -> None:
        if not 1 <= ingests <= MAX_INGESTS:
            raise ValueError(f"ingests must be between 1 and {MAX_INGESTS}, got {ingests}")
        if not 1 <= lanes <= MAX_LANES:
            raise ValueError(f"lanes must be between 1 and {MAX_LANES}, got {lanes}")
        layout.check_capacity(ring_bytes)
        layout.check_capacity(outcome_bytes)
        self.ingests = ingests
        self.lanes = lanes
        self.ring_bytes = ring_bytes
        self.outcome_bytes = outcome_bytes
        self._pair = _page_align(layout.ring_bytes(ring_bytes)) + _page_align(layout.ring_bytes(outcome_bytes))
        self.size = CONTROL_BYTES + ingests * lanes * self._pair

    def intent_ring_offset(self, i: int, lane: int) -> int:
        return CONTROL_BYTES + (i * self.lanes + lane) * self._pair

    def outcome_ring_offset(self, i: int, lane: int) -> int:
        return self.intent_ring_offset(i, lane) + _page_align(layout.ring_bytes(self.ring_bytes))

    def args(self) -> list[str]:
        """The map as command-line words, so a worker can rebuild it."""
        return [str(self.ingests), str(self.lanes), str(self.ring_bytes), str(self.outcome_bytes)]


class Control:
    """Typed views over the control block and the rings of one segment.

    ``intent_rings[i][l]`` and ``outcome_rings[i][l]`` are the pair between
    ingest ``i`` and lane ``l``; ``flushers[l]`` are lane ``l``'s counters;
    ``workers[l]`` is lane ``l``'s slot and ``workers[lanes + i]`` ingest ``i``'s."""

    def __init__(self, buf: memoryview, smap: SegmentMap, *, create: bool = False) -> None:
        self.map = smap
        self.config = Counters(buf, _CONFIG_OFFSET, Config.COUNT)
        self.flushers = [
            Counters(buf, _FLUSHER_OFFSET + 8 * Flusher.COUNT * lane, Flusher.COUNT) for lane in range(smap.lanes)
        ]
        self.ingest = [Counters(buf, _INGEST_OFFSET + 8 * Ingest.COUNT * i, Ingest.COUNT) for i in range(smap.ingests)]
        self.workers = [
            Counters(buf, _WORKERS_OFFSET + 8 * Worker.COUNT * s, Worker.COUNT)
            for s in range(smap.lanes + smap.ingests)
        ]
        self.histograms = [
            Counters(buf, _HISTOGRAMS_OFFSET + 8 * HISTOGRAM_WORDS * lane, HISTOGRAM_WORDS)
            for lane in range(smap.lanes)
        ]
        self.intent_rings = [
            [
                Ring(
                    buf, smap.intent_ring_offset(i, lane), smap.ring_bytes, create=create, name=f"intents[{i}][{lane}]"
                )
                for lane in range(smap.lanes)
            ]
            for i in range(smap.ingests)
        ]
        self.outcome_rings = [
            [
                Ring(
                    buf,
                    smap.outcome_ring_offset(i, lane),
                    smap.outcome_bytes,
                    create=create,
                    name=f"outcomes[{i}][{lane}]",
                )
                for lane in range(smap.lanes)
            ]
            for i in range(smap.ingests)
        ]

    def ingest_slot(self, i: int) -> int:
        return self.map.lanes + i

    def close(self) -> None:
        """Release every view (required before the segment can be unmapped)."""
        for counters in (self.config, *self.flushers, *self.ingest, *self.workers, *self.histograms):
            counters.detach()
        for ring in (*_flat(self.intent_rings), *_flat(self.outcome_rings)):
            ring.close()


def _flat(rows: list[list[Ring]]) -> list[Ring]:
    return [ring for row in rows for ring in row]
