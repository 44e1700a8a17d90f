"""Batching policy: when to cut, how big, and when to stop trying.

Pure objects with injectable clocks, so tests drive them without sleeping:

* ``decide_cut``: the seed's dual condition in one place.
* ``CommitLead``: how early a time cut starts, so wait + commit fit the window.
* ``AdaptiveLimit``: the seed's adaptive batch sizing.
* ``CircuitBreaker``: the seed's breaker (closed, open, half-open).
* ``Backoff``: restart and reconnect delays.
"""

from __future__ import annotations

import time
from collections.abc import Callable

TIME = "time"
SIZE = "size"
DRAIN = "drain"


def decide_cut(
    pending: int, limit: int, oldest_ns: int, window_ns: int, now_ns: int, draining: bool
) -> tuple[str | None, int]:
    """The dual condition. Returns ``(reason, 0)`` to cut now, or
    ``(None, wait_ns)`` with how long until the window of the oldest pending
    intent expires. The window runs from the *first* intent of the batch."""
    if pending <= 0:
        return None, -1
    if pending >= limit:
        return SIZE, 0
    if draining:
        return DRAIN, 0
    deadline = oldest_ns + window_ns
    if now_ns >= deadline:
        return TIME, 0
    return None, deadline - now_ns


class AdaptiveLimit:
    """Adjusts the batch size limit between ``minimum`` and ``maximum``.

    After each batch: a failure, or a smoothed error rate above the
    threshold, or a latency above the threshold shrinks the limit by
    ``factor``; a size-triggered batch (demand exceeds the limit) with healthy
    latency grows it by ``factor``. Time-triggered healthy batches leave it
    alone: the limit is not what holds them back.
    """

    # EWMA weight of the newest batch: ~20 batches of memory, a fraction of a
    # second at load, so a burst of errors is noticed within a few batches.
    ALPHA = 0.05

    def __init__(
        self,
        *,
        initial: int,
        minimum: int,
        maximum: int,
        factor: float,
        error_rate_threshold: float,
        latency_threshold_s: float,
        enabled: bool = True,
    ) -> None:
        self.enabled = enabled
        self.minimum = max(1, min(minimum, maximum))
        self.maximum = maximum
        self.factor = factor
        self.error_rate_threshold = error_rate_threshold
        self.latency_threshold_s = latency_threshold_s
        self.limit = max(self.minimum, min(initial, maximum))
        self.error_rate = 0.0

    def reconfigure(self, *, maximum: int, minimum: int, enabled: bool) -> None:
        self.enabled = enabled
        self.maximum = maximum
        self.minimum = max(1, min(minimum, maximum))
        self.limit = maximum if not enabled else max(self.minimum, min(self.limit, maximum))

    def observe(self, *, failed_fraction: float, latency_s: float, size_triggered: bool) -> int:
        """Feed one batch's result; returns the new limit."""
        self.error_rate += self.ALPHA * (failed_fraction - self.error_rate)
        if not self.enabled:
            self.limit = self.maximum
            return self.limit
        if (
            failed_fraction >= 1.0
            or self.error_rate > self.error_rate_threshold
            or latency_s > self.latency_threshold_s
        ):
            self.limit = max(self.minimum, int(self.limit * (1 - self.factor)))
        elif size_triggered:
            self.limit = min(self.maximum, max(self.limit + 1, int(self.limit * (1 + self.factor))))
        return self.limit


CLOSED, OPEN, HALF_OPEN = 0, 1, 2
STATE_NAMES = {CLOSED: "closed", OPEN: "open", HALF_OPEN: "half_open"}


class CircuitBreaker:
    """Stops hammering a failing database.

    ``failure_threshold`` consecutive batch failures open it; while open,
    ``allow()`` is False until ``recovery_timeout_s`` has passed, then it is
    half-open: ``test_count`` batches in a row must succeed to close it, and
    one failure re-opens it.
    """

    def __init__(
        self,
        *,
        failure_threshold: int,
        recovery_timeout_s: float,
        test_count: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.failure_threshold = failure_threshold
        self.recovery_timeout_s = recovery_timeout_s
        self.test_count = test_count
        self.clock = clock
        self.state = CLOSED
        self.failures = 0
        self.successes = 0
        self.opened_at = 0.0

    def allow(self) -> bool:
        """May a batch be attempted now? Moves open -> half-open on timeout."""
        if self.state == OPEN and self.clock() - self.opened_at >= self.recovery_timeout_s:
            self.state = HALF_OPEN
            self.successes = 0
        return self.state != OPEN

    def retry_in(self) -> float:
        """Seconds until an open breaker lets a test batch through."""
        if self.state != OPEN:
            return 0.0
        return max(0.0, self.opened_at + self.recovery_timeout_s - self.clock())

    def success(self) -> None:
        self.failures = 0
        if self.state == HALF_OPEN:
            self.successes += 1
            if self.successes >= self.test_count:
                self.state = CLOSED

    def failure(self) -> None:
        self.failures += 1
        if self.state == HALF_OPEN or self.failures >= self.failure_threshold:
            self.state = OPEN
            self.opened_at = self.clock()

    def __repr__(self) -> str:
        return f"<CircuitBreaker {STATE_NAMES[self.state]} failures={self.failures}>"


class CommitLead:
    """How much earlier than its window a time-triggered batch is cut, so an
    intent's wait plus its batch's commit stays within the window (the
    product's promise: at most the window in added latency).

    The flusher observes, per batch, the time from when the cut was due to
    when its outcomes were handed back (wake-up lateness, planning, the
    commit, the hand-off). The lead is a high estimate of that: the smoothed
    mean plus two smoothed mean deviations (~20 batches of memory), never
    more than half the window, so a slow database cannot shrink batching to
    nothing. Off (``enabled=False``) the lead is 0: the window is wait only."""

    ALPHA = 0.05

    def __init__(self, *, enabled: bool) -> None:
        self.enabled = enabled
        self.mean_s = 0.0
        self.dev_s = 0.0
        self.seen = False

    def observe(self, seconds: float) -> None:
        if not self.seen:
            self.mean_s, self.dev_s, self.seen = seconds, seconds / 2, True
            return
        self.dev_s += self.ALPHA * (abs(seconds - self.mean_s) - self.dev_s)
        self.mean_s += self.ALPHA * (seconds - self.mean_s)

    def lead_ns(self, window_ns: int) -> int:
        if not self.enabled:
            return 0
        return min(window_ns // 2, int((self.mean_s + 2 * self.dev_s) * 1e9))


class Backoff:
    """Exponential delay: ``initial`` doubling to ``maximum``; ``reset`` after
    a success (or after a worker stayed up ``stable_s``)."""

    def __init__(
        self,
        *,
        initial: float = 0.1,
        maximum: float = 5.0,
        stable_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.initial = initial
        self.maximum = maximum
        self.stable_s = stable_s
        self.clock = clock
        self.current = 0.0
        self.started = clock()

    def started_now(self) -> None:
        """Note that the guarded thing (worker, connection) just started."""
        self.started = self.clock()

    def next_delay(self) -> float:
        """Delay before the next attempt; grows unless the last run was stable."""
        if self.clock() - self.started >= self.stable_s:
            self.current = 0.0
        self.current = self.initial if self.current == 0 else min(self.maximum, self.current * 2)
        return self.current

    def reset(self) -> None:
        self.current = 0.0
