"""Replay: rebuild the entities from the intent log and compare with the live table.

The intent log is the source of truth: its committed rows, in apply order
(batch id, then position in the batch), applied from an empty world with the
same handlers and the same ``World.apply`` the flusher uses, must reproduce
``batchscheduler.entities`` exactly (state and version). The rebuilt table is
written to the scratch schema ``batchscheduler_replay`` and compared in SQL.

An intent the log says committed but that fails on replay is itself a
difference (reported), as is a dead letter that would now apply: either means
the handlers changed since the intents were applied.
"""

from __future__ import annotations

import dataclasses
import logging

import msgspec
import psycopg

from engine.handlers import Registry
from engine.intent import DecodedRecord
from engine.pipeline import World

log = logging.getLogger(__name__)

SCRATCH = "batchscheduler_replay"
CHUNK = 20_000  # log rows fetched per round trip

LOG_ROWS = """SELECT client_id, seq, entity, kind, args::text, status, code
FROM batchscheduler.intent_log ORDER BY batch_id, batch_ord"""

DIFF = f"""SELECT coalesce(l.id, r.id), l.state::text, r.state::text, l.version, r.version
FROM batchscheduler.entities l FULL OUTER JOIN {SCRATCH}.entities r ON l.id = r.id
WHERE l.id IS NULL OR r.id IS NULL OR l.state <> r.state OR l.version <> r.version
ORDER BY 1 LIMIT %s"""

# Dead-letter codes decided from the state at the time; replay must decide the same.
_STATE_DEPENDENT = ("handler_error", "no_such_entity", "entity_exists")


@dataclasses.dataclass
class ReplayReport:
    intents: int = 0
    applied: int = 0
    entities: int = 0
    differences: list[tuple] = dataclasses.field(default_factory=list)
    outcome_mismatches: list[tuple] = dataclasses.field(default_factory=list)

    @property
    def identical(self) -> bool:
        return not self.differences and not self.outcome_mismatches


def replay(dsn: str, registry: Registry, *, max_diffs: int = 20, keep_scratch: bool = False) -> ReplayReport:
    """Rebuild into the scratch schema and compare; see the module docstring."""
    report = ReplayReport()
    world = World({})
    decode_args = msgspec.json.Decoder(dict).decode
    with psycopg.connect(dsn) as conn:
        with conn.cursor(name="replay_log") as cur:  # server-side: constant memory
            cur.itersize = CHUNK
            cur.execute(LOG_ROWS)
            for client_id, seq, entity, kind, args, status, code in cur:
                report.intents += 1
                if kind not in registry:
                    report.outcome_mismatches.append((client_id, seq, status, f"no handler for kind {kind!r}"))
                    continue
                rec = DecodedRecord(client_id, seq, entity, kind, decode_args(args), 0)
                if status == "committed":
                    failure = world.apply(registry, rec)
                    if failure is not None:
                        report.outcome_mismatches.append((client_id, seq, status, failure[0]))
                    else:
                        report.applied += 1
                elif code in _STATE_DEPENDENT and _would_apply(registry, rec, world):
                    # Decided from the state at the time: replay must decide the same.
                    report.outcome_mismatches.append((client_id, seq, status, "applies on replay"))
        conn.commit()
        encode = msgspec.json.Encoder().encode
        report.entities = len(world.states)
        with conn.transaction():
            conn.execute(f"DROP SCHEMA IF EXISTS {SCRATCH} CASCADE")
            conn.execute(f"CREATE SCHEMA {SCRATCH}")
            conn.execute(
                f"CREATE TABLE {SCRATCH}.entities (id text PRIMARY KEY, state jsonb NOT NULL, version bigint NOT NULL)"
            )
            with conn.cursor().copy(f"COPY {SCRATCH}.entities (id, state, version) FROM STDIN") as copy:
                for entity, state in world.states.items():
                    copy.write_row((entity, encode(state).decode(), world.touched.get(entity, 0)))
        report.differences = conn.execute(DIFF, (max_diffs,)).fetchall()
        conn.commit()
        if not keep_scratch:
            conn.execute(f"DROP SCHEMA {SCRATCH} CASCADE")
            conn.commit()
    return report


def _would_apply(registry: Registry, rec: DecodedRecord, world: World) -> bool:
    """Would ``rec`` apply to the current replayed world? (checked on a copy)"""
    import copy

    trial = World({rec.entity: copy.deepcopy(world.states[rec.entity])} if rec.entity in world.states else {})
    return trial.apply(registry, rec) is None
