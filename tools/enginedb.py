"""An engine's database for the tools that read it: ``--dsn`` or ``--data-dir``.

``--dsn`` is any engine's database, running or not (the ``dsn:`` line
``tools/run_engine`` prints). ``--data-dir`` is an engine's data directory
and its embedded PostgreSQL (``<data_dir>/pg``):

- stopped engine: ``stopped_engine_database`` takes the directory's
  ``engine.lock`` (so no engine starts meanwhile), starts the embedded
  server for the block and stops it after;
- running engine (it holds the lock): ``running_engine_dsn`` reads where its
  server listens from ``postmaster.pid``. ``tools/replay`` refuses this
  case (it compares a quiet database); ``tools/dead_letters`` uses it.

Failures raise ``NoDatabase`` with a sentence for the user (the tools exit 2).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import psycopg

from engine import datadir

# postmaster.pid lines (PostgreSQL's LOCK_FILE_LINE_*), 0-based.
_PIDFILE_PORT, _PIDFILE_SOCKET_DIR = 3, 4


class NoDatabase(Exception):
    """The engine's database cannot be reached; the message says why."""


class EngineRunning(NoDatabase):
    """An engine holds the data directory's lock; ``pid`` is its supervisor's."""

    def __init__(self, message: str, pid: str) -> None:
        super().__init__(message)
        self.pid = pid


def _pgdata(data_dir: str | os.PathLike) -> tuple[Path, Path]:
    data = Path(data_dir).resolve()
    pgdata = data / "pg"
    if not (pgdata / "PG_VERSION").is_file():
        raise NoDatabase(f"no embedded engine database in {data} (no {pgdata}/PG_VERSION)")
    return data, pgdata


def describe(exc: psycopg.Error) -> str:
    """A database failure as the one sentence a tool prints before exit 2."""
    text = str(exc).strip()
    if isinstance(exc, psycopg.errors.UndefinedTable):
        return f"not an engine's database (no batchscheduler tables): {text}"
    if isinstance(exc, psycopg.OperationalError):
        return f"cannot reach the database: {text}"
    return f"database error: {text}"


@contextlib.contextmanager
def _data_dir_lock(data: Path) -> Iterator[None]:
    """Hold ``<data>/engine.lock`` for the block; EngineRunning when an engine holds it."""
    try:
        fd = datadir.lock(data)
    except datadir.Busy as busy:
        raise EngineRunning(
            f"an engine is running on {data} ({busy}): use the 'dsn:' line it printed (--dsn), or stop it first",
            busy.holder,
        ) from None
    except OSError as exc:
        raise NoDatabase(f"cannot open {data / datadir.LOCK_FILE}: {exc.strerror}") from None
    try:
        yield
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def stopped_engine_database(data_dir: str | os.PathLike) -> Iterator[str]:
    """The DSN of a stopped engine's embedded PostgreSQL, started for the
    block and stopped after it. The data directory's ``engine.lock`` is held
    throughout, so no engine starts on it meanwhile; a live engine holds it
    already, and then this raises EngineRunning."""
    from engine.errors import StartupError
    from persistence.embedded import EmbeddedPostgres

    data, pgdata = _pgdata(data_dir)
    with _data_dir_lock(data):
        pg = EmbeddedPostgres(pgdata)
        try:
            try:
                dsn = pg.start()
            except StartupError as exc:
                raise NoDatabase(f"cannot start the embedded PostgreSQL in {pgdata}: {exc}") from None
            yield dsn
        finally:
            pg.stop()


def running_engine_dsn(data_dir: str | os.PathLike, engine_pid: str = "unknown") -> str:
    """The DSN of the embedded PostgreSQL a running engine serves from
    ``<data_dir>/pg``, from the socket directory and port its
    ``postmaster.pid`` records. NoDatabase when there is none (an engine
    started with ``--dsn``, or its server restarting)."""
    from persistence.embedded import DATABASE, PG_USER

    data, pgdata = _pgdata(data_dir)
    try:
        lines = (pgdata / "postmaster.pid").read_text().splitlines()
        port, sockdir = int(lines[_PIDFILE_PORT]), lines[_PIDFILE_SOCKET_DIR].strip()
    except (OSError, IndexError, ValueError):
        raise NoDatabase(
            f"an engine is running on {data} (pid {engine_pid}) but its embedded PostgreSQL is not (an engine "
            f"started with --dsn, or its server restarting): pass the 'dsn:' line it printed (--dsn)"
        ) from None
    if not sockdir:
        raise NoDatabase(f"the embedded PostgreSQL in {pgdata} listens on no Unix socket: pass --dsn")
    from psycopg.conninfo import make_conninfo

    return make_conninfo(host=sockdir, port=port, user=PG_USER, dbname=DATABASE)


@contextlib.contextmanager
def engine_database(data_dir: str | os.PathLike) -> Iterator[str]:
    """The DSN of the engine database in ``data_dir``, whether its engine
    runs (its live server) or not (started for the block, as
    ``stopped_engine_database``)."""
    with contextlib.ExitStack() as stack:
        try:
            dsn = stack.enter_context(stopped_engine_database(data_dir))
        except EngineRunning as running:
            dsn = running_engine_dsn(data_dir, running.pid)
        yield dsn
