"""The batch writer: one transaction per batch, statements pipelined.

A batch reaches the writer as one JSON array of records, each record the
JSON array ``[client_id, seq, entity, kind, args, received_us]`` exactly as it
sat in the ring. PostgreSQL expands it with ``jsonb_array_elements``, so the
flusher does no per-intent work to write the log. (Measured here: psycopg's
Python-level list-to-array adaptation cost ~11 ms for three 857-element arrays;
the same rows as text literals ~3 ms; one jsonb parameter needs no adaptation.)

The common case (``write_fast``) is one round trip: BEGIN, the batch row, a
plain INSERT of the log, the state writes planned from the pipeline's entity
cache, COMMIT. When it declines (cache miss, a resend in the batch, a stale
cache) nothing was written, and ``write`` does the general case.

Per batch in ``write``, in one transaction:

1. ``INSERT`` the ``batches`` row and the intent log with
   ``ON CONFLICT (client_id, seq) DO NOTHING RETURNING batch_ord``: the unique
   key makes a resend a no-op and tells which intents are new.
2. Only for new intents: the state statements a ``planner`` returns (set-based
   ``UPDATE … FROM unnest``, one row per entity), and the dead letters it
   decided on.
3. ``COMMIT``. Nothing is acknowledged before it returns.

The records that were not new are then looked up in one read
(``ORIGINAL_OUTCOMES``): a resend of the stored intent gets its stored
outcome, marked duplicate; a record that shares only the key -- another
entity, kind or args under a seq already used -- is rejected ``seq_reused``,
naming what is stored, and nothing is stored for it.

Without a planner (log-only) BEGIN, step 1 and COMMIT go in one pipeline
sync: one round trip per batch. With one, BEGIN and step 1 are a round trip
and steps 2-3 a second.

If the batch fails on its data (not on the connection), ``write_isolated``
redoes it intent by intent under savepoints so one poison intent is
dead-lettered and the others commit: the seed's per-intent isolation. On
connection errors the exception propagates; the flusher keeps the records in
the ring and retries.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import psycopg

from persistence.migrations import SCHEMA as S

log = logging.getLogger(__name__)

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

# A resend whose (client_id, seq) is stored for a different intent: nothing
# is stored for it, and it is not the stored intent's duplicate either.
REJECTED = "rejected"
SEQ_REUSED = "seq_reused"

MARK_DEAD = f"""UPDATE {S}.intent_log l SET status = 'dead_lettered', code = d.code, reason = d.reason
FROM unnest(%(ords)s::int4[], %(codes)s::text[], %(reasons)s::text[]) AS d(ord, code, reason)
WHERE l.batch_id = currval('{S}.batches_id_seq') AND l.batch_ord = d.ord"""

COPY_DEAD = f"""INSERT INTO {S}.dead_letters (client_id, seq, entity, kind, args, code, reason, batch_id)
SELECT client_id, seq, entity, kind, args, code, reason, batch_id FROM {S}.intent_log
WHERE batch_id = currval('{S}.batches_id_seq') AND batch_ord = ANY(%(ords)s::int4[])"""

# Raised by batchscheduler.expect_rows when a cached entity changed behind
# the flusher's back (see engine.pipeline.UPDATE_ENTITIES).
STALE_CACHE = "BS001"

# The batch row counts what the batch stored (README, Tables): resends are
# answered from earlier batches and are not counted in size; a batch of
# resends only keeps no row.
TRIM_BATCH = f"""UPDATE {S}.batches SET size = %(stored)s, resends = %(resends)s
WHERE id = currval('{S}.batches_id_seq')"""
DROP_BATCH = f"DELETE FROM {S}.batches WHERE id = currval('{S}.batches_id_seq')"

NOTIFY = "SELECT pg_notify('batchscheduler_batches', currval('batchscheduler.batches_id_seq')::text)"


@dataclass
class Plan:
    """What the pipeline wants done for a set of new intents."""

    statements: list[tuple[str, dict]] = field(default_factory=list)
    dead: dict[int, tuple[str, str]] = field(default_factory=dict)
    """ord (1-based position in the batch) -> (code, reason)"""


class Planner(Protocol):
    """The pipeline's side of a batch write (see ``engine.pipeline``)."""

    def read_query(self, ords: Sequence[int] | None = None) -> tuple[str, dict]:
        """A query returning the rows of state the plan needs, for the whole
        batch (None) or for the given ords."""

    def plan(self, new_ords: Sequence[int], rows: list[tuple]) -> Plan:
        """Statements and dead letters for ``new_ords`` given those rows."""

    def plan_optimistic(self) -> Plan | None:
        """Statements and dead letters for every intent, from cached state
        only; None when the cache cannot answer."""

    def committed(self) -> None:
        """The plan's transaction committed."""

    def invalidate(self) -> None:
        """The plan's transaction failed, or state was written intent by intent."""


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


def _scalar(cursor: psycopg.Cursor[Any]) -> Any:
    """The first column of a statement's one row (its RETURNING value)."""
    row = cursor.fetchone()
    if row is None:
        raise psycopg.DataError("statement returned no row where one was expected")
    return row[0]


def is_connection_error(exc: BaseException) -> bool:
    """True when the failure is the connection's, not the batch's data."""
    return isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError)) and not isinstance(
        exc, (psycopg.errors.QueryCanceled, psycopg.errors.DeadlockDetected, psycopg.errors.ProgramLimitExceeded)
    )


class BatchWriter:
    """Writes batches on one connection (autocommit off; one transaction each)."""

    def __init__(self, conn: psycopg.Connection, *, notify: bool = False, lane: int = 0) -> None:
        self.conn = conn
        self.notify = notify
        self.lane = lane

    def write_fast(
        self,
        batch: str,
        size: int,
        reason: str,
        first_received: float,
        cut_at: float,
        planner: Planner | None = None,
        plan: Plan | None = None,
        invalidate: bool = True,
    ) -> WriteResult | None:
        """The common case in ONE round trip: BEGIN, the batch row, a plain
        INSERT of the log, the state writes planned from the entity cache,
        COMMIT. ``plan`` is the planner's ``plan_optimistic()`` if already
        made. Returns None -- nothing written, use ``write`` -- when the
        cache misses an entity, the batch holds a resend (unique violation),
        or a cached entity changed behind our back (stale cache). Any other
        failure raises, as ``write`` does. With ``invalidate=False`` it
        leaves the cache alone on failure (the caller must invalidate), so it
        can run on a thread of its own while the caller plans the next batch."""
        conn = self.conn
        if planner is not None and plan is None:
            plan = planner.plan_optimistic()
            if plan is None:
                return None
        cb = conn.cursor()
        head = {"size": size, "reason": reason, "first": first_received, "cut": cut_at, "lane": self.lane}
        try:
            with conn.pipeline(), conn.transaction():
                cb.execute(INSERT_BATCH, head, prepare=True)
                conn.execute(INSERT_LOG_PLAIN, {"batch": batch, "ord0": 0}, prepare=True)
                if plan is not None:
                    for sql, params in plan.statements:
                        conn.execute(sql, params, prepare=True)
                    self._mark_dead(plan.dead)
                if self.notify:
                    conn.execute(NOTIFY)
        except psycopg.Error as exc:
            if planner is not None and invalidate:
                planner.invalidate()
            if isinstance(exc, psycopg.errors.UniqueViolation) or (
                exc.diag is not None and exc.diag.sqlstate == STALE_CACHE
            ):
                return None
            raise
        except BaseException:
            if planner is not None and invalidate:
                planner.invalidate()
            raise
        dead = plan.dead if plan is not None else {}
        return WriteResult(
            _scalar(cb), size, {o: ("dead_lettered", code, why, False) for o, (code, why) in dead.items()}
        )

    def write(
        self, batch: str, size: int, reason: str, first_received: float, cut_at: float, planner: Planner | None = None
    ) -> WriteResult:
        """One transaction for the whole batch; raises psycopg.Error on failure
        (the transaction is rolled back)."""
        conn = self.conn
        head = {"size": size, "reason": reason, "first": first_received, "cut": cut_at, "lane": self.lane}
        cb, cl = conn.cursor(), conn.cursor()
        if planner is None:
            # Only resends bring a log-only batch here (write_fast took the
            # rest): the fetch costs this slow path a second round trip.
            with conn.pipeline(), conn.transaction():
                cb.execute(INSERT_BATCH, head, prepare=True)
                cl.execute(INSERT_LOG, {"batch": batch, "ord0": 0}, prepare=True)
                batch_id = _scalar(cb)
                new = [r[0] for r in cl.fetchall()]
                self._count_stored(size, len(new))
            return self._finish(batch, size, batch_id, new, Plan())
        cs = conn.cursor()
        read_sql, read_params = planner.read_query()
        # Two round trips in all: BEGIN + inserts + state read, then state
        # writes + COMMIT (the fetch forces the first sync; leaving the
        # pipeline sends the second).
        with conn.pipeline(), conn.transaction():
            cb.execute(INSERT_BATCH, head, prepare=True)
            cl.execute(INSERT_LOG, {"batch": batch, "ord0": 0}, prepare=True)
            cs.execute(read_sql, read_params, prepare=True)
            batch_id = _scalar(cb)
            new = [r[0] for r in cl.fetchall()]
            plan = planner.plan(new, cs.fetchall())
            for sql, params in plan.statements:
                conn.execute(sql, params, prepare=True)
            self._mark_dead(plan.dead)
            self._count_stored(size, len(new))
        planner.committed()
        return self._finish(batch, size, batch_id, new, plan)

    def write_isolated(
        self,
        batch: str,
        records: Sequence[str],
        reason: str,
        first_received: float,
        cut_at: float,
        planner: Planner | None = None,
    ) -> WriteResult:
        """The fallback: the same batch, one savepoint per intent, so the
        intents whose writes fail are dead-lettered and the rest commit.
        ``records`` are the batch's elements as JSON texts, in order."""
        conn = self.conn
        outcomes_dead: dict[int, tuple[str, str]] = {}
        unstorable: dict[int, tuple[str, str]] = {}
        new: list[int] = []
        with conn.transaction():
            batch_id = _scalar(
                conn.execute(
                    INSERT_BATCH,
                    {"size": len(records), "reason": reason, "first": first_received, "cut": cut_at, "lane": self.lane},
                )
            )
            for ord_, record in enumerate(records, start=1):
                try:
                    with conn.transaction():  # SAVEPOINT
                        inserted = conn.execute(INSERT_LOG, {"batch": f"[{record}]", "ord0": ord_ - 1}).fetchall()
                        if not inserted:
                            continue
                        if planner is None:
                            plan = Plan()
                        else:
                            read_sql, read_params = planner.read_query([ord_])
                            plan = planner.plan([ord_], conn.execute(read_sql, read_params).fetchall())
                        if ord_ in plan.dead:
                            outcomes_dead[ord_] = plan.dead[ord_]
                        else:
                            for sql, params in plan.statements:
                                conn.execute(sql, params)
                        new.append(ord_)
                except Exception as exc:  # a poison intent must not stop the batch
                    if isinstance(exc, psycopg.Error) and is_connection_error(exc):
                        raise
                    if isinstance(exc, psycopg.errors.IntegrityError):
                        code = "constraint_violation"
                    else:
                        code = "write_error" if isinstance(exc, psycopg.Error) else "planner_error"
                    diag = ((exc.diag.message_primary if isinstance(exc, psycopg.Error) else None) or str(exc)).strip()
                    outcomes_dead[ord_] = (code, f"{type(exc).__name__}: {diag}")
                    # The log row went with the savepoint; write it again so
                    # the outcome is durable and a resend gets it.
                    try:
                        with conn.transaction():
                            inserted = conn.execute(INSERT_LOG, {"batch": f"[{record}]", "ord0": ord_ - 1}).fetchall()
                    except psycopg.Error as again:
                        if is_connection_error(again):
                            raise
                        # Not even the log row can be stored: answer dead-lettered
                        # (nothing was kept, so a resend is tried afresh).
                        log.error("intent %d of batch cannot be logged: %s", ord_, again)
                        unstorable[ord_] = ("unstorable", f"{type(again).__name__}: {again}".strip())
                        outcomes_dead.pop(ord_, None)
                        continue
                    if inserted:
                        new.append(ord_)
                    else:
                        outcomes_dead.pop(ord_, None)
            self._mark_dead(outcomes_dead)
            self._count_stored(len(records), len(new))
        if planner is not None:
            planner.invalidate()  # states were changed one intent at a time
        return self._finish(
            batch, len(records), batch_id, new + list(unstorable), Plan(dead={**outcomes_dead, **unstorable})
        )

    # ------------------------------------------------------------------ private
    def _count_stored(self, size: int, stored: int) -> None:
        """Make the batch row say what this batch stored, then announce it
        (a batch that stored nothing has no row and no NOTIFY)."""
        if stored == 0:
            self.conn.execute(DROP_BATCH)
            return
        if stored < size:
            self.conn.execute(TRIM_BATCH, {"stored": stored, "resends": size - stored})
        if self.notify:
            self.conn.execute(NOTIFY)

    def _mark_dead(self, dead: dict[int, tuple[str, str]]) -> None:
        if not dead:
            return
        ords = sorted(dead)
        params = {"ords": ords, "codes": [dead[o][0] for o in ords], "reasons": [dead[o][1] for o in ords]}
        self.conn.execute(MARK_DEAD, params)
        self.conn.execute(COPY_DEAD, {"ords": ords})

    def _finish(self, batch: str, size: int, batch_id: int, new: Iterable[int], plan: Plan) -> WriteResult:
        new_set = set(new)
        outcomes: dict[int, tuple[str, str, str, bool]] = {
            o: ("dead_lettered", code, reason, False) for o, (code, reason) in plan.dead.items() if o in new_set
        }
        if len(new_set) < size:
            missing = [o for o in range(1, size + 1) if o not in new_set]
            rows = self.conn.execute(ORIGINAL_OUTCOMES, {"batch": batch, "ords": missing}).fetchall()
            self.conn.commit()  # read-only; ends the implicit transaction
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
                outcomes.setdefault(ord_, ("dead_lettered", "lost_conflict", "conflicting row vanished; resend", True))
        return WriteResult(batch_id, len(new_set), outcomes)
