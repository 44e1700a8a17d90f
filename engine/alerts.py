"""Alerts from the seed's thresholds, computed in the engine.

The supervisor calls ``Alerts.evaluate`` once a second with a sample of the
shared counters (``engine.metrics.Sample``). Each rule is a condition over
that history:

``error_rate``
    dead-lettered over answered-by-a-lane (committed + dead-lettered) in the
    trailing ``alert_error_rate_for_s`` (default 300 s) exceeds
    ``alert_error_rate`` (0.01): "> 1% for 5 minutes". Decided only once
    the engine has run a whole window, and only over at least
    ``MIN_INTENTS`` (100) answered intents: below that it does not fire.
``latency_p95``
    the p95 of received -> committed latency over the trailing
    ``alert_latency_for_s`` (600 s), from the histogram's buckets, exceeds
    ``alert_latency_p95_ms`` (50 ms). Also needs the whole window and
    ``MIN_INTENTS`` commits; a window with no commit at all (the database
    down) leaves it as it was, so it does not clear while intents wait.
``flush_failures``
    some lane's consecutive failed batch writes exceed
    ``alert_flush_failures`` (3).
``memory``
    some worker's RSS exceeds ``alert_memory_ratio`` (0.8) of
    ``worker_rss_limit_mb`` (the limit at which it is recycled).

An alert is logged once when it starts firing (WARNING) and once when it
clears (INFO); ``state()`` is what ``/health`` shows, and
``batchscheduler_alert_firing{alert}`` exports the same flags.
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass

from engine.metrics import Sample, iso, quantile
from engine.options import Options

log = logging.getLogger(__name__)

NAMES = ("error_rate", "latency_p95", "flush_failures", "memory")
# A windowed alert needs this many intents answered in its window to fire:
# one dead letter (or one slow commit) in a quiet window is not a rate.
MIN_INTENTS = 100


@dataclass
class Alert:
    name: str
    threshold: float
    summary: str
    firing: bool = False
    since_wall_ns: int = 0
    value: float = 0.0

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "firing": self.firing,
            "since": iso(self.since_wall_ns) if self.firing else None,
            "value": round(self.value, 6),
            "threshold": self.threshold,
            "summary": self.summary,
        }


class Alerts:
    def __init__(self, options: Options) -> None:
        o = options
        self.error_window_s = o.alert_error_rate_for_s
        self.latency_window_s = o.alert_latency_for_s
        self.alerts = {
            "error_rate": Alert(
                "error_rate",
                o.alert_error_rate,
                f"dead-lettered fraction over the last {o.alert_error_rate_for_s:g} s above {o.alert_error_rate:g}",
            ),
            "latency_p95": Alert(
                "latency_p95",
                o.alert_latency_p95_ms / 1000,
                f"p95 received->committed latency (seconds) over the last {o.alert_latency_for_s:g} s "
                f"above {o.alert_latency_p95_ms:g} ms",
            ),
            "flush_failures": Alert(
                "flush_failures",
                o.alert_flush_failures,
                f"a lane's consecutive failed batch writes above {o.alert_flush_failures}",
            ),
            "memory": Alert(
                "memory",
                o.alert_memory_ratio,
                f"a worker's RSS above {o.alert_memory_ratio:g} of worker_rss_limit_mb ({o.worker_rss_limit_mb} MiB)",
            ),
        }
        # (monotonic time, sample); long enough for the longer window.
        self.history: collections.deque[tuple[float, Sample]] = collections.deque()

    def _window(self, now: float, seconds: float) -> Sample | None:
        """The newest sample at least ``seconds`` old, or None while the
        history is shorter than that."""
        found = None
        for t, sample in self.history:
            if now - t >= seconds:
                found = sample
            else:
                break
        return found

    def evaluate(self, sample: Sample, *, rss_ratio: float, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self.history.append((now, sample))
        horizon = max(self.error_window_s, self.latency_window_s) + 5
        while self.history and now - self.history[0][0] > horizon:
            self.history.popleft()

        then = self._window(now, self.error_window_s)
        error_rate = None
        if then is not None:
            dead = sample.dead_lettered - then.dead_lettered
            answered = sample.committed - then.committed + dead
            error_rate = dead / answered if answered >= MIN_INTENTS else 0.0
        self._set("error_rate", error_rate)

        then = self._window(now, self.latency_window_s)
        p95 = None
        if then is not None:
            counts = [a - b for a, b in zip(sample.latency_buckets, then.latency_buckets, strict=True)]
            n = sum(counts)
            # Nothing committed in the window (an outage, or idle): no new
            # evidence, the alert stays as it is rather than clearing while
            # intents wait. A few commits are too few to say "p95".
            if n:
                p95 = quantile(0.95, counts) if n >= MIN_INTENTS else 0.0
        self._set("latency_p95", p95)
        self._set("flush_failures", float(sample.consecutive_failures))
        self._set("memory", rss_ratio)

    def _set(self, name: str, value: float | None) -> None:
        alert = self.alerts[name]
        if value is None:  # not enough history yet: neither fires nor clears
            return
        alert.value = value
        firing = value > alert.threshold
        if firing and not alert.firing:
            alert.firing, alert.since_wall_ns = True, time.time_ns()
            log.warning("alert %s firing: %s (value %.4g > %.4g)", name, alert.summary, value, alert.threshold)
        elif alert.firing and not firing:
            lasted = (time.time_ns() - alert.since_wall_ns) / 1e9
            alert.firing, alert.since_wall_ns = False, 0
            log.info("alert %s cleared after %.0f s (value %.4g <= %.4g)", name, lasted, value, alert.threshold)

    def state(self) -> list[dict]:
        return [self.alerts[name].as_dict() for name in NAMES]

    def firing(self) -> dict[str, bool]:
        return {name: self.alerts[name].firing for name in NAMES}
