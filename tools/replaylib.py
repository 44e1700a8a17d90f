"""Replay: rebuild the entities from the intent log and compare with the live table.

The intent log is the source of truth: its committed rows, in apply order
(batch id, then position in the batch), applied from an empty world with the
same handlers and the same ``World.apply`` the flusher uses, must reproduce
``batchscheduler.entities`` exactly (state and version). The rebuilt table is
written to the scratch schema ``batchscheduler_replay`` and compared in SQL.

An intent the log says committed but that fails on replay is itself a
difference (reported), as is a dead letter that would now apply: either means
the handlers changed since the intents were applied.

``tools/replay`` (``main``) reaches the database through ``--dsn`` (a running
engine's ``dsn:`` line) or ``--data-dir`` (a stopped engine's data
directory: it takes the directory's ``engine.lock`` so no engine starts
meanwhile, starts the embedded PostgreSQL in ``<data_dir>/pg``, compares,
and stops it). Exit 0: identical; 1: differs; 2: could not compare (bad
arguments, no database, an engine running on the data directory).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import msgspec
import psycopg

from engine.handlers import Registry
from engine.intent import DecodedRecord
from engine.planner import World
from persistence.migrations import SCHEMA

log = logging.getLogger(__name__)

SCRATCH = f"{SCHEMA}_replay"
CHUNK = 20_000  # log rows fetched per round trip

LOG_ROWS = f"""SELECT client_id, seq, entity, kind, args::text, status, code
FROM {SCHEMA}.intent_log ORDER BY batch_id, batch_ord"""

_DIFFERING = f"""FROM {SCHEMA}.entities l FULL OUTER JOIN {SCRATCH}.entities r ON l.id = r.id
WHERE l.id IS NULL OR r.id IS NULL OR l.state <> r.state OR l.version <> r.version"""
DIFF = f"""SELECT coalesce(l.id, r.id), l.state::text, r.state::text, l.version, r.version
{_DIFFERING}
ORDER BY 1 LIMIT %s"""
DIFF_COUNT = f"SELECT count(*) {_DIFFERING}"

# Dead-letter codes decided from the state at the time; replay must decide the same.
_STATE_DEPENDENT = ("handler_error", "no_such_entity", "entity_exists")


@dataclasses.dataclass
class ReplayReport:
    intents: int = 0
    applied: int = 0
    entities: int = 0  # rebuilt by the replay
    live_entities: int = 0  # in batchscheduler.entities
    differences_total: int = 0  # every differing entity; ``differences`` holds the first max_diffs
    differences: list[tuple] = dataclasses.field(default_factory=list)
    outcome_mismatches: list[tuple] = dataclasses.field(default_factory=list)

    @property
    def identical(self) -> bool:
        return not self.differences_total and not self.differences and not self.outcome_mismatches


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
        ((report.differences_total,),) = conn.execute(DIFF_COUNT).fetchall()
        ((report.live_entities,),) = conn.execute(f"SELECT count(*) FROM {SCHEMA}.entities").fetchall()
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


# ---------------------------------------------------------------------- CLI
def _prog() -> str:
    from .bench.args import prog

    return prog("replay")


def build_parser() -> argparse.ArgumentParser:
    from .bench import args as cli_args

    p = argparse.ArgumentParser(
        prog=cli_args.prog("replay"),
        description="Replay batchscheduler.intent_log (committed intents, in batch order) from an empty world "
        "with the engine's handlers, write the result to the schema batchscheduler_replay and compare "
        "it with batchscheduler.entities (state and version), and the logged outcomes with the replayed "
        "ones. Prints a summary table and the first differences; --json writes the report.",
        epilog="Exit status: 0 identical; 1 differs; 2 could not compare (bad arguments, the database "
        "unreachable or not an engine's, an engine running on --data-dir).",
        formatter_class=cli_args.HelpFormatter,
    )
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--dsn",
        type=cli_args.dsn,
        help="the database of an engine, running or not (the 'dsn:' line tools/run_engine prints)",
    )
    where.add_argument(
        "--data-dir",
        metavar="DIR",
        help="a stopped engine's data directory: its embedded PostgreSQL (DIR/pg) is started for the "
        "replay and stopped after it; refused while an engine runs there",
    )
    p.add_argument(
        "--handlers",
        default="engine.handlers:BUILTIN",
        help="handler registry the engine ran with",
    )
    p.add_argument("--max-diffs", type=cli_args.nonnegative_int, default=20, help="differences to print and write")
    p.add_argument("--keep-scratch", action="store_true", help="keep the batchscheduler_replay schema")
    p.add_argument(
        "--json", metavar="FILE", type=cli_args.output_file, help="also write the report as JSON to FILE ('-': stdout)"
    )
    return p


def render(report: ReplayReport, max_diffs: int) -> str:
    from .bench.report import table

    lines = [
        f"intents in log: {report.intents}, applied: {report.applied}, entities rebuilt: {report.entities}",
        "",
        table(
            ("check", "live", "replayed", "differing"),
            [
                ("entities", report.live_entities, report.entities, report.differences_total),
                ("committed intents", "-", report.applied, "-"),
                ("outcomes (intent log)", report.intents, "-", len(report.outcome_mismatches)),
            ],
        ),
    ]
    if report.outcome_mismatches or report.differences:
        lines.append("")
    for client_id, seq, status, why in report.outcome_mismatches[:max_diffs]:
        lines.append(f"outcome differs: ({client_id}, {seq}) logged {status}, replay: {why}")
    for entity, live, replayed, v_live, v_replayed in report.differences:
        lines.append(f"entity {entity}:\n  live     v{v_live}: {live}\n  replayed v{v_replayed}: {replayed}")
    shown = len(report.differences)
    if report.differences_total > shown:
        lines.append(f"… and {report.differences_total - shown} more differing entities (--max-diffs)")
    lines.append(
        "identical"
        if report.identical
        else f"DIFFERENT: {report.differences_total} entities, {len(report.outcome_mismatches)} outcomes"
    )
    return "\n".join(lines)


def as_json(report: ReplayReport, max_diffs: int) -> dict:
    return {
        "identical": report.identical,
        "intents": report.intents,
        "applied": report.applied,
        "entities_live": report.live_entities,
        "entities_replayed": report.entities,
        "entities_differing": report.differences_total,
        "outcomes_differing": len(report.outcome_mismatches),
        "differences": [
            {"entity": e, "live": live, "replayed": rep, "live_version": v_live, "replayed_version": v_rep}
            for e, live, rep, v_live, v_rep in report.differences
        ],
        "outcome_mismatches": [
            {"client_id": c, "seq": q, "logged": status, "replay": why}
            for c, q, status, why in report.outcome_mismatches[:max_diffs]
        ],
    }


def main(argv: Sequence[str] | None = None) -> int:
    from engine import handlers
    from engine.errors import ConfigError

    from . import enginedb
    from .bench.report import write_json

    args = build_parser().parse_args(argv)
    prog = _prog()
    source = {"dsn": args.dsn} if args.dsn else {"data_dir": str(Path(args.data_dir).resolve())}

    def cannot(why: str) -> int:
        print(f"{prog}: could not compare: {why}", file=sys.stderr)
        if args.json:
            write_json(args.json, {"tool": "replay", "source": source, "identical": None, "error": why})
        return 2

    try:
        registry = handlers.load(args.handlers)
    except ConfigError as exc:
        return cannot(f"--handlers: {exc}")
    # SIGTERM unwinds like Ctrl-C: a database started for --data-dir is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        with contextlib.ExitStack() as stack:
            dsn = args.dsn or stack.enter_context(enginedb.stopped_engine_database(args.data_dir))
            report = replay(dsn, registry, max_diffs=args.max_diffs, keep_scratch=args.keep_scratch)
    except enginedb.NoDatabase as exc:
        return cannot(str(exc))
    except psycopg.Error as exc:
        return cannot(enginedb.describe(exc))
    print(render(report, args.max_diffs))
    if args.json:
        write_json(args.json, {"tool": "replay", "source": source, **as_json(report, args.max_diffs)})
    return 0 if report.identical else 1
