"""Metrics: the shared counters, read by anyone, as one JSON-able mapping.

The seed's ``PipelineMetrics`` map onto these: batch size distribution and
trigger ratio come from the ``batches`` table (and the cut counters here),
throughput from the intent/batch counters over time, error rates from the
dead-letter and database-error counters.
"""

from __future__ import annotations

import os
import signal

from ipc.control import Control
from ipc.control import Flusher as F
from ipc.control import Ingest as I

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


def snapshot(control: Control) -> dict:
    flusher = control.flusher.snapshot()
    out: dict = {"flusher": {name: flusher[i] for i, name in _FLUSHER_NAMES.items()}}
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
        pid, restarts, last_exit, _ = counters.snapshot()
        workers.append(
            {
                "role": "flusher" if slot == 0 else f"ingest {slot - 1}",
                "pid": pid,
                "restarts": restarts,
                "last_exit": exit_name(last_exit) if restarts else None,
            }
        )
    out["workers"] = workers
    out["pid"] = os.getpid()
    return out
