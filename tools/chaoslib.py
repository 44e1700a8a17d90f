"""The chaos harness behind ``tools/chaos``: faults under load, then an audit.

One run:

1. starts its own engine (``tools/run_engine --data-dir DIR --socket
   DIR/engine.sock``) as a child process and reads the ``dsn:`` line it prints;
2. starts ledger clients (threads, one connection each): each spawns its own
   entities, then sends ``move`` intents with small ``dx``/``dy`` on them,
   keeps up to ``window`` in flight, and writes down every intent and every
   reply. On EOF or an error it reconnects with backoff and resends every
   unanswered intent with the same ``seq``; a ``busy`` reply is resent later
   with the same ``seq``;
3. injects faults (``KINDS``) one after the other, each once the engine is
   whole again and the previous fault resumed, and measures each fault's
   resume time: from the fault to the next ``committed`` reply at any client
   (for an intent sent after the fault: a reply already on its way when the
   fault hit proves nothing);
4. stops sending, waits until every intent has its final reply, audits the
   database against the ledgers while the engine is idle (every reply's
   status equals the stored one; nothing replied committed is missing or
   stored twice; every entity's ``pos`` is the sum of its committed moves;
   ``tools/replay`` exits 0), stops the engine with SIGTERM and checks that it
   exited 0 and left no process, no socket file and nothing new in /dev/shm.

Only processes verified to belong to the engine this harness started are
signalled: its supervisor (our child, by title), the supervisor's children by
title (``batchscheduler: flusher`` / ``batchscheduler: ingest N``) or name
(``postgres``, the postmaster), and, after a supervisor was killed, the
processes recorded in its tree before the kill (same pid *and* start time).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import re
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import msgspec
import psutil
import psycopg

from engine.policy import Backoff
from ipc import wire
from persistence.migrations import SCHEMA

log = logging.getLogger("chaos")

ROOT = Path(__file__).resolve().parent.parent
RUN_ENGINE = ROOT / "tools" / "run_engine"
REPLAY = ROOT / "tools" / "replay"

KINDS: dict[str, str] = {
    "kill-flusher": "SIGKILL the flusher (one, at random, when there is one per write lane; the supervisor restarts it)",
    "kill-ingest": "SIGKILL one ingest, chosen at random (the supervisor restarts it; its clients reconnect)",
    "kill-supervisor": "SIGKILL the supervisor, wait until its whole process tree is gone, "
    "restart the engine on the same data dir and socket",
    "kill-postmaster": "SIGKILL the embedded PostgreSQL's postmaster (the engine must restart it; "
    "if it does not within --restart-timeout: failure postmaster_not_restarted, and the engine is restarted)",
    "terminate-backend": "pg_terminate_backend() on a flusher's connection (application_name 'batchscheduler flusher[ N]')",
    "stop-worker": "SIGSTOP a flusher or an ingest for 1-3 s, then SIGCONT",
}

# "flusher" (one flusher) or "flusher N" (one per write lane), "ingest N".
WORKER_TITLE = re.compile(r"batchscheduler: (flusher(?: \d+)?|ingest \d+)$")
SUPERVISOR_TITLE = "batchscheduler: supervisor"
FLUSHER_APP = "batchscheduler flusher"  # application_name prefix ("batchscheduler flusher N" per lane)
# Unix socket paths must fit sun_path (108 bytes with the NUL).
MAX_SOCKET_PATH = 100

RECONNECT_INITIAL_S = 0.05
RECONNECT_MAX_S = 1.0
BUSY_RETRY_S = 0.1
SEND_TIMEOUT_S = 5.0
POLL_S = 0.25  # longest a client sleeps in select before looking at its timers
STOP_HELD_S = (1.0, 3.0)
TREE_GONE_TIMEOUT_S = 30.0
ENGINE_STOP_TIMEOUT_S = 45.0
REPLAY_TIMEOUT_S = 120.0


class UsageError(Exception):
    """The run could not start (exit 2)."""


class EngineStartError(Exception):
    """run_engine did not print ``ready``: ``why``, and the tail of its log."""

    def __init__(self, why: str, log_path: Path, tail: str) -> None:
        super().__init__(f"engine {why}; log {log_path}:\n{tail}")
        self.why = why
        self.tail = tail


@dataclasses.dataclass
class Config:
    clients: int = 4
    kills: int = 10
    interval: float = 2.0
    kinds: tuple[str, ...] = tuple(KINDS)
    duration: float = 120.0
    settle_timeout: float = 60.0
    resume_timeout: float = 30.0
    restart_timeout: float = 30.0
    start_timeout: float = 90.0
    framing: str = "mixed"
    entities: int = 4
    window: int = 16
    rate: float = 100.0
    ingests: int = 2
    engine_flags: tuple[str, ...] = ()
    data_dir: str | None = None
    keep_data: bool = False
    seed: int | None = None


# ---------------------------------------------------------------- processes
def _title(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline()).strip()
    except psutil.Error:
        return ""


def _alive(proc: psutil.Process) -> bool:
    """Running and not a zombie (a zombie is gone for our purposes)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _describe(proc: psutil.Process) -> str:
    try:
        title = _title(proc) or proc.name()
        return f"{proc.pid} {title if len(title) <= 60 else title[:57] + '...'}"
    except psutil.Error:
        return str(proc.pid)


class ProcTracker:
    """Every process seen in one engine's tree, keyed by (pid, start time), so
    a reused pid is never mistaken for one of ours."""

    def __init__(self) -> None:
        self._procs: dict[tuple[int, float], psutil.Process] = {}
        self._labels: dict[tuple[int, float], str] = {}
        self._gone: dict[tuple[int, float], float] = {}  # first seen gone (monotonic)

    def add(self, procs: Iterable[psutil.Process]) -> None:
        for proc in procs:
            try:
                key = (proc.pid, proc.create_time())
            except psutil.Error:
                continue
            if key not in self._procs:
                self._procs[key] = proc
                self._labels[key] = _describe(proc)

    def add_tree(self, root: psutil.Process) -> None:
        try:
            self.add([root, *root.children(recursive=True)])
        except psutil.Error:
            self.add([root])

    def alive(self) -> list[psutil.Process]:
        """Tracked processes still running; their children join the tracked set
        (a dying postmaster may still start a process)."""
        for proc in list(self._procs.values()):
            if _alive(proc):
                try:
                    self.add(proc.children(recursive=True))
                except psutil.Error:
                    pass
        left = []
        now = time.monotonic()
        for key, proc in self._procs.items():
            if _alive(proc):
                left.append(proc)
            else:
                self._gone.setdefault(key, now)
        return left

    def wait_gone(self, timeout: float) -> list[psutil.Process]:
        """Poll until every tracked process exited; returns those left."""
        deadline = time.monotonic() + timeout
        delay = 0.01
        while True:
            left = self.alive()
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(delay)
            delay = min(delay * 2, 0.2)

    def pids(self) -> list[int]:
        return [pid for pid, _ in self._procs]

    def last_exits(self, since: float, n: int = 3) -> str:
        """The last ``n`` processes to exit after ``since``, with when (to the
        poll's precision): which one a slow tree shutdown waited for."""
        late = sorted(((t - since, self._labels[k]) for k, t in self._gone.items() if t >= since), reverse=True)
        return ", ".join(f"{label} at +{dt:.2f}s" for dt, label in late[:n])

    @staticmethod
    def kill(procs: Iterable[psutil.Process]) -> None:
        """SIGKILL tracked leftovers (psutil re-checks pid and start time)."""
        for proc in procs:
            try:
                proc.kill()
            except psutil.Error:
                pass


def wait_until(predicate: Callable[[], Any], timeout: float, stop: threading.Event | None = None) -> Any:
    """Poll ``predicate`` with backoff until truthy or the deadline; returns
    its last value."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        if stop is not None and stop.is_set():
            return value
        time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        delay = min(delay * 2, 0.2)


class Engine:
    """One ``tools/run_engine`` process tree that this harness started."""

    def __init__(self, data_dir: Path, socket_path: Path, ingests: int, flags: list[str], log_path: Path) -> None:
        self.data_dir = data_dir
        self.socket_path = socket_path
        self.ingests = ingests
        self.flags = flags
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.sup: psutil.Process | None = None
        self.dsn: str | None = None
        self.lines: list[str] = []
        self.tracker = ProcTracker()
        self.exit_code: int | None = None
        self.roles: set[str] = set()  # worker roles of the whole engine
        self._ready = threading.Event()  # 'ready' printed, or stdout closed
        self.saw_ready = False
        self._pump: threading.Thread | None = None
        self._log_file = None

    def start(self, timeout: float) -> Engine:
        cmd = [
            sys.executable,
            str(RUN_ENGINE),
            "--data-dir",
            str(self.data_dir),
            "--socket",
            str(self.socket_path),
            "--ingests",
            str(self.ingests),
            # Any free port: restarts and other engines never collide on it.
            *([] if "--metrics-addr" in self.flags else ["--metrics-addr", "127.0.0.1:0"]),
            *self.flags,
        ]
        # Engine options come from --engine-flags only: a stray
        # BATCHSCHEDULER_DSN would point the engine at another database.
        env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHSCHEDULER_")}
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the engine
        log.info("starting engine: %s", " ".join(cmd[1:]))
        # Own session: a Ctrl-C at the terminal reaches the harness, which then
        # stops the engine itself.
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=self._log_file,
            stdin=subprocess.DEVNULL,
            text=True,
            env=env,
            start_new_session=True,
        )
        self._pump = threading.Thread(target=self._read_stdout, name="engine-stdout", daemon=True)
        self._pump.start()
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                break
        if not self.saw_ready or self.proc.poll() is not None or self.dsn is None:
            try:  # stdout closed: the engine is exiting
                code = self.proc.wait(5 if self._ready.is_set() else 0.01)
                why = f"exited with code {code}"
            except subprocess.TimeoutExpired:
                why = f"was not ready after {timeout:g}s"
            self.kill_and_reap()
            raise EngineStartError(why, self.log_path, self.log_tail())
        self.sup = psutil.Process(self.proc.pid)
        if _title(self.sup) != SUPERVISOR_TITLE:
            self.kill_and_reap()
            raise EngineStartError(
                f"(pid {self.proc.pid}) is not titled {SUPERVISOR_TITLE!r}: {_title(self.sup)!r}",
                self.log_path,
                self.log_tail(),
            )
        self.track()
        # The supervisor prints 'ready' once every worker reported ready: the
        # workers running now are what a whole engine has.
        self.roles = set(self.workers())
        log.info(
            "engine ready (supervisor pid %d, workers: %s), dsn %s",
            self.proc.pid,
            ", ".join(sorted(self.roles)),
            self.dsn,
        )
        return self

    def _read_stdout(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            self.lines.append(line)
            if line.startswith("dsn: "):
                self.dsn = line[len("dsn: ") :].strip()
            elif line.startswith("ready"):
                self.saw_ready = True
                self._ready.set()
        self._ready.set()

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    # ------------------------------------------------------------ inspection
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _children(self) -> list[psutil.Process]:
        if self.sup is None or not self.running():
            return []
        try:
            return [c for c in self.sup.children() if _alive(c)]
        except psutil.Error:
            return []

    def workers(self) -> dict[str, psutil.Process]:
        """Live workers by role (``flusher``, ``ingest 0``, ...)."""
        found = {}
        for child in self._children():
            match = WORKER_TITLE.match(_title(child))
            if match:
                found[match.group(1)] = child
        return found

    def postmaster(self) -> psutil.Process | None:
        for child in self._children():
            try:
                if child.name() == "postgres":
                    return child
            except psutil.Error:
                continue
        return None

    def missing(self) -> list[str]:
        """What the engine lacks to be whole (empty when whole)."""
        if not self.running():
            return ["supervisor"]
        roles = self.workers()
        gone = [r for r in sorted(self.roles) if r not in roles]
        if self.postmaster() is None:
            gone.append("postmaster")
        return gone

    def track(self) -> None:
        if self.sup is not None and self.running():
            self.tracker.add_tree(self.sup)

    def verify_child(self, proc: psutil.Process, role: str) -> bool:
        """``proc`` is a live child of our supervisor with the title of
        ``role`` (``flusher``, ``ingest N``) or, for ``postmaster``, named postgres."""
        if self.sup is None or not self.running() or not _alive(proc):
            return False
        try:
            if proc.ppid() != self.sup.pid:
                return False
            if role == "postmaster":
                return proc.name() == "postgres"
        except psutil.Error:
            return False
        match = WORKER_TITLE.match(_title(proc))
        return bool(match) and match.group(1) == role

    def verify_supervisor(self) -> bool:
        return self.sup is not None and self.running() and _alive(self.sup) and _title(self.sup) == SUPERVISOR_TITLE

    # ------------------------------------------------------------------ stop
    def stop(self, timeout: float = ENGINE_STOP_TIMEOUT_S) -> int | None:
        """SIGTERM (drain) and wait; SIGKILL after ``timeout``. Returns the
        exit code of the drain (None when it had to be killed)."""
        if self.proc is None:
            return None
        self.track()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.exit_code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.error("engine (pid %d) did not stop within %gs after SIGTERM; SIGKILL", self.proc.pid, timeout)
            self.kill_and_reap()
            self.exit_code = None
        self.close()
        return self.exit_code

    def kill_and_reap(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            self.close()

    def close(self) -> None:
        if self._pump is not None:
            self._pump.join(5)
        if self.proc is not None and self.proc.stdout is not None and not self.proc.stdout.closed:
            self.proc.stdout.close()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None


# ------------------------------------------------------------------ clients
class ResumeTracker:
    """Resolves each fault's resume time: fault to the first committed reply
    (at any client) for an intent sent after the fault, arriving once the
    fault is armed (at once, except for a killed supervisor: once the new
    engine is up, so a commit by the dying tree does not count)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: list[Fault] = []
        self.last_commit = 0.0

    def fault(self, fault: Fault, at: float, armed: bool = True) -> None:
        with self._lock:
            fault.t = at
            fault.armed_at = at if armed else None
            self._pending.append(fault)

    def arm(self, fault: Fault) -> None:
        with self._lock:
            fault.armed_at = time.monotonic()

    def committed(self, at: float, sent_at: float) -> None:
        """A committed reply arrived ``at``, for an intent last sent at
        ``sent_at``. Only an intent sent after a fault proves the engine
        committed something after it (replies already on their way when the
        fault hit do not)."""
        self.last_commit = at
        if not self._pending:
            return
        with self._lock:
            still = []
            for fault in self._pending:
                if sent_at > fault.t and fault.armed_at is not None and at >= fault.armed_at:
                    fault.resume_s = at - fault.t
                    log.info("fault #%d %s: resumed after %.3fs", fault.n, fault.kind, fault.resume_s)
                else:
                    still.append(fault)
            self._pending = still


@dataclasses.dataclass(slots=True)
class Entry:
    """One intent in a client's ledger."""

    seq: int
    entity: str
    kind: str
    args: dict[str, Any]
    frame: bytes
    sends: int = 0
    last_sent: float = 0.0
    replies: list[tuple[float, str, str | None, bool]] = dataclasses.field(default_factory=list)
    final: str | None = None
    code: str | None = None


class LedgerClient(threading.Thread):
    """One connection's worth of load with a complete ledger."""

    def __init__(
        self,
        index: int,
        client_id: str,
        socket_path: Path,
        framing: str,
        cfg: Config,
        rng: random.Random,
        resume: ResumeTracker,
        sending: threading.Event,
        stop: threading.Event,
        t0: float,
    ) -> None:
        super().__init__(name=f"chaos-client-{index}", daemon=True)
        self.client_id = client_id
        self.path = str(socket_path)
        self.framing = framing
        self.window = cfg.window
        self.interval = 1.0 / cfg.rate if cfg.rate > 0 else 0.0
        self.rng = rng
        self.resume = resume
        self.sending = sending
        self.stop = stop
        self.t0 = t0
        self.entities = [f"{client_id}-e{i}" for i in range(cfg.entities)]
        self.spawned: list[str] = []
        self.ledger: dict[int, Entry] = {}
        self.unanswered: set[int] = set()  # no final reply yet
        self.inflight: set[int] = set()  # sent on the current connection, no reply yet
        self.retry_at: dict[int, float] = {}  # busy: resend at
        self.next_seq = 1
        self.connects = 0
        self.refused = 0  # connections answered 'unavailable'
        self.busy = 0
        self.unmatched: list[dict] = []
        self.errors: list[str] = []
        self.crashed: str | None = None
        self._lock = threading.Lock()  # guards the counters the main thread reads
        self._sock: socket.socket | None = None
        self._sel = selectors.DefaultSelector()
        # A refusal at connect ('unavailable') is a JSON line even on a msgpack
        # connection; the reader tells it apart (msgpack frames start with 0x00).
        self._replies = wire.ReplyReader(framing, msgspec.msgpack.decode, msgspec.json.decode)
        self._encode = (msgspec.msgpack.Encoder() if framing == wire.MODE_MSGPACK else msgspec.json.Encoder()).encode

    # ------------------------------------------------------------ main loop
    def run(self) -> None:
        try:
            self._loop()
        except Exception as exc:  # reported as a failed check, never hidden
            log.exception("%s crashed", self.name)
            self.crashed = f"{type(exc).__name__}: {exc}"
        finally:
            self._drop()
            self._sel.close()

    def pending(self) -> int:
        with self._lock:
            return len(self.unanswered)

    def _loop(self) -> None:
        backoff = Backoff(initial=RECONNECT_INITIAL_S, maximum=RECONNECT_MAX_S, stable_s=math.inf)
        next_send = time.monotonic()
        while not self.stop.is_set():
            if self._sock is None:
                if not self._connect():
                    self.stop.wait(backoff.next_delay())
                    continue
                backoff.reset()
                # Everything without a final reply goes again, same seq, in order.
                self.retry_at.clear()
                if self.unanswered and not self._send(sorted(self.unanswered)):
                    continue
            now = time.monotonic()
            due = sorted(s for s, at in self.retry_at.items() if at <= now)
            for seq in due:
                del self.retry_at[seq]
            fresh = []
            blocked = False
            if self.sending.is_set():
                room = self.window - len(self.inflight) - len(self.retry_at) - len(due)
                while room > 0 and now >= next_send:
                    seq = self._new_intent()
                    if seq is None:
                        blocked = True  # spawns unanswered: a reply wakes us
                        break
                    fresh.append(seq)
                    room -= 1
                    if self.interval:
                        next_send = max(next_send + self.interval, now - 1.0)
            if (due or fresh) and not self._send(due + fresh):
                continue
            timeout = POLL_S
            if self.retry_at:
                timeout = min(timeout, min(self.retry_at.values()) - now)
            if self.sending.is_set() and self.interval and not blocked and len(self.inflight) < self.window:
                timeout = min(timeout, next_send - now)
            if self._sel.select(max(timeout, 0.001)):
                self._receive()

    def _new_intent(self) -> int | None:
        """Next intent: spawn each entity, then (once every spawn has its final
        reply) moves on the entities whose spawn committed."""
        if len(self.spawned) < len(self.entities):
            entity = self.entities[len(self.spawned)]
            self.spawned.append(entity)
            return self._add(entity, "spawn", {"state": {"pos": {"x": 0, "y": 0}}})
        spawns = [self.ledger[s] for s in range(1, len(self.entities) + 1)]
        if any(e.final is None for e in spawns):
            return None
        alive = [e.entity for e in spawns if e.final == "committed"]
        if not alive:
            return None
        return self._add(self.rng.choice(alive), "move", {"dx": self.rng.randint(-3, 3), "dy": self.rng.randint(-3, 3)})

    def _add(self, entity: str, kind: str, args: dict[str, Any]) -> int:
        seq = self.next_seq
        self.next_seq += 1
        intent = {"client_id": self.client_id, "seq": seq, "entity": entity, "kind": kind, "args": args}
        frame = wire.frame(self.framing, self._encode(intent))
        with self._lock:
            self.ledger[seq] = Entry(seq, entity, kind, args, frame)
            self.unanswered.add(seq)
        return seq

    # --------------------------------------------------------- connection
    def _connect(self) -> bool:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(SEND_TIMEOUT_S)
        try:
            sock.connect(self.path)
        except OSError:
            sock.close()
            return False
        self._sock = sock
        self._replies.clear()
        self.inflight.clear()
        self._sel.register(sock, selectors.EVENT_READ)
        self.connects += 1
        return True

    def _drop(self) -> None:
        if self._sock is not None:
            try:
                self._sel.unregister(self._sock)
            except (KeyError, ValueError):
                pass
            self._sock.close()
            self._sock = None
        self.inflight.clear()

    def _send(self, seqs: list[int]) -> bool:
        assert self._sock is not None
        frames = []
        now = time.monotonic()
        for seq in seqs:
            entry = self.ledger[seq]
            entry.sends += 1
            entry.last_sent = now
            self.inflight.add(seq)
            frames.append(entry.frame)
        try:
            self._sock.sendall(b"".join(frames))
            return True
        except OSError as exc:
            log.debug("%s: send failed (%s); reconnecting", self.name, exc)
            self._drop()
            return False

    def _receive(self) -> None:
        assert self._sock is not None
        try:
            data = self._sock.recv(1 << 16)
        except OSError as exc:
            log.debug("%s: recv failed (%s); reconnecting", self.name, exc)
            data = b""
        if not data:
            self._drop()
            return
        try:
            replies = self._replies.feed(data)
        except (msgspec.DecodeError, ValueError) as exc:
            self.errors.append(f"undecodable reply: {exc}")
            log.error("%s: undecodable reply (%s); reconnecting", self.name, exc)
            self._drop()
            return
        now = time.monotonic()
        for reply in replies:
            self._reply(reply, now)

    def _reply(self, reply: dict, now: float) -> None:
        status, code, seq = reply.get("status"), reply.get("code"), reply.get("seq")
        entry = self.ledger.get(seq) if reply.get("client_id") == self.client_id and isinstance(seq, int) else None
        if entry is None:
            if reply.get("client_id") is None and status == "rejected" and code == "unavailable":
                self.refused += 1  # the engine closes this connection; we reconnect
            else:
                self.unmatched.append(reply)
            return
        entry.replies.append((round(now - self.t0, 4), status, code, bool(reply.get("duplicate"))))
        self.inflight.discard(seq)
        if status == "busy" or (status == "rejected" and code == "unavailable"):
            # Nothing stored: resend later with the same seq.
            self.busy += 1
            if entry.final is None:
                self.retry_at[seq] = now + BUSY_RETRY_S
            return
        if status == "committed":
            self.resume.committed(now, entry.last_sent)
        if entry.final is None:
            with self._lock:
                entry.final, entry.code = status, code
                self.unanswered.discard(seq)


def retryable(status: str, code: str | None) -> bool:
    """A reply that stores nothing and asks for a resend."""
    return status == "busy" or (status == "rejected" and code == "unavailable")


# ------------------------------------------------------------------- faults
@dataclasses.dataclass
class Fault:
    n: int
    kind: str
    target: str = ""
    pid: int | None = None
    t: float = 0.0  # monotonic time of the fault
    armed_at: float | None = None  # commits count for resume from then on
    at_s: float = 0.0  # seconds since the run started
    resume_s: float | None = None
    held_s: float | None = None  # stop-worker: how long the worker was stopped
    recovered_s: float | None = None  # fault to engine whole again
    failure: str | None = None
    skipped: str | None = None
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        del d["t"], d["armed_at"]
        return d


def schedule(kinds: tuple[str, ...], n: int, rng: random.Random) -> list[str]:
    """``n`` kinds: random order, each kind once per round of len(kinds)."""
    out: list[str] = []
    while len(out) < n:
        round_ = list(kinds)
        rng.shuffle(round_)
        out.extend(round_)
    return out[:n]


# ---------------------------------------------------------------------- run
class Chaos:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        seed = cfg.seed if cfg.seed is not None else random.SystemRandom().randrange(1 << 31)
        self.seed = seed
        self.rng = random.Random(seed)
        self.run_id = uuid.UUID(int=self.rng.getrandbits(128)).hex[:8]
        self.own_dir = cfg.data_dir is None
        if cfg.data_dir is None:
            self.data_dir = Path(tempfile.mkdtemp(prefix="bs-chaos-"))
        else:
            self.data_dir = Path(cfg.data_dir).resolve()
        self.socket_path = self.data_dir / "engine.sock"
        self.log_path = self.data_dir / "engine.log"
        self.engines: list[Engine] = []
        self.engine: Engine | None = None
        self.resume = ResumeTracker()
        self.sending = threading.Event()
        self.stop_clients = threading.Event()
        self.clients: list[LedgerClient] = []
        self.faults: list[Fault] = []
        self.failures: list[str] = []
        self.stopped: list[psutil.Process] = []  # SIGSTOPped, to SIGCONT whatever happens
        self.t0 = time.monotonic()

    # ---------------------------------------------------------- lifecycle
    def run(self) -> dict[str, Any]:
        if len(str(self.socket_path)) > MAX_SOCKET_PATH:
            raise UsageError(f"socket path {self.socket_path} is too long for a Unix socket; use a shorter --data-dir")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        shm_before = _shm_entries()
        log.info("chaos run %s, seed %d, data dir %s", self.run_id, self.seed, self.data_dir)
        try:
            self.engine = self._new_engine()
        except EngineStartError as exc:
            if self.own_dir and not self.cfg.keep_data:
                shutil.rmtree(self.data_dir, ignore_errors=True)
                raise UsageError(f"could not start the engine: it {exc.why}; its log ends:\n{exc.tail}") from None
            raise UsageError(f"could not start the engine: {exc}") from None
        report: dict[str, Any] = {}
        try:
            try:
                self.t0 = time.monotonic()
                self._start_clients()
                self._fault_loop()
                self.sending.clear()
                report = self._audit(self._settle())
            except RunAborted as exc:
                log.error("run aborted: %s", exc)
                self.failures.append(f"run_aborted: {exc}")
                report = {"checks": {"run_completed": _check(False, str(exc))}}
            finally:
                self._cleanup()
            report.update(self._final_checks(shm_before))
        except BaseException:
            # A bug or Ctrl-C: never leave the engine running.
            self._cleanup()
            for engine in self.engines:
                if engine.running():
                    engine.stop(timeout=20)
            raise
        return self._finish(report)

    def _new_engine(self) -> Engine:
        engine = Engine(self.data_dir, self.socket_path, self.cfg.ingests, list(self.cfg.engine_flags), self.log_path)
        self.engines.append(engine)
        return engine.start(self.cfg.start_timeout)

    def _start_clients(self) -> None:
        cfg = self.cfg
        framings = {"json": ["json"], "msgpack": ["msgpack"], "mixed": ["json", "msgpack"]}[cfg.framing]
        for i in range(cfg.clients):
            client = LedgerClient(
                i,
                f"chaos-{self.run_id}-{i}",
                self.socket_path,
                framings[i % len(framings)],
                cfg,
                random.Random(self.rng.getrandbits(64)),
                self.resume,
                self.sending,
                self.stop_clients,
                self.t0,
            )
            self.clients.append(client)
        self.sending.set()
        for client in self.clients:
            client.start()

    def _elapsed(self) -> float:
        return time.monotonic() - self.t0

    def _fault_loop(self) -> None:
        cfg = self.cfg
        deadline = self.t0 + cfg.duration
        # Warm-up: the first commit shows the clients and the engine work.
        if not wait_until(lambda: self.resume.last_commit > 0, min(cfg.resume_timeout, cfg.duration)):
            self.failures.append("no_commit_before_faults: no committed reply within the warm-up")
            return
        for n, kind in enumerate(schedule(cfg.kinds, cfg.kills, self.rng), start=1):
            if time.monotonic() + cfg.interval >= deadline:
                log.warning("--duration %gs reached after %d of %d faults", cfg.duration, n - 1, cfg.kills)
                break
            time.sleep(cfg.interval)  # the pace of the run, not a wait for a condition
            self._ensure_whole(f"before fault #{n}")
            if time.monotonic() >= deadline:
                log.warning("--duration %gs reached after %d of %d faults", cfg.duration, n - 1, cfg.kills)
                break
            fault = Fault(n, kind)
            self.faults.append(fault)
            log.info("fault #%d: %s", n, kind)
            self._inject(fault)
            if fault.skipped:
                log.warning("fault #%d %s skipped: %s", n, kind, fault.skipped)
                continue
            whole_at = wait_until(lambda: not self.engine.missing() and time.monotonic(), cfg.restart_timeout)
            if whole_at:
                fault.recovered_s = round(whole_at - fault.t, 4)
            # The next fault waits until this one resumed (bounded).
            if not wait_until(lambda f=fault: f.resume_s is not None, cfg.resume_timeout):
                log.error("fault #%d %s: no committed reply within %gs", n, kind, cfg.resume_timeout)
        if not self.faults:
            # --kills 0 (or nothing to inject): load for the whole --duration.
            time.sleep(max(0.0, deadline - time.monotonic()))

    def _ensure_whole(self, when: str) -> None:
        """Wait for the engine to be whole; restart it when it does not get there."""
        if wait_until(lambda: not self.engine.missing(), self.cfg.restart_timeout):
            return
        missing = self.engine.missing()
        self.failures.append(
            f"engine_not_whole ({when}): missing {', '.join(missing)} after {self.cfg.restart_timeout:g}s"
        )
        log.error("engine not whole %s (missing %s); restarting it", when, missing)
        self._restart_engine()

    def _restart_engine(self) -> None:
        old = self.engine
        code = old.stop()
        log.info("engine stopped for restart, exit code %s", code)
        left = old.tracker.wait_gone(TREE_GONE_TIMEOUT_S)
        if left:
            self.failures.append(f"tree_not_gone: after the engine stopped: {[_describe(p) for p in left]}")
            ProcTracker.kill(left)
            old.tracker.wait_gone(5)
        self.engine = self._new_engine()

    def _inject(self, fault: Fault) -> None:
        engine = self.engine
        kind = fault.kind
        engine.track()
        if kind in ("kill-flusher", "kill-ingest", "stop-worker"):
            workers = engine.workers()
            if kind == "kill-flusher":
                roles = sorted(r for r in workers if r.startswith("flusher"))
            elif kind == "kill-ingest":
                roles = sorted(r for r in workers if r.startswith("ingest"))
            else:
                roles = sorted(workers)
            roles = [r for r in roles if r in workers]
            if not roles:
                fault.skipped = "no such worker running"
                return
            role = self.rng.choice(roles)
            proc = workers[role]
            if not engine.verify_child(proc, role):
                fault.skipped = f"{role} (pid {proc.pid}) could not be verified as this engine's"
                return
            fault.target, fault.pid = role, proc.pid
            if kind == "stop-worker":
                self._stop_worker(fault, proc)
            else:
                self._signal(fault, proc, signal.SIGKILL)
        elif kind == "kill-supervisor":
            self._kill_supervisor(fault)
        elif kind == "kill-postmaster":
            self._kill_postmaster(fault)
        elif kind == "terminate-backend":
            self._terminate_backend(fault)
        else:  # pragma: no cover - kinds are validated by the CLI
            raise ValueError(kind)

    def _mark(self, fault: Fault, armed: bool = True) -> None:
        now = time.monotonic()
        fault.at_s = round(now - self.t0, 4)
        self.resume.fault(fault, now, armed)

    def _signal(self, fault: Fault, proc: psutil.Process, sig: int, armed: bool = True) -> bool:
        try:
            proc.send_signal(sig)  # psutil re-checks pid and start time
        except psutil.Error as exc:
            fault.skipped = f"signal failed: {exc}"
            return False
        self._mark(fault, armed)
        return True

    def _stop_worker(self, fault: Fault, proc: psutil.Process) -> None:
        held = self.rng.uniform(*STOP_HELD_S)
        self.stopped.append(proc)
        try:
            if not self._signal(fault, proc, signal.SIGSTOP):
                return
            time.sleep(held)  # the fault itself: the worker stays stopped this long
        finally:
            try:
                proc.send_signal(signal.SIGCONT)
            except psutil.Error:
                pass
            self.stopped.remove(proc)
        fault.held_s = round(held, 3)

    def _kill_supervisor(self, fault: Fault) -> None:
        engine = self.engine
        if not engine.verify_supervisor():
            fault.skipped = "supervisor could not be verified"
            return
        engine.track()
        fault.target, fault.pid = "supervisor", engine.sup.pid
        if not self._signal(fault, engine.sup, signal.SIGKILL, armed=False):
            return
        engine.proc.wait()
        # Workers hold the engine's stdout: close() (which waits for EOF)
        # comes after the tree is gone.
        left = engine.tracker.wait_gone(TREE_GONE_TIMEOUT_S)
        if left:
            fault.failure = "supervisor_tree_not_gone"
            fault.note = f"left after {TREE_GONE_TIMEOUT_S:g}s: {[_describe(p) for p in left]}"
            self.failures.append(f"supervisor_tree_not_gone (fault #{fault.n}): {fault.note}")
            ProcTracker.kill(left)
            engine.tracker.wait_gone(5)
        else:
            fault.note = (
                f"tree gone after {time.monotonic() - fault.t:.2f}s (last: {engine.tracker.last_exits(fault.t)})"
            )
        engine.close()
        try:
            self.engine = self._new_engine()
        except EngineStartError as exc:
            fault.failure = "engine_restart_failed"
            raise RunAborted(f"engine did not restart after the supervisor was killed: {exc}") from None
        self.resume.arm(fault)

    def _kill_postmaster(self, fault: Fault) -> None:
        engine = self.engine
        old = engine.postmaster()
        if old is None or not engine.verify_child(old, "postmaster"):
            fault.skipped = "postmaster not found among the supervisor's children"
            return
        fault.target, fault.pid = "postmaster", old.pid
        if not self._signal(fault, old, signal.SIGKILL):
            return

        def back() -> bool:
            new = engine.postmaster()
            return new is not None and new.pid != old.pid and _db_ok(engine.dsn)

        if wait_until(back, self.cfg.restart_timeout):
            fault.note = f"postmaster back after {time.monotonic() - fault.t:.2f}s (pid {engine.postmaster().pid})"
            return
        fault.failure = "postmaster_not_restarted"
        fault.note = f"no new postmaster accepting connections within {self.cfg.restart_timeout:g}s; engine restarted"
        self.failures.append(f"postmaster_not_restarted (fault #{fault.n}): {fault.note}")
        log.error("fault #%d: postmaster not restarted by the engine; restarting the engine", fault.n)
        try:
            self._restart_engine()
        except EngineStartError as exc:
            raise RunAborted(f"engine did not restart after postmaster_not_restarted: {exc}") from None

    def _terminate_backend(self, fault: Fault) -> None:
        dsn = self.engine.dsn

        def flusher_backends() -> list[int]:
            try:
                with psycopg.connect(
                    dsn, autocommit=True, connect_timeout=5, application_name="batchscheduler chaos"
                ) as conn:
                    rows = conn.execute(
                        "SELECT pid, application_name FROM pg_stat_activity "
                        "WHERE application_name = %s OR application_name LIKE %s",
                        (FLUSHER_APP, FLUSHER_APP + " %"),
                    ).fetchall()
                    return sorted(rows)
            except psycopg.Error:
                return []

        backends = wait_until(flusher_backends, 5.0)
        if not backends:
            fault.skipped = f"no connection with application_name {FLUSHER_APP!r}"
            return
        pid, app = self.rng.choice(backends)
        pids = [pid]
        fault.target, fault.pid = f"backend of {app!r}", pid
        try:
            with psycopg.connect(
                dsn, autocommit=True, connect_timeout=5, application_name="batchscheduler chaos"
            ) as conn:
                done = conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid", (pids,)
                ).fetchall()
        except psycopg.Error as exc:
            fault.skipped = f"pg_terminate_backend failed: {exc}"
            return
        self._mark(fault)
        fault.note = f"terminated {sum(1 for (ok,) in done if ok)} of {len(pids)} backend(s)"

    # ------------------------------------------------------------- finish
    def _settle(self) -> bool:
        """Wait for every intent's final reply (the clients keep resending)."""
        log.info("stopped sending; waiting up to %gs for every final reply", self.cfg.settle_timeout)
        done = wait_until(
            lambda: all(c.pending() == 0 or not c.is_alive() for c in self.clients), self.cfg.settle_timeout
        )
        self.stop_clients.set()
        for client in self.clients:
            client.join(10)
        return bool(done)

    def _audit(self, settled: bool) -> dict[str, Any]:
        """Compare the ledgers with the database while the engine is up and idle."""
        checks: dict[str, dict[str, Any]] = {}
        if self.engine.missing():
            wait_until(lambda: not self.engine.missing(), self.cfg.restart_timeout)
        ledger = {(c.client_id, e.seq): e for c in self.clients for e in c.ledger.values()}
        finals = [e.final for e in ledger.values()]
        counts: dict[str, Any] = {
            "intents_sent": len(ledger),
            "sends": sum(e.sends for e in ledger.values()),
            "committed": finals.count("committed"),
            "dead_lettered": finals.count("dead_lettered"),
            "rejected": finals.count("rejected"),
            "unanswered": finals.count(None),
            "busy_replies": sum(c.busy for c in self.clients),
            "connects": sum(c.connects for c in self.clients),
            "refused_connections": sum(c.refused for c in self.clients),
        }
        unmatched = [r for c in self.clients for r in c.unmatched]
        crashed = [f"{c.name}: {c.crashed}" for c in self.clients if c.crashed]
        errors = [f"{c.name}: {e}" for c in self.clients for e in c.errors]
        checks["all_answered"] = _check(
            settled and counts["unanswered"] == 0,
            f"{counts['unanswered']} intents without a final reply after --settle-timeout {self.cfg.settle_timeout:g}s",
        )
        checks["no_unmatched_replies"] = _check(not unmatched and not errors, f"{unmatched[:5]} {errors[:5]}")
        checks["clients_ok"] = _check(not crashed, "; ".join(crashed))
        try:
            stored, entities = self._query(
                list({c.client_id for c in self.clients}), [e for c in self.clients for e in c.entities]
            )
        except psycopg.Error as exc:
            checks["database_reachable"] = _check(False, str(exc).strip())
            counts.update(lost=None, duplicated=None, mismatched=None)
            return {"counts": counts, "checks": checks}
        lost: list[tuple[str, int]] = []
        mismatched: list[dict[str, Any]] = []
        duplicated = [k for k, rows in stored.items() if len(rows) > 1]
        for key, entry in ledger.items():
            rows = stored.get(key, [])
            status = rows[0][0] if rows else None
            if entry.final in ("committed", "dead_lettered") and status is None:
                lost.append(key)
            for t, r_status, r_code, dup in entry.replies:
                if retryable(r_status, r_code):
                    continue
                expected = status if status is not None else "rejected"
                if r_status != expected:
                    mismatched.append(
                        {
                            "client_id": key[0],
                            "seq": key[1],
                            "at_s": t,
                            "reply": r_status,
                            "code": r_code,
                            "duplicate": dup,
                            "stored": status,
                        }
                    )
        phantom = sorted(k for k in stored if k not in ledger)
        # Entities: pos = sum of the committed moves; exists iff its spawn committed.
        expected: dict[str, tuple[int, int]] = {}
        for entry in ledger.values():
            if entry.final != "committed":
                continue
            if entry.kind == "spawn":
                expected.setdefault(entry.entity, (0, 0))
        for entry in ledger.values():
            if entry.final == "committed" and entry.kind == "move":
                x, y = expected.get(entry.entity, (0, 0))
                expected[entry.entity] = (x + entry.args["dx"], y + entry.args["dy"])
        entity_diffs = []
        for entity in sorted(set(expected) | set(entities)):
            want = expected.get(entity)
            state = entities.get(entity)
            got = None if state is None else _pos(state)
            if want != got:
                entity_diffs.append({"entity": entity, "expected_pos": want, "stored_pos": got})
        counts.update(lost=len(lost), duplicated=len(duplicated), mismatched=len(mismatched), phantom=len(phantom))
        checks["database_reachable"] = _check(True, "")
        checks["no_lost"] = _check(not lost, f"replied committed/dead_lettered, not stored: {lost[:20]}")
        checks["no_duplicates"] = _check(not duplicated, f"stored more than once: {duplicated[:20]}")
        checks["no_mismatched_replies"] = _check(
            not mismatched, f"{len(mismatched)} replies differ from the stored status"
        )
        checks["no_phantom_rows"] = _check(not phantom, f"stored but never sent: {phantom[:20]}")
        checks["entities_match"] = _check(not entity_diffs, f"{len(entity_diffs)} entities differ: {entity_diffs[:10]}")
        checks["replay_identical"] = self._replay()
        return {
            "counts": counts,
            "checks": checks,
            "mismatches": mismatched[:100],
            "lost_keys": [list(k) for k in lost[:100]],
            "entity_diffs": entity_diffs[:100],
        }

    def _query(self, client_ids: list[str], entity_ids: list[str]) -> tuple[dict, dict]:
        stored: dict[tuple[str, int], list[tuple[str, str | None]]] = {}
        with psycopg.connect(
            self.engine.dsn, autocommit=True, connect_timeout=10, application_name="batchscheduler chaos"
        ) as conn:
            for client_id, seq, status, code in conn.execute(
                f"SELECT client_id, seq, status, code FROM {SCHEMA}.intent_log WHERE client_id = ANY(%s)",
                (client_ids,),
            ):
                stored.setdefault((client_id, seq), []).append((status, code))
            entities = dict(
                conn.execute(f"SELECT id, state FROM {SCHEMA}.entities WHERE id = ANY(%s)", (entity_ids,)).fetchall()
            )
        return stored, entities

    def _replay(self) -> dict[str, Any]:
        try:
            result = subprocess.run(
                [sys.executable, str(REPLAY), "--dsn", self.engine.dsn],
                capture_output=True,
                text=True,
                timeout=REPLAY_TIMEOUT_S,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            return _check(False, f"tools/replay did not finish within {REPLAY_TIMEOUT_S:g}s")
        tail = (result.stdout + result.stderr).strip().splitlines()[-5:]
        return _check(result.returncode == 0, f"exit {result.returncode}: {' | '.join(tail)}")

    def _cleanup(self) -> None:
        """Whatever happened: no client running, nothing left SIGSTOPped."""
        self.sending.clear()
        self.stop_clients.set()
        for proc in list(self.stopped):
            try:
                proc.send_signal(signal.SIGCONT)
            except psutil.Error:
                pass
        for client in self.clients:
            client.join(10)

    def _final_checks(self, shm_before: set[str]) -> dict[str, Any]:
        checks: dict[str, dict[str, Any]] = {}
        engine = self.engine
        code = engine.stop() if engine is not None else None
        checks["engine_exit_clean"] = _check(code == 0, f"final SIGTERM: exit code {code}")
        left = []
        for eng in self.engines:
            left += eng.tracker.wait_gone(TREE_GONE_TIMEOUT_S)
        pgdata = str(self.data_dir / "pg")
        for proc in psutil.process_iter():
            # A postmaster of our data dir that was never seen in a tree.
            if proc.pid != os.getpid() and _alive(proc) and pgdata in _title(proc).split():
                left.append(proc)
        checks["no_processes_left"] = _check(not left, f"still running: {[_describe(p) for p in left]}")
        if left:
            ProcTracker.kill(p for eng in self.engines for p in eng.tracker.alive())
        checks["no_socket_left"] = _check(not self.socket_path.exists(), f"{self.socket_path} exists")
        ours = {pid for eng in self.engines for pid in eng.tracker.pids()}
        new_shm = sorted(name for name in _shm_entries() - shm_before if not _held_by_others(name, ours))
        checks["no_new_dev_shm"] = _check(not new_shm, f"new in /dev/shm: {new_shm}")
        return {"exit_checks": checks, "engine_exit_code": code}

    def _finish(self, report: dict[str, Any]) -> dict[str, Any]:
        checks = {**report.pop("checks", {}), **report.pop("exit_checks", {})}
        unresumed = [f"fault #{f.n} {f.kind}" for f in self.faults if not f.skipped and f.resume_s is None]
        checks["faults_recovered"] = _check(not self.failures, "; ".join(self.failures))
        checks["faults_resumed"] = _check(not unresumed, f"no committed reply after: {unresumed}")
        counts = report.pop("counts", {})
        ok = all(c["ok"] for c in checks.values()) and all(
            counts.get(k) == 0 for k in ("lost", "duplicated", "mismatched")
        )
        by_kind = {}
        for kind in self.cfg.kinds:
            mine = [f for f in self.faults if f.kind == kind]
            times = [f.resume_s for f in mine if f.resume_s is not None]
            by_kind[kind] = {
                "kills": sum(1 for f in mine if not f.skipped),
                "skipped": sum(1 for f in mine if f.skipped),
                "failed": sum(1 for f in mine if f.failure),
                "resumed": len(times),
                "resume_median_s": round(statistics.median(times), 4) if times else None,
                "resume_max_s": round(max(times), 4) if times else None,
            }
        out = {
            "ok": ok,
            "run_id": self.run_id,
            "seed": self.seed,
            "duration_s": round(self._elapsed(), 2),
            "data_dir": str(self.data_dir),
            "engine_log": str(self.log_path),
            "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self.cfg).items()},
            "kills_requested": self.cfg.kills,
            "kills_done": sum(1 for f in self.faults if not f.skipped),
            "engine_starts": len(self.engines),
            **counts,
            "by_kind": by_kind,
            "faults": [f.as_dict() for f in self.faults],
            "failures": self.failures,
            "checks": checks,
            **report,
        }
        if ok and self.own_dir and not self.cfg.keep_data:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            out["data_dir_removed"] = True
        return out


class RunAborted(Exception):
    """The run cannot go on (the engine would not restart)."""


def _check(ok: bool, detail: str) -> dict[str, Any]:
    return {"ok": bool(ok), "detail": "" if ok else detail}


def _pos(state: Any) -> tuple[int, int] | None:
    if isinstance(state, str):
        state = json.loads(state)
    pos = state.get("pos") if isinstance(state, dict) else None
    if not isinstance(pos, dict):
        return None
    return (pos.get("x"), pos.get("y"))


def _db_ok(dsn: str | None) -> bool:
    if not dsn:
        return False
    try:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=2, application_name="batchscheduler chaos") as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.Error:
        return False


def _held_by_others(name: str, ours: set[int]) -> bool:
    """Whether a live process that is not this engine's has /dev/shm/``name``
    open or mapped: another program's segment, not a leak of ours (the box
    may be running other tests)."""
    path = f"/dev/shm/{name}"
    for pid in psutil.pids():
        if pid in ours or pid == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as maps:
                if path in maps.read():
                    return True
            fds = f"/proc/{pid}/fd"
            if any(os.readlink(os.path.join(fds, fd)).startswith(path) for fd in os.listdir(fds)):
                return True
        except OSError:
            continue
    return False


def _shm_entries() -> set[str]:
    try:
        return set(os.listdir("/dev/shm"))
    except FileNotFoundError:
        return set()


# -------------------------------------------------------------------- output
def table(report: dict[str, Any]) -> str:
    """The summary a person reads."""
    from .bench.report import table as render

    def fmt(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f} s"

    rows = [
        [kind, k["kills"], k["skipped"], k["failed"], k["resumed"], fmt(k["resume_median_s"]), fmt(k["resume_max_s"])]
        for kind, k in report["by_kind"].items()
    ]
    lines = [
        f"chaos run {report['run_id']} (seed {report['seed']}): {report['config']['clients']} clients, "
        f"{report['kills_done']}/{report['kills_requested']} faults, {report['duration_s']:.1f} s, "
        f"engine starts {report['engine_starts']}",
        "",
        render(["fault kind", "kills", "skipped", "failed", "resumed", "resume median", "resume max"], rows),
        "",
    ]
    counts = [
        ("intents sent", report.get("intents_sent")),
        ("  sends incl. resends", report.get("sends")),
        ("  busy replies (resent)", report.get("busy_replies")),
        ("  connections (incl. reconnects)", report.get("connects")),
        ("committed", report.get("committed")),
        ("dead_lettered", report.get("dead_lettered")),
        ("rejected", report.get("rejected")),
        ("unanswered", report.get("unanswered")),
        ("lost", report.get("lost")),
        ("duplicated", report.get("duplicated")),
        ("mismatched replies", report.get("mismatched")),
    ]
    lines.append(render(["ledger", "count"], [[k, "-" if v is None else v] for k, v in counts]))
    lines.append("")
    lines.append(
        render(
            ["check", "result", "detail"],
            [[name, "PASS" if c["ok"] else "FAIL", c["detail"][:160]] for name, c in report["checks"].items()],
            align="llr",
        )
    )
    lines.append("")
    if report.get("failures"):
        lines.append("failures: " + "; ".join(report["failures"]))
    lines.append(f"result: {'PASS' if report['ok'] else 'FAIL'}")
    if not report.get("data_dir_removed"):
        lines.append(f"data dir kept: {report['data_dir']} (engine log {report['engine_log']})")
    return "\n".join(lines)


def run(cfg: Config) -> dict[str, Any]:
    """One chaos run; raises UsageError when it could not run."""
    return Chaos(cfg).run()
