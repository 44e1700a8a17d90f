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

from engine import codes
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
    F.LAST_BATCH_SIZE: max,  # replaced below by the latest lane's
    F.BATCH_LIMIT: max,
    F.BREAKER: lambda states: OPEN if OPEN in states else max(states),  # open beats half-open beats closed
    F.CONSECUTIVE_FAILURES: max,
    F.LATENCY_EWMA_US: max,
    F.READY_NS: min,
    F.DB_CONNECTED: min,
}


def iso(wall_ns: int) -> str | None:
    """Wall-clock nanoseconds as an ISO-8601 UTC timestamp (None for 0: never)."""
    if not wall_ns:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(wall_ns / 1e9)) + f".{wall_ns % 1_000_000_000 // 1000:06d}Z"


def lanes_total(control: Control) -> list[int]:
    """The flusher words of every lane combined: counts summed, levels by _GAUGES."""
    rows = [c.snapshot() for c in control.flushers]
    total = [_GAUGES[i]([r[i] for r in rows]) if i in _GAUGES else sum(r[i] for r in rows) for i in range(len(rows[0]))]
    # The last batch is the latest lane's: its size goes with its time.
    total[F.LAST_BATCH_SIZE] = max(rows, key=lambda r: r[F.LAST_FLUSH_WALL_NS])[F.LAST_BATCH_SIZE]
    return total


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
                "last_successful_flush": iso(f[F.LAST_FLUSH_WALL_NS]),
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
        "last_successful_flush": iso(total[F.LAST_FLUSH_WALL_NS]),
        "breaker": STATE_NAMES[breaker],
        "draining": draining,
        "database": database,
        "database_restarts": cfg.get(Config.DB_RESTARTS),
        "lanes": lanes,
    }


def _readable(names: dict[int, str], values: list[int]) -> dict:
    """Counter words as people read them: times in seconds or ISO-8601,
    states by name, flags as booleans; counts as they are."""
    out: dict = {}
    for i, name in names.items():
        v = values[i]
        if name.endswith("_wall_ns") or name == "ready_ns":
            out[name.removesuffix("_wall_ns").removesuffix("_ns") + "_at"] = iso(v)
        elif name.endswith("_us"):
            out[name.removesuffix("_us") + "_s"] = round(v / 1e6, 6)
        elif name == "breaker":
            out[name] = STATE_NAMES[v]
        elif name in ("db_connected", "paused"):
            out[name] = bool(v)
        elif name == "paused_since_ns":
            continue
        else:
            out[name] = v
    return out


def backpressure_s(values: list[int]) -> float:
    """An ingest's time paused on a full ring: ended pauses plus the one running."""
    since = values[I.PAUSED_SINCE_NS]
    running = (time.monotonic_ns() - since) / 1e9 if since else 0.0
    return round(values[I.BACKPRESSURE_US] / 1e6 + running, 6)


def snapshot(control: Control) -> dict:
    """The socket's ``metrics`` reply: every shared counter, overall and per
    lane, ingest and worker, with uptime, version and latency percentiles."""
    cfg = control.config
    flusher = lanes_total(control)
    started = cfg.get(Config.STARTED_NS)
    out: dict = {
        "version": VERSION,
        "started_at": iso(started),
        "uptime_s": round((time.time_ns() - started) / 1e9, 3) if started else None,
        "time_window_s": cfg.get(Config.WINDOW_US) / 1e6,
        "max_batch_size": cfg.get(Config.MAX_BATCH),
    }
    out["flusher"] = _readable(_FLUSHER_NAMES, flusher)
    out["lanes"] = [_readable(_FLUSHER_NAMES, c.snapshot()) for c in control.flushers]
    cuts = flusher[F.TIME_CUTS] + flusher[F.SIZE_CUTS] + flusher[F.DRAIN_CUTS]
    out["flush_trigger_ratio"] = {
        "time_triggered": round(flusher[F.TIME_CUTS] / cuts, 4) if cuts else 0.0,
        "size_triggered": round(flusher[F.SIZE_CUTS] / cuts, 4) if cuts else 0.0,
        "drain_triggered": round(flusher[F.DRAIN_CUTS] / cuts, 4) if cuts else 0.0,
    }
    now = sample(control)
    out["commit_latency_s"] = {
        "p50": round(quantile(0.5, now.latency_buckets), 6),
        "p95": round(quantile(0.95, now.latency_buckets), 6),
        "p99": round(quantile(0.99, now.latency_buckets), 6),
    }
    out["dead_letters_by_code"] = dead_letters_by_code(control)
    out["ingests"] = []
    for counters in control.ingest:
        values = counters.snapshot()
        row = _readable(_INGEST_NAMES, values)
        row.pop("backpressure_s", None)
        row["backpressure_s"] = backpressure_s(values)
        out["ingests"].append(row)
    workers = []
    for slot, counters in enumerate(control.workers):
        pid, restarts, last_exit, started_ns = counters.snapshot()[:4]
        workers.append(
            {
                "role": role_of(control, slot),
                "pid": pid,
                "restarts": restarts,
                "last_exit": exit_name(last_exit) if restarts else None,
                "started_at": iso(started_ns),
            }
        )
    out["workers"] = workers
    me = os.getpid()
    out["answered_by"] = next((w for w in workers if w["pid"] == me), {"role": None, "pid": me})
    return out


def role_of(control: Control, slot: int) -> str:
    """Worker slot -> role: ``flusher l`` for the lanes, then ``ingest i``."""
    lanes = control.map.lanes
    return f"flusher {slot}" if slot < lanes else f"ingest {slot - lanes}"


def dead_letters_by_code(control: Control) -> dict[str, int]:
    words = [h.snapshot() for h in control.histograms]
    return {code: sum(w[word] for w in words) for code, word in DEAD_LETTER_WORD.items()}


def _version() -> str:
    try:
        from importlib.metadata import version as dist_version

        return dist_version("batchscheduler")
    except Exception:  # noqa: BLE001 - a checkout without an installed distribution
        return "unknown"


VERSION = _version()


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
# After the histograms, one count per dead-letter code (engine/codes.py), so
# "dead letters by code" needs no query: the lane that stored them counts them.
DEAD_LETTER_CODES = tuple(code for code, status in codes.REPLY_CODES.items() if status == codes.DEAD_LETTERED)
DEAD_LETTER_WORD = {code: COMMIT_DURATION.sum_word + 1 + i for i, code in enumerate(DEAD_LETTER_CODES)}
assert max(DEAD_LETTER_WORD.values()) < HISTOGRAM_WORDS, "histograms outgrew their shared-memory words"
_LATENCY_BOUNDS_NS = np.array([b * 1e9 for b in COMMIT_LATENCY.bounds], dtype=np.int64)


def _bucket(h: Histogram, value: float) -> int:
    for i, bound in enumerate(h.bounds):
        if value <= bound:
            return h.first + i
    return h.first + len(h.bounds)


def record_batch(
    words: Counters, stored: int, latencies_ns: np.ndarray, duration_s: float, dead_codes: dict[str, int] | None = None
) -> None:
    """A lane's flusher, after a batch committed: its size (intents stored),
    each intent's received-to-committed latency, the write's duration, and
    how many of its intents were dead-lettered, by code."""
    for code, n in (dead_codes or {}).items():
        # every code the engine sends is registered (tests/test_reply_codes.py)
        words.add(DEAD_LETTER_WORD[code], n)
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


# ---------------------------------------------------------------- samples
class Sample(NamedTuple):
    """The engine's totals at one moment, for rates and windowed figures
    (alerts, the periodic stats line): two samples' difference is what
    happened between them."""

    committed: int
    dead_lettered: int
    batches: int
    stored: int  # intents in those batches (the batch-size histogram's sum)
    latency_buckets: tuple[int, ...]  # commit-latency bucket counts, all lanes
    consecutive_failures: int  # the worst lane's
    breaker: int  # the engine-wide breaker state (open beats half-open beats closed)
    ring_fill: float  # the fullest intent ring, 0..1


def sample(control: Control) -> Sample:
    total = lanes_total(control)
    words = [h.snapshot() for h in control.histograms]
    width = len(COMMIT_LATENCY.bounds) + 1
    buckets = tuple(sum(w[COMMIT_LATENCY.first + i] for w in words) for i in range(width))
    fill = max(
        ((ring.published() - ring.released()) / ring.capacity for row in control.intent_rings for ring in row),
        default=0.0,
    )
    return Sample(
        committed=total[F.COMMITTED],
        dead_lettered=total[F.DEAD_LETTERED],
        batches=total[F.BATCHES],
        stored=sum(w[BATCH_SIZE.sum_word] for w in words),
        latency_buckets=buckets,
        consecutive_failures=total[F.CONSECUTIVE_FAILURES],
        breaker=total[F.BREAKER],
        ring_fill=fill,
    )


def quantile(q: float, counts: list[int] | tuple[int, ...], bounds: tuple[float, ...] = COMMIT_LATENCY.bounds) -> float:
    """The ``q`` quantile of a histogram's (non-cumulative) bucket counts, by
    linear interpolation inside the bucket, as Prometheus' histogram_quantile
    does; a rank in the +Inf bucket answers the largest finite bound."""
    total = sum(counts)
    if not total:
        return 0.0
    rank, running, lower = q * total, 0, 0.0
    for bound, count in zip(bounds, counts, strict=False):
        if count and running + count >= rank:
            return lower + (bound - lower) * (rank - running) / count
        running += count
        lower = bound
    return bounds[-1]


def stats_line(before: Sample, after: Sample, seconds: float) -> tuple[str, dict]:
    """The periodic INFO line over one interval: the text, and its fields
    (for ``--log-format json``)."""
    counts = [a - b for a, b in zip(after.latency_buckets, before.latency_buckets, strict=True)]
    batches = after.batches - before.batches
    fields = {
        "committed_per_s": round((after.committed - before.committed) / seconds, 1),
        "dead_lettered_per_s": round((after.dead_lettered - before.dead_lettered) / seconds, 1),
        "batches_per_s": round(batches / seconds, 1),
        "latency_p50_ms": round(quantile(0.5, counts) * 1000, 2),
        "latency_p99_ms": round(quantile(0.99, counts) * 1000, 2),
        "batch_avg": round((after.stored - before.stored) / batches, 1) if batches else 0.0,
        "ring_fill": round(after.ring_fill, 4),
        "breaker": STATE_NAMES[after.breaker],
    }
    text = (
        f"stats: {fields['committed_per_s']:g} committed/s, {fields['dead_lettered_per_s']:g} dead-lettered/s, "
        f"p50 {fields['latency_p50_ms']:g} ms, p99 {fields['latency_p99_ms']:g} ms, "
        f"batch avg {fields['batch_avg']:g}, ring fill {fields['ring_fill'] * 100:.1f}%, breaker {fields['breaker']}"
    )
    return text, fields
