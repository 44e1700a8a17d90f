"""The supervisor: owns the shared memory, the socket and the database;
starts, watches and restarts the workers; drains on SIGTERM/SIGINT.

Start order: database (embedded or ``dsn``) and migrations, shared segment,
eventfds, listening socket, flusher, ingests. The listening socket belongs
to the supervisor, so while an ingest restarts its clients' reconnects wait
in the backlog instead of being refused.

Watching: each worker's pidfd is in one ``selectors`` set with a self-pipe
(stop requests, signals), so a worker exit wakes the supervisor at once; RSS
is sampled with psutil once a second, and on the same tick the alerts are
evaluated (engine.alerts) and, every ``stats_interval_s``, the stats line is
logged. A crashed worker is restarted after an
exponential backoff (0.1 s doubling to 5 s, reset once a worker stayed up
10 s); one over ``worker_rss_limit_mb`` is asked to drain (SIGTERM) and
restarted. Exit codes are logged as signal names.

Stop (drain), bounded by ``drain_timeout_s``: set the draining flag, SIGTERM
the ingests (stop accepting and reading, reply to everything already read),
then SIGTERM the flusher (flush what is left), then SIGKILL whatever is still
running, always reap, unlink the socket, unmap the segment, stop the
embedded PostgreSQL. The segment is a memfd: nothing to leak in /dev/shm.
"""

from __future__ import annotations

import logging
import os
import selectors
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgspec
import psutil

from engine import datadir, handlers, metrics
from engine import options as opts
from engine.alerts import Alerts
from engine.errors import StartupError
from engine.metrics import exit_name
from engine.options import Options
from engine.policy import Backoff
from engine.worker import WORKER_SPEC_ENV, WorkerSpec, title
from ipc.control import Config, Control, SegmentMap
from ipc.control import Worker as W
from ipc.shm import Segment
from ipc.wakeup import Wakeup
from persistence import migrations
from persistence.embedded import EmbeddedPostgres

log = logging.getLogger(__name__)

# Outcome rings carry only exceptions (dead letters, duplicates): 1 MiB holds
# two full batches of maximum-length reasons, and the ingest drains it on
# every commit wake-up.
OUTCOME_RING_BYTES = 1 << 20
RSS_CHECK_INTERVAL_S = 1.0
# Drain deadlines, as shares of drain_timeout_s, nest: an ingest stops
# waiting for releases on its own at engine.ingest.DRAIN_SHARE (0.6) and
# answers what it can; only a still-running ingest is killed, at this share;
# the flusher gets the rest of the budget.
DRAIN_KILL_SHARE = 0.8
# The data directory's lock file: flock()ed for the supervisor's lifetime and
# holding its PID, so a second engine on the same directory names the first.


class WorkerHandle:
    """One worker slot: the current process, its restarts and backoff."""

    def __init__(self, role: str, index: int, slot: int, clock=time.monotonic) -> None:
        self.role = role
        self.index = index
        self.slot = slot
        self.proc: subprocess.Popen | None = None
        self.pidfd: int | None = None
        self.backoff = Backoff(initial=0.1, maximum=5.0, stable_s=10.0, clock=clock)
        self.restart_at: float | None = None
        self.restarts = 0
        self.last_exit: int | None = None
        self.kill_deadline: float | None = None

    @property
    def name(self) -> str:
        return title(self.role, self.index)

    def __repr__(self) -> str:
        if self.proc is not None and self.proc.returncode is None:
            state = f"running pid={self.proc.pid}"
        elif self.last_exit is not None:
            state = f"stopped[{exit_name(self.last_exit)}]"
        else:
            state = "not started"
        return f"<Worker {self.name} {state} restarts={self.restarts}>"


class Supervisor:
    def __init__(self, options: Options) -> None:
        self.options = options
        self.pg: EmbeddedPostgres | None = None
        self.dsn: str | None = options.dsn
        self.segment: Segment | None = None
        self.control: Control | None = None
        self.data_wakes: list[Wakeup] = []  # one per lane
        self.release_wakes: list[Wakeup] = []
        self.listener: socket.socket | None = None
        # Absolute, never resolved: a symlink at the path is refused, not followed.
        self.socket_path = Path(opts.socket_path(options)).absolute()
        self.workers: list[WorkerHandle] = []
        self.selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._stop_requested = threading.Event()
        self.stopped = threading.Event()
        self.draining = False
        self.exit_code = 0
        self._lock_fd: int | None = None
        self.observability = None  # engine.observe.ObservabilityServer once serving
        # The embedded PostgreSQL is watched like a worker: its pidfd sits in
        # the selector, and a dead server is restarted with backoff.
        self._pg_pidfd: int | None = None
        self._pg_backoff = Backoff(initial=0.2, maximum=5.0, stable_s=10.0)
        self._pg_restart_at: float | None = None
        self.alerts = Alerts(options)
        self.started_wall = time.time()
        self._stats_at: float | None = None  # next stats line (monotonic)
        self._stats_from: tuple[float, metrics.Sample] | None = None

    # ------------------------------------------------------------------ start
    def start(self) -> None:
        """Bring everything up; raises StartupError (and cleans up) on failure."""
        try:
            self._start()
        except BaseException:
            self._cleanup()
            raise

    def _start(self) -> None:
        o = self.options
        registry = handlers.load(o.handlers)  # fail fast on a bad --handlers
        log.info("handlers: %s", ", ".join(sorted(registry)))
        self._lock_data_dir()
        self._claim_socket_path()
        if self.dsn is None:
            self.pg = EmbeddedPostgres(opts.data_path(o) / "pg")
            self.dsn = self.pg.start()
            self._watch_database()
        try:
            version = migrations.check_server(self.dsn)
            applied = migrations.migrate(self.dsn)
        except Exception as exc:
            raise StartupError(f"database {self._safe_dsn()} unusable: {exc}") from exc
        log.info("PostgreSQL %d at %s; migrations applied now: %s", version, self._safe_dsn(), applied or "none")
        smap = SegmentMap(o.ingests, o.lanes, o.ring_bytes, OUTCOME_RING_BYTES)
        self.segment = Segment.create(smap.size)
        self.control = Control(self.segment.buf, smap, create=True)
        self._write_config(o)
        self.control.config.set(Config.DATABASE, 1)
        self.control.config.set(Config.STARTED_NS, int(self.started_wall * 1e9))
        # The zero point of every window (alerts, stats): nothing has happened yet.
        baseline = metrics.sample(self.control)
        self.alerts.history.append((time.monotonic(), baseline))
        self._stats_from = (time.monotonic(), baseline)
        self.data_wakes = [Wakeup() for _ in range(o.lanes)]
        self.release_wakes = [Wakeup() for _ in range(o.ingests)]
        self.listener = self._listen()
        self.workers = [WorkerHandle("flusher", lane, lane) for lane in range(o.lanes)] + [
            WorkerHandle("ingest", i, self.control.ingest_slot(i)) for i in range(o.ingests)
        ]
        for handle in self.workers:
            self._spawn(handle)
        self._wait_ready()
        self._serve_observability()

    def _serve_observability(self) -> None:
        """``/metrics`` and ``/health`` on ``metrics_addr`` (unless off)."""
        addr = opts.parse_addr(self.options.metrics_addr)
        if addr is None:
            return
        from engine import observe

        try:
            self.observability = observe.ObservabilityServer(
                *addr, self.control, health=self.health, alerts=self.alerts.firing, started=self.started_wall
            )
        except OSError as exc:
            raise StartupError(
                f"cannot serve metrics on {self.options.metrics_addr}: {exc.strerror or exc}; "
                "choose another --metrics-addr (port 0: any free one) or 'off'"
            ) from exc
        self.observability.start()
        log.info("metrics and health on %s", self.observability.url)

    def _workers(self) -> list[dict]:
        return [
            {
                "role": h.name.removeprefix("batchscheduler: "),
                "pid": h.proc.pid if h.proc is not None and h.proc.returncode is None else None,
                "restarts": h.restarts,
                "last_exit": None if h.last_exit is None else exit_name(h.last_exit),
            }
            for h in self.workers
        ]

    def _wait_ready(self, timeout: float = 60.0) -> None:
        """Return once every worker reported ready; a worker that exits first
        is a StartupError naming it and its exit code."""
        from ipc.control import Flusher as F
        from ipc.control import Ingest as I

        deadline = time.monotonic() + timeout
        delay = 0.005
        while True:
            for handle in self.workers:
                code = handle.proc.poll()
                if code is not None:
                    raise StartupError(
                        f"{handle.name} exited with {exit_name(code)} during start (its log lines above say why)"
                    )
            flusher_ready = all(c.get(F.READY_NS) > 0 for c in self.control.flushers)
            if flusher_ready and all(c.get(I.READY_NS) > 0 for c in self.control.ingest):
                return
            if time.monotonic() > deadline:
                raise StartupError(f"workers not ready after {timeout}s")
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def _lock_data_dir(self) -> None:
        """Hold an exclusive flock on ``<data_dir>/engine.lock`` until exit:
        one engine per data directory, whatever its socket path."""
        data = opts.data_path(self.options)
        data.mkdir(parents=True, exist_ok=True)
        try:
            self._lock_fd = datadir.lock(data)
        except datadir.Busy as busy:
            raise StartupError(
                f"data directory {data} is in use by another engine ({busy}); "
                "stop that engine or choose another --data-dir"
            ) from None
        except OSError as exc:
            path = data / datadir.LOCK_FILE
            raise StartupError(f"cannot open the data directory's lock file {path}: {exc.strerror}") from exc

    def _claim_socket_path(self) -> None:
        path = self.socket_path
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_symlink():
            raise StartupError(f"{path} is a symbolic link; refusing to follow it (--socket must not name a symlink)")
        if path.exists():
            if not stat.S_ISSOCK(path.lstat().st_mode):
                raise StartupError(f"{path} exists and is not a socket; refusing to replace it")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(path))
            except (ConnectionRefusedError, FileNotFoundError):
                log.warning("removing stale socket %s (no engine listening)", path)
                path.unlink()
            else:
                raise StartupError(f"another engine is already listening on {path}")
            finally:
                probe.close()

    def _listen(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # no window where the socket is wider than asked
        try:
            sock.bind(str(self.socket_path))
        finally:
            os.umask(old_umask)
        os.chmod(self.socket_path, self.options.socket_mode)
        sock.listen(1024)
        return sock

    def _write_config(self, o: Options) -> None:
        cfg = self.control.config
        cfg.set(Config.WINDOW_US, round(o.time_window_ms * 1000))
        cfg.set(Config.MAX_BATCH, o.max_batch_size)
        cfg.set(Config.MIN_BATCH, min(o.min_batch_size, o.max_batch_size))
        cfg.set(Config.ADAPTIVE, int(o.adaptive_batching))
        cfg.set(Config.EPOCH, cfg.get(Config.EPOCH) + 1)  # last: readers reload on change

    def configure(self, **changes) -> Options:
        """Apply runtime options now (the flusher reads them at its next cut).
        Raises ConfigError naming the field for anything else."""
        opts.check_runtime(changes)
        self.options = self.options.replace(**changes)
        self._write_config(self.options)
        log.info("configured %s", changes)
        return self.options

    def _safe_dsn(self) -> str:
        from psycopg.conninfo import conninfo_to_dict, make_conninfo

        try:
            parts = conninfo_to_dict(self.dsn or "")
        except Exception:  # noqa: BLE001 - any unparsable DSN is shown redacted
            return "<dsn>"
        if "password" in parts:
            parts["password"] = "***"
        return make_conninfo(**parts)

    # --------------------------------------------------------------- database
    def _watch_database(self) -> None:
        assert self.pg is not None and self.pg.pid is not None
        self._pg_pidfd = os.pidfd_open(self.pg.pid)
        self.selector.register(self._pg_pidfd, selectors.EVENT_READ, self.pg)
        self._pg_backoff.started_now()

    def _unwatch_database(self) -> None:
        if self._pg_pidfd is not None:
            self.selector.unregister(self._pg_pidfd)
            os.close(self._pg_pidfd)
            self._pg_pidfd = None

    def _database_exited(self) -> None:
        """The embedded postmaster died: mark the database down and schedule
        a restart. The flusher meanwhile fails its writes, its breaker opens
        and the ingests answer ``busy``; what is in the rings stays there."""
        assert self.pg is not None
        pid = self.pg.pid
        self._unwatch_database()
        code = self.pg.exit_code()
        self.control.config.set(Config.DATABASE, 0)
        if self.draining:
            log.warning("embedded PostgreSQL (pid %s) exited with %s while draining", pid, exit_name(code))
            return
        delay = self._pg_backoff.next_delay()
        self._pg_restart_at = time.monotonic() + delay
        log.error("embedded PostgreSQL (pid %s) exited with %s; restarting in %.1fs", pid, exit_name(code), delay)

    def _restart_database(self) -> None:
        assert self.pg is not None
        self._pg_restart_at = None
        try:
            self.pg.restart()
        except StartupError as exc:
            delay = self._pg_backoff.next_delay()
            self._pg_restart_at = time.monotonic() + delay
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            log.error("embedded PostgreSQL did not come back (%s); next try in %.1fs", first, delay)
            return
        self._watch_database()
        cfg = self.control.config
        cfg.set(Config.DB_RESTARTS, cfg.get(Config.DB_RESTARTS) + 1)
        cfg.set(Config.DATABASE, 1)
        log.warning("embedded PostgreSQL restarted (pid %s); the flusher reconnects on its next try", self.pg.pid)

    # ---------------------------------------------------------------- workers
    def _spawn(self, handle: WorkerHandle) -> None:
        o = self.options
        fds = [
            self.segment.fd,
            *[w.fd for w in self.data_wakes],
            *[w.fd for w in self.release_wakes],
            self.listener.fileno(),
        ]
        spec = WorkerSpec(
            role=handle.role,
            index=handle.index,
            segment_fd=self.segment.fd,
            segment_size=self.segment.size,
            segment_map=[int(a) for a in self.control.map.args()],
            data_wake_fds=[w.fd for w in self.data_wakes],
            release_wake_fds=[w.fd for w in self.release_wakes],
            listen_fd=self.listener.fileno(),
            dsn=self.dsn,
            options=opts.to_dict(o),
            supervisor_pid=os.getpid(),
        )
        env = dict(os.environ)
        env[WORKER_SPEC_ENV] = msgspec.json.encode(spec).decode()
        # The worker must import this checkout's packages even when the
        # current directory is elsewhere.
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        handle.proc = subprocess.Popen(
            [sys.executable, "-m", "engine.worker"], env=env, pass_fds=fds, stdin=subprocess.DEVNULL, close_fds=True
        )
        handle.pidfd = os.pidfd_open(handle.proc.pid)
        self.selector.register(handle.pidfd, selectors.EVENT_READ, handle)
        handle.backoff.started_now()
        handle.restart_at = None
        handle.kill_deadline = None
        slot = self.control.workers[handle.slot]
        slot.set(W.STOP_ASKED, 0)
        slot.set(W.PID, handle.proc.pid)
        slot.set(W.STARTED_NS, time.time_ns())
        log.info("started %s (pid %d)", handle.name, handle.proc.pid)

    def _reaped(self, handle: WorkerHandle) -> None:
        code = handle.proc.wait()
        self.selector.unregister(handle.pidfd)
        os.close(handle.pidfd)
        handle.pidfd = None
        handle.last_exit = code
        handle.kill_deadline = None
        slot = self.control.workers[handle.slot]
        slot.set(W.PID, 0)
        slot.set(W.LAST_EXIT, code)
        if self.draining:
            log.info("%s exited (%s)", handle.name, exit_name(code))
            return
        delay = handle.backoff.next_delay()
        handle.restarts += 1
        slot.set(W.RESTARTS, handle.restarts)
        handle.restart_at = time.monotonic() + delay
        log.error(
            "%s (pid %d) exited with %s; restarting in %.1fs (restart #%d)",
            handle.name,
            handle.proc.pid,
            exit_name(code),
            delay,
            handle.restarts,
        )

    def _check_memory(self) -> float:
        """Recycle a worker over the RSS limit; returns the largest RSS as a
        fraction of the limit (for the memory alert)."""
        limit = self.options.worker_rss_limit_mb << 20
        worst = 0.0
        for handle in self.workers:
            proc = handle.proc
            if proc is None or proc.returncode is not None or handle.kill_deadline is not None:
                continue
            try:
                rss = psutil.Process(proc.pid).memory_info().rss
            except psutil.NoSuchProcess:
                continue
            worst = max(worst, rss / limit)
            if rss > limit:
                log.error(
                    "%s uses %d MiB RSS > worker_rss_limit_mb=%d; recycling it",
                    handle.name,
                    rss >> 20,
                    self.options.worker_rss_limit_mb,
                )
                self._terminate(handle)
        return worst

    def _every_second(self, now: float) -> None:
        """Memory limits, alerts, and (every ``stats_interval_s``) the stats line."""
        rss_ratio = self._check_memory()
        sample = metrics.sample(self.control)
        self.alerts.evaluate(sample, rss_ratio=rss_ratio, now=now)
        interval = self.options.stats_interval_s
        if not interval:
            return
        assert self._stats_from is not None  # the zero point, set at start
        since, before = self._stats_from
        if now - since >= interval:
            text, fields = metrics.stats_line(before, sample, now - since)
            log.info("%s", text, extra={"stats": fields})
            self._stats_from = (now, sample)

    def health(self) -> dict:
        """The HTTP ``/health`` body: ``metrics.health`` plus workers, alerts, uptime and version."""
        body = metrics.health(self.control, draining=self.draining)
        body["alerts"] = self.alerts.state()
        body["workers"] = self._workers()
        body["uptime_s"] = round(time.time() - self.started_wall, 3)
        body["version"] = metrics.VERSION
        return body

    def _ask_to_stop(self, handle: WorkerHandle) -> None:
        """SIGTERM a worker, marked as ours first: a SIGTERM without the mark
        is the parent-death signal (engine.ingest.begin_drain)."""
        self.control.workers[handle.slot].set(W.STOP_ASKED, 1)
        handle.proc.send_signal(signal.SIGTERM)

    def _terminate(self, handle: WorkerHandle) -> None:
        """SIGTERM now, SIGKILL if still running after the drain timeout."""
        if handle.proc is not None and handle.proc.returncode is None:
            self._ask_to_stop(handle)
            handle.kill_deadline = time.monotonic() + self.options.drain_timeout_s

    # ------------------------------------------------------------------- loop
    def run(self) -> int:
        """Watch workers until a stop is requested; then drain. Returns the
        exit code (0 after a clean drain)."""
        next_rss = time.monotonic() + RSS_CHECK_INTERVAL_S
        try:
            while not self._stop_requested.is_set():
                now = time.monotonic()
                deadlines = (
                    [next_rss]
                    + [h.restart_at for h in self.workers if h.restart_at]
                    + [h.kill_deadline for h in self.workers if h.kill_deadline]
                    + ([self._pg_restart_at] if self._pg_restart_at is not None else [])
                )
                timeout = max(0.0, min(deadlines) - now)
                for key, _ in self.selector.select(timeout):
                    if key.data is None:
                        self._drain_pipe()
                    elif key.data is self.pg:
                        self._database_exited()
                    else:
                        self._reaped(key.data)
                now = time.monotonic()
                for handle in self.workers:
                    if handle.restart_at is not None and now >= handle.restart_at and not self._stop_requested.is_set():
                        self._spawn(handle)
                    if handle.kill_deadline is not None and now >= handle.kill_deadline:
                        log.warning("%s ignored SIGTERM for %.1fs; SIGKILL", handle.name, self.options.drain_timeout_s)
                        handle.proc.kill()
                        handle.kill_deadline = None
                if self._pg_restart_at is not None and now >= self._pg_restart_at:
                    self._restart_database()
                if now >= next_rss:
                    self._every_second(now)
                    next_rss = now + RSS_CHECK_INTERVAL_S
            self.exit_code = self._drain()
        finally:
            self._cleanup()
            self.stopped.set()
        return self.exit_code

    def request_stop(self, *_: object) -> None:
        """Thread- and signal-safe: ask ``run`` to drain and return."""
        self._stop_requested.set()
        try:
            os.write(self._wake_w, b"x")
        except OSError:  # pragma: no cover - pipe full: a wake-up is pending anyway
            pass

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)

    def _drain_pipe(self) -> None:
        try:
            while os.read(self._wake_r, 512):
                pass
        except BlockingIOError:
            pass

    def _drain(self) -> int:
        self.draining = True
        t0 = time.monotonic()
        budget = self.options.drain_timeout_s
        log.info("draining: stop accepting, flush, reply (budget %.1fs)", budget)
        self.control.config.set(Config.DRAINING, 1)
        self.control.config.set(Config.EPOCH, self.control.config.get(Config.EPOCH) + 1)
        ingests = [h for h in self.workers if h.role == "ingest"]
        flusher = [h for h in self.workers if h.role == "flusher"]
        for wake in self.data_wakes:
            wake.signal()
        clean = self._stop_group(ingests, deadline=t0 + budget * DRAIN_KILL_SHARE)
        clean &= self._stop_group(flusher, deadline=t0 + budget)
        log.info("drained in %.2fs (%s)", time.monotonic() - t0, "clean" if clean else "forced")
        return 0 if clean else 1

    def _stop_group(self, group: list[WorkerHandle], deadline: float) -> bool:
        for handle in group:
            handle.restart_at = None
            if handle.proc is not None and handle.proc.returncode is None:
                self._ask_to_stop(handle)
        clean = True
        for handle in group:
            if handle.proc is None:
                continue
            try:
                handle.proc.wait(max(0.05, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not finish draining in time; SIGKILL", handle.name)
                handle.proc.kill()
                handle.proc.wait()
                clean = False
            if handle.pidfd is not None:
                self._reaped(handle)
            if handle.proc.returncode not in (0, None):
                log.warning("%s exited with %s while draining", handle.name, exit_name(handle.proc.returncode))
        return clean

    def _cleanup(self) -> None:
        if self.observability is not None:
            self.observability.stop()
            self.observability = None
        for handle in self.workers:
            if handle.proc is not None and handle.proc.returncode is None:
                handle.proc.kill()
                handle.proc.wait()
            if handle.pidfd is not None:
                try:
                    self.selector.unregister(handle.pidfd)
                except (KeyError, ValueError):
                    pass
                os.close(handle.pidfd)
                handle.pidfd = None
        if self.listener is not None:
            self.listener.close()
            self.listener = None
            try:
                self.socket_path.unlink()
            except FileNotFoundError:
                pass
        if self.control is not None:
            self.control.close()
            self.control = None
        if self.segment is not None:
            self.segment.close()
            self.segment = None
        for wake in [*self.data_wakes, *self.release_wakes]:
            if wake is not None:
                wake.close()
        self.data_wakes, self.release_wakes = [], []
        self._unwatch_database()
        if self.pg is not None:
            self.pg.stop()
            self.pg = None
        if self._wake_r >= 0:
            self.selector.close()
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._wake_r = self._wake_w = -1
        if self._lock_fd is not None:  # last: the database is stopped
            os.close(self._lock_fd)
            self._lock_fd = None

    def snapshot(self) -> dict:
        from engine.metrics import snapshot

        return snapshot(self.control)
