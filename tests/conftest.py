"""Shared fixtures: a real PostgreSQL, real engine processes, leak checks.

One embedded PostgreSQL serves the whole session (or the server named by
``BATCHSCHEDULER_TEST_DSN``); every test that needs a database gets a fresh
one, so tests never see each other's rows. ``engine`` starts
``tools/run_engine`` as a real process tree and, at teardown, stops it with
SIGTERM and checks it exited 0 and left no process, socket or shm segment.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import psutil
import psycopg
import pytest

ROOT = Path(__file__).resolve().parent.parent
RUN_ENGINE = ROOT / "tools" / "run_engine"
sys.path.insert(0, str(ROOT))

from engine.options import Options  # noqa: E402
from persistence.embedded import EmbeddedPostgres  # noqa: E402


def wait_for(predicate, timeout: float = 10.0, what: str = "condition"):
    """Poll ``predicate`` with a short backoff until truthy or the deadline."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def _shm_entries() -> set[str]:
    try:
        return set(os.listdir("/dev/shm"))
    except FileNotFoundError:  # pragma: no cover
        return set()


@pytest.fixture(autouse=True)
def no_leaks():
    """Every test: no new /dev/shm segment, no child process left behind."""
    before_shm = _shm_entries()
    me = psutil.Process()
    before_children = {p.pid for p in me.children(recursive=True)}
    yield

    def alive(proc: psutil.Process) -> bool:
        try:
            return proc.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:  # exited between listing and looking
            return False

    def leftovers() -> list[psutil.Process]:
        # Backends of the session's own PostgreSQL come and go with
        # connections; they are that server's business, not a leak.
        return [
            p
            for p in me.children(recursive=True)
            if p.pid not in before_children and p.ppid() not in before_children and alive(p)
        ]

    def settled():
        try:
            return not leftovers()
        except psutil.NoSuchProcess:
            return False

    try:
        wait_for(settled, 10, "child processes to exit")
    except AssertionError:
        raise AssertionError(f"processes left behind: {[(p.pid, p.name()) for p in leftovers()]}") from None
    assert _shm_entries() <= before_shm, f"leaked /dev/shm entries: {_shm_entries() - before_shm}"


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory):
    """DSN of the session's PostgreSQL server (embedded unless overridden)."""
    external = os.environ.get("BATCHSCHEDULER_TEST_DSN")
    if external:
        yield external
        return
    base = Path(tempfile.mkdtemp(prefix="bs-test-"))
    server = EmbeddedPostgres(base / "pg")
    dsn = server.start()
    try:
        yield dsn
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def dsn(pg_server):
    """A fresh, empty database on the session server; dropped afterwards."""
    name = "t_" + uuid.uuid4().hex[:12]
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    parts = psycopg.conninfo.conninfo_to_dict(pg_server)
    parts["dbname"] = name
    yield psycopg.conninfo.make_conninfo(**parts)
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def short_tmp():
    """A temp dir with a short path (Unix socket paths must stay < 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="bs-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Engine:
    """A running ``tools/run_engine`` process tree."""

    def __init__(self, proc: subprocess.Popen, socket_path: Path, dsn: str, log_path: Path) -> None:
        self.proc = proc
        self.socket = socket_path
        self.dsn = dsn
        self.log_path = log_path
        self.stdout_lines: list[str] = []
        self.lanes = 1
        self.pump: threading.Thread | None = None

    def workers(self) -> dict[str, psutil.Process]:
        found = {}
        for child in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                title = " ".join(child.cmdline())
            except psutil.Error:
                continue
            match = re.match(r"batchscheduler: (flusher \d+|ingest \d+)", title)
            if match:
                found[match.group(1)] = child
        return found

    def roles(self) -> set[str]:
        """Every worker this engine runs: one flusher per lane, one ingest here."""
        return {f"flusher {lane}" for lane in range(self.lanes)} | {"ingest 0"}

    def worker(self, role: str, timeout: float = 15.0) -> psutil.Process:
        return wait_for(lambda: self.workers().get(role), timeout, f"worker {role}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig=signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"engine did not stop within {timeout}s:\n{self.log()[-3000:]}") from None
        finally:
            self.close_pipes()

    def close_pipes(self) -> None:
        if self.pump is not None:
            self.pump.join(5)
        if self.proc.stdout is not None and not self.proc.stdout.closed:
            self.proc.stdout.close()


def start_engine(
    tmp: Path, dsn: str | None, *args: str, env: dict | None = None, timeout: float = 60.0, name: str = "e"
) -> Engine:
    sock = tmp / f"{name}.sock"
    log_path = tmp / f"{name}.log"
    # Any free port: several engines (and the developer's own) may run at once.
    metrics = [] if "--metrics-addr" in args else ["--metrics-addr", "127.0.0.1:0"]
    cmd = [sys.executable, str(RUN_ENGINE), "--socket", str(sock), "--data-dir", str(tmp / "var"), *metrics, *args]
    if dsn:
        cmd += ["--dsn", dsn]
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHSCHEDULER_")}
    full_env.update(env or {})
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=full_env)
    engine = Engine(proc, sock, dsn or "", log_path)
    engine.lanes = int(args[args.index("--lanes") + 1]) if "--lanes" in args else Options().lanes
    ready = threading.Event()

    def pump():
        for line in proc.stdout:
            engine.stdout_lines.append(line.rstrip("\n"))
            if line.startswith("ready"):
                ready.set()
        ready.set()

    engine.pump = threading.Thread(target=pump, daemon=True)
    engine.pump.start()
    if not ready.wait(timeout) or proc.poll() is not None:
        proc.kill()
        proc.wait()
        raise AssertionError(f"engine did not become ready:\n{log_path.read_text()[-4000:]}")
    for line in engine.stdout_lines:
        if line.startswith("dsn: "):
            engine.dsn = dsn or line[5:]
    return engine


@pytest.fixture
def engine_factory(short_tmp, dsn):
    """Start engines with extra flags; all are stopped (and checked) at teardown."""
    started: list[Engine] = []

    def factory(*args: str, env: dict | None = None, use_dsn: bool = True) -> Engine:
        eng = start_engine(short_tmp, dsn if use_dsn else None, *args, env=env, name=f"e{len(started)}")
        started.append(eng)
        return eng

    yield factory
    codes = [eng.stop() for eng in started]
    for eng, code in zip(started, codes):
        assert code == 0, f"engine exited {code}:\n{eng.log()[-3000:]}"
        assert not eng.socket.exists(), "socket file left behind"


@pytest.fixture
def engine(engine_factory):
    return engine_factory()


def query(dsn: str, sql: str, params=None) -> list[tuple]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(sql, params).fetchall()


def execute(dsn: str, sql: str, params=None) -> None:
    """Run a statement that returns no rows (DDL, TRUNCATE, UPDATE)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql, params)
