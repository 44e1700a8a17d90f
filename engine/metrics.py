"""Metrics: the shared counters, read by anyone, as one JSON-able mapping.

The seed's ``PipelineMetrics`` map onto these: batch size distribution and
trigger ratio come from the ``batches`` table (and the cut counters here),
throughput from the intent/batch counters over time, error rates from the
dead-letter and database-error counters.
"""

from __future__ import annotations

import os
import signal
import time
from typing import NamedTuple

import numpy as np

from engine.policy import OPEN, STATE_NAMES
from ipc.control import HISTOGRAM_WORDS, Config, Control
from ipc.control import Flusher as F
from ipc.control import Ingest as I
from ipc.cursors import Counters

_FLUSHER_NAMES = {v: k.lower() for k, v in vars(F).items() if k.isupper() and k != "COUNT"}
_INGEST_NAMES = {v: k.lower() for k, v in vars(I).items() if k.isupper() and k != "COUNT"}


def exit_name(code: int) -> str:
    """A returncode as people read it: ``0``, ``3``, ``SIGKILL``."""
    if code < 0:
        try:
            return signal.Signals(-code).name
        except ValueError:
            return f"signal {-code}"
    return str(code)


# Flusher words that are levels, not counts: summed over lanes they would lie.
_GAUGES = {
    F.LAST_FLUSH_WALL_NS: max,
    F.LAST_BATCH_SIZE: max,
    F.BATCH_LIMIT: max,
    F.BREAKER: lambda states: OPEN if OPEN in states else max(states),  # open beats half-open beats closed
    F.CONSECUTIVE_FAILURES: max,
    F.LATENCY_EWMA_US: max,
    F.READY_NS: min,
    F.DB_CONNECTED: min,
}


def _iso(wall_ns: int) -> str | None:
    if not wall_ns:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(wall_ns / 1e9)) + f".{wall_ns % 1_000_000_000 // 1000:06d}Z"


def lanes_total(control: Control) -> list[int]:
    """The flusher words of every lane combined: counts summed, levels by _GAUGES."""
    rows = [c.snapshot() for c in control.flushers]
    return [_GAUGES[i]([r[i] for r in rows]) if i in _GAUGES else sum(r[i] for r in rows) for i in range(len(rows[0]))]


def health(control: Control, *, draining: bool) -> dict:
    """The seed's HealthStatus (snake_case), overall and per lane.

    ``database``: "restarting" while the supervisor brings a dead embedded
    server back; "down" while any lane's connection is failing (an external
    server, or the embedded one not yet reachable again); else "up"."""
    cfg = control.config
    lanes = []
    for lane, counters in enumerate(control.flushers):
        f = counters.snapshot()
        lanes.append(
            {
                "lane": lane,
                "breaker": STATE_NAMES[f[F.BREAKER]],
                "connected": bool(f[F.DB_CONNECTED]),
                "current_batch_size": f[F.BATCH_LIMIT],
                "average_latency_ms": round(f[F.LATENCY_EWMA_US] / 1000, 3),
                "last_successful_flush": _iso(f[F.LAST_FLUSH_WALL_NS]),
            }
        )
    total = lanes_total(control)
    if not cfg.get(Config.DATABASE):
        database = "restarting"
    elif not all(lane["connected"] for lane in lanes):
        database = "down"
    else:
        database = "up"
    breaker = total[F.BREAKER]
    return {
        "is_healthy": breaker == 0 and not draining and database == "up",
        "batching_enabled": all(lane["breaker"] != "open" for lane in lanes),
        "current_batch_size": total[F.BATCH_LIMIT],
        "error_rate": round(total[F.DEAD_LETTERED] / max(1, total[F.INTENTS]), 6),
        "average_latency_ms": round(total[F.LATENCY_EWMA_US] / 1000, 3),
        "last_successful_flush": _iso(total[F.LAST_FLUSH_WALL_NS]),
        "breaker": STATE_NAMES[breaker],
        "draining": draining,
        "database": database,
        "database_restarts": cfg.get(Config.DB_RESTARTS),
        "lanes": lanes,
    }


def snapshot(control: Control) -> dict:
    flusher = lanes_total(control)
    out: dict = {"flusher": {name: flusher[i] for i, name in _FLUSHER_NAMES.items()}}
    out["lanes"] = [
        {name: values[i] for i, name in _FLUSHER_NAMES.items()} for values in (c.snapshot() for c in control.flushers)
    ]
    cuts = flusher[F.TIME_CUTS] + flusher[F.SIZE_CUTS] + flusher[F.DRAIN_CUTS]
    out["flush_trigger_ratio"] = {
        "time_triggered": round(flusher[F.TIME_CUTS] / cuts, 4) if cuts else 0.0,
        "size_triggered": round(flusher[F.SIZE_CUTS] / cuts, 4) if cuts else 0.0,
    }
    out["ingests"] = []
    for counters in control.ingest:
        values = counters.snapshot()
        out["ingests"].append({name: values[j] for j, name in _INGEST_NAMES.items()})
    workers = []
    for slot, counters in enumerate(control.workers):
        pid, restarts, last_exit = counters.snapshot()[:3]
        lanes = control.map.lanes
        workers.append(
            {
                "role": f"flusher {slot}" if slot < lanes else f"ingest {slot - lanes}",
                "pid": pid,
                "restarts": restarts,
                "last_exit": exit_name(last_exit) if restarts else None,
            }
        )
    out["workers"] = workers
    out["pid"] = os.getpid()
    return out


# ------------------------------------------------------------ histograms
class Histogram(NamedTuple):
    """One histogram's place in a lane's histogram words: ``len(bounds) + 1``
    bucket counts (the last is +Inf), then the sum in ``unit`` (an integer)."""

    name: str
    help: str
    first: int
    bounds: tuple[float, ...]
    unit: float  # the sum word counts in this many base units (1e-6: microseconds)

    @property
    def sum_word(self) -> int:
        return self.first + len(self.bounds) + 1


# Batch sizes: the seed's 857 is a bound, so "full" batches are one bucket.
BATCH_SIZE = Histogram(
    "batchscheduler_batch_size",
    "Intents stored per committed batch.",
    0,
    (1, 2, 5, 10, 25, 50, 100, 250, 500, 856, 857, 1000, 2500, 5000, 10000),
    1.0,
)
# Received -> committed: the window (10 ms) plus the write; buckets resolve
# around the window, where the seed's latency questions are.
COMMIT_LATENCY = Histogram(
    "batchscheduler_commit_latency_seconds",
    "Time from an intent's arrival at the ingest to the commit of its batch.",
    BATCH_SIZE.sum_word + 1,
    (0.001, 0.002, 0.005, 0.0075, 0.01, 0.0125, 0.015, 0.02, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
    1e-6,
)
COMMIT_DURATION = Histogram(
    "batchscheduler_commit_duration_seconds",
    "Time one batch's database write took, first statement to COMMIT.",
    COMMIT_LATENCY.sum_word + 1,
    (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
    1e-6,
)
HISTOGRAMS = (BATCH_SIZE, COMMIT_LATENCY, COMMIT_DURATION)
assert COMMIT_DURATION.sum_word < HISTOGRAM_WORDS, "histograms outgrew their shared-memory words"
_LATENCY_BOUNDS_NS = np.array([b * 1e9 for b in COMMIT_LATENCY.bounds], dtype=np.int64)


def _bucket(h: Histogram, value: float) -> int:
    for i, bound in enumerate(h.bounds):
        if value <= bound:
            return h.first + i
    return h.first + len(h.bounds)


def record_batch(words: Counters, stored: int, latencies_ns: np.ndarray, duration_s: float) -> None:
    """A lane's flusher, after a batch committed: its size (intents stored),
    each intent's received-to-committed latency, the write's duration."""
    if stored:
        words.add(_bucket(BATCH_SIZE, stored), 1)
        words.add(BATCH_SIZE.sum_word, stored)
    if len(latencies_ns):
        # side="left": a latency equal to a bound falls in that bound's bucket (le).
        counts = np.bincount(
            np.searchsorted(_LATENCY_BOUNDS_NS, latencies_ns, side="left"), minlength=len(COMMIT_LATENCY.bounds) + 1
        ).astype(np.int64)
        words.add_block(COMMIT_LATENCY.first, counts)
        words.add(COMMIT_LATENCY.sum_word, int(latencies_ns.sum() // 1000))
    words.add(_bucket(COMMIT_DURATION, duration_s), 1)
    words.add(COMMIT_DURATION.sum_word, int(duration_s * 1e6))
