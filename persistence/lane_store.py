"""The lane store: the one owner of a lane's batch write.

A flusher lane hands its store a cut batch and gets back what became of
each intent; everything between is here: the lane's connection, every
statement the write sends, the optimistic -> reading -> isolated fallback
chain, and the rule that keeps the lane's entity cache true. Exactly-once
rests on three things only: the unique ``(client_id, seq)`` key, this
object (a batch is one transaction; nothing is reported before COMMIT
returns), and the flusher's acknowledgement (outcomes, then the release
cursor, only after ``commit`` returned).

A batch reaches the store as one JSON array of records, each record the
JSON array ``[client_id, seq, entity, kind, args, received_us]`` exactly as
it sat in the ring. PostgreSQL expands it with ``jsonb_array_elements``, so
no per-intent work is done in Python to write the log. (Measured here:
psycopg's list-to-array adaptation cost ~11 ms for three 857-element arrays;
the same rows as text literals ~3 ms; one jsonb parameter needs no
adaptation.)

``commit`` tries, in order, stopping at the first that commits:

1. **optimistic** (planned by ``plan`` from the cache, no read): ONE round
   trip -- BEGIN, the ``batches`` row, a plain INSERT of the log, the state
   writes, COMMIT. It declines, writing nothing, when the batch holds a
   resend (the unique key raises) or a cached entity changed behind the
   lane's back (the ``UPDATE`` matches versions; ``expect_rows`` raises
   ``STALE_CACHE``). A cache miss never gets here.
2. **reading**: ``INSERT … ON CONFLICT DO NOTHING RETURNING batch_ord`` says
   which intents are new, the touched entities are read in the same round
   trip, the planner applies the new intents to what was read, and each
   touched entity is written once; two round trips.
3. **isolated**, after a failure on the batch's *data* (a constraint, a
   handler or planner bug): the same batch, one savepoint per intent, so the
   culprits are dead-lettered and the rest commit.

A failure of the *connection* at any step ends the chain: the connection is
closed and ``DatabaseUnavailable`` raised; the flusher keeps the records and
retries, and a retry of a batch whose COMMIT did land is answered from the
stored outcomes (every intent a duplicate, nothing applied twice).

**The cache rule.** The planner (``engine.planner``, reached only through the
``StatePlanning`` protocol: persistence does not import the engine) keeps
the lane's entity states so the optimistic path needs no read, and updates
them as soon as a batch is planned, so the next batch can be planned while
this one is written. That is true only while every planned write commits as
planned. So the store, and nothing else, forgets the whole cache whenever a
write leaves its plan: the optimistic path declines or fails, the batch is
isolated, or anything raises. Each forget starts a new cache *epoch*; a
batch planned in an older epoch was planned from states that may never have
been written and goes to the reading path instead.

The records that were not new are looked up in one read
(``ORIGINAL_OUTCOMES``): a resend of the stored intent gets its stored
outcome, marked duplicate; a record that only shares the key (another
entity, kind or args under a used seq) is rejected ``seq_reused``, naming
what is stored, and nothing is stored for it.
"""

from __future__ import annotations

import logging
import select
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgspec
import psycopg

from persistence.migrations import SCHEMA as S

log = logging.getLogger(__name__)

# --------------------------------------------------------------- statements
INSERT_BATCH = f"""INSERT INTO {S}.batches (size, cut_reason, first_received_at, cut_at, lane)
VALUES (%(size)s, %(reason)s, to_timestamp(%(first)s), to_timestamp(%(cut)s), %(lane)s) RETURNING id"""

# batch_id comes from currval() so this can be queued behind INSERT_BATCH in
# the same pipeline sync without waiting for the id.
INSERT_LOG = f"""INSERT INTO {S}.intent_log
    (client_id, seq, entity, kind, args, status, batch_id, batch_ord, received_at)
SELECT r->>0, (r->>1)::int8, r->>2, r->>3, r->4, 'committed', currval('{S}.batches_id_seq'),
       x.ord + %(ord0)s, to_timestamp((r->>5)::float8 / 1e6)
FROM jsonb_array_elements(%(batch)s::jsonb) WITH ORDINALITY AS x(r, ord)
ORDER BY x.ord
ON CONFLICT ON CONSTRAINT intent_log_key DO NOTHING
RETURNING batch_ord"""

# The optimistic form: no ON CONFLICT (speculative insertion costs ~25% of
# the insert), no RETURNING. A resend in the batch raises unique_violation,
# the transaction rolls back, and the batch is redone with INSERT_LOG.
INSERT_LOG_PLAIN = INSERT_LOG.split("ON CONFLICT")[0].rstrip()

# The entity ids go in as ONE jsonb parameter; ``= ANY(ARRAY(subquery))``
# becomes an init-plan array, so the primary-key index is used (a join
# against jsonb_array_elements is estimated at 100 rows and seq-scans).
SELECT_ENTITIES = f"""SELECT id, state::text, version FROM {S}.entities
WHERE id = ANY(ARRAY(SELECT jsonb_array_elements_text(%(ids)s::jsonb)))"""

# Every updated entity's new state as ONE jsonb object keyed by id
# (id -> [state, applied intents, version it was planned from]): one
# statement, one row per entity. A row whose version is no longer the
# planned-from one does not match; expect_rows then raises STALE_CACHE, so
# a stale cached state is never written over.
UPDATE_ENTITIES = f"""WITH u AS (
    UPDATE {S}.entities e
    SET state = m.map -> e.id -> 0, version = e.version + (m.map -> e.id ->> 1)::int8,
        updated_batch = currval('{S}.batches_id_seq')
    FROM (SELECT %(rows)s::jsonb AS map) AS m
    WHERE e.id = ANY(ARRAY(SELECT jsonb_object_keys(%(rows)s::jsonb)))
      AND e.version = (m.map -> e.id ->> 2)::int8
    RETURNING 1)
SELECT {S}.expect_rows((SELECT count(*) FROM u), %(n)s)"""

# Spawned entities as one jsonb array of [id, state, applied intents].
INSERT_ENTITIES = f"""INSERT INTO {S}.entities (id, state, version, updated_batch)
SELECT x->>0, x->1, (x->>2)::int8, currval('{S}.batches_id_seq')
FROM jsonb_array_elements(%(rows)s::jsonb) AS x"""

# Raised by batchscheduler.expect_rows (migration 0003) when a planned-from
# version no longer matches: a cached entity changed behind the lane's back.
STALE_CACHE = "BS001"

# Original outcome of the records that were not new (resends, or a batch
# retried after a crash between COMMIT and the acknowledgement), and whether
# each is the stored intent again: same entity and kind (text), same args
# (jsonb equality: key order and number spelling aside, the same value). A
# record that only shares the key is another intent reusing a seq; the
# stored kind and entity name the original in its rejection.
ORIGINAL_OUTCOMES = f"""SELECT x.ord, l.status, coalesce(l.code, ''), coalesce(l.reason, ''),
       l.entity = x.r->>2 AND l.kind = x.r->>3 AND l.args = x.r->4, l.client_id, l.seq, l.entity, l.kind
FROM jsonb_array_elements(%(batch)s::jsonb) WITH ORDINALITY AS x(r, ord)
JOIN {S}.intent_log l ON l.client_id = x.r->>0 AND l.seq = (x.r->>1)::int8
WHERE x.ord = ANY(%(ords)s::int8[])"""

# The dead letters of the current batch are found by their unique key
# (client_id, seq): an index lookup however long the log grows. (By
# batch_id they were not: currval() is volatile, so compared directly it
# rules out every index, and the BRIN on batch_id cannot help either, since
# the newest pages are never summarized yet: each dead letter scanned more
# of the log than the last.) The batch_id test only guards the key.
MARK_DEAD = f"""UPDATE {S}.intent_log l SET status = 'dead_lettered', code = d.code, reason = d.reason
FROM unnest(%(clients)s::text[], %(seqs)s::int8[], %(codes)s::text[], %(reasons)s::text[]) AS d(client_id, seq, code, reason)
WHERE l.client_id = d.client_id AND l.seq = d.seq AND l.batch_id = (SELECT currval('{S}.batches_id_seq'))"""

COPY_DEAD = f"""INSERT INTO {S}.dead_letters (client_id, seq, entity, kind, args, code, reason, batch_id)
SELECT l.client_id, l.seq, l.entity, l.kind, l.args, l.code, l.reason, l.batch_id
FROM unnest(%(clients)s::text[], %(seqs)s::int8[]) AS d(client_id, seq)
JOIN {S}.intent_log l ON l.client_id = d.client_id AND l.seq = d.seq
WHERE l.batch_id = (SELECT currval('{S}.batches_id_seq'))"""

# The batch row counts what the batch stored (README, Tables): resends are
# answered from earlier batches and are not counted in size; a batch of
# resends only keeps no row.
TRIM_BATCH = f"""UPDATE {S}.batches SET size = %(stored)s, resends = %(resends)s
WHERE id = (SELECT currval('{S}.batches_id_seq'))"""
DROP_BATCH = f"DELETE FROM {S}.batches WHERE id = (SELECT currval('{S}.batches_id_seq'))"

# The channel engine.scheduler LISTENs on: one notification per stored batch.
BATCHES_CHANNEL = "batchscheduler_batches"
NOTIFY = f"SELECT pg_notify('{BATCHES_CHANNEL}', currval('{S}.batches_id_seq')::text)"

# ----------------------------------------------------------------- outcomes
# Which path committed a batch (WriteResult.path).
OPTIMISTIC = "optimistic"
READING = "reading"
ISOLATED = "isolated"

DEAD_LETTERED = "dead_lettered"
# A resend whose (client_id, seq) is stored for a different intent: nothing
# is stored for it, and it is not the stored intent's duplicate either.
REJECTED = "rejected"
SEQ_REUSED = "seq_reused"

# libpq's connect timeout, in whole seconds: long enough for a server in
# crash recovery to accept, short enough that the breaker sees a dead one.
CONNECT_TIMEOUT_S = 5


class DatabaseUnavailable(Exception):
    """The lane's connection failed or could not be made; the batch is not known to have committed."""


@dataclass
class Plan:
    """What the planner wants written for a set of new intents: plain data,
    turned into statements by the store."""

    spawned: list[tuple[str, Any, int]] = field(default_factory=list)
    """(entity, state, applied intents) of each entity the intents created"""
    updated: dict[str, tuple[Any, int, int]] = field(default_factory=dict)
    """entity -> (new state, applied intents, version it was planned from)"""
    dead: dict[int, tuple[str, str]] = field(default_factory=dict)
    """ord (1-based position in the batch) -> (code, reason)"""


class BatchPlanning(Protocol):
    """The planner's side of one batch's write (``engine.planner.BatchPlanner``)."""

    def entity_ids(self, ords: Sequence[int] | None = None) -> list[str]:
        """The entities the batch (or just ``ords``) touches, for the read."""

    def plan(self, new_ords: Sequence[int], rows: Iterable[tuple[str, str, int]]) -> Plan:
        """Plan ``new_ords`` from the rows read: (entity, state as JSON text, version)."""

    def plan_optimistic(self) -> Plan | None:
        """Plan every intent as new from cached states only, and cache the
        result; None (caching nothing) when an entity is not cached."""

    def committed(self) -> None:
        """The reading path's transaction committed: cache what it wrote."""


class StatePlanning(Protocol):
    """The lane's planner and the owner of its entity cache (``engine.planner.StatePlanner``)."""

    def planner(self, batch: bytes) -> BatchPlanning:
        """A planner for one batch (the JSON array of ring records)."""

    def forget(self) -> None:
        """Drop every cached state. Only ``LaneStore`` calls this."""


@dataclass
class WriteResult:
    batch_id: int
    new: int
    outcomes: dict[int, tuple[str, str, str, bool]]
    """ord -> (status, code, reason, duplicate) for every intent that is not
    simply newly committed; absent ords are newly committed. A resend of the
    stored intent has its stored outcome with ``duplicate`` True; another
    intent under a stored key is ``("rejected", "seq_reused", why, False)``
    (nothing stored for it)."""
    path: str
    """OPTIMISTIC, READING or ISOLATED: the path that committed the batch"""


class _Key(msgspec.Struct, array_like=True):
    """The first two fields of a ring record ``[client_id, seq, …]``; the rest is skipped."""

    client_id: str
    seq: int


_KEYS = msgspec.json.Decoder(list[_Key])


class BatchWrite:
    """A cut batch, planned and ready for ``LaneStore.commit``."""

    __slots__ = (
        "batch",
        "cut_at",
        "dead",
        "epoch",
        "first_received",
        "optimistic",
        "reason",
        "size",
        "statements",
        "text",
    )

    def __init__(self, batch: bytes, size: int, reason: str, first_received: float, cut_at: float) -> None:
        self.batch = batch
        self.text = batch.decode()
        self.size = size
        self.reason = reason
        self.first_received = first_received
        self.cut_at = cut_at
        self.optimistic = False  # a one-round-trip write is planned
        self.statements: list[tuple[str, dict]] = []  # the optimistic state writes
        self.dead: dict[int, tuple[str, str]] = {}  # the optimistic plan's dead letters
        self.epoch = -1  # the cache epoch it was planned in

    def __repr__(self) -> str:
        return f"<BatchWrite {self.size} intents, {'optimistic' if self.optimistic else 'reading'}>"


def _scalar(cursor: psycopg.Cursor[Any]) -> Any:
    """The first column of a statement's one row (its RETURNING value)."""
    row = cursor.fetchone()
    if row is None:
        raise psycopg.DataError("statement returned no row where one was expected")
    return row[0]


def _is_connection_error(exc: BaseException) -> bool:
    """True when the failure is the connection's, not the batch's data."""
    return isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError)) and not isinstance(
        exc, (psycopg.errors.QueryCanceled, psycopg.errors.DeadlockDetected, psycopg.errors.ProgramLimitExceeded)
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


class LaneStore:
    """One lane's connection and batch write.

    ``plan`` runs on the caller's thread and touches no connection; ``commit``
    may run on another thread (the flusher overlaps batch k's write with
    planning batch k+1), one ``commit`` at a time. The cache is touched only
    under the store's lock.
    """

    def __init__(self, dsn: str, *, lane: int = 0, planning: StatePlanning | None = None, notify: bool = False) -> None:
        self.dsn = dsn
        self.lane = lane
        self.notify = notify
        self._planning = planning
        self._conn: psycopg.Connection[Any] | None = None
        self._encode = msgspec.json.Encoder().encode
        self._cache_lock = threading.Lock()
        self._epoch = 0

    def __repr__(self) -> str:
        return (
            f"<LaneStore lane {self.lane} {'connected' if self.is_connected else 'disconnected'} epoch {self._epoch}>"
        )

    # --------------------------------------------------------------- connection
    @property
    def is_connected(self) -> bool:
        """A connection is open (the server may since have gone: see ``check_connection``)."""
        return self._conn is not None and not self._conn.closed

    def connect(self) -> None:
        """Open the lane's connection (one transaction per batch) unless open;
        raises DatabaseUnavailable when the server cannot be reached."""
        if self.is_connected:
            return
        try:
            self._conn = psycopg.connect(
                self.dsn, connect_timeout=CONNECT_TIMEOUT_S, application_name=f"batchscheduler flusher {self.lane}"
            )
        except psycopg.Error as exc:
            self._conn = None
            raise DatabaseUnavailable(_first_line(exc)) from exc

    def check_connection(self) -> None:
        """Between writes: notice a server that went away (it sends EOF or a
        FATAL message, so the socket turns readable), without a query. Raises
        DatabaseUnavailable, the connection closed, when it has."""
        conn = self._conn
        if conn is None or conn.closed:
            return
        try:
            if select.select([conn.fileno()], [], [], 0)[0]:
                conn.pgconn.consume_input()  # raises once the server is gone
        except psycopg.Error as exc:
            self.close()
            raise DatabaseUnavailable(_first_line(exc)) from exc

    def close(self) -> None:
        """Close the connection (an open transaction rolls back); idempotent."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    # --------------------------------------------------------------- the write
    def plan(self, batch: bytes, size: int, reason: str, first_received: float, cut_at: float) -> BatchWrite:
        """Plan ``batch`` (``size`` records, cut for ``reason``) for the
        optimistic path from the entity cache, without touching the
        connection. When the cache misses an entity, or planning fails, the
        write is left to the reading path (which meets the failure again and
        isolates it)."""
        write = BatchWrite(batch, size, reason, first_received, cut_at)
        planning = self._planning
        if planning is None:
            write.epoch = self._epoch
            write.optimistic = True  # log only: a plain INSERT is the optimistic write
            return write
        planner = planning.planner(batch)
        try:
            with self._cache_lock:
                write.epoch = self._epoch
                plan = planner.plan_optimistic()
            if plan is not None:
                write.statements = self._state_statements(plan)
                write.dead = plan.dead
                write.optimistic = True
        except Exception:  # noqa: BLE001 - the reading path redoes the plan and isolates what fails
            self._forget()  # the plan may already be cached; it will never be written
            write.statements, write.dead, write.optimistic = [], {}, False
        return write

    def commit(self, write: BatchWrite) -> WriteResult:
        """Write ``write`` in one transaction: optimistic, else reading, else
        isolated (module docstring). Returns only after COMMIT returned.
        Raises DatabaseUnavailable when the connection fails (it is closed;
        the batch may or may not have committed, and a retry answers what
        did from the stored outcomes). Any other exception is a bug and
        propagates. Whatever raises, the cache is forgotten first."""
        try:
            if self._conn is None or self._conn.closed:
                raise DatabaseUnavailable("not connected")
            failure: Exception | None = None
            if write.optimistic and write.epoch == self._epoch:
                try:
                    result = self._write_optimistic(write)
                except Exception as exc:  # a data error: isolated below
                    if _is_connection_error(exc):
                        raise
                    result, failure = None, exc
                if result is not None:
                    return result
                self._forget()  # nothing was written; the cache holds the plan's states
            if failure is None:
                try:
                    return self._write_reading(write)
                except Exception as exc:  # a data error or a planner bug: isolated below
                    if _is_connection_error(exc):
                        raise
                    failure = exc
            self._forget()  # the isolated path writes states the cache never sees
            return self._write_isolated(write, failure)
        except BaseException as exc:
            self._forget()
            if _is_connection_error(exc):
                self.close()
                raise DatabaseUnavailable(_first_line(exc)) from exc
            raise

    # ----------------------------------------------------------------- private
    def _forget(self) -> None:
        """The cache rule, applied: a write left its plan, so every cached
        state may be one that was never written. Forget them all and start a
        new epoch, so a batch planned from them is not written as planned."""
        with self._cache_lock:
            self._epoch += 1
            if self._planning is not None:
                self._planning.forget()

    def _head(self, write: BatchWrite, size: int) -> dict[str, Any]:
        return {
            "size": size,
            "reason": write.reason,
            "first": write.first_received,
            "cut": write.cut_at,
            "lane": self.lane,
        }

    def _state_statements(self, plan: Plan) -> list[tuple[str, dict]]:
        out: list[tuple[str, dict]] = []
        if plan.spawned:
            out.append((INSERT_ENTITIES, {"rows": self._encode(plan.spawned).decode()}))
        if plan.updated:
            out.append((UPDATE_ENTITIES, {"rows": self._encode(plan.updated).decode(), "n": len(plan.updated)}))
        return out

    def _write_optimistic(self, write: BatchWrite) -> WriteResult | None:
        """ONE round trip: BEGIN, the batch row, the plain log INSERT, the
        planned state writes, COMMIT. None -- nothing written -- when the
        batch holds a resend or the cache was stale."""
        conn = self._conn
        assert conn is not None
        cb = conn.cursor()
        try:
            with conn.pipeline(), conn.transaction():
                cb.execute(INSERT_BATCH, self._head(write, write.size), prepare=True)
                conn.execute(INSERT_LOG_PLAIN, {"batch": write.text, "ord0": 0}, prepare=True)
                for sql, params in write.statements:
                    conn.execute(sql, params, prepare=True)
                self._mark_dead(write, write.dead)
                if self.notify:
                    conn.execute(NOTIFY)
        except psycopg.Error as exc:
            if isinstance(exc, psycopg.errors.UniqueViolation) or (
                exc.diag is not None and exc.diag.sqlstate == STALE_CACHE
            ):
                return None
            raise
        outcomes = {o: (DEAD_LETTERED, code, why, False) for o, (code, why) in write.dead.items()}
        return WriteResult(_scalar(cb), write.size, outcomes, OPTIMISTIC)

    def _write_reading(self, write: BatchWrite) -> WriteResult:
        """One transaction for the whole batch, planned from what it reads;
        raises on failure (the transaction is rolled back)."""
        conn = self._conn
        assert conn is not None
        head = self._head(write, write.size)
        cb, cl = conn.cursor(), conn.cursor()
        if self._planning is None:
            # Only resends bring a log-only batch here (the optimistic write
            # took the rest): the fetch costs this path a second round trip.
            with conn.pipeline(), conn.transaction():
                cb.execute(INSERT_BATCH, head, prepare=True)
                cl.execute(INSERT_LOG, {"batch": write.text, "ord0": 0}, prepare=True)
                batch_id = _scalar(cb)
                new = [r[0] for r in cl.fetchall()]
                self._count_stored(write.size, len(new))
            return self._finish(write, batch_id, new, {}, READING)
        planner = self._planning.planner(write.batch)
        cs = conn.cursor()
        ids = self._encode(planner.entity_ids()).decode()
        # Two round trips in all: BEGIN + inserts + state read, then state
        # writes + COMMIT (the fetch forces the first sync; leaving the
        # pipeline sends the second).
        with conn.pipeline(), conn.transaction():
            cb.execute(INSERT_BATCH, head, prepare=True)
            cl.execute(INSERT_LOG, {"batch": write.text, "ord0": 0}, prepare=True)
            cs.execute(SELECT_ENTITIES, {"ids": ids}, prepare=True)
            batch_id = _scalar(cb)
            new = [r[0] for r in cl.fetchall()]
            plan = planner.plan(new, cs.fetchall())
            for sql, params in self._state_statements(plan):
                conn.execute(sql, params, prepare=True)
            self._mark_dead(write, plan.dead)
            self._count_stored(write.size, len(new))
        with self._cache_lock:
            planner.committed()
        return self._finish(write, batch_id, new, plan.dead, READING)

    def _write_isolated(self, write: BatchWrite, cause: BaseException) -> WriteResult:
        """The batch failed on its data: redo it with one savepoint per
        intent, so the intents whose writes fail are dead-lettered and the
        rest commit."""
        conn = self._conn
        assert conn is not None
        if conn.info.transaction_status:
            conn.rollback()
        log.warning("batch of %d failed on its data (%s); retrying intent by intent", write.size, _first_line(cause))
        records = [bytes(r).decode() for r in msgspec.json.decode(write.batch, type=list[msgspec.Raw])]
        planner = self._planning.planner(write.batch) if self._planning is not None else None
        dead: dict[int, tuple[str, str]] = {}
        unstorable: dict[int, tuple[str, str]] = {}
        new: list[int] = []
        with conn.transaction():
            batch_id = _scalar(conn.execute(INSERT_BATCH, self._head(write, len(records))))
            for ord_, record in enumerate(records, start=1):
                try:
                    with conn.transaction():  # SAVEPOINT
                        inserted = conn.execute(INSERT_LOG, {"batch": f"[{record}]", "ord0": ord_ - 1}).fetchall()
                        if not inserted:
                            continue
                        if planner is None:
                            plan = Plan()
                        else:
                            ids = self._encode(planner.entity_ids([ord_])).decode()
                            plan = planner.plan([ord_], conn.execute(SELECT_ENTITIES, {"ids": ids}).fetchall())
                        if ord_ in plan.dead:
                            dead[ord_] = plan.dead[ord_]
                        else:
                            for sql, params in self._state_statements(plan):
                                conn.execute(sql, params)
                        new.append(ord_)
                except Exception as exc:  # a poison intent must not stop the batch
                    if _is_connection_error(exc):
                        raise
                    if isinstance(exc, psycopg.errors.IntegrityError):
                        code = "constraint_violation"
                    else:
                        code = "write_error" if isinstance(exc, psycopg.Error) else "planner_error"
                    diag = ((exc.diag.message_primary if isinstance(exc, psycopg.Error) else None) or str(exc)).strip()
                    dead[ord_] = (code, f"{type(exc).__name__}: {diag}")
                    # The log row went with the savepoint; write it again so
                    # the outcome is durable and a resend gets it.
                    try:
                        with conn.transaction():
                            inserted = conn.execute(INSERT_LOG, {"batch": f"[{record}]", "ord0": ord_ - 1}).fetchall()
                    except psycopg.Error as again:
                        if _is_connection_error(again):
                            raise
                        # Not even the log row can be stored: answer dead-lettered
                        # (nothing was kept, so a resend is tried afresh).
                        log.error("intent %d of batch cannot be logged: %s", ord_, again)
                        unstorable[ord_] = ("unstorable", f"{type(again).__name__}: {again}".strip())
                        dead.pop(ord_, None)
                        continue
                    if inserted:
                        new.append(ord_)
                    else:
                        dead.pop(ord_, None)
            self._mark_dead(write, dead)
            self._count_stored(len(records), len(new))
        return self._finish(write, batch_id, new + list(unstorable), {**dead, **unstorable}, ISOLATED)

    def _count_stored(self, size: int, stored: int) -> None:
        """Make the batch row say what this batch stored, then announce it
        (a batch that stored nothing has no row and no NOTIFY)."""
        conn = self._conn
        assert conn is not None
        if stored == 0:
            conn.execute(DROP_BATCH)
            return
        if stored < size:
            conn.execute(TRIM_BATCH, {"stored": stored, "resends": size - stored})
        if self.notify:
            conn.execute(NOTIFY)

    def _mark_dead(self, write: BatchWrite, dead: dict[int, tuple[str, str]]) -> None:
        """Mark the batch's dead letters in the log and copy them to
        ``dead_letters``, found by their keys (read from the batch text)."""
        if not dead:
            return
        conn = self._conn
        assert conn is not None
        ords = sorted(dead)
        keys = _KEYS.decode(write.batch)
        clients = [keys[o - 1].client_id for o in ords]
        seqs = [keys[o - 1].seq for o in ords]
        conn.execute(
            MARK_DEAD,
            {
                "clients": clients,
                "seqs": seqs,
                "codes": [dead[o][0] for o in ords],
                "reasons": [dead[o][1] for o in ords],
            },
        )
        conn.execute(COPY_DEAD, {"clients": clients, "seqs": seqs})

    def _finish(
        self, write: BatchWrite, batch_id: int, new: Iterable[int], dead: dict[int, tuple[str, str]], path: str
    ) -> WriteResult:
        """The committed batch's result; the intents that were not new get
        their stored outcomes (one read, after COMMIT)."""
        conn = self._conn
        assert conn is not None
        size = write.size
        new_set = set(new)
        outcomes: dict[int, tuple[str, str, str, bool]] = {
            o: (DEAD_LETTERED, code, reason, False) for o, (code, reason) in dead.items() if o in new_set
        }
        if len(new_set) < size:
            missing = [o for o in range(1, size + 1) if o not in new_set]
            rows = conn.execute(ORIGINAL_OUTCOMES, {"batch": write.text, "ords": missing}).fetchall()
            conn.commit()  # read-only; ends the implicit transaction
            for ord_, status, code, reason, same, client_id, seq, entity, kind in rows:
                if same:
                    outcomes[ord_] = (status, code, reason, True)
                else:
                    stored = f"{status}: {code}" if code else status
                    outcomes[ord_] = (
                        REJECTED,
                        SEQ_REUSED,
                        f"seq {seq} of client {client_id} was already used for a different intent "
                        f"(stored: {kind} on {entity}, {stored})",
                        False,
                    )
            for ord_ in missing:  # a row we cannot find cannot be acknowledged as stored
                outcomes.setdefault(ord_, (DEAD_LETTERED, "lost_conflict", "conflicting row vanished; resend", True))
        return WriteResult(batch_id, len(new_set), outcomes, path)
