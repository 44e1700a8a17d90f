"""The embedded PostgreSQL and its ``postmaster.pid``: never signal a PID
that is not verified to be ours (DESIGN contract 9).

A stale file naming an unrelated process (a real ``sleep``, a postgres of
another data directory) must leave that process alive, with a warning; a
live server of another engine must make a second start refuse, not stop it;
a verified orphan (its engine is gone) is still stopped and replaced.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import time
from pathlib import Path

import psutil
import psycopg
import pytest
from conftest import wait_for

from engine.client import Client
from engine.errors import StartupError
from engine.intent import COMMITTED
from persistence import embedded
from persistence.embedded import EmbeddedPostgres

pytestmark = pytest.mark.skipif(
    bool(os.environ.get("BATCHSCHEDULER_TEST_DSN")), reason="the embedded PostgreSQL is what is tested"
)


def pgdata_of(tmp: Path) -> Path:
    """Where ``tools/run_engine --data-dir tmp/var`` keeps PostgreSQL."""
    return tmp / "var" / "pg"


def initialise(pgdata: Path) -> None:
    """Create the cluster (initdb) and leave it stopped."""
    server = EmbeddedPostgres(pgdata)
    server.start()
    server.stop()
    assert not (pgdata / "postmaster.pid").exists()


def write_pidfile(pgdata: Path, pid: int, started: float | None = None) -> None:
    """A postmaster.pid as PostgreSQL writes it: PID, data directory, start
    time (epoch seconds), port, socket directory, listen address."""
    started = int(time.time() if started is None else started)
    (pgdata / "postmaster.pid").write_text(f"{pid}\n{pgdata.resolve()}\n{started}\n5432\n{pgdata.resolve()}\n\n")


def running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def postmaster_of(pgdata: Path) -> psutil.Process:
    pid = int((pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
    return psutil.Process(pid)


def server_user() -> dict:
    """Popen arguments that run a process as the embedded server's user."""
    if os.geteuid() != 0:
        return {}  # the server runs as we do
    entry = pwd.getpwnam(embedded.SYSTEM_USER)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


def session_postmaster_pid(pg_server: str) -> int:
    """PID of the session server's postmaster: a postgres, of another data directory."""
    with psycopg.connect(pg_server, autocommit=True) as conn:
        backend = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        return psutil.Process(backend).ppid()


@pytest.mark.parametrize("victim", ["sleep", "sleep_as_server_user", "postgres_of_another_data_dir"])
def test_stale_pidfile_naming_an_unrelated_process_leaves_it_alive_with_a_warning(
    engine_factory, short_tmp, pg_server, victim
):
    pgdata = pgdata_of(short_tmp)
    initialise(pgdata)
    if victim == "sleep_as_server_user" and os.geteuid() != 0:
        pytest.skip("not root: the plain sleep already runs as the server's user")
    sleep = None
    if victim == "postgres_of_another_data_dir":
        target = psutil.Process(session_postmaster_pid(pg_server))
        expected = "serving data directory"
    else:
        # As the server's user, kill(pid, 0) from PostgreSQL succeeds, so it
        # would refuse to start over the file: the engine must remove it.
        sleep = subprocess.Popen(["sleep", "300"], **(server_user() if victim == "sleep_as_server_user" else {}))
        target = psutil.Process(sleep.pid)
        expected = "'sleep'"
    try:
        write_pidfile(pgdata, target.pid)
        eng = engine_factory(use_dsn=False)  # a real engine start on that data directory
        with Client(eng.socket, client_id="after-stale", first_seq=1) as client:
            assert client.submit(client.intent("survivor", "spawn", {})).status == COMMITTED
        assert running(target), f"{victim} (pid {target.pid}) was killed by the engine start"
        log = eng.log()
        assert "[WARNING]" in log and f"PID {target.pid} is not the PostgreSQL of this data directory" in log, log
        assert expected in log, log
        assert postmaster_of(pgdata).pid != target.pid  # the engine runs its own server
        assert eng.stop() == 0
        assert running(target)
    finally:
        if sleep is not None:
            sleep.kill()
            sleep.wait()


def test_second_start_on_a_live_engines_data_dir_refuses_and_leaves_its_server_running(engine_factory, short_tmp):
    eng = engine_factory(use_dsn=False)
    pgdata = pgdata_of(short_tmp)
    postmaster = postmaster_of(pgdata)
    born = postmaster.create_time()
    assert postmaster.ppid() == eng.proc.pid  # the supervisor's child

    with pytest.raises(StartupError, match="another engine owns this data directory") as refused:
        EmbeddedPostgres(pgdata).start()
    assert f"pid {eng.proc.pid}" in str(refused.value)

    assert running(postmaster) and postmaster.create_time() == born
    with Client(eng.socket, client_id="still-served", first_seq=1) as client:
        assert client.submit(client.intent("keep", "spawn", {})).status == COMMITTED
    # The same live server with a start time that is not the file's (a
    # reused PID) is not recognised as the file's postmaster.
    started = int((pgdata / "postmaster.pid").read_text().split("\n")[2])
    proc, what, here = EmbeddedPostgres(pgdata)._identify(postmaster.pid, started - 3600)
    assert proc is None and here and "not the process that wrote it" in what
    assert eng.stop() == 0


def test_verified_orphan_server_of_this_data_dir_is_stopped_and_replaced(short_tmp, caplog):
    """A server whose engine is gone (reparented away from any live engine)
    is still stopped: that path is kept, behind the verification."""
    pgdata = short_tmp / "pg"
    initialise(pgdata)
    sockdir = short_tmp / "orphan-sock"
    sockdir.mkdir()
    if os.geteuid() == 0:
        shutil.chown(sockdir, embedded.SYSTEM_USER, embedded.SYSTEM_USER)
    postgres = str(embedded.bin_dir() / "postgres")
    # setsid -f forks and its parent exits at once: the server is nobody's child.
    subprocess.run(
        ["setsid", "-f", postgres, "-D", str(pgdata), "-k", str(sockdir), "-c", "listen_addresses="],
        check=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        **server_user(),
    )

    def ready():
        try:
            lines = (pgdata / "postmaster.pid").read_text().split("\n")
        except FileNotFoundError:
            return None
        return len(lines) > 7 and lines[7].strip() == "ready" and int(lines[0])

    orphan = psutil.Process(wait_for(ready, 30, "the orphan server to be ready"))
    try:
        assert orphan.ppid() not in (os.getpid(), *[c.pid for c in psutil.Process().children()])
        server = EmbeddedPostgres(pgdata)
        with caplog.at_level("WARNING", logger="persistence.embedded"):
            server.start()
        try:
            assert not running(orphan)
            assert server.pid != orphan.pid and postmaster_of(pgdata).pid == server.pid
            assert any("left running" in r.getMessage() for r in caplog.records)
        finally:
            server.stop()
    finally:
        if running(orphan):  # only after a failed assertion above
            orphan.kill()
