"""``tools/bench_ipc``: how fast intents cross from one process to another.

The engine hands intents from an ingest process to the flusher through an
``ipc.ring.Ring`` in a shared ``ipc.shm.Segment``. This benchmark measures
that hand-off next to the alternatives, in the same run, with the same
records (msgspec-encoded intents, compact JSON arrays of ~70-80 bytes,
``engine.intent.DecodedRecord``) and the same sizes: the writer hands over
runs (or lists) of ``--chunk`` records, the reader takes up to
``--max-batch`` at a time and does the flusher's work with them.

``ring``
    What an ingest and a flusher lane do: the writer appends each chunk as
    one packed run (``Ring.try_append_packed``: one ``join``, one vector
    check for newlines, one copy), publishes it with one cursor store and
    signals an ``ipc.wakeup.Wakeup``. The reader keeps an
    ``ipc.runqueue.RunQueue``: it reads every published run (one copy of
    each body), takes up to ``--max-batch`` items as a few body slices, does
    the consumer's work with them, consumes them (durable and release
    cursors, one store each) and signals the writer's "space" wake-up. A
    full ring makes the writer block on that wake-up.
``ring_per_record``
    The same ring driven one record per intent, as the engine's intent
    rings were before packed runs (and as its outcome rings still are):
    ``try_append`` per record, the reader's payloads as one memoryview each.
``mp_queue_batched``
    ``multiprocessing.Queue`` carrying one list of ``--chunk`` records per
    ``put``: the baseline of the ratio column.
``mp_queue_joined``
    ``multiprocessing.Queue`` carrying, per ``put``, a chunk's records
    already joined by ``,\\n`` (and their count): the packed run's idea
    without the ring. The reader gets the batch text's inside in one
    ``get``, but no item boundaries: it cannot take part of a chunk or
    address an item (a flusher needs both), so it is shown, not the baseline.
``mp_queue``
    ``multiprocessing.Queue``, one record per ``put`` and ``get``.
``faster_fifo``
    ``faster_fifo.Queue`` (``put`` each, ``get_many`` up to ``--max-batch``),
    only when the package is importable; otherwise reported as skipped.

The consumer's work (``--consume``) is the flusher's: ``join`` builds the
batch text it sends to PostgreSQL (``[`` + the payloads joined by ``,`` +
``]``); ``decode`` also decodes that batch with one msgspec call, as the
state planner does. Every variant ends with the same batches (the packed
ones have a newline after each comma inside a run: the same JSON), so the
transport is the difference; a packed writer pays the ``join`` the queue
readers pay, inside the timed span either way. The reader checks each run it receives against
the records sent (its first and last record and its length), so a lost,
repeated or reordered record fails the round.

Fairness: every variant moves the same pre-encoded ``bytes`` payloads (the
queues' best case: pickling ``bytes`` is trivial). The payloads are built
once, before any child starts; each writer touches them all before it says
it is ready, so copy-on-write faults are not timed. The clock starts when
the reader releases the writer and stops when the last batch is built.
Rounds are interleaved (ring, queue, batched queue, ring, ...) so drift in a
shared machine's load hits every variant alike; the table shows the median.

Waiting never spins: ring waits block in ``select`` on an eventfd
(``ipc.wakeup.Wakeup``) with a timeout, queue waits block in ``get(timeout=...)``, and every timeout checks
that the other side is still alive. Writers are forked (the memfd and the
eventfds are inherited), always reaped, and a memfd leaves nothing in
``/dev/shm``.

``--ingest-breakdown`` runs a different measurement instead: where an ingest
spends its CPU per intent (``tools.bench.ingest``).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import multiprocessing
import os
import queue as queue_mod
import signal
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import msgspec

from engine.intent import DecodedRecord
from engine.metrics import exit_name
from engine.options import Options
from ipc import layout
from ipc.cursors import Counters
from ipc.ring import Packed, Ring
from ipc.runqueue import RunQueue
from ipc.shm import Segment
from ipc.wakeup import Wakeup

from . import args as cli_args
from . import report

log = logging.getLogger(__name__)

DEFAULT_N = 500_000
DEFAULT_REPEAT = 3
DEFAULT_MAX_BATCH = Options().max_batch_size  # the seed's 857
# The writer hands over runs (ring) and lists (queue) of the reader's batch
# size, so both sides of the comparison move the same units. An ingest's
# runs are one socket read (~64 intents in 5 KiB): ``--chunk 64`` shows it.
DEFAULT_CHUNK = DEFAULT_MAX_BATCH
CONSUME = ("join", "decode")
DEFAULT_RING_BYTES = Options().ring_bytes  # the engine's 8 MiB
# How long any wait blocks before checking that the other process lives.
WAIT_S = 0.5
# A run that has not finished by then is reported as an error, not awaited.
DEFAULT_TIMEOUT_S = 300.0
# Writers get this long to exit after their last record before escalation.
REAP_S = 10.0
BASE_US = 1_764_000_000_000_000

_ARGS = (
    ("move", {"dx": 1, "dy": -1}),
    ("attack", {"target": "orc-7", "dmg": 3}),
    ("say", {"text": "hail"}),
    ("pickup", {"item": "potion"}),
)


class WriterStat:
    """Counters a ring writer leaves in the segment for the report. The
    block sits in the segment's first page, the ring after it."""

    PUBLISHES = 0
    FULL_WAITS = 1  # times the writer found the ring full and blocked
    COUNT = 8


STATS_OFFSET = 0
RING_OFFSET = 4096  # its own page: the ring's cursors never share a line with the stats


def make_payloads(n: int) -> list[bytes]:
    """``n`` encoded intents like ``["player-17",12345,"orc-42","move",
    {"dx":1,"dy":-1},1764000000000000]``, seq = index (the reader checks it)."""
    encode = msgspec.json.Encoder().encode
    out = []
    for i in range(n):
        kind, args = _ARGS[i % len(_ARGS)]
        out.append(encode(DecodedRecord(f"player-{i % 64}", i, f"orc-{i % 1000}", kind, args, BASE_US + i * 50)))
    return out


# ------------------------------------------------------------------ plumbing
class Handshake:
    """Ready/go between reader and writer over two eventfds, so neither the
    writer's preparation nor process start-up is timed."""

    def __init__(self) -> None:
        self.ready = Wakeup()
        self.go = Wakeup()

    def writer_ready_then_wait(self, parent: int) -> None:
        self.ready.signal()
        while not self.go.wait(WAIT_S):
            _exit_if_orphaned(parent)

    def reader_wait_ready(self, proc: multiprocessing.process.BaseProcess, deadline: float) -> None:
        while not self.ready.wait(WAIT_S):
            _check_alive(proc, deadline, "writer never became ready")

    def close(self) -> None:
        self.ready.close()
        self.go.close()


def _exit_if_orphaned(parent: int) -> None:
    """A writer whose reader died has no one to hand off to: leave."""
    if os.getppid() != parent:
        os._exit(3)


def _check_alive(proc: multiprocessing.process.BaseProcess, deadline: float, what: str) -> None:
    if proc.exitcode is not None:
        raise RuntimeError(f"{what}: writer exited with {_exit_name(proc.exitcode)}")
    if time.monotonic() > deadline:
        raise RuntimeError(f"{what}: timed out")


def _exit_name(code: int | None) -> str:
    return "running" if code is None else exit_name(code)


def _reap(proc: multiprocessing.process.BaseProcess, grace: float = REAP_S) -> int | None:
    """Join for ``grace`` seconds; escalate SIGTERM then SIGKILL; always reap.
    Returns the exit code. An aborted run passes ``grace=0``: its writer may
    be blocked on a reader that is gone, so waiting for it is pointless."""
    proc.join(grace)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc.exitcode is not None:
            break
        if grace:
            log.warning("writer pid %s did not exit; sending %s", proc.pid, sig.name)
        os.kill(proc.pid, sig)
        proc.join(5.0)
    proc.join()
    code = proc.exitcode
    proc.close()
    return code


@dataclass
class Run:
    seconds: float
    n: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.n / self.seconds if self.seconds > 0 else 0.0


class _Check:
    """The reader's check that nothing was lost, repeated or reordered: each
    run must continue where the last one stopped, and its first and last
    records and its length must be those sent (checked per run, not per
    record, so the check stays out of the hand-off's timing; records are
    distinct, their seq differs)."""

    __slots__ = ("expected", "next")

    def __init__(self, expected: list[bytes]) -> None:
        self.expected = expected
        self.next = 0

    def run(self, first: Any, last: Any, count: int) -> None:
        i = self.next
        if count < 1 or first != self.expected[i] or last != self.expected[i + count - 1]:
            raise RuntimeError(f"records lost, repeated or out of order in the run starting at record {i}")
        self.next = i + count

    def one(self, payload: bytes) -> None:
        if payload != self.expected[self.next]:
            raise RuntimeError(f"records lost, repeated or out of order at record {self.next}")
        self.next += 1


# ---------------------------------------------------------------- variants
class Bench:
    """One process's view of the benchmark: parameters and the payloads."""

    def __init__(
        self,
        payloads: list[bytes],
        *,
        chunk: int,
        max_batch: int,
        ring_bytes: int,
        timeout_s: float,
        consume: str = "join",
    ) -> None:
        self.payloads = payloads
        self.n = len(payloads)
        self.chunk = chunk
        self.max_batch = max_batch
        self.ring_bytes = ring_bytes
        self.timeout_s = timeout_s
        self.ctx = multiprocessing.get_context("fork")
        self.consume = _consumer(consume)

    def _start(self, target: Callable, *args: Any) -> tuple[multiprocessing.process.BaseProcess, Handshake]:
        hs = Handshake()
        proc = self.ctx.Process(target=target, args=(hs, os.getpid(), *args), name="bench_ipc writer", daemon=True)
        proc.start()
        return proc, hs

    def _finish(self, proc: multiprocessing.process.BaseProcess, hs: Handshake) -> None:
        code = _reap(proc)
        hs.close()
        if code != 0:
            raise RuntimeError(f"writer exited with {_exit_name(code)}")

    # ----------------------------------------------------------------- ring
    def ring(self) -> Run:
        return self._ring(bulk=True)

    def ring_per_record(self) -> Run:
        return self._ring(bulk=False)

    def _ring(self, *, bulk: bool) -> Run:
        seg = Segment.create(RING_OFFSET + layout.ring_bytes(self.ring_bytes), name="bench_ipc")
        ring = stats = run = None
        data_wake, space_wake = Wakeup(), Wakeup()
        proc = hs = None
        try:
            ring = Ring(seg.buf, RING_OFFSET, self.ring_bytes, create=True, name="bench")
            stats = Counters(seg.buf, STATS_OFFSET, WriterStat.COUNT)
            proc, hs = self._start(_ring_writer, seg, self.payloads, self.chunk, bulk, data_wake, space_wake)
            deadline = time.monotonic() + self.timeout_s
            hs.reader_wait_ready(proc, deadline)

            consume, check, max_batch, n = self.consume, _Check(self.payloads), self.max_batch, self.n
            pos = ring.released()
            queue = RunQueue(ring)
            got = runs = waits = 0
            t0 = time.perf_counter()
            hs.go.signal()
            while got < n:
                published = ring.published()  # one cursor load per run
                if (published == queue.end and not queue.count) if bulk else published == pos:
                    waits += 1
                    if not data_wake.wait(WAIT_S):
                        _check_alive(proc, deadline, f"ring run stalled at {got}/{n}")
                    continue
                if bulk:  # as a flusher lane: packed runs, a batch is a few slices
                    have = queue.fill(max_batch)
                    k = min(have, max_batch)
                    parts, _ = queue.slices(0, k)
                    consume(parts)
                    check.run(queue.item(0), queue.item(k - 1), k)
                    queue.consume(k)  # one cursor store per batch
                    got += k
                else:
                    run = ring.read(pos, published, max_batch)
                    payloads = run.payloads
                    consume(payloads)
                    check.run(payloads[0], payloads[-1], len(payloads))
                    got += len(payloads)
                    run.detach()
                    pos = run.end
                    ring.release_to(pos)  # one cursor store per run
                    run = None
                space_wake.signal()
                runs += 1
            elapsed = time.perf_counter() - t0
            self._finish(proc, hs)
            proc = None
            return Run(
                elapsed,
                n,
                {
                    "runs": runs,
                    "mean_run": round(n / runs, 1),
                    "reader_waits": waits,
                    "publishes": stats.get(WriterStat.PUBLISHES),
                    "writer_full_waits": stats.get(WriterStat.FULL_WAITS),
                },
            )
        finally:
            if proc is not None:  # aborted: stop the writer now
                _reap(proc, grace=0)
                hs.close()
            if run is not None:  # interrupted between read and release
                run.detach()
            if stats is not None:
                stats.detach()
            if ring is not None:
                ring.close()
            try:
                seg.close()
            except BufferError:
                # Interrupted inside Ring.read: the traceback still holds its
                # views. A memfd is freed by the kernel when this process
                # exits, so nothing outlives us either way.
                log.debug("shared segment left mapped until exit (views still held)")
            data_wake.close()
            space_wake.close()

    # ---------------------------------------------------------- mp.Queue
    def mp_queue(self) -> Run:
        q = self.ctx.Queue()
        proc, hs = self._start(_queue_writer, q, self.payloads, 1)
        try:
            deadline = time.monotonic() + self.timeout_s
            hs.reader_wait_ready(proc, deadline)
            consume, check, get, n, max_batch = self.consume, _Check(self.payloads), q.get, self.n, self.max_batch
            got = 0
            batch: list[bytes] = []
            t0 = time.perf_counter()
            hs.go.signal()
            while got < n:
                try:
                    payload = get(True, WAIT_S)
                except queue_mod.Empty:
                    _check_alive(proc, deadline, f"queue run stalled at {got}/{n}")
                    continue
                check.one(payload)
                batch.append(payload)
                got += 1
                if len(batch) == max_batch or got == n:
                    consume(batch)
                    batch = []
            elapsed = time.perf_counter() - t0
            self._finish(proc, hs)
            proc = None
            return Run(elapsed, n, {"gets": n})
        finally:
            if proc is not None:  # aborted: stop the writer now
                _reap(proc, grace=0)
                hs.close()
            q.close()
            q.join_thread()

    def mp_queue_batched(self) -> Run:
        return self._mp_queue_chunks(self.chunk, "batched", lambda p: (p, p[0], p[-1], len(p)))

    def mp_queue_joined(self) -> Run:
        return self._mp_queue_chunks(-self.chunk, "joined", _joined)

    def _mp_queue_chunks(self, per_put: int, what: str, unpack: Callable[[Any], Any]) -> Run:
        """A Queue carrying one chunk per put (``_queue_writer``'s
        ``per_put``); ``unpack`` turns what ``get`` returns into the
        consumer's parts, the chunk's first and last record and its count."""
        q = self.ctx.Queue()
        proc, hs = self._start(_queue_writer, q, self.payloads, per_put)
        try:
            deadline = time.monotonic() + self.timeout_s
            hs.reader_wait_ready(proc, deadline)
            consume, check, get, n = self.consume, _Check(self.payloads), q.get, self.n
            got = gets = 0
            t0 = time.perf_counter()
            hs.go.signal()
            while got < n:
                try:
                    parts, first, last, count = unpack(get(True, WAIT_S))
                except queue_mod.Empty:
                    _check_alive(proc, deadline, f"{what} queue run stalled at {got}/{n}")
                    continue
                consume(parts)
                check.run(first, last, count)
                got += count
                gets += 1
            elapsed = time.perf_counter() - t0
            self._finish(proc, hs)
            proc = None
            return Run(elapsed, n, {"gets": gets})
        finally:
            if proc is not None:  # aborted: stop the writer now
                _reap(proc, grace=0)
                hs.close()
            q.close()
            q.join_thread()

    # -------------------------------------------------------- faster-fifo
    def faster_fifo(self) -> Run:
        import faster_fifo  # only called when importable

        # As much buffer as the ring has, so neither gets more slack.
        q = faster_fifo.Queue(max_size_bytes=self.ring_bytes)
        proc, hs = self._start(_faster_fifo_writer, q, self.payloads)
        try:
            deadline = time.monotonic() + self.timeout_s
            hs.reader_wait_ready(proc, deadline)
            consume, check, n, max_batch = self.consume, _Check(self.payloads), self.n, self.max_batch
            get_many = q.get_many
            got = gets = 0
            t0 = time.perf_counter()
            hs.go.signal()
            while got < n:
                try:
                    payloads = get_many(block=True, timeout=WAIT_S, max_messages_to_get=max_batch)
                except queue_mod.Empty:
                    _check_alive(proc, deadline, f"faster-fifo run stalled at {got}/{n}")
                    continue
                consume(payloads)
                check.run(payloads[0], payloads[-1], len(payloads))
                got += len(payloads)
                gets += 1
            elapsed = time.perf_counter() - t0
            self._finish(proc, hs)
            proc = None
            return Run(elapsed, n, {"gets": gets, "mean_run": round(n / gets, 1)})
        finally:
            if proc is not None:  # aborted: stop the writer now
                _reap(proc, grace=0)
                hs.close()
            q.close()


def _joined(got: tuple[int, bytes]) -> tuple[list[bytes], bytes, bytes, int]:
    """``mp_queue_joined``'s ``(count, joined records)``, read back with the
    packed run's own reader."""
    run = Packed(0, 0, 0, *got)
    return [run.body], run.item(0), run.item(run.count - 1), run.count


def _consumer(kind: str) -> Callable[[Sequence[Any]], Any]:
    """The reader's work on each run or list: the flusher's batch text
    (``join``), or that text decoded in one msgspec call (``decode``)."""
    if kind == "join":
        return lambda payloads: b"[" + b",".join(payloads) + b"]"
    if kind == "decode":
        decode = msgspec.json.Decoder(list[DecodedRecord]).decode
        return lambda payloads: decode(b"[" + b",".join(payloads) + b"]")
    raise ValueError(f"consume must be one of {CONSUME}, got {kind!r}")


# ------------------------------------------------------ writer processes
def _writer_signals() -> None:
    """A forked writer inherits the tool's handlers: Ctrl-C at the terminal
    is the reader's to handle (it reaps the writer), SIGTERM just ends it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _touch(payloads: list[bytes]) -> list[bytes]:
    """Copy the list: every payload's refcount is written now, so the
    copy-on-write page faults after fork happen before the clock starts."""
    return list(payloads)


def _ring_writer(
    hs: Handshake,
    parent: int,
    seg: Segment,
    payloads: list[bytes],
    chunk: int,
    bulk: bool,
    data_wake: Wakeup,
    space_wake: Wakeup,
) -> None:
    """Producer: append a chunk (one run, or record by record), publish it,
    wake the reader; on a full ring publish what fits and block until the
    reader releases."""
    _writer_signals()
    ring = Ring(seg.buf, RING_OFFSET, name="bench")  # attach: validates the header
    stats = Counters(seg.buf, STATS_OFFSET, WriterStat.COUNT)
    try:
        payloads = _touch(payloads)
        n = len(payloads)
        publishes = full_waits = 0
        i = 0
        hs.writer_ready_then_wait(parent)
        while i < n:
            end = min(i + chunk, n)
            now = time.monotonic_ns()  # an ingest stamps each socket read
            with ring.claim() as w:
                if bulk:
                    i += w.try_append_packed(payloads[i:end], now)
                else:
                    append = w.try_append
                    while i < end and append(payloads[i], now):
                        i += 1
            publishes += 1
            data_wake.signal()
            if i < end:  # full: the reader's release signals space_wake
                full_waits += 1
                if not space_wake.wait(WAIT_S):
                    _exit_if_orphaned(parent)
        stats.set(WriterStat.PUBLISHES, publishes)
        stats.set(WriterStat.FULL_WAITS, full_waits)
    finally:
        stats.detach()
        ring.close()


def _queue_writer(hs: Handshake, parent: int, q: Any, payloads: list[bytes], per_put: int) -> None:
    """Producer for multiprocessing.Queue: one record per put, lists of
    ``per_put``, or (``per_put`` < 0) ``(count, the records joined by ",\\n")``."""
    _writer_signals()
    payloads = _touch(payloads)
    hs.writer_ready_then_wait(parent)
    put = q.put
    if per_put == 1:
        for p in payloads:
            put(p)
    elif per_put < 0:
        for i in range(0, len(payloads), -per_put):
            chunk = payloads[i : i - per_put]
            put((len(chunk), layout.RUN_SEPARATOR.join(chunk)))
    else:
        for i in range(0, len(payloads), per_put):
            put(payloads[i : i + per_put])
    q.close()
    q.join_thread()  # the feeder thread has written everything to the pipe


def _faster_fifo_writer(hs: Handshake, parent: int, q: Any, payloads: list[bytes]) -> None:
    """Producer for faster_fifo.Queue: one record per put; a full queue
    blocks in put (its own condition variable) and is retried."""
    _writer_signals()
    payloads = _touch(payloads)
    hs.writer_ready_then_wait(parent)
    put = q.put
    for p in payloads:
        while True:
            try:
                put(p, block=True, timeout=WAIT_S)
                break
            except queue_mod.Full:
                _exit_if_orphaned(parent)


# ------------------------------------------------------------------ driver
@dataclass(frozen=True)
class Variant:
    key: str
    label: str
    method: str
    requires: str | None = None  # an importable module, or always available


VARIANTS = [
    Variant("ring", "ipc.ring.Ring, packed runs (RunQueue)", "ring"),
    Variant("ring_per_record", "ipc.ring.Ring, record by record (views)", "ring_per_record"),
    Variant("mp_queue_batched", "multiprocessing.Queue, one list per put", "mp_queue_batched"),
    Variant("mp_queue_joined", "multiprocessing.Queue, one joined bytes per put", "mp_queue_joined"),
    Variant("mp_queue", "multiprocessing.Queue, one record per put", "mp_queue"),
    Variant("faster_fifo", "faster_fifo.Queue, put + get_many", "faster_fifo", requires="faster_fifo"),
]
BY_KEY = {v.key: v for v in VARIANTS}
BASELINE = "mp_queue_batched"


def run_benchmark(
    *,
    n: int = DEFAULT_N,
    repeat: int = DEFAULT_REPEAT,
    chunk: int = DEFAULT_CHUNK,
    max_batch: int = DEFAULT_MAX_BATCH,
    ring_bytes: int = DEFAULT_RING_BYTES,
    only: Sequence[str] | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    consume: str = "join",
) -> dict:
    """Run every variant ``repeat`` times, interleaved; returns the JSON document."""
    layout.check_capacity(ring_bytes)
    variants = [BY_KEY[k] for k in only] if only else VARIANTS
    payloads = make_payloads(n)
    payload_bytes = sum(map(len, payloads)) / n
    if max(map(len, payloads)) > layout.max_item(ring_bytes):  # pragma: no cover - 8 KiB rings and up
        raise ValueError(f"ring of {ring_bytes} bytes cannot hold a {max(map(len, payloads))}-byte record")
    bench = Bench(
        payloads, chunk=chunk, max_batch=max_batch, ring_bytes=ring_bytes, timeout_s=timeout_s, consume=consume
    )
    runs: dict[str, list[Run]] = {v.key: [] for v in variants}
    skipped: dict[str, str] = {}
    for v in variants:
        if v.requires and importlib.util.find_spec(v.requires) is None:
            skipped[v.key] = f"{v.requires.replace('_', '-')} is not installed (not importable)"
            log.info("%-17s skipped: %s", v.key, skipped[v.key])
    for r in range(repeat):
        for v in variants:
            if v.key in skipped:
                continue
            result = getattr(bench, v.method)()
            runs[v.key].append(result)
            log.info("round %d/%d %-17s %12s intents/s", r + 1, repeat, v.key, report.fmt_rate(result.rate))
    leftover = multiprocessing.active_children()
    if leftover:  # pragma: no cover - _reap joins every writer
        raise RuntimeError(f"writer processes left behind: {leftover}")

    results = []
    for v in variants:
        entry: dict[str, Any] = {"key": v.key, "variant": v.label, "skipped": skipped.get(v.key)}
        rates = [x.rate for x in runs[v.key]]
        if rates:
            med = statistics.median(rates)
            entry.update(
                intents_per_s=med,
                us_per_intent=1e6 / med if med else None,
                min_intents_per_s=min(rates),
                max_intents_per_s=max(rates),
                runs=[{"seconds": x.seconds, "intents_per_s": x.rate, **x.extra} for x in runs[v.key]],
            )
        else:
            entry.update(
                intents_per_s=None, us_per_intent=None, min_intents_per_s=None, max_intents_per_s=None, runs=[]
            )
        results.append(entry)
    base = next((e for e in results if e["key"] == BASELINE and e["intents_per_s"]), None)
    for e in results:
        e["ratio_to_baseline"] = e["intents_per_s"] / base["intents_per_s"] if base and e["intents_per_s"] else None
        # Each round's ratio too: the two ran back to back, so this is the
        # figure least moved by a shared machine's drift.
        e["round_ratios"] = (
            [x["intents_per_s"] / b["intents_per_s"] for x, b in zip(e["runs"], base["runs"])] if base else []
        )
    return {
        "tool": "bench_ipc",
        "machine": report.machine(report.embedded_pg_version() + " (embedded wheel; not used here)"),
        "params": {
            "n": n,
            "repeat": repeat,
            "chunk": chunk,
            "max_batch": max_batch,
            "ring_bytes": ring_bytes,
            "consume": consume,
            "payload_bytes_mean": round(payload_bytes, 1),
            "start_method": "fork",
            "wait_timeout_s": WAIT_S,
        },
        "baseline": BASELINE,
        "results": results,
    }


HEADERS = ("variant", "intents/s", "µs/intent", "min…max intents/s", "vs mp.Queue list/put", "per round")


def render(doc: dict) -> str:
    p = doc["params"]
    lines = [
        report.machine_line(doc["machine"]),
        f"bench_ipc: {p['n']:,} intents of ~{p['payload_bytes_mean']:.0f} bytes (msgspec JSON arrays), "
        f"one writer process -> this process, median of {p['repeat']} interleaved rounds; ring "
        f"{p['ring_bytes'] >> 10} KiB; the writer hands over runs / lists of {p['chunk']} records, the reader "
        f"takes up to {p['max_batch']} at a time and "
        + ("joins them into one batch text" if p["consume"] == "join" else "joins and decodes them (one msgspec call)"),
        "",
    ]
    rows, notes = [], []
    for e in doc["results"]:
        if e["skipped"]:
            rows.append((e["variant"], "skipped", "-", "-", "-", "-"))
            notes.append(f"{e['key']}: skipped, {e['skipped']}")
            continue
        rows.append(
            (
                e["variant"],
                report.fmt_rate(e["intents_per_s"]),
                report.fmt_us(e["us_per_intent"]),
                f"{report.fmt_rate(e['min_intents_per_s'])}…{report.fmt_rate(e['max_intents_per_s'])}",
                report.fmt_ratio(e["ratio_to_baseline"]),
                f"{report.fmt_ratio(min(e['round_ratios']))}…{report.fmt_ratio(max(e['round_ratios']))}"
                if e["round_ratios"]
                else "-",
            )
        )
    lines.append(report.table(HEADERS, rows))
    if notes:
        lines += [""] + notes
    for ring in (e for e in doc["results"] if e["key"].startswith("ring") and e["runs"]):
        last = ring["runs"][-1]
        lines += [
            "",
            f"{ring['key']}, last round: {last['runs']} reader runs (mean {last['mean_run']} records), "
            f"{last['reader_waits']} reader waits, {last['publishes']} publishes, "
            f"{last['writer_full_waits']} writer waits on a full ring",
        ]
    return "\n".join(lines)


# --------------------------------------------------------------------- CLI
def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog or cli_args.prog("bench_ipc"),
        description="Measure the hand-off rate of intents from one writer process to a reader: the "
        "engine's shared-memory ring (ipc.ring.Ring, bulk runs and record by record, eventfd wake-ups) "
        "versus multiprocessing.Queue (one list per put, and one record per put) and faster-fifo if "
        "it is importable. Same records, same sizes, same run, interleaved rounds; prints a machine line "
        "and a table (median intents/s and the ratio to multiprocessing.Queue with a list per put); --json "
        "also writes the figures as JSON. Nothing busy-waits; no process or shared memory is left. "
        "With --ingest-breakdown it measures instead where an ingest's CPU goes per intent "
        "(framing, decode, validate, encode, route + append), on realistic frames.",
        epilog="Variants: "
        + "; ".join(f"{v.key} = {v.label}" for v in VARIANTS)
        + ". Exit 0 when every round completed; 1 when a round failed (a writer died, a round timed out); "
        "2 on bad arguments.",
        formatter_class=cli_args.HelpFormatter,
    )
    p.add_argument(
        "-n",
        "--records",
        dest="n",
        type=report.positive_int,
        help=f"intents each variant moves per round (default {DEFAULT_N:,}; with --ingest-breakdown 100,000)",
    )
    p.add_argument(
        "--repeat", type=report.positive_int, default=DEFAULT_REPEAT, help="rounds; the table shows the median"
    )
    p.add_argument(
        "--chunk",
        type=report.positive_int,
        help="records the writer hands over at once: one ring run (one cursor store + one wake-up) or "
        "one queue list (default: --max-batch's default; an ingest's socket read is ~64). With "
        "--ingest-breakdown: frames per socket read, 64 unless given",
    )
    p.add_argument(
        "--max-batch",
        type=report.positive_int,
        default=DEFAULT_MAX_BATCH,
        help="records per reader run, per queue list and per faster-fifo get_many",
    )
    p.add_argument(
        "--ring-bytes",
        type=_power_of_two,
        default=DEFAULT_RING_BYTES,
        help=f"ring capacity in bytes, a power of two from {layout.MIN_CAPACITY} to {layout.MAX_CAPACITY} "
        "(default: the engine's, %(default)s)",
    )
    p.add_argument(
        "--only",
        type=_variant_list,
        metavar="VARIANT[,VARIANT…]",
        help="run only these variants (comma-separated keys, see below)",
    )
    p.add_argument(
        "--timeout",
        type=cli_args.positive_float,
        default=DEFAULT_TIMEOUT_S,
        help="seconds one round may take before it is aborted as an error",
    )
    p.add_argument(
        "--json", metavar="FILE", type=cli_args.output_file, help="also write the results as JSON to FILE ('-': stdout)"
    )
    p.add_argument(
        "--consume",
        choices=CONSUME,
        default="join",
        help="the reader's work per run or list: the flusher's batch text (join), or that text decoded "
        "with one msgspec call (decode, as the state planner does)",
    )
    p.add_argument(
        "--ingest-breakdown",
        action="store_true",
        help="measure the ingest's CPU per intent by stage instead (tools.bench.ingest); -n, --repeat, "
        "--chunk, --lanes and --json apply",
    )
    p.add_argument(
        "--lanes",
        type=report.positive_int,
        default=Options().lanes,
        help="with --ingest-breakdown: lanes (rings) the ingest routes to (default: the engine's, %(default)s)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    return p


def _power_of_two(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer number of bytes, got {text!r}") from None
    try:
        layout.check_capacity(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def _variant_list(text: str) -> list[str]:
    keys = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in keys if k not in BY_KEY]
    if unknown or not keys:
        raise argparse.ArgumentTypeError(f"unknown variant(s) {unknown}; choose from {', '.join(BY_KEY)}")
    return keys


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """The whole tool: parse, run, print, write JSON."""
    out = out or sys.stdout
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s", stream=sys.stderr)
    log.setLevel(logging.WARNING if args.quiet else logging.INFO)
    # SIGTERM unwinds like Ctrl-C, so writers are reaped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    if args.ingest_breakdown:
        from . import ingest

        return ingest.main(args, out)
    try:
        doc = run_benchmark(
            n=args.n or DEFAULT_N,
            repeat=args.repeat,
            chunk=args.chunk or DEFAULT_CHUNK,
            max_batch=args.max_batch,
            ring_bytes=args.ring_bytes,
            only=args.only,
            timeout_s=args.timeout,
            consume=args.consume,
        )
    except KeyboardInterrupt:
        log.warning("interrupted; writers reaped, nothing measured")
        return 130
    except (RuntimeError, OSError) as exc:
        print(f"{cli_args.prog('bench_ipc')}: a round failed, nothing reported: {exc}", file=sys.stderr)
        return 1
    out.write(render(doc) + "\n")
    if args.json:
        report.write_json(args.json, doc)
    return 0
