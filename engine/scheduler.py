"""``BatchScheduler``: the seed's interface (start, stop, configure, event bus)
over the multi-process engine, for Python programs that embed it.

``start()`` runs the supervisor in this process (workers and the embedded
PostgreSQL are child processes) with its watch loop on a thread;
``configure(**partial)`` changes the batching options of the running engine
(the flusher picks them up at its next cut); ``stop()`` drains.

With an ``EventBus``:

* ``bus.emit(SystemEvent.INTENT, intent)`` submits the intent to the engine
  (a forwarding thread keeps many in flight on one connection); intents
  that are not committed come back as ``SystemEvent.INTENT_FAILED`` with the
  reply.
* ``SystemEvent.INTENT_BATCH`` is emitted once per committed batch with a
  ``Batch`` (id, size, cut reason, the newly committed intents in apply
  order), driven by PostgreSQL ``LISTEN``: an event means the batch is
  durable, never earlier.
"""

from __future__ import annotations

import enum
import logging
import queue
import threading
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import msgspec

from engine import options as opts
from engine.client import Client
from engine.errors import EngineError
from engine.intent import COMMITTED, Batch, Intent
from engine.supervisor import Supervisor
from persistence.batch_feed import BatchFeed

log = logging.getLogger(__name__)


class SystemEvent(str, enum.Enum):
    INTENT = "intent"
    INTENT_BATCH = "intent_batch"
    INTENT_FAILED = "intent_failed"


class EventBus:
    """Minimal synchronous event emitter. A subscriber that raises is logged
    and skipped; it cannot break delivery to the others."""

    def __init__(self) -> None:
        self._subscribers: dict[Any, list[Callable]] = defaultdict(list)
        self._lock = threading.Lock()

    def on(self, event: Any, handler: Callable) -> None:
        with self._lock:
            self._subscribers[event].append(handler)

    def off(self, event: Any, handler: Callable) -> None:
        with self._lock:
            self._subscribers[event].remove(handler)

    def emit(self, event: Any, payload: Any) -> None:
        with self._lock:
            handlers = list(self._subscribers.get(event, ()))
        for handler in handlers:
            try:
                handler(payload)
            except Exception:
                log.exception("subscriber %r of %s failed", handler, event)

    def has(self, event: Any) -> bool:
        return bool(self._subscribers.get(event))


class BatchScheduler:
    def __init__(
        self,
        options: opts.Options | None = None,
        *,
        event_bus: EventBus | None = None,
        log: logging.Logger | None = None,
        **overrides: Any,
    ) -> None:
        base = opts.to_dict(options) if options is not None else {}
        if options is None:
            # A library opens no port unless asked: pass metrics_addr="127.0.0.1:9187"
            # (or port 0) for /metrics and /health, as tools/run_engine serves by default.
            base["metrics_addr"] = "off"
        base.update(overrides)
        if event_bus is not None:
            base["notify_batches"] = True
        self.options = opts.from_mapping(base, source="BatchScheduler()")
        self.event_bus = event_bus
        self.log = log or logging.getLogger("batchscheduler")
        self._supervisor: Supervisor | None = None
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._forward: queue.Queue = queue.Queue()

    # ------------------------------------------------------------ seed interface
    def start(self) -> None:
        """Start the engine; returns once it accepts intents."""
        if self._supervisor is not None:
            raise EngineError("BatchScheduler already started")
        self._stopping.clear()
        supervisor = Supervisor(self.options)
        started = threading.Event()
        failure: list[BaseException] = []

        def supervise() -> None:
            # Workers are started from this long-lived thread, not from the
            # caller's: their parent-death signal follows the thread that
            # forked them, and the caller's thread may end before the engine.
            try:
                supervisor.start()
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                failure.append(exc)
                started.set()
                return
            started.set()
            supervisor.run()

        self._spawn_thread("batchscheduler-supervisor", supervise)
        started.wait()
        if failure:
            self._threads = []
            raise failure[0]
        self._supervisor = supervisor
        if self.event_bus is not None:
            # LISTEN before start() returns, so no committed batch goes unannounced.
            feed = BatchFeed(supervisor.dsn)
            self.event_bus.on(SystemEvent.INTENT, self._forward.put)
            self._spawn_thread("batchscheduler-forward", self._forward_loop)
            self._spawn_thread("batchscheduler-listen", lambda: self._listen_loop(feed))
        self.log.info("BatchScheduler started on %s", supervisor.socket_path)

    def stop(self) -> None:
        """Drain (stop accepting, flush, reply) and stop every process."""
        supervisor = self._supervisor
        if supervisor is None:
            return
        self._stopping.set()
        self._forward.put(None)
        if self.event_bus is not None:
            self.event_bus.off(SystemEvent.INTENT, self._forward.put)
        for thread in self._threads:
            if thread.name != "batchscheduler-supervisor":
                thread.join(10)
        supervisor.request_stop()
        for thread in self._threads:
            thread.join(30)
        self._threads = []
        self._supervisor = None

    def configure(self, **partial: Any) -> None:
        """Change runtime options (time_window_ms, max_batch_size,
        adaptive_batching, min_batch_size) without a restart. Before start(),
        any option may change."""
        if self._supervisor is None:
            self.options = self.options.replace(**partial)
            return
        self.options = self._supervisor.configure(**partial)

    # ------------------------------------------------------------------ helpers
    @property
    def socket_path(self) -> str:
        return str(self._require().socket_path)

    @property
    def dsn(self) -> str:
        return self._require().dsn

    def client(self, **kwargs: Any) -> Client:
        """A connected blocking client."""
        return Client(self.socket_path, **kwargs).connect()

    def metrics(self) -> dict:
        return self._require().snapshot()

    def __enter__(self) -> BatchScheduler:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _require(self) -> Supervisor:
        if self._supervisor is None:
            raise EngineError("BatchScheduler is not started")
        return self._supervisor

    def _spawn_thread(self, name: str, target: Callable) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    # ---------------------------------------------------------------- event bus
    def _forward_loop(self) -> None:
        with Client(self.socket_path, client_id="event-bus") as client:
            while True:
                item = self._forward.get()
                batch = [item]
                while True:  # take whatever else is queued: one round trip for all
                    try:
                        batch.append(self._forward.get_nowait())
                    except queue.Empty:
                        break
                intents = [i for i in batch if isinstance(i, Intent)]
                if intents:
                    for intent, reply in zip(intents, client.submit_many(intents)):
                        if reply.status != COMMITTED:
                            self.event_bus.emit(SystemEvent.INTENT_FAILED, (intent, reply))
                if any(i is None for i in batch):
                    return

    def _listen_loop(self, feed: BatchFeed) -> None:
        decode_args = msgspec.json.Decoder(dict).decode
        try:
            while not self._stopping.is_set():
                for stored in feed.wait(0.2):
                    intents = [Intent(c, s, e, k, decode_args(a)) for c, s, e, k, a in stored.intents]
                    size = stored.size if stored.size is not None else len(intents)
                    self.event_bus.emit(
                        SystemEvent.INTENT_BATCH, Batch(stored.batch_id, size, stored.cut_reason or "?", intents)
                    )
        finally:
            feed.close()
