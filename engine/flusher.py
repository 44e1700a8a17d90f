"""A flusher lane: cuts batches out of its rings and commits each in one transaction.

Lane ``l`` reads ring [i][l] of every ingest ``i`` (the intents of the
entities it owns, ``engine.lanes``) and writes on its own connection; no other
lane writes its entities. Loop (the main thread, no spinning): scan what the
ingests published, apply the dual condition (``policy.decide_cut``), and
either cut a batch or sleep on the lane's eventfd for exactly the time left in
the window. A cut takes records from the rings in a fixed rotation (ring ``b
mod N`` first for batch ``b``, so no ring starves) and has the lane store
plan it; the store commits it (``persistence.lane_store``: connection, SQL,
fallback chain and entity-cache rule; a writer thread overlaps batch k's
commit with cutting and planning batch k+1); and only after COMMIT returns
the flusher acknowledges: hands every outcome to the ingests
(``engine.handoff``), then advances each ring's release cursor and wakes the
ingests to reply. So the loop reads scan -> cut -> commit -> acknowledge;
this module imports no database driver.

A flusher killed at any point loses nothing: the records stay in the rings
until the release cursor passes them, and its successor starts there.
Records committed but not yet released are written again; the unique key
turns that into "duplicate" and the stored outcome is replied.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import signal
import time

from engine import metrics, policy
from engine.handoff import OutcomeOutbox
from engine.intent import DEAD_LETTERED, Outcome, clip_reason
from engine.options import Options
from engine.planner import StatePlanner
from ipc.control import Config, Control
from ipc.control import Flusher as F
from ipc.runqueue import RunQueue, arrival_times
from ipc.wakeup import Wakeup
from persistence.lane_store import ISOLATED, OPTIMISTIC, BatchWrite, DatabaseUnavailable, LaneStore, WriteResult

log = logging.getLogger(__name__)

_NS = 1_000_000_000
# How long an idle flusher sleeps before re-checking the drain flag and the
# runtime config when nothing wakes it; it is woken for data anyway.
IDLE_WAIT_S = 0.5


class _Job:
    """One cut batch on its way to the database."""

    __slots__ = ("arrivals", "due_ns", "first_ns", "reason", "size", "skip", "takes", "write", "write_s")

    def __init__(
        self, takes, skip, size: int, arrivals, reason: str, first_ns: int, due_ns: int, write: BatchWrite
    ) -> None:
        self.takes = takes  # [(ring index, count)] in batch order
        self.skip = skip  # records of each ring an earlier in-flight batch took
        self.size = size
        self.arrivals = arrivals  # [(arrival time, count)]: runqueue.arrival_times
        self.reason = reason
        self.first_ns = first_ns
        self.due_ns = due_ns  # when the cut was due: its window's end (time), else the cut itself
        self.write = write  # planned by the lane store
        self.write_s = 0.0  # the commit's duration, for the commit-duration histogram


class FlusherProcess:
    """Write lane ``lane``: reads ring [i][lane] of every ingest i, writes
    on its own connection, hands outcomes back through outcome ring
    [i][lane]."""

    def __init__(
        self,
        lane: int,
        control: Control,
        data_wake: Wakeup,
        ingest_wakes: list[Wakeup],
        dsn: str,
        options: Options,
        state_planner: StatePlanner | None,
    ) -> None:
        self.lane = lane
        self.control = control
        self.rings = [row[lane] for row in control.intent_rings]
        self.outboxes = [OutcomeOutbox(row[lane]) for row in control.outcome_rings]
        self.data_wake = data_wake
        self.ingest_wakes = ingest_wakes
        self.options = options
        self.store = LaneStore(dsn, lane=lane, planning=state_planner, notify=options.notify_batches)
        self.counters = control.flushers[lane]
        self.histograms = control.histograms[lane]
        self.pending = [RunQueue(r) for r in self.rings]
        self.stopping = False
        self.batch_no = 0
        self.config_epoch = -1
        self.window_ns = int(options.time_window_ms * 1e6)
        self.lead = policy.CommitLead(enabled=options.window_covers_commit)
        self.adaptive = policy.AdaptiveLimit(
            initial=options.max_batch_size,
            minimum=options.min_batch_size,
            maximum=options.max_batch_size,
            factor=options.adjustment_factor,
            error_rate_threshold=options.error_rate_threshold,
            latency_threshold_s=options.latency_threshold_ms / 1000,
            enabled=options.adaptive_batching,
        )
        self.breaker = policy.CircuitBreaker(
            failure_threshold=options.breaker_failure_threshold,
            recovery_timeout_s=options.breaker_recovery_timeout_s,
            test_count=options.breaker_half_open_test_count,
        )
        self.reconnect = policy.Backoff(initial=0.05, maximum=2.0)
        self.retry_at = 0.0  # monotonic time before which no write is attempted
        # One writer thread commits an optimistic batch while the main thread
        # cuts and plans the next (the driver releases the GIL while it waits
        # on the socket).
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="flusher-writer")

    # ------------------------------------------------------------------ control
    def stop(self, *_: object) -> None:
        """Signal handler: finish what is in the rings, then return from run()."""
        self.stopping = True
        self.data_wake.signal()

    def _read_config(self) -> None:
        cfg = self.control.config
        epoch = cfg.get(Config.EPOCH)
        if epoch == self.config_epoch:
            return
        self.config_epoch = epoch
        self.window_ns = cfg.get(Config.WINDOW_US) * 1000
        self.adaptive.reconfigure(
            maximum=cfg.get(Config.MAX_BATCH), minimum=cfg.get(Config.MIN_BATCH), enabled=bool(cfg.get(Config.ADAPTIVE))
        )
        self.counters.set(F.BATCH_LIMIT, self.adaptive.limit)

    # --------------------------------------------------------------------- loop
    def run(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        # Ctrl-C reaches the whole process group: the supervisor orders the
        # drain and sends SIGTERM here once the ingests are done.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        self._read_config()
        try:
            self._connect()
        except DatabaseUnavailable as exc:
            self._db_failed(exc)
        self.counters.set(F.READY_NS, time.time_ns())
        while True:
            self._read_config()
            draining = self.stopping or bool(self.control.config.get(Config.DRAINING))
            limit = self.adaptive.limit if self.breaker.state != policy.HALF_OPEN else 1
            total = self._scan(limit)
            if total == 0:
                if self.stopping:
                    return
                self._check_idle_connection()
                self.data_wake.wait(IDLE_WAIT_S)
                continue
            backoff_left = self.retry_at - time.monotonic()
            if backoff_left > 0:
                # Data keeps arriving (and signalling) while the database is
                # down: sleep on the clock, not on the eventfd.
                time.sleep(min(backoff_left, IDLE_WAIT_S))
                if self.stopping and not self.store.is_connected:
                    log.error(
                        "stopping with %d intents unflushed (database unavailable); they were "
                        "not acknowledged, so clients resend them",
                        total,
                    )
                    return
                continue
            if not self.breaker.allow():
                self.counters.set(F.BREAKER, self.breaker.state)
                self.data_wake.wait(min(self.breaker.retry_in(), IDLE_WAIT_S))
                if self.stopping and self.breaker.state == policy.OPEN:
                    log.error(
                        "stopping with %d intents unflushed (database unavailable); "
                        "they stay in the rings for the next start's resend",
                        total,
                    )
                    return
                continue
            oldest = min(p.oldest_ns() for p in self.pending if p.count)
            window_ns = self.window_ns - self.lead.lead_ns(self.window_ns)
            reason, wait_ns = policy.decide_cut(total, limit, oldest, window_ns, time.monotonic_ns(), draining)
            if reason is None:
                self.data_wake.wait(wait_ns / _NS)
                continue
            self._flush(reason, limit)

    def _scan(self, limit: int) -> int:
        """Read newly published runs (until ``limit`` items per ring); the items queued."""
        return sum(pend.fill(limit) for pend in self.pending)

    # -------------------------------------------------------------------- flush
    def _flush(self, reason: str, limit: int) -> None:
        """Cut, commit and acknowledge batches. While an optimistic batch k
        is committed (on the writer thread), the next full batch is cut and
        planned here, so the Python work of k+1 overlaps the database work
        of k. Acknowledgements stay in order and only follow COMMIT."""
        job = self._cut(reason, limit, after=None)
        while job is not None:
            nxt = None
            try:
                if not self.store.is_connected:
                    self._connect()
                # Only an optimistic batch is looked past: the cache that plans
                # k+1 holds k's states only once k is planned from it.
                if job.write.optimistic and self._beyond(job) >= limit and not self.stopping:
                    future = self._executor.submit(self._commit, job)
                    nxt = self._cut(policy.SIZE, limit, after=job)
                    result = future.result()
                else:  # nothing to overlap: skip the thread hand-off
                    result = self._commit(job)
            except DatabaseUnavailable as exc:
                self._db_failed(exc)
                return  # records stay pending; retried after the breaker/backoff
            self._acknowledge(job, result)
            job = nxt

    def _beyond(self, job: _Job) -> int:
        """Records pending after those ``job`` took."""
        taken = dict(job.takes)
        return sum(p.count - taken.get(i, 0) for i, p in enumerate(self.pending))

    def _cut(self, reason: str, limit: int, after: _Job | None) -> _Job | None:
        """Take up to ``limit`` records (skipping those ``after`` took), in
        the ring rotation of the batch they will be, and have the store plan
        them."""
        batch_no = self.batch_no + (1 if after is not None else 0)
        skip = dict(after.takes) if after is not None else {}
        n_rings = len(self.rings)
        room = limit
        takes: list[tuple[int, int]] = []  # (ring index, count)
        for step in range(n_rings):
            i = (batch_no + step) % n_rings
            k = min(room, self.pending[i].count - skip.get(i, 0))
            if k > 0:
                takes.append((i, k))
                room -= k
            if not room:
                break
        if not takes:
            return None
        parts: list[bytes | memoryview] = []
        arrivals: list[tuple[int, int]] = []
        size = 0
        for i, k in takes:
            some, stamps = self.pending[i].slices(skip.get(i, 0), k)
            parts += some
            arrivals += stamps
            size += k
        first_ns = min(stamp for stamp, _ in arrivals)
        mono_now, cut_wall = time.monotonic_ns(), time.time()
        first_wall = cut_wall - (mono_now - first_ns) / _NS
        due_ns = mono_now
        if reason == policy.TIME:
            due_ns = min(mono_now, first_ns + self.window_ns - self.lead.lead_ns(self.window_ns))
        # Each part is a slice of a packed run: items already joined by ",".
        write = self.store.plan(b"[" + b",".join(parts) + b"]", size, reason, first_wall, cut_wall)
        return _Job(takes, skip, size, arrivals, reason, first_ns, due_ns, write)

    def _commit(self, job: _Job) -> WriteResult:
        """May run on the writer thread: the store's whole write, timed."""
        t0 = time.monotonic()
        try:
            return self.store.commit(job.write)
        finally:
            job.write_s = time.monotonic() - t0

    def _acknowledge(self, job: _Job, result: WriteResult) -> None:
        """Durable: tell the ingests, outcomes before cursors."""
        now_ns = time.monotonic_ns()
        latency_s = (now_ns - job.first_ns) / _NS
        ord_base = 0
        for i, k in job.takes:
            pend = self.pending[i]
            if result.outcomes:
                self._publish_outcomes(i, pend.positions(0, k), ord_base, result)
            pend.consume(k)  # durable, then released
            self.ingest_wakes[i].signal()
            ord_base += k
        self.batch_no += 1
        if job.write.optimistic and result.path != OPTIMISTIC:
            self.counters.add(F.SLOW_PATH, 1)  # declined (resend, stale cache) or failed on its data
        if result.path == ISOLATED:
            self.counters.add(F.FALLBACKS, 1)
        dead_codes = collections.Counter(o[1] for o in result.outcomes.values() if o[0] == DEAD_LETTERED and not o[3])
        self._account(result, job.size, job.reason, latency_s, dead=sum(dead_codes.values()))
        # Due -> acknowledged: wake-up lateness, planning, the commit and the hand-off.
        self.lead.observe((time.monotonic_ns() - job.due_ns) / _NS)
        metrics.record_batch(self.histograms, result.new, now_ns - arrival_times(job.arrivals), job.write_s, dead_codes)

    def _check_idle_connection(self) -> None:
        """While idle, notice a lost connection (the server sends EOF or a
        FATAL message: the socket turns readable) and reconnect on the
        backoff clock, so health tells the truth without waiting for a
        write. One select() per idle wake-up; no query."""
        try:
            if not self.store.is_connected:
                if time.monotonic() >= self.retry_at:
                    self._connect()
            else:
                self.store.check_connection()
        except DatabaseUnavailable as exc:
            self._db_failed(exc)

    def _connect(self) -> None:
        """Open the store's connection; raises DatabaseUnavailable."""
        self.store.connect()
        self.reconnect.reset()
        self.counters.set(F.DB_CONNECTED, 1)

    def _db_failed(self, exc: DatabaseUnavailable) -> None:
        self.counters.add(F.DB_ERRORS, 1)
        self.counters.set(F.DB_CONNECTED, 0)
        self.breaker.failure()
        self.counters.set(F.CONSECUTIVE_FAILURES, self.breaker.failures)
        self.counters.set(F.BREAKER, self.breaker.state)
        self.adaptive.observe(failed_fraction=1.0, latency_s=0.0, size_triggered=False)
        self.counters.set(F.BATCH_LIMIT, self.adaptive.limit)
        self.store.close()
        delay = self.reconnect.next_delay()
        self.retry_at = time.monotonic() + delay
        log.error(
            "database write failed (%s); breaker %s, retrying in %.2fs",
            exc,  # the driver's error class and the first line of its message
            policy.STATE_NAMES[self.breaker.state],
            delay,
        )

    def _publish_outcomes(self, ring_index: int, positions: list[int], ord_base: int, result: WriteResult) -> None:
        """Hand every outcome of these positions to the ingest; returns only
        when all are in the outcome ring (the caller releases after that).
        The ingest drains the ring whenever it is woken and holds what it
        read until the release (engine/handoff.py); rare path: called only
        for a batch with outcomes."""
        outbox = self.outboxes[ring_index]
        pending = []
        for j, pos in enumerate(positions):
            out = result.outcomes.get(ord_base + j + 1)
            if out is not None:
                status, code, reason, duplicate = out
                pending.append(outbox.encode(Outcome(pos, status, code, clip_reason(reason), duplicate)))
        delay = 0.001
        while pending:
            del pending[: outbox.publish(pending)]
            if pending:
                self.ingest_wakes[ring_index].signal()
                time.sleep(delay)
                delay = min(delay * 2, 0.1)

    def _account(self, result: WriteResult, size: int, reason: str, latency_s: float, *, dead: int) -> None:
        """The lane's counters after a batch; ``dead``: its intents newly dead-lettered."""
        c = self.counters
        dups = sum(1 for o in result.outcomes.values() if o[3])
        if result.new:  # a batch of resends only stored nothing: no batch (README, Tables)
            c.add(F.BATCHES, 1)
            c.add({policy.TIME: F.TIME_CUTS, policy.SIZE: F.SIZE_CUTS}.get(reason, F.DRAIN_CUTS), 1)
        c.add(F.INTENTS, size)
        c.add(F.COMMITTED, result.new - dead)
        c.add(F.DEAD_LETTERED, dead)
        c.add(F.DUPLICATES, dups)
        c.set(F.LAST_FLUSH_WALL_NS, time.time_ns())
        c.set(F.LAST_BATCH_SIZE, size)
        prev = c.get(F.LATENCY_EWMA_US)
        lat_us = int(latency_s * 1e6)
        c.set(F.LATENCY_EWMA_US, lat_us if prev == 0 else prev + (lat_us - prev) // 20)
        self.breaker.success()
        c.set(F.BREAKER, self.breaker.state)
        c.set(F.CONSECUTIVE_FAILURES, 0)
        c.set(
            F.BATCH_LIMIT,
            self.adaptive.observe(
                failed_fraction=dead / size, latency_s=latency_s, size_triggered=reason == policy.SIZE
            ),
        )

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self.pending = []  # the runs were copied out: nothing holds a view into the segment
        self.store.close()
