"""Schema migrations and the embedded server's ownership rules."""

from __future__ import annotations

import stat
import subprocess
import sys
import threading

import psycopg
from conftest import RUN_ENGINE, query

from persistence import migrations


def test_migrations_apply_once_and_a_second_start_is_a_no_op(dsn):
    first = migrations.migrate(dsn)
    assert first == [v for v, _, _ in migrations.available()]
    assert migrations.migrate(dsn) == []
    tables = {
        t
        for (t,) in query(dsn, "SELECT table_name FROM information_schema.tables WHERE table_schema = 'batchscheduler'")
    }
    assert {"intent_log", "entities", "batches", "dead_letters", "schema_migrations"} <= tables


def test_concurrent_starts_serialise_on_the_advisory_lock(dsn):
    results, errors = [], []

    def run():
        try:
            results.append(migrations.migrate(dsn))
        except psycopg.Error as exc:  # pragma: no cover - the failure this test guards against
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert sorted(len(r) for r in results) == [0, 0, 0, len(migrations.available())]


def test_unique_intent_key_is_enforced_by_the_database(dsn):
    migrations.migrate(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        insert = (
            "INSERT INTO batchscheduler.intent_log (client_id, seq, entity, kind, args, status, batch_id, "
            "batch_ord, received_at) VALUES ('c', 1, 'e', 'k', '{}', 'committed', 1, 1, now())"
        )
        conn.execute(insert)
        try:
            conn.execute(insert)
        except psycopg.errors.UniqueViolation:
            pass
        else:
            raise AssertionError("a second (client_id, seq) row was accepted")


def test_socket_is_private_by_default(engine):
    assert stat.S_IMODE(engine.socket.stat().st_mode) == 0o600


def test_second_engine_on_the_same_socket_refuses_to_start(engine, dsn):
    proc = subprocess.run(
        [sys.executable, str(RUN_ENGINE), "--socket", str(engine.socket), "--dsn", dsn],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "another engine is already listening" in proc.stderr
    assert engine.socket.exists()  # the running engine's socket is untouched
