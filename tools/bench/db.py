"""``tools/bench_db``: the seed's "Measured Performance Results", reproduced.

The seed measured four per-row paths on a MacBook Pro M1 against PostgreSQL
in Docker. This benchmark runs the same four here, then the set-based paths
the engine can use for a batch of 857, all in one run, against one server,
with ``fsync`` and ``synchronous_commit`` on (an ack promises durability, so
a benchmark that turned them off would measure a different product).

Per-row paths (``--rows`` rows each; one transaction per row means an
autocommit statement, which is one round trip and the cheapest way to have a
transaction per row):

========================  =====================================================
``insert_per_tx``         ``INSERT … VALUES`` one row, its own transaction (the baseline)
``update_per_tx``         ``UPDATE … WHERE id = $1`` one row, its own transaction
``update_batched``        the same ``UPDATE`` one statement at a time, ``--batch-size``
                          statements per transaction (what the seed called batched)
``complex_update_per_tx`` ``jsonb_set`` on a nested path with a ``WHERE`` on a
                          jsonb field, its own transaction
========================  =====================================================

Bulk paths (``--batches`` batches of ``--batch-size`` rows, one transaction
per batch): ``INSERT … SELECT FROM unnest(arrays)``, ``COPY`` with
``write_row``, ``UPDATE … FROM unnest``, pipelined ``executemany`` UPDATE,
and ``INSERT … SELECT FROM jsonb_array_elements($1)`` -- how
``persistence.lane_store`` sends a batch: the ring payloads joined into one JSON
array, one parameter -- plain and with the writer's ``ON CONFLICT DO NOTHING
RETURNING``. The two ``unnest`` paths also run with binary parameters
(``%b``): psycopg builds a text-format array in Python, quoting element by
element, and on a small machine that costs more than the server's insert.

What is timed: from the first statement to the last commit, including
turning pre-generated rows into each statement's parameters (transposing to
columns, joining JSON, building datetimes), because that work is part of
each path's real cost. Generating the rows is not timed. Every operation
starts right after a ``CHECKPOINT`` (so none pays for another's dirty
pages) and after one untimed warm-up batch or a few warm-up rows (so none
pays for preparing its statement or faulting in the table). Inserts start
from an empty table, updates from a vacuumed one.

Everything lives in a scratch schema (``bench_<hex>``) that is dropped at
the end; the engine's ``batchscheduler`` schema is never touched.
"""

from __future__ import annotations

import argparse
import logging
import random
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

import msgspec
import psycopg

from engine.errors import StartupError

from . import args as cli_args
from . import report

log = logging.getLogger(__name__)

# The seed's table (MacBook Pro M1, PostgreSQL official Docker image, default
# settings). Only these four have a seed figure.
SEED_OPS_S = {
    "insert_per_tx": 103_169,
    "update_per_tx": 24_153,
    "update_batched": 25_336,
    "complex_update_per_tx": 11_791,
}
BASELINE = "insert_per_tx"

# 20 000 rows per per-row path is ~5 s each at the ~4k durable commits/s this
# 2-core box manages; 50 batches of 857 is ~43k rows per bulk path, well past
# the first few batches' noise. The default run stays under a minute.
DEFAULT_ROWS = 20_000
DEFAULT_BATCHES = 50
DEFAULT_BATCH_SIZE = 857
# Updates hit a fixed population of entities in a shuffled order, so a batch
# touches scattered pages as players would; 10 000 keeps the table in shared
# buffers, as a live game's hot set is.
DEFAULT_ENTITIES = 10_000
# Warm-up: enough rows to prepare the statement and fault in the index pages.
PER_ROW_WARMUP = 100
ZONES = 8
BASE_US = 1_764_000_000_000_000  # a fixed epoch (µs) so runs are comparable


# ---------------------------------------------------------------------- data
@dataclass(frozen=True)
class Operation:
    key: str
    label: str
    bulk: bool
    kind: str  # "insert" or "update": which table it works on


OPERATIONS: list[Operation] = [
    Operation("insert_per_tx", "Individual INSERTs (1 tx/row)", False, "insert"),
    Operation("update_per_tx", "Individual UPDATEs (1 tx/row)", False, "update"),
    Operation("update_batched", "Batched UPDATEs (1 stmt/row, batch/tx)", False, "update"),
    Operation("complex_update_per_tx", "Complex UPDATEs (jsonb_set, 1 tx/row)", False, "update"),
    Operation("insert_unnest", "INSERT…SELECT unnest(arrays)", True, "insert"),
    Operation("insert_unnest_binary", "INSERT…SELECT unnest(arrays), binary params", True, "insert"),
    Operation("copy_write_row", "COPY, write_row", True, "insert"),
    Operation("update_unnest", "UPDATE…FROM unnest(arrays)", True, "update"),
    Operation("update_unnest_binary", "UPDATE…FROM unnest(arrays), binary params", True, "update"),
    Operation("update_executemany", "UPDATE executemany, pipelined", True, "update"),
    Operation("insert_jsonb", "INSERT…jsonb_array_elements($1)", True, "insert"),
    Operation("insert_jsonb_idempotent", "INSERT…jsonb_array_elements ON CONFLICT RETURNING", True, "insert"),
]
BY_KEY = {op.key: op for op in OPERATIONS}

_ARGS = (
    ("move", {"dx": 1, "dy": -1}),
    ("attack", {"target": "orc-7", "dmg": 3}),
    ("say", {"text": "hail, traveller"}),
    ("pickup", {"item": "potion", "n": 1}),
)
_ENC = msgspec.json.Encoder()


def intent_rows(start: int, n: int, entities: int) -> list[tuple[str, int, str, str, str, int]]:
    """``n`` intent-log rows ``(client_id, seq, entity, kind, args_json,
    received_us)`` with seqs from ``start`` (unique per operation)."""
    rows = []
    for i in range(start, start + n):
        kind, args = _ARGS[i % len(_ARGS)]
        rows.append((f"player-{i % 500}", i, f"orc-{i % entities}", kind, _ENC.encode(args).decode(), BASE_US + i * 97))
    return rows


def ring_payload(row: tuple) -> str:
    """A row as it sits in the engine's ring: one compact JSON array
    (``engine.intent.Record``), with ``args`` as raw JSON."""
    client_id, seq, entity, kind, args, received_us = row
    return _ENC.encode([client_id, seq, entity, kind, msgspec.Raw(args.encode()), received_us]).decode()


def entity_order(entities: int, seed: int = 857) -> list[int]:
    """A fixed shuffle of the entity ids; update ``k`` hits ``order[k % len]``,
    so any ``entities`` consecutive updates touch distinct rows (which
    ``UPDATE … FROM`` needs: it applies one joined row per target)."""
    order = list(range(entities))
    random.Random(seed).shuffle(order)
    return order


def zone(entity_id: int) -> str:
    return f"z{entity_id % ZONES}"


def update_rows(start: int, n: int, order: Sequence[int]) -> list[tuple[int, int]]:
    """``n`` updates ``(entity_id, dmg)``."""
    size = len(order)
    return [(order[k % size], 1 + k % 5) for k in range(start, start + n)]


# ---------------------------------------------------------------------- SQL
class Sql:
    """Every statement, for one scratch schema."""

    def __init__(self, schema: str) -> None:
        s = self.schema = schema
        self.create = [
            f"CREATE SCHEMA {s}",
            # The shape of the engine's intent log: its unique key is the
            # idempotency key, so every insert path pays for that index.
            f"""CREATE TABLE {s}.intents (
                id          bigserial   PRIMARY KEY,
                client_id   text        NOT NULL,
                seq         bigint      NOT NULL,
                entity      text        NOT NULL,
                kind        text        NOT NULL,
                args        jsonb       NOT NULL,
                received_at timestamptz NOT NULL,
                CONSTRAINT intents_key UNIQUE (client_id, seq))""",
            f"""CREATE TABLE {s}.entities (
                id      bigint  PRIMARY KEY,
                hp      integer NOT NULL,
                version bigint  NOT NULL DEFAULT 0,
                state   jsonb   NOT NULL)""",
        ]
        self.populate = f"""INSERT INTO {s}.entities (id, hp, state)
            SELECT g, 1000000, jsonb_build_object(
                'zone', 'z' || (g %% {ZONES}), 'pos', jsonb_build_object('x', 0, 'y', 0),
                'inventory', jsonb_build_array('sword', 'potion'), 'title', 'orc ' || g)
            FROM generate_series(0, %s - 1) AS g"""
        self.drop = f"DROP SCHEMA IF EXISTS {s} CASCADE"
        self.truncate = f"TRUNCATE {s}.intents RESTART IDENTITY"
        self.vacuum = f"VACUUM (ANALYZE) {s}.entities"

        self.insert_one = f"""INSERT INTO {s}.intents (client_id, seq, entity, kind, args, received_at)
            VALUES (%s, %s, %s, %s, %s::jsonb, to_timestamp(%s::float8 / 1e6))"""
        self.update_one = f"UPDATE {s}.entities SET hp = hp - %s, version = version + 1 WHERE id = %s"
        self.update_complex = f"""UPDATE {s}.entities
            SET state = jsonb_set(state, '{{pos,x}}', to_jsonb((state #>> '{{pos,x}}')::int + %s)),
                version = version + 1
            WHERE id = %s AND state ->> 'zone' = %s"""
        self.insert_unnest = f"""INSERT INTO {s}.intents (client_id, seq, entity, kind, args, received_at)
            SELECT c, q, e, k, a, to_timestamp(r::float8 / 1e6)
            FROM unnest(%s::text[], %s::int8[], %s::text[], %s::text[], %s::jsonb[], %s::int8[])
                AS u(c, q, e, k, a, r)"""
        # %b: psycopg dumps the arrays in binary, skipping the per-element
        # quoting of the text array format (the client-side cost of unnest).
        self.insert_unnest_binary = self.insert_unnest.replace("%s", "%b")
        self.copy = f"COPY {s}.intents (client_id, seq, entity, kind, args, received_at) FROM STDIN"
        self.update_unnest = f"""UPDATE {s}.entities AS t SET hp = t.hp - u.dmg, version = t.version + 1
            FROM unnest(%s::int8[], %s::int4[]) AS u(id, dmg) WHERE t.id = u.id"""
        self.update_unnest_binary = self.update_unnest.replace("%s", "%b")
        # persistence.lane_store.INSERT_LOG without the engine-only columns.
        jsonb_select = f"""INSERT INTO {s}.intents (client_id, seq, entity, kind, args, received_at)
            SELECT r->>0, (r->>1)::int8, r->>2, r->>3, r->4, to_timestamp((r->>5)::float8 / 1e6)
            FROM jsonb_array_elements(%s::jsonb) WITH ORDINALITY AS x(r, ord)"""
        self.insert_jsonb = jsonb_select
        self.insert_jsonb_idempotent = (
            jsonb_select + "\n            ORDER BY x.ord"
            "\n            ON CONFLICT ON CONSTRAINT intents_key DO NOTHING"
            "\n            RETURNING seq"
        )


# ---------------------------------------------------------------- operations
@dataclass
class Result:
    key: str
    operation: str
    rows: int
    transactions: int
    seconds: float
    seed_ops_per_s: float | None
    ops_per_s: float = 0.0
    us_per_op: float = 0.0
    ratio_to_baseline: float | None = None

    def __post_init__(self) -> None:
        self.ops_per_s = self.rows / self.seconds if self.seconds > 0 else 0.0
        self.us_per_op = self.seconds / self.rows * 1e6 if self.rows else 0.0


def _chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


class Runner:
    """Runs operations on one autocommit connection in one scratch schema."""

    def __init__(
        self, conn: psycopg.Connection, sql: Sql, *, rows: int, batches: int, batch_size: int, entities: int
    ) -> None:
        self.conn = conn
        self.sql = sql
        self.rows = rows
        self.batches = batches
        self.batch_size = batch_size
        self.entities = entities
        self.order = entity_order(entities)
        self.cur = conn.cursor()
        self.can_checkpoint = True

    # Each op_* takes its (warm-up or timed) work and returns the number of
    # transactions it committed; it raises if a row went missing.
    def op_insert_per_tx(self, data: list[tuple]) -> int:
        cur, sql = self.cur, self.sql.insert_one
        hit = 0
        for row in data:
            cur.execute(sql, row, prepare=True)
            hit += cur.rowcount
        _expect(hit, len(data), "insert_per_tx")
        return len(data)

    def op_update_per_tx(self, data: list[tuple[int, int]]) -> int:
        cur, sql = self.cur, self.sql.update_one
        hit = 0
        for entity_id, dmg in data:
            cur.execute(sql, (dmg, entity_id), prepare=True)
            hit += cur.rowcount
        _expect(hit, len(data), "update_per_tx")
        return len(data)

    def op_update_batched(self, data: list[tuple[int, int]]) -> int:
        cur, sql, conn = self.cur, self.sql.update_one, self.conn
        hit = txs = 0
        for chunk in _chunks(data, self.batch_size):
            with conn.transaction():
                for entity_id, dmg in chunk:
                    cur.execute(sql, (dmg, entity_id), prepare=True)
                    hit += cur.rowcount
            txs += 1
        _expect(hit, len(data), "update_batched")
        return txs

    def op_complex_update_per_tx(self, data: list[tuple[int, int]]) -> int:
        cur, sql = self.cur, self.sql.update_complex
        hit = 0
        for entity_id, dmg in data:
            cur.execute(sql, (dmg, entity_id, zone(entity_id)), prepare=True)
            hit += cur.rowcount
        _expect(hit, len(data), "complex_update_per_tx")
        return len(data)

    def op_insert_unnest(self, batches: list[list[tuple]], binary: bool = False) -> int:
        cur, conn = self.cur, self.conn
        sql = self.sql.insert_unnest_binary if binary else self.sql.insert_unnest
        for batch in batches:
            cols = [list(c) for c in zip(*batch)]
            with conn.transaction():
                cur.execute(sql, cols, prepare=True)
            _expect(cur.rowcount, len(batch), "insert_unnest")
        return len(batches)

    def op_insert_unnest_binary(self, batches: list[list[tuple]]) -> int:
        return self.op_insert_unnest(batches, binary=True)

    def op_copy_write_row(self, batches: list[list[tuple]]) -> int:
        cur, sql, conn = self.cur, self.sql.copy, self.conn
        utc = UTC
        fromts = datetime.fromtimestamp
        for batch in batches:
            with conn.transaction(), cur.copy(sql) as copy:
                for c, q, e, k, a, r in batch:
                    copy.write_row((c, q, e, k, a, fromts(r / 1e6, utc)))
            _expect(cur.rowcount, len(batch), "copy_write_row")
        return len(batches)

    def op_update_unnest(self, batches: list[list[tuple[int, int]]], binary: bool = False) -> int:
        cur, conn = self.cur, self.conn
        sql = self.sql.update_unnest_binary if binary else self.sql.update_unnest
        for batch in batches:
            ids = [b[0] for b in batch]
            dmg = [b[1] for b in batch]
            with conn.transaction():
                cur.execute(sql, (ids, dmg), prepare=True)
            _expect(cur.rowcount, len(batch), "update_unnest")
        return len(batches)

    def op_update_unnest_binary(self, batches: list[list[tuple[int, int]]]) -> int:
        return self.op_update_unnest(batches, binary=True)

    def op_update_executemany(self, batches: list[list[tuple[int, int]]]) -> int:
        cur, sql, conn = self.cur, self.sql.update_one, self.conn
        for batch in batches:
            with conn.transaction(), conn.pipeline():
                cur.executemany(sql, [(dmg, entity_id) for entity_id, dmg in batch])
            _expect(cur.rowcount, len(batch), "update_executemany")
        return len(batches)

    def op_insert_jsonb(self, batches: list[list[str]]) -> int:
        cur, sql, conn = self.cur, self.sql.insert_jsonb, self.conn
        for batch in batches:
            with conn.transaction():
                cur.execute(sql, ("[" + ",".join(batch) + "]",), prepare=True)
            _expect(cur.rowcount, len(batch), "insert_jsonb")
        return len(batches)

    def op_insert_jsonb_idempotent(self, batches: list[list[str]]) -> int:
        cur, sql, conn = self.cur, self.sql.insert_jsonb_idempotent, self.conn
        for batch in batches:
            with conn.transaction():
                cur.execute(sql, ("[" + ",".join(batch) + "]",), prepare=True)
                new = cur.fetchall()
            _expect(len(new), len(batch), "insert_jsonb_idempotent")
        return len(batches)

    # ------------------------------------------------------------ the driver
    def _data(self, op: Operation, start: int, n: int) -> list:
        if op.kind == "update":
            rows = update_rows(start, n, self.order)
        else:
            rows = intent_rows(start, n, self.entities)
            if op.key.startswith("insert_jsonb"):
                rows = [ring_payload(r) for r in rows]
        if op.bulk:
            return [rows[i : i + self.batch_size] for i in range(0, n, self.batch_size)]
        return rows

    def _prepare_table(self, op: Operation) -> None:
        if op.kind == "insert":
            self.conn.execute(self.sql.truncate)
        else:
            self.conn.execute(self.sql.vacuum)
        if self.can_checkpoint:
            try:
                self.conn.execute("CHECKPOINT")
            except psycopg.errors.InsufficientPrivilege:
                log.warning(
                    "no privilege to CHECKPOINT on this server: operations may pay for each other's dirty pages"
                )
                self.can_checkpoint = False

    def run(self, op: Operation) -> Result:
        """Warm up, then time ``op``; returns its result."""
        if op.bulk:
            warm_n, n = self.batch_size, self.batches * self.batch_size
        else:
            warm_n, n = min(PER_ROW_WARMUP, max(1, self.rows // 10)), self.rows
        fn: Callable[[list], int] = getattr(self, f"op_{op.key}")
        self._prepare_table(op)
        warm = self._data(op, 0, warm_n)
        data = self._data(op, warm_n, n)
        log.info("%-24s %d rows%s", op.key, n, f" in {self.batches} batches of {self.batch_size}" if op.bulk else "")
        fn(warm)
        t0 = time.perf_counter()
        txs = fn(data)
        elapsed = time.perf_counter() - t0
        return Result(op.key, op.label, n, txs, elapsed, SEED_OPS_S.get(op.key))


def _expect(got: int, want: int, what: str) -> None:
    if got != want:
        raise RuntimeError(f"{what}: {got} rows affected, expected {want}")


# ------------------------------------------------------------------- driver
def server_info(conn: psycopg.Connection) -> dict[str, str]:
    """Version and the durability settings the figures depend on."""
    info = {"version": conn.execute("SHOW server_version").fetchone()[0]}
    for name in ("fsync", "synchronous_commit", "full_page_writes", "wal_sync_method", "shared_buffers"):
        info[name] = conn.execute(f"SHOW {name}").fetchone()[0]
    return info


def run_benchmark(
    dsn: str,
    *,
    rows: int = DEFAULT_ROWS,
    batches: int = DEFAULT_BATCHES,
    batch_size: int = DEFAULT_BATCH_SIZE,
    entities: int = DEFAULT_ENTITIES,
    only: Sequence[str] | None = None,
    embedded: bool = False,
) -> dict:
    """Run the operations against ``dsn`` in a fresh scratch schema (dropped
    afterwards, also on failure); returns the JSON document."""
    ops = [BY_KEY[k] for k in only] if only else OPERATIONS
    if any(op.kind == "update" and op.bulk for op in ops) and entities < batch_size:
        raise ValueError(
            f"--entities ({entities}) must be at least --batch-size ({batch_size}): "
            "UPDATE … FROM applies one row per entity per batch"
        )
    sql = Sql(f"bench_{uuid.uuid4().hex[:10]}")
    results: list[Result] = []
    with psycopg.connect(dsn, autocommit=True, application_name="bench_db") as conn:
        conn.execute("SET synchronous_commit = on")
        server = server_info(conn)
        server["embedded"] = embedded
        if server["fsync"] != "on":
            log.warning("this server runs with fsync=%s: figures are not durable-commit figures", server["fsync"])
        try:
            for stmt in sql.create:
                conn.execute(stmt)
            conn.execute(sql.populate, (entities,))
            runner = Runner(conn, sql, rows=rows, batches=batches, batch_size=batch_size, entities=entities)
            for op in ops:
                results.append(runner.run(op))
        finally:
            if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                conn.rollback()
            conn.execute(sql.drop)
    base = next((r for r in results if r.key == BASELINE), None)
    for r in results:
        r.ratio_to_baseline = r.ops_per_s / base.ops_per_s if base and base.ops_per_s else None
    return {
        "tool": "bench_db",
        "machine": report.machine(server["version"]),
        "server": server,
        "params": {"rows": rows, "batches": batches, "batch_size": batch_size, "entities": entities},
        "baseline": BASELINE,
        "seed_source": "SEED-BatchScheduler.md, Measured Performance Results "
        "(MacBook Pro M1, PostgreSQL in Docker, default settings)",
        "results": [asdict(r) for r in results],
    }


def run_writers_benchmark(
    dsn: str, *, writers: Sequence[int], batches: int, batch_size: int, entities: int, embedded: bool = False
) -> dict:
    """The ``--writers`` document: the flusher-shaped write on K connections."""
    from .writers import run_writers

    with psycopg.connect(dsn, autocommit=True, application_name="bench_db") as conn:
        server = server_info(conn)
    server["embedded"] = embedded
    rows = run_writers(dsn, writers, batches=batches, batch_size=batch_size, entities=entities)
    return {
        "tool": "bench_db --writers",
        "machine": report.machine(server["version"]),
        "server": server,
        "params": {"writers": list(writers), "batches": batches, "batch_size": batch_size, "entities": entities},
        "results": rows,
    }


def render_writers(doc: dict) -> str:
    s, p = doc["server"], doc["params"]
    lines = [
        report.machine_line(doc["machine"]),
        f"server: PostgreSQL {s['version']} ({'embedded, temp dir' if s['embedded'] else 'external --dsn'}), "
        f"fsync={s['fsync']} synchronous_commit={s['synchronous_commit']}",
        f"bench_db --writers: each writer {p['batches']} transactions of {p['batch_size']} intents "
        "(log INSERT…unnest + full-state UPDATE…FROM unnest), disjoint entities, all writers at once",
        "",
        report.table(
            ("writers", "intents", "seconds", "intents/s", "ratio vs first"),
            [
                (
                    r["writers"],
                    r["intents"],
                    f"{r['seconds']:.2f}",
                    report.fmt_rate(r["intents_per_s"]),
                    report.fmt_ratio(r["ratio_to_first"]),
                )
                for r in doc["results"]
            ],
        ),
    ]
    return "\n".join(lines)


HEADERS = ("operation", "rows", "ops/s", "µs/op", "seed ops/s", "ratio vs INSERT")


def render(doc: dict) -> str:
    """The table humans read, with the machine and server lines above it."""
    s = doc["server"]
    lines = [
        report.machine_line(doc["machine"]),
        f"server: PostgreSQL {s['version']} ({'embedded, temp dir' if s['embedded'] else 'external --dsn'}), "
        f"fsync={s['fsync']} synchronous_commit={s['synchronous_commit']} "
        f"full_page_writes={s['full_page_writes']} wal_sync_method={s['wal_sync_method']} "
        f"shared_buffers={s['shared_buffers']}",
        f"bench_db: {doc['params']['rows']} rows per per-row path; {doc['params']['batches']} batches of "
        f"{doc['params']['batch_size']} per bulk path; {doc['params']['entities']} entities; one connection",
        "",
    ]
    rows = [
        (
            r["operation"],
            r["rows"],
            report.fmt_rate(r["ops_per_s"]),
            report.fmt_us(r["us_per_op"]),
            report.fmt_rate(r["seed_ops_per_s"]),
            report.fmt_ratio(r["ratio_to_baseline"]),
        )
        for r in doc["results"]
    ]
    lines.append(report.table(HEADERS, rows))
    lines.append("")
    lines.append(
        "seed ops/s: the seed's figures (MacBook Pro M1, PostgreSQL in Docker, default settings); "
        "bulk rows are per batch of "
        f"{doc['params']['batch_size']} in one transaction."
    )
    return "\n".join(lines)


# ---------------------------------------------------------------------- CLI
def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog or cli_args.prog("bench_db"),
        description="Reproduce the seed's 'Measured Performance Results' table against PostgreSQL "
        "(fsync and synchronous_commit on), next to the set-based batch paths the engine "
        "can use. Starts an embedded PostgreSQL in a temporary directory (removed "
        "afterwards) unless --dsn names a server. Works in its own scratch schema, "
        "dropped at the end; never touches the engine's batchscheduler schema. Prints a "
        "machine line and a table; --json also writes the figures as JSON.",
        epilog="Operations: "
        + "; ".join(f"{op.key} = {op.label}" for op in OPERATIONS)
        + ". The ratio column is ops/s divided by insert_per_tx's ops/s. Exit 0 when the run "
        "completed; 2 on bad arguments or when it could not run (no database, a lost connection).",
        formatter_class=cli_args.HelpFormatter,
    )
    p.add_argument(
        "--dsn",
        type=cli_args.dsn,
        help="libpq connection string of an external PostgreSQL ≥ 14 (default: start an embedded one in a temp dir)",
    )
    p.add_argument(
        "--rows",
        type=report.positive_int,
        default=DEFAULT_ROWS,
        help="rows for each per-row operation (1 tx/row and the batched statement-per-row UPDATE)",
    )
    p.add_argument(
        "--batches", type=report.positive_int, default=DEFAULT_BATCHES, help="batches for each bulk operation"
    )
    p.add_argument(
        "--batch-size",
        type=report.positive_int,
        default=DEFAULT_BATCH_SIZE,
        help="rows per transaction for the batched and bulk operations (the seed's 857)",
    )
    p.add_argument(
        "--entities",
        type=report.positive_int,
        default=DEFAULT_ENTITIES,
        help="rows in the entities table the UPDATEs hit (at least --batch-size)",
    )
    p.add_argument(
        "--only", type=_op_list, metavar="OP[,OP…]", help="run only these operations (comma-separated keys, see below)"
    )
    p.add_argument(
        "--writers",
        type=_writer_list,
        metavar="K[,K…]",
        help="instead of the seed's table: the flusher-shaped write (log INSERT…unnest + full-state "
        "UPDATE…FROM unnest, one transaction per --batch-size intents) on K connections at once over "
        "disjoint entities, for each K in the list, in one run (uses --batches per writer and --entities)",
    )
    p.add_argument(
        "--json", metavar="FILE", type=cli_args.output_file, help="also write the results as JSON to FILE ('-': stdout)"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    return p


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Combinations no single argument type can see; refused before any work."""
    ops = [BY_KEY[k] for k in args.only] if args.only else OPERATIONS
    if not args.writers and any(op.kind == "update" and op.bulk for op in ops) and args.entities < args.batch_size:
        p.error(
            f"argument --entities: must be at least --batch-size ({args.batch_size}), got {args.entities}: "
            "UPDATE … FROM applies one row per entity per batch (or pick operations with --only)"
        )


def _writer_list(text: str) -> list[int]:
    try:
        ks = [int(k) for k in text.split(",") if k.strip()]
    except ValueError:
        ks = []
    if not ks or any(k < 1 or k > 64 for k in ks):
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of writer counts 1-64, got {text!r}")
    return ks


def _op_list(text: str) -> list[str]:
    keys = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in keys if k not in BY_KEY]
    if unknown or not keys:
        raise argparse.ArgumentTypeError(f"unknown operation(s) {unknown}; choose from {', '.join(BY_KEY)}")
    return keys


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM until the block ends, then act on them.

    An initdb killed half-way (``subprocess.run`` kills its child when
    interrupted) leaves its bootstrap ``postgres`` to die without cleanup,
    and that leaks ``PostgreSQL.*`` segments in ``/dev/shm`` (seen here). A
    start takes a second or two, so a Ctrl-C waits that long instead. The
    handlers are Python-level, so initdb and postgres (exec'd children) get
    default dispositions, not these."""
    pending: list[int] = []
    previous = {
        sig: signal.signal(sig, lambda signum, _frame: pending.append(signum))
        for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if pending:
        log.warning("%s arrived while PostgreSQL was starting; stopping it now", signal.Signals(pending[0]).name)
        signal.raise_signal(pending[0])


def _remove_tree(path: Path) -> None:
    """Remove the temp dir. Retried briefly because an initdb interrupted by
    a signal leaves its bootstrap ``postgres`` child writing for a moment."""
    for delay in (0.0, 0.1, 0.3, 1.0):
        time.sleep(delay)
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            return
    log.warning("could not remove %s", path)


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """The whole tool: parse, start or reach PostgreSQL, run, print, write JSON."""
    out = out or sys.stdout
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s", stream=sys.stderr)
    log.setLevel(logging.WARNING if args.quiet else logging.INFO)
    # SIGTERM unwinds like Ctrl-C, so the embedded server is stopped and its
    # temp dir removed rather than orphaned.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    params = dict(
        rows=args.rows, batches=args.batches, batch_size=args.batch_size, entities=args.entities, only=args.only
    )
    run = run_benchmark
    if args.writers:
        params = dict(writers=args.writers, batches=args.batches, batch_size=args.batch_size, entities=args.entities)
        run = run_writers_benchmark
    try:
        if args.dsn:
            doc = run(args.dsn, **params)
        else:
            from persistence.embedded import EmbeddedPostgres

            base = Path(tempfile.mkdtemp(prefix="bs-bench-db-"))
            pg = EmbeddedPostgres(base / "pg")
            try:
                log.info("starting embedded PostgreSQL in %s", base)
                # Not ``with``: stop() must run even if start() is cut short.
                with _signals_deferred():
                    pg.start()
                doc = run(pg.dsn, embedded=True, **params)
            finally:
                pg.stop()
                _remove_tree(base)
    except KeyboardInterrupt:
        log.warning("interrupted; scratch schema dropped, embedded server stopped")
        return 130
    except (psycopg.OperationalError, StartupError) as exc:
        where = f"the server of --dsn {args.dsn!r}" if args.dsn else "the embedded PostgreSQL"
        print(f"{parser.prog}: could not run against {where}: {str(exc).strip()}", file=sys.stderr)
        return 2
    out.write((render_writers(doc) if args.writers else render(doc)) + "\n")
    if args.json:
        report.write_json(args.json, doc)
    return 0
