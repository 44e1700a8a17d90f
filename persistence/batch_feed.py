"""The feed of stored batches: what a lane store announces, read back.

A lane store built with ``notify=True`` sends one ``pg_notify`` on
``BATCHES_CHANNEL`` per batch that stored something, inside the batch's
transaction, so the notification is delivered only once the batch is
durable. The feed LISTENs on its own autocommit connection and, per
notification, reads the batch row and its newly committed intents in apply
order (``batch_ord``). A batch notified before ``BatchFeed`` was made is not
seen: make it before anything is written.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import psycopg

from persistence.lane_store import BATCHES_CHANNEL
from persistence.migrations import SCHEMA as S

BATCH_ROW = f"SELECT size, cut_reason FROM {S}.batches WHERE id = %s"
BATCH_INTENTS = f"""SELECT client_id, seq, entity, kind, args::text FROM {S}.intent_log
WHERE batch_id = %s AND status = 'committed' ORDER BY batch_ord"""


class StoredBatch(NamedTuple):
    batch_id: int
    size: int | None  # None when the row is gone (tables truncated meanwhile)
    cut_reason: str | None
    intents: list[tuple[str, int, str, str, str]]
    """(client_id, seq, entity, kind, args as JSON text) of each newly committed intent"""


class BatchFeed:
    """One LISTEN connection; ``wait`` returns the batches announced since."""

    def __init__(self, dsn: str) -> None:
        self._conn: psycopg.Connection[Any] = psycopg.connect(dsn, autocommit=True)
        self._conn.execute(f"LISTEN {BATCHES_CHANNEL}")

    def wait(self, timeout_s: float) -> list[StoredBatch]:
        """The batches notified within ``timeout_s`` (an empty list if none);
        raises psycopg.Error when the connection fails."""
        conn = self._conn
        # Drain first: querying while the notifies() generator is open would
        # wait on the connection lock it holds.
        notes = list(conn.notifies(timeout=timeout_s))
        out = []
        for note in notes:
            batch_id = int(note.payload)
            head = conn.execute(BATCH_ROW, (batch_id,)).fetchone()
            rows = conn.execute(BATCH_INTENTS, (batch_id,)).fetchall()
            out.append(StoredBatch(batch_id, head[0] if head else None, head[1] if head else None, rows))
        return out

    def close(self) -> None:
        self._conn.close()
