"""Versioned schema migrations, applied at start under an advisory lock.

Each ``sql/NNNN_name.sql`` file is one migration, applied once, in order, in
its own transaction together with its row in ``schema_migrations``. Two
engines starting on one database serialise on the advisory lock; the second
finds everything applied and does nothing.
"""

from __future__ import annotations

import logging
import re
from importlib import resources

import psycopg

log = logging.getLogger(__name__)

# Arbitrary but fixed: "BSMIGRAT" as an int64, so no other application's
# advisory lock collides with ours by accident.
LOCK_KEY = 0x42534D4947524154
SCHEMA = "batchscheduler"
_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


def available() -> list[tuple[int, str, str]]:
    """(version, name, sql) of every shipped migration, in version order."""
    found = []
    for entry in resources.files("persistence").joinpath("sql").iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append((int(match.group(1)), match.group(2), entry.read_text()))
    found.sort()
    versions = [v for v, _, _ in found]
    if versions != list(range(1, len(versions) + 1)):
        raise RuntimeError(f"migration versions must be 1..N without gaps, found {versions}")
    return found


def migrate(dsn: str) -> list[int]:
    """Apply what is missing; returns the versions applied by this call."""
    applied_now: list[int] = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s::bigint)", (LOCK_KEY,))
        try:
            conn.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
            conn.execute(f"""CREATE TABLE IF NOT EXISTS {SCHEMA}.schema_migrations (
                version integer PRIMARY KEY, name text NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now())""")
            done = {row[0] for row in conn.execute(f"SELECT version FROM {SCHEMA}.schema_migrations")}
            for version, name, sql in available():
                if version in done:
                    continue
                with conn.transaction():
                    conn.execute(sql)
                    conn.execute(
                        f"INSERT INTO {SCHEMA}.schema_migrations (version, name) VALUES (%s, %s)", (version, name)
                    )
                log.info("applied migration %04d_%s", version, name)
                applied_now.append(version)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s::bigint)", (LOCK_KEY,))
    return applied_now


def check_server(dsn: str) -> int:
    """The server's major version; raises RuntimeError below 14."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        version = conn.info.server_version // 10000
    if version < 14:
        raise RuntimeError(f"PostgreSQL {version} is too old; BatchScheduler needs 14 or newer")
    return version
