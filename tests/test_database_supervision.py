"""The supervisor owns the data directory and the embedded PostgreSQL:
a killed postmaster comes back, a second engine on the same directory is
refused (DESIGN.md § Processes, contracts 1 and 9)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading

import psutil
import pytest
from conftest import RUN_ENGINE, query, wait_for

from engine.client import control as client_control

pytestmark = pytest.mark.slow


def control(engine, op: str) -> dict:
    return client_control(engine.socket, op, timeout=10)


def postmaster(engine) -> psutil.Process:
    supervisor = psutil.Process(engine.proc.pid)
    found = [p for p in supervisor.children() if p.name() == "postgres"]
    assert len(found) == 1, found
    return found[0]


class Sender:
    """One JSON-lines connection; every reply kept by seq."""

    def __init__(self, engine, client_id: str) -> None:
        self.client_id = client_id
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(str(engine.socket))
        self.replies: dict[int, dict] = {}
        self.sent = 0
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def send(self, entity: str, kind: str, args: dict) -> int:
        self.sent += 1
        line = {"client_id": self.client_id, "seq": self.sent, "entity": entity, "kind": kind, "args": args}
        self.sock.sendall(json.dumps(line).encode() + b"\n")
        return self.sent

    def _read(self) -> None:
        buf = b""
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            buf += data
            *lines, buf = buf.split(b"\n")
            with self._cond:
                for line in lines:
                    reply = json.loads(line)
                    self.replies[reply["seq"]] = reply
                self._cond.notify_all()

    def wait_all(self, timeout: float) -> None:
        wait_for(lambda: len(self.replies) == self.sent, timeout, f"{self.sent} replies ({len(self.replies)} so far)")

    def close(self) -> None:
        self.sock.close()


def test_a_killed_postmaster_is_restarted_and_everything_in_the_rings_commits(engine_factory):
    engine = engine_factory("--breaker-recovery-timeout-s", "0.5", "--breaker-failure-threshold", "1", use_dsn=False)
    client = Sender(engine, "pg-kill")
    client.send("hero", "spawn", {"state": {"pos": {"x": 0, "y": 0}}})
    client.wait_all(20)
    old = postmaster(engine)
    flusher = engine.worker("flusher 0")
    # Intents that are in the ring when the database dies.
    flusher.send_signal(signal.SIGSTOP)
    try:
        for _ in range(200):
            client.send("hero", "move", {"dx": 1, "dy": 0})
        wait_for(lambda: control(engine, "metrics")["ingests"][0]["received"] >= 201, 20, "intents in the ring")
        old.kill()
        old.wait(10)
    finally:
        flusher.send_signal(signal.SIGCONT)
    wait_for(lambda: control(engine, "health")["database"] != "up", 20, "health to show the database down")
    try:
        health = wait_for(lambda: (h := control(engine, "health"))["database"] == "up" and h, 60, "recovery")
    except AssertionError:
        raise AssertionError(f"{control(engine, 'health')}\n{engine.log()[-3000:]}") from None
    assert health["database_restarts"] == 1
    assert postmaster(engine).pid != old.pid
    client.wait_all(60)
    # Every intent that was in the ring is answered, with what is stored.
    assert {r["status"] for r in client.replies.values()} == {"committed"}
    # The breaker's half-open test batches pass: healthy again.
    for _ in range(3):
        seq = client.send("hero", "move", {"dx": 1, "dy": 0})
        client.wait_all(20)
        assert client.replies[seq]["status"] == "committed"
    assert control(engine, "health")["is_healthy"]
    client.close()
    (state,) = query(engine.dsn, "SELECT state FROM batchscheduler.entities WHERE id = 'hero'")[0]
    assert state["pos"]["x"] == 203
    assert "restarting in" in engine.log()


def run_engine(tmp, name: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(RUN_ENGINE), "--data-dir", str(tmp / "shared"), "--socket", str(tmp / name), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_a_second_engine_on_the_same_data_directory_is_refused_naming_the_first(engine_factory, short_tmp, dsn):
    first = engine_factory(use_dsn=False)
    pg_before = postmaster(first).pid
    second = subprocess.run(
        [
            sys.executable,
            str(RUN_ENGINE),
            "--data-dir",
            str(short_tmp / "var"),
            "--socket",
            str(short_tmp / "other.sock"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert second.returncode != 0
    assert f"in use by another engine (pid {first.proc.pid}" in second.stderr
    assert not (short_tmp / "other.sock").exists()
    # The first engine and its database are untouched.
    assert postmaster(first).pid == pg_before
    assert control(first, "health")["is_healthy"]


def test_the_lock_is_released_when_the_engine_exits(engine_factory, short_tmp):
    first = engine_factory(use_dsn=False)
    assert first.stop() == 0
    again = engine_factory(use_dsn=False)
    assert control(again, "ping")["status"] == "ok"


def test_a_symlink_as_the_lock_file_is_not_followed(short_tmp):
    data = short_tmp / "var"
    data.mkdir()
    target = short_tmp / "elsewhere"
    os.symlink(target, data / "engine.lock")
    proc = subprocess.run(
        [sys.executable, str(RUN_ENGINE), "--data-dir", str(data), "--socket", str(short_tmp / "s.sock")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "lock file" in proc.stderr
    assert not target.exists()


def test_an_external_database_that_goes_away_is_retried_and_reported(engine_factory, short_tmp):
    from persistence.embedded import EmbeddedPostgres

    external = EmbeddedPostgres(short_tmp / "external")
    dsn = external.start()
    try:
        engine = engine_factory("--dsn", dsn, "--breaker-recovery-timeout-s", "0.5", use_dsn=False)
        client = Sender(engine, "ext")
        client.send("hero", "spawn", {"state": {}})
        client.wait_all(20)
        external.stop()
        wait_for(lambda: control(engine, "health")["database"] == "down", 30, "health to show the database down")
        assert not control(engine, "health")["is_healthy"]
        external.start()
        wait_for(lambda: control(engine, "health")["database"] == "up", 60, "the flusher to reconnect")
        seq = client.send("hero", "move", {"dx": 1, "dy": 0})
        client.wait_all(30)
        assert client.replies[seq]["status"] in ("committed", "busy")
        client.close()
        assert "database write failed" in engine.log() or "database unavailable" in engine.log()
        assert engine.stop() == 0
    finally:
        external.stop()
