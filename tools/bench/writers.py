"""``tools/bench_db --writers K[,K…]``: the database's ceiling for K lanes.

Each of K processes holds its own connection and writes what one flusher
lane writes per batch, over its own disjoint slice of the entities: one
transaction per batch of ``batch_size`` intents holding

* the intent log, ``INSERT … SELECT FROM unnest(arrays)`` (unique
  ``(client_id, seq)`` key, as the engine's), and
* every touched entity's full new state, ``UPDATE … FROM unnest(ids,
  states)`` (one row per entity per batch, as the engine's planner writes),

sent as one pipeline and committed (``fsync``, ``synchronous_commit`` on).
The K processes start together on a barrier; intents/s is the total over
the wall time of the slowest. What the engine reaches with ``--lanes K``
against the same server is the figure to hold beside it (``tools/load_gen
--spawn-engine --variant 'lanes1=--lanes 1' …``).
"""

from __future__ import annotations

import multiprocessing as mp
import time
import uuid
from collections.abc import Sequence

import msgspec
import psycopg

_STATE = msgspec.json.Encoder()


def _setup(dsn: str, schema: str, entities: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
        conn.execute(
            f"""CREATE TABLE {schema}.intents (
                id bigserial PRIMARY KEY, client_id text NOT NULL, seq bigint NOT NULL,
                entity text NOT NULL, kind text NOT NULL, args jsonb NOT NULL,
                CONSTRAINT intents_key UNIQUE (client_id, seq))"""
        )
        conn.execute(
            f"""CREATE TABLE {schema}.entities (id bigint PRIMARY KEY, state jsonb NOT NULL,
                version bigint NOT NULL DEFAULT 0) WITH (fillfactor = 70)"""
        )
        conn.execute(
            f"""INSERT INTO {schema}.entities (id, state)
                SELECT g, jsonb_build_object('hp', 100, 'pos', jsonb_build_object('x', 0, 'y', 0))
                FROM generate_series(0, %s - 1) AS g""",
            (entities,),
        )
        conn.execute(f"VACUUM (ANALYZE) {schema}.entities")
        conn.execute("CHECKPOINT")


def _writer(
    dsn: str, schema: str, k: int, first: int, count: int, batches: int, batch_size: int, barrier, results
) -> None:
    """One lane's writes: ``batches`` transactions over entities [first, first + count)."""
    insert = f"""INSERT INTO {schema}.intents (client_id, seq, entity, kind, args)
        SELECT c, q, e, 'move', a FROM unnest(%b::text[], %b::int8[], %b::text[], %b::jsonb[]) AS u(c, q, e, a)"""
    update = f"""UPDATE {schema}.entities AS t SET state = u.state, version = t.version + 1
        FROM unnest(%b::int8[], %b::jsonb[]) AS u(id, state) WHERE t.id = u.id"""
    client = f"bench-{k}"
    with psycopg.connect(dsn, application_name=f"bench_db writer {k}") as conn:
        conn.execute("SET synchronous_commit = on")
        conn.commit()
        barrier.wait()
        t0 = time.perf_counter()
        seq = 0
        for b in range(batches):
            ids = [first + (b * batch_size + j) % count for j in range(batch_size)]
            seqs = list(range(seq, seq + batch_size))
            seq += batch_size
            args = [_STATE.encode({"dx": 1, "dy": 0}).decode()] * batch_size
            touched = sorted(set(ids))
            states = [_STATE.encode({"hp": 100, "pos": {"x": b + 1, "y": 0}}).decode()] * len(touched)
            with conn.pipeline():
                conn.execute(insert, ([client] * batch_size, seqs, [str(i) for i in ids], args))
                conn.execute(update, (touched, states))
            conn.commit()
        results.put((k, time.perf_counter() - t0))


def run_writers(
    dsn: str, writers: Sequence[int], *, batches: int, batch_size: int, entities: int
) -> list[dict[str, float]]:
    """For each K in ``writers``: K processes at once, each its own slice.
    Returns one row per K with intents/s and the ratio to the first K."""
    rows = []
    ctx = mp.get_context("spawn")
    for k_total in writers:
        schema = f"bench_w_{uuid.uuid4().hex[:10]}"
        per = max(batch_size, entities // k_total)
        _setup(dsn, schema, per * k_total)
        try:
            barrier, results = ctx.Barrier(k_total + 1), ctx.Queue()
            procs = [
                ctx.Process(target=_writer, args=(dsn, schema, k, k * per, per, batches, batch_size, barrier, results))
                for k in range(k_total)
            ]
            for p in procs:
                p.start()
            barrier.wait()
            t0 = time.perf_counter()
            times = [results.get(timeout=600)[1] for _ in procs]
            wall = time.perf_counter() - t0
            for p in procs:
                p.join(30)
                if p.exitcode != 0:
                    raise RuntimeError(f"writer process exited with {p.exitcode}")
        finally:
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        intents = k_total * batches * batch_size
        rows.append(
            {
                "writers": k_total,
                "intents": intents,
                "seconds": wall,
                "intents_per_s": intents / wall,
                "slowest_writer_s": max(times),
            }
        )
    base = rows[0]["intents_per_s"] if rows else 0
    for r in rows:
        r["ratio_to_first"] = r["intents_per_s"] / base if base else 0.0
    return rows
