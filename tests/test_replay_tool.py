"""``tools/replay``'s exit status says what happened: 0 identical, 1 differs,
2 could not compare. ``--data-dir`` replays a stopped engine's embedded
database (and refuses a running engine's); ``--json`` writes the report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import psycopg
from conftest import ROOT

from engine.client import Client
from persistence.embedded import EmbeddedPostgres

REPLAY = ROOT / "tools" / "replay"


def replay(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHSCHEDULER_")}
    return subprocess.run([sys.executable, str(REPLAY), *args], capture_output=True, text=True, timeout=120, env=env)


def servers_on(pgdata: Path) -> list[psutil.Process]:
    """PostgreSQL processes serving ``pgdata``."""
    found = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        cmd = proc.info["cmdline"] or []
        if proc.info["name"] == "postgres" and "-D" in cmd and Path(cmd[cmd.index("-D") + 1]) == pgdata:
            found.append(proc)
    return found


def play(engine) -> None:
    with Client(engine.socket, client_id="replayed", first_seq=1, timeout=60) as client:
        intents = [client.intent(f"hero{i}", "spawn", {"state": {"hp": 10}}) for i in range(5)]
        intents += [client.intent(f"hero{i % 5}", "move", {"dx": 1, "dy": i}) for i in range(40)]
        intents.append(client.intent("ghost", "move", {"dx": 1, "dy": 0}))  # a dead letter
        client.submit_many(intents)


def test_exit_codes_json_and_data_dir(engine_factory, short_tmp):
    eng = engine_factory(use_dsn=False)  # embedded PostgreSQL in short_tmp/var/pg
    data_dir = short_tmp / "var"
    pgdata = (data_dir / "pg").resolve()
    play(eng)
    report = short_tmp / "replay.json"

    # 0: identical, through the running engine's dsn: line; the table and the JSON.
    proc = replay("--dsn", eng.dsn, "--json", str(report))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "intents in log: 46, applied: 45, entities rebuilt: 5" in proc.stdout
    header = next(line for line in proc.stdout.splitlines() if line.startswith("check"))
    assert header.split() == ["check", "live", "replayed", "differing"]
    assert proc.stdout.rstrip().endswith("identical")
    doc = json.loads(report.read_text())
    assert doc["identical"] is True and doc["source"] == {"dsn": eng.dsn}
    assert (doc["intents"], doc["applied"], doc["entities_live"], doc["entities_replayed"]) == (46, 45, 5, 5)
    assert doc["differences"] == [] and doc["entities_differing"] == 0

    # 2: the data directory of a running engine is refused (its lock is held).
    proc = replay("--data-dir", str(data_dir))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "engine is running" in proc.stderr and f"pid {eng.proc.pid}" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert eng.proc.poll() is None  # and left alone

    assert eng.stop() == 0

    # 0: the stopped engine's database, started for the replay and stopped after.
    proc = replay("--data-dir", str(data_dir), "--json", str(report))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "identical" in proc.stdout
    doc = json.loads(report.read_text())
    assert doc["identical"] is True and doc["source"] == {"data_dir": str(data_dir.resolve())}
    assert servers_on(pgdata) == [] and not (pgdata / "postmaster.pid").exists()

    # 1: differs (a tampered live table), also through --data-dir.
    with EmbeddedPostgres(pgdata) as pg, psycopg.connect(pg.dsn, autocommit=True) as conn:
        conn.execute("UPDATE batchscheduler.entities SET state = state || '{\"hp\": 999}' WHERE id = 'hero3'")
    proc = replay("--data-dir", str(data_dir), "--json", str(report))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "entity hero3" in proc.stdout and "999" in proc.stdout
    assert "DIFFERENT: 1 entities, 0 outcomes" in proc.stdout
    doc = json.loads(report.read_text())
    assert doc["identical"] is False and doc["entities_differing"] == 1
    assert doc["differences"][0]["entity"] == "hero3"
    assert servers_on(pgdata) == []


def test_unreachable_database_is_could_not_compare_not_a_diff(short_tmp):
    report = short_tmp / "replay.json"
    proc = replay("--dsn", f"host={short_tmp}/nothing dbname=x", "--json", str(report))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "could not compare" in proc.stderr and "Traceback" not in proc.stderr
    assert "DIFFERENT" not in proc.stdout
    doc = json.loads(report.read_text())
    assert doc["identical"] is None and "cannot reach the database" in doc["error"]


def test_a_database_without_the_engine_schema_is_could_not_compare(dsn):
    proc = replay("--dsn", dsn)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "not an engine's database" in proc.stderr and "Traceback" not in proc.stderr


def test_a_directory_without_an_engine_database_is_could_not_compare(short_tmp):
    proc = replay("--data-dir", str(short_tmp))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no embedded engine database" in proc.stderr
    assert not (short_tmp / "engine.lock").exists()  # nothing created there
