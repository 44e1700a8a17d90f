"""The seed's "Batch Size Analysis", end to end through the engine.

One engine (``BatchScheduler`` in this process, workers and the embedded
PostgreSQL as children) serves every size: between runs the size limit is
changed with ``configure(max_batch_size=n)``, at run time, as a user would.
Each run is the same closed-loop MUD load (``engine.loadgen``).

The seed's efficiency model E(n) = n·C_ind / (C_batch + n·C_op) says the
cost per intent at batch size n is C_batch/n + C_op. So 1/throughput(n) is
linear in 1/n; a least-squares line through the measurements gives C_batch
(intercept with 1/n, seconds per batch) and C_op (seconds per intent), and
C_ind is the measured cost at n = 1. The fit error is the RMS relative error
of the predicted throughput.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile

import numpy as np

from engine import loadgen
from engine.scheduler import BatchScheduler

SEED_SIZES = (1, 73, 127, 251, 509, 617, 857, 991)
# The seed's measured table, for the side-by-side column.
SEED_TABLE = {73: 17_380, 127: 17_674, 251: 23_622, 509: 24_730, 617: 24_890, 857: 25_336, 991: 24_692}


@dataclasses.dataclass
class SweepPoint:
    size: int
    throughput: float
    p50_ms: float
    p99_ms: float
    batch_mean: float
    lost: int


def fit(points: list[SweepPoint]) -> dict:
    """Least-squares fit of 1/throughput = C_batch·(1/n) + C_op."""
    n = np.array([p.size for p in points], dtype=float)
    thr = np.array([p.throughput for p in points], dtype=float)
    ok = thr > 0
    n, thr = n[ok], thr[ok]
    if len(n) < 2:
        return {}
    A = np.vstack([1 / n, np.ones_like(n)]).T
    (c_batch, c_op), *_ = np.linalg.lstsq(A, 1 / thr, rcond=None)
    predicted = 1 / (c_batch / n + c_op)
    rms = float(np.sqrt(np.mean(((predicted - thr) / thr) ** 2)))
    c_ind = float(1 / thr[n == 1][0]) if (n == 1).any() else float(c_batch + c_op)
    return {
        "c_ind_us": c_ind * 1e6,
        "c_batch_us": float(c_batch) * 1e6,
        "c_op_us": float(c_op) * 1e6,
        # In the seed's units (C_ind = 3 round trips):
        "c_batch_rt": float(c_batch / c_ind * 3),
        "c_op_rt": float(c_op / c_ind * 3),
        "rms_relative_error": rms,
        "predicted": {int(k): float(v) for k, v in zip(n, predicted)},
    }


def run(
    sizes=SEED_SIZES,
    *,
    connections: int = 8,
    in_flight: int = 256,
    duration: float = 4.0,
    entities: int = 10_000,
    window_ms: float = 10.0,
    dsn: str | None = None,
    progress=None,
) -> dict:
    tmp = tempfile.mkdtemp(prefix="bs-sweep-")
    scheduler = BatchScheduler(
        socket=os.path.join(tmp, "e.sock"),
        data_dir=os.path.join(tmp, "var"),
        dsn=dsn,
        time_window_ms=window_ms,
        max_batch_size=max(sizes),
        log_level="WARNING",
    )
    points = []
    try:
        scheduler.start()
        loadgen.spawn_entities(scheduler.socket_path, entities)
        for size in sizes:
            scheduler.configure(max_batch_size=size)
            plan = loadgen.Plan(
                socket=scheduler.socket_path,
                connections=connections,
                in_flight=in_flight,
                duration=duration,
                entities=entities,
                seed=size,
            )
            result = loadgen.run(plan, progress=progress)
            stats = loadgen.batch_stats(scheduler.dsn, *result["window"])
            points.append(
                SweepPoint(
                    size,
                    result["throughput"],
                    result["latency_ms"]["p50"],
                    result["latency_ms"]["p99"],
                    stats.get("size_mean", 0.0),
                    result["lost"],
                )
            )
    finally:
        scheduler.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    best = max(points, key=lambda p: p.throughput)
    return {
        "points": [dataclasses.asdict(p) for p in points],
        "optimum": best.size,
        "fit": fit(points),
        "seed_table": SEED_TABLE,
    }
