"""Dead letters: list, show, replay and purge ``batchscheduler.dead_letters``.

A dead letter is an intent the engine stored but could not apply (its
``code`` says why: ``no_such_entity``, ``handler_error``, …; see
``engine.codes``). The engine answers a resend of it with the same outcome,
so bringing one back means sending it again as a *new* intent:

- ``replay`` resubmits the selected rows, oldest first, through a running
  engine's socket under one client id (``dead-letters-replay`` by default)
  with seqs after every seq that client id has stored (intent log and dead
  letters), so they never collide with an earlier replay's. A session
  advisory lock per client id keeps two replays from picking the same seqs.
  A replayed intent that dead-letters again is a new dead letter under that
  client id. Nothing is deleted unless ``--purge-committed`` is given: then
  exactly the rows whose replay committed.
- ``purge`` deletes the selected rows from ``batchscheduler.dead_letters``.
  The intent log keeps its ``dead_lettered`` rows: it is the history
  (``tools/replay`` reads it), not a queue.

Rows are selected by ``--id``, ``--client``, ``--kind``, ``--code`` (each
repeatable or a comma list; values of one flag are alternatives, flags
combine with AND), ``--since`` (inclusive) and ``--until`` (exclusive) on
``created_at``, and ``--limit`` (the first N by id): ``list --limit 10``
shows exactly the rows ``replay --limit 10`` would send.

The database is reached as in ``tools/replay`` (``enginedb``): ``--dsn``, or
``--data-dir`` (default ``var``, the engine's): a running engine's embedded
server, or a stopped engine's, started for the command and stopped after it.
Exit 0: done (replay: every intent committed); 1: an id not found, or a
replayed intent that did not commit; 2: bad usage, no database or no engine.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import os
import re
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import psycopg

from engine import codes
from persistence.migrations import SCHEMA

DEFAULT_CLIENT_ID = "dead-letters-replay"
LIST_LIMIT = 50  # a screenful; --limit 0 lists every match
REASON_WIDTH = 48  # reasons are sentences; the table clips them, show prints them whole
REPLY_TIMEOUT_S = 60.0  # long enough for a breaker's recovery (30 s by default) on a busy engine
PING_TIMEOUT_S = 5.0

DEAD_LETTER_CODES = tuple(code for code, status in codes.REPLY_CODES.items() if status == codes.DEAD_LETTERED)
COLUMNS = "id, client_id, seq, entity, kind, args::text, code, reason, batch_id, created_at"
_AGE = re.compile(r"(\d+)([smhdw])")
_AGE_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}

EXIT_OK, EXIT_NOT_DONE, EXIT_USAGE = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class DeadLetter:
    id: int
    client_id: str
    seq: int
    entity: str
    kind: str
    args: dict
    code: str
    reason: str
    batch_id: int
    created_at: dt.datetime

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> DeadLetter:
        id_, client_id, seq, entity, kind, args, code, reason, batch_id, created_at = row
        return cls(id_, client_id, seq, entity, kind, json.loads(args), code, reason, batch_id, created_at)

    def as_json(self) -> dict:
        return {**dataclasses.asdict(self), "created_at": self.created_at.isoformat()}


@dataclasses.dataclass(frozen=True)
class Selection:
    """Which dead letters a command works on; empty tuples and None select all."""

    ids: tuple[int, ...] = ()
    clients: tuple[str, ...] = ()
    kinds: tuple[str, ...] = ()
    codes: tuple[str, ...] = ()
    since: dt.datetime | None = None
    until: dt.datetime | None = None
    limit: int | None = None  # the first N by id

    @property
    def unfiltered(self) -> bool:
        """No flag narrows the rows (``limit`` only stops early, it chooses nothing)."""
        return not (self.ids or self.clients or self.kinds or self.codes or self.since or self.until)

    def where(self) -> tuple[str, list]:
        """The WHERE clause (without LIMIT) and its parameters."""
        terms: list[str] = []
        params: list = []
        for column, values in (
            ("id", self.ids),
            ("client_id", self.clients),
            ("kind", self.kinds),
            ("code", self.codes),
        ):
            if values:
                terms.append(f"{column} = ANY(%s)")
                params.append(list(values))
        if self.since is not None:
            terms.append("created_at >= %s")
            params.append(self.since)
        if self.until is not None:
            terms.append("created_at < %s")
            params.append(self.until)
        return ("WHERE " + " AND ".join(terms)) if terms else "", params

    def ids_query(self) -> tuple[str, list]:
        """SELECT of the selected ids, oldest first, LIMIT applied."""
        where, params = self.where()
        sql = f"SELECT id FROM {SCHEMA}.dead_letters {where} ORDER BY id"
        if self.limit:
            sql += " LIMIT %s"
            params = [*params, self.limit]
        return sql, params


# ------------------------------------------------------------ database side
def select(conn: psycopg.Connection, sel: Selection) -> list[DeadLetter]:
    """The selected dead letters, oldest (lowest id) first."""
    ids_sql, params = sel.ids_query()
    rows = conn.execute(
        f"SELECT {COLUMNS} FROM {SCHEMA}.dead_letters WHERE id IN ({ids_sql}) ORDER BY id", params
    ).fetchall()
    return [DeadLetter.from_row(r) for r in rows]


def count(conn: psycopg.Connection, sel: Selection) -> int:
    """How many dead letters match, ignoring ``limit``."""
    where, params = sel.where()
    ((n,),) = conn.execute(f"SELECT count(*) FROM {SCHEMA}.dead_letters {where}", params).fetchall()
    return int(n)


def get(conn: psycopg.Connection, dead_letter_id: int) -> DeadLetter | None:
    row = conn.execute(f"SELECT {COLUMNS} FROM {SCHEMA}.dead_letters WHERE id = %s", (dead_letter_id,)).fetchone()
    return None if row is None else DeadLetter.from_row(row)


def missing_ids(conn: psycopg.Connection, ids: Sequence[int]) -> list[int]:
    """Those of ``ids`` that name no dead letter at all."""
    if not ids:
        return []
    found = {r[0] for r in conn.execute(f"SELECT id FROM {SCHEMA}.dead_letters WHERE id = ANY(%s)", (list(ids),))}
    return sorted(set(ids) - found)


def delete(conn: psycopg.Connection, sel: Selection) -> list[int]:
    """Delete the selected dead letters; returns their ids."""
    ids_sql, params = sel.ids_query()
    rows = conn.execute(f"DELETE FROM {SCHEMA}.dead_letters WHERE id IN ({ids_sql}) RETURNING id", params)
    return sorted(r[0] for r in rows)


def next_seq(conn: psycopg.Connection, client_id: str) -> int:
    """The first seq after every seq ``client_id`` has stored, in the intent
    log or the dead letters (a purged dead letter is still in the log)."""
    ((last,),) = conn.execute(
        f"""SELECT greatest((SELECT max(seq) FROM {SCHEMA}.intent_log WHERE client_id = %s),
                            (SELECT max(seq) FROM {SCHEMA}.dead_letters WHERE client_id = %s))""",
        (client_id, client_id),
    ).fetchall()
    return 1 if last is None else last + 1


def lock_replays(conn: psycopg.Connection, client_id: str) -> bool:
    """Take the session advisory lock of replays under ``client_id``; False
    when another session holds it. Released when ``conn`` closes."""
    ((got,),) = conn.execute(
        "SELECT pg_try_advisory_lock(hashtext(%s))", (f"{SCHEMA}.dead_letters replay {client_id}",)
    ).fetchall()
    return bool(got)


@dataclasses.dataclass(frozen=True)
class Outcome:
    dead_letter: DeadLetter
    seq: int
    status: str  # a reply status, or "unknown" when no reply came and the log has nothing
    code: str | None = None
    reason: str | None = None
    duplicate: bool = False

    def as_json(self) -> dict:
        return {
            "dead_letter": self.dead_letter.id,
            "seq": self.seq,
            "status": self.status,
            "code": self.code,
            "reason": self.reason,
            "duplicate": self.duplicate,
        }


def submit(
    socket_path: str,
    client_id: str,
    first_seq: int,
    letters: Sequence[DeadLetter],
    *,
    conn: psycopg.Connection,
    timeout: float,
) -> list[Outcome]:
    """Send ``letters`` as new intents (seqs ``first_seq``…) and collect the
    replies. When replies stop coming (ClientError), the intent log (read
    on ``conn``) tells what was stored by then; the rest is ``unknown``:
    it may still commit, under its seq, and a later replay starts after it."""
    from engine.client import Client
    from engine.errors import ClientError
    from engine.intent import Intent

    seqs = range(first_seq, first_seq + len(letters))
    intents = [Intent(client_id, seq, d.entity, d.kind, d.args) for seq, d in zip(seqs, letters)]
    try:
        with Client(socket_path, client_id=client_id, timeout=timeout) as client:
            replies = client.submit_many(intents)
    except ClientError as exc:
        why = f"no reply ({exc}); not in the intent log yet"
        stored = {
            seq: (status, code, reason)
            for seq, status, code, reason in conn.execute(
                f"SELECT seq, status, code, reason FROM {SCHEMA}.intent_log WHERE client_id = %s AND seq = ANY(%s)",
                (client_id, list(seqs)),
            )
        }
        return [Outcome(d, seq, *stored.get(seq, ("unknown", None, why))) for seq, d in zip(seqs, letters)]
    return [
        Outcome(d, seq, r.status, r.code, r.reason, r.duplicate)
        for seq, d, r in zip(seqs, letters, replies, strict=True)
    ]


# ------------------------------------------------------------- arguments
def _values(what: str, check: Callable[[str], None] | None = None) -> Callable[[str], list[str]]:
    """argparse type: a comma list of non-empty values (``--flag a,b``)."""

    def parse(text: str) -> list[str]:
        values = [v.strip() for v in text.split(",")]
        if not any(values) or not all(values):
            raise argparse.ArgumentTypeError(f"must be {what} or a comma list of them, got {text!r}")
        for v in values:
            if "\x00" in v:
                raise argparse.ArgumentTypeError(f"must not contain NUL, got {text!r}")
            if check is not None:
                check(v)
        return values

    parse.__name__ = what
    return parse


def _check_code(code: str) -> None:
    if code in DEAD_LETTER_CODES:
        return
    known = ", ".join(DEAD_LETTER_CODES)
    status = codes.REPLY_CODES.get(code)
    if status is not None:
        raise argparse.ArgumentTypeError(f"{code!r} is a {status} code, never stored; dead-letter codes: {known}")
    raise argparse.ArgumentTypeError(f"unknown code {code!r}; dead-letter codes: {known}")


BIGINT_MAX = 2**63 - 1  # ids and limits travel to PostgreSQL as bigint


def _check_id(text: str) -> None:
    if not text.isdigit() or not 1 <= int(text) <= BIGINT_MAX:
        raise argparse.ArgumentTypeError(f"ids are positive integers up to {BIGINT_MAX}, got {text!r}")


def _ids(text: str) -> list[int]:
    return [int(v) for v in _values("an id", _check_id)(text)]


def _one_id(text: str) -> int:
    _check_id(text)
    return int(text)


def when(text: str) -> dt.datetime:
    """argparse type: an ISO-8601 timestamp (without an offset: local time)
    or an age before now: ``90s``, ``15m``, ``2h``, ``3d``, ``1w``."""
    age = _AGE.fullmatch(text.strip())
    if age:
        try:
            delta = dt.timedelta(**{_AGE_UNITS[age.group(2)]: int(age.group(1))})
            return dt.datetime.now(dt.UTC) - delta
        except OverflowError:
            raise argparse.ArgumentTypeError(f"age {text!r} reaches before year 1") from None
    try:
        stamp = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be an ISO-8601 timestamp (2026-11-30T14:05:00, +00:00 or Z for UTC) or an age like 15m, 2h, 3d; "
            f"got {text!r}"
        ) from None
    return stamp if stamp.tzinfo is not None else stamp.astimezone()


def _client_id(text: str) -> str:
    if not 1 <= len(text) <= 64 or "\x00" in text:
        raise argparse.ArgumentTypeError(f"must be 1-64 characters without NUL (an intent's client_id), got {text!r}")
    return text


def _limit(text: str) -> int:
    from .bench.args import nonnegative_int

    value = nonnegative_int(text)
    if value > BIGINT_MAX:
        raise argparse.ArgumentTypeError(f"must be at most {BIGINT_MAX}, got {text!r}")
    return value


_EXITS = (
    "Exit status: 0 done (replay: every intent committed); 1 an --id or ID not found, or a replayed intent that "
    "did not commit; 2 bad usage, the database unreachable or not an engine's, no engine at --socket (replay), "
    "or purge without --yes."
)


def build_parser() -> argparse.ArgumentParser:
    from engine.options import Options

    from .bench import args as cli_args

    prog = cli_args.prog("dead_letters")
    default_data_dir = Options().data_dir

    source = argparse.ArgumentParser(add_help=False)
    where = source.add_mutually_exclusive_group()
    where.add_argument(
        "--dsn",
        type=cli_args.dsn,
        help="the engine's database, running or not (the 'dsn:' line tools/run_engine prints)",
    )
    where.add_argument(
        "--data-dir",
        metavar="DIR",
        help=f"an engine's data directory (default: {default_data_dir}, the engine's): the embedded PostgreSQL in "
        "DIR/pg of the engine running there, or, when none runs, started for the command and stopped after it",
    )

    filters = argparse.ArgumentParser(add_help=False)
    chosen = filters.add_argument_group("selection (a flag's values: any of them; different flags: all; oldest first)")
    chosen.add_argument(
        "--id", dest="ids", action="extend", type=_ids, default=[], metavar="ID", help="dead letter id (repeatable)"
    )
    chosen.add_argument(
        "--client",
        dest="clients",
        action="extend",
        type=_values("a client id"),
        default=[],
        metavar="CLIENT_ID",
        help="the original intent's client_id (repeatable)",
    )
    chosen.add_argument(
        "--kind",
        dest="kinds",
        action="extend",
        type=_values("a kind"),
        default=[],
        metavar="KIND",
        help="the intent's kind (repeatable)",
    )
    chosen.add_argument(
        "--code",
        dest="codes",
        action="extend",
        type=_values("a dead-letter code", _check_code),
        default=[],
        metavar="CODE",
        help=f"why it was dead-lettered (repeatable): {', '.join(DEAD_LETTER_CODES)}",
    )
    chosen.add_argument(
        "--since",
        type=when,
        metavar="TIME",
        help="created at or after TIME: ISO-8601 (no offset: local time) or an age before now (90s, 15m, 2h, 3d, 1w)",
    )
    chosen.add_argument("--until", type=when, metavar="TIME", help="created before TIME (as --since)")

    output = argparse.ArgumentParser(add_help=False)
    output.add_argument(
        "--json", action="store_true", help="print JSON on stdout instead of the table (one document: rows, counts)"
    )

    p = argparse.ArgumentParser(
        prog=prog,
        description="The engine's dead-letter queue (batchscheduler.dead_letters): list and show dead letters, "
        "replay them through a running engine as new intents, purge them. 'tools/dead_letters COMMAND --help' "
        "describes each command.",
        epilog=_EXITS,
        formatter_class=cli_args.HelpFormatter,
    )
    commands = p.add_subparsers(dest="command", required=True, metavar="COMMAND", help="list, show, replay or purge")

    def command(name: str, parents: list, description: str, help_: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name,
            parents=parents,
            help=help_,
            description=description,
            epilog=_EXITS,
            formatter_class=cli_args.HelpFormatter,
        )
        sub.set_defaults(command_parser=sub)  # its usage line for the checks that span flags (main)
        return sub

    ls = command(
        "list",
        [source, filters, output],
        "Print the selected dead letters as a table (id, created_at in local time, client_id, seq, entity, kind, "
        "code, reason clipped) and how many match.",
        "table of the selected dead letters",
    )
    ls.add_argument(
        "--limit", type=_limit, default=LIST_LIMIT, help=f"show the first N (default: {LIST_LIMIT}; 0: all)"
    )

    show = command("show", [source, output], "Print one dead letter whole, its args as JSON.", "one dead letter whole")
    show.add_argument("dead_letter_id", metavar="ID", type=_one_id, help="the dead letter's id")

    rp = command(
        "replay",
        [source, filters, output],
        "Resubmit the selected dead letters, oldest first, through a running engine as new intents under "
        f"--client-id (default {DEFAULT_CLIENT_ID}), with seqs after every seq that client id has stored, and "
        "report each outcome. Deletes nothing unless --purge-committed. A replayed intent that dead-letters "
        "again becomes a new dead letter under --client-id.",
        "resubmit the selected dead letters as new intents",
    )
    rp.add_argument("--limit", type=_limit, default=0, help="replay only the first N (0: all)")
    rp.add_argument(
        "--socket",
        metavar="PATH",
        help="the running engine's socket (default: DIR/engine.sock of --data-dir, or of var)",
    )
    rp.add_argument(
        "--client-id",
        type=_client_id,
        default=DEFAULT_CLIENT_ID,
        help="client_id of the replayed intents",
    )
    rp.add_argument(
        "--timeout", type=cli_args.positive_float, default=REPLY_TIMEOUT_S, help="seconds to wait for replies"
    )
    rp.add_argument("--dry-run", action="store_true", help="show what would be sent (and the seqs); send nothing")
    rp.add_argument(
        "--purge-committed", action="store_true", help="delete the dead letters whose replay committed (only those)"
    )

    pg = command(
        "purge",
        [source, filters, output],
        "Delete the selected dead letters from batchscheduler.dead_letters (the intent log keeps its "
        "dead_lettered rows). Without --yes, prints how many would go and exits 2.",
        "delete the selected dead letters",
    )
    pg.add_argument("--limit", type=_limit, default=0, help="delete only the first N (0: all)")
    pg.add_argument("--yes", action="store_true", help="really delete")
    pg.add_argument("--all", action="store_true", help="allow a purge without any selection flag (every dead letter)")
    return p


def selection(args: argparse.Namespace) -> Selection:
    return Selection(
        ids=tuple(dict.fromkeys(args.ids)),
        clients=tuple(dict.fromkeys(args.clients)),
        kinds=tuple(dict.fromkeys(args.kinds)),
        codes=tuple(dict.fromkeys(args.codes)),
        since=args.since,
        until=args.until,
        limit=args.limit or None,
    )


# ---------------------------------------------------------------- output
def _local(stamp: dt.datetime) -> str:
    return stamp.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _clip(text: str | None, width: int = REASON_WIDTH) -> str:
    text = (text or "").replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


def render_list(letters: Sequence[DeadLetter], matching: int) -> str:
    from .bench.report import table

    if not letters:
        return "no dead letters match"
    rows = [
        (d.id, _local(d.created_at), d.client_id, d.seq, d.entity, d.kind, d.code, _clip(d.reason)) for d in letters
    ]
    head = ("id", "created_at", "client_id", "seq", "entity", "kind", "code", "reason")
    shown = (
        f"{matching} dead letters match"
        if len(letters) == matching
        else f"{matching} dead letters match; the first {len(letters)} shown (--limit)"
    )
    return table(head, rows, align="rllrllll") + "\n" + shown


def render_show(d: DeadLetter) -> str:
    args = json.dumps(d.args, indent=2, ensure_ascii=False).replace("\n", "\n  ")
    fields = [
        ("id", d.id),
        ("created_at", d.created_at.astimezone().isoformat()),
        ("client_id", d.client_id),
        ("seq", d.seq),
        ("entity", d.entity),
        ("kind", d.kind),
        ("code", d.code),
        ("reason", d.reason),
        ("batch_id", d.batch_id),
    ]
    return "\n".join(f"{name:<11} {value}" for name, value in fields) + f"\nargs\n  {args}"


def render_replay(outcomes: Sequence[Outcome], client_id: str, *, dry_run: bool) -> str:
    from .bench.report import table

    if dry_run:
        plan = [
            (o.dead_letter.id, o.seq, o.dead_letter.entity, o.dead_letter.kind, _clip(json.dumps(o.dead_letter.args)))
            for o in outcomes
        ]
        return (
            table(("dead_letter", "new seq", "entity", "kind", "args"), plan, align="rrlll")
            + f"\ndry run: would send {len(outcomes)} intents as client {client_id!r}, "
            f"seqs {outcomes[0].seq}..{outcomes[-1].seq}; nothing sent"
        )
    rows = [
        (o.dead_letter.id, o.seq, o.dead_letter.entity, o.dead_letter.kind, o.status, o.code or "", _clip(o.reason))
        for o in outcomes
    ]
    tally: dict[str, int] = {}
    for o in outcomes:
        tally[o.status] = tally.get(o.status, 0) + 1
    summary = ", ".join(f"{n} {status}" for status, n in sorted(tally.items(), key=lambda kv: kv[0] != codes.COMMITTED))
    return (
        table(("dead_letter", "new seq", "entity", "kind", "status", "code", "reason"), rows, align="rrlllll")
        + f"\nreplayed {len(outcomes)} dead letters as client {client_id!r}, "
        f"seqs {outcomes[0].seq}..{outcomes[-1].seq}: {summary}"
    )


def _emit(args: argparse.Namespace, text: str, doc: dict) -> None:
    """The table, or with ``--json`` the document, on stdout."""
    if args.json:
        print(json.dumps({"tool": "dead_letters", "command": args.command, **doc}, indent=2, ensure_ascii=False))
    else:
        print(text)


def _report_missing(prog: str, missing: Sequence[int]) -> None:
    if missing:
        print(f"{prog}: no dead letter with id {', '.join(map(str, missing))}", file=sys.stderr)


# --------------------------------------------------------------- commands
@contextlib.contextmanager
def _database(args: argparse.Namespace) -> Iterator[psycopg.Connection]:
    from . import enginedb

    with contextlib.ExitStack() as stack:
        dsn = args.dsn or stack.enter_context(enginedb.engine_database(args.data_dir))
        with psycopg.connect(dsn, autocommit=True) as conn:
            yield conn


def cmd_list(args: argparse.Namespace, prog: str) -> int:
    sel = selection(args)
    with _database(args) as conn:
        letters = select(conn, sel)
        matching = count(conn, sel)
        missing = missing_ids(conn, sel.ids)
    _emit(
        args,
        render_list(letters, matching),
        {"matching": matching, "shown": len(letters), "dead_letters": [d.as_json() for d in letters]},
    )
    _report_missing(prog, missing)
    return EXIT_NOT_DONE if missing else EXIT_OK


def cmd_show(args: argparse.Namespace, prog: str) -> int:
    with _database(args) as conn:
        letter = get(conn, args.dead_letter_id)
    if letter is None:
        _report_missing(prog, [args.dead_letter_id])
        return EXIT_NOT_DONE
    _emit(args, render_show(letter), {"dead_letter": letter.as_json()})
    return EXIT_OK


def cmd_purge(args: argparse.Namespace, prog: str) -> int:
    sel = selection(args)
    with _database(args) as conn:
        missing = missing_ids(conn, sel.ids)
        if not args.yes:
            ids_sql, params = sel.ids_query()
            ((would,),) = conn.execute(f"SELECT count(*) FROM ({ids_sql}) s", params).fetchall()
            print(f"{prog}: would delete {would} dead letters; add --yes to delete them", file=sys.stderr)
            _report_missing(prog, missing)
            return EXIT_USAGE
        deleted = delete(conn, sel)
    _emit(args, f"deleted {len(deleted)} dead letters", {"deleted": deleted})
    _report_missing(prog, missing)
    return EXIT_NOT_DONE if missing else EXIT_OK


def cmd_replay(args: argparse.Namespace, prog: str) -> int:
    from engine.client import control
    from engine.errors import ClientError

    sel = selection(args)
    socket_path = args.socket or os.path.join(args.data_dir, "engine.sock")
    if not args.dry_run:
        try:  # before the database: a wrong --socket is found without waiting for anything
            control(socket_path, "ping", timeout=PING_TIMEOUT_S)
        except (OSError, ClientError) as exc:
            raise _CannotReplay(f"no engine answers at {socket_path} ({exc}); start it, or pass --socket") from None
    with _database(args) as conn:
        missing = missing_ids(conn, sel.ids)
        letters = select(conn, sel)
        if not letters:
            _emit(args, "no dead letters match; nothing sent", {"client_id": args.client_id, "outcomes": []})
            _report_missing(prog, missing)
            return EXIT_NOT_DONE if missing else EXIT_OK
        if not args.dry_run and not lock_replays(conn, args.client_id):
            raise _CannotReplay(f"another replay under client id {args.client_id!r} is running; wait for it to finish")
        first = next_seq(conn, args.client_id)
        if args.dry_run:
            outcomes = [Outcome(d, first + i, "not sent") for i, d in enumerate(letters)]
        else:
            outcomes = submit(socket_path, args.client_id, first, letters, conn=conn, timeout=args.timeout)
        purged: list[int] = []
        if args.purge_committed and not args.dry_run:
            committed = [o.dead_letter.id for o in outcomes if o.status == codes.COMMITTED]
            if committed:
                purged = delete(conn, Selection(ids=tuple(committed)))
    text = render_replay(outcomes, args.client_id, dry_run=args.dry_run)
    if args.purge_committed and not args.dry_run:
        text += f"\ndeleted {len(purged)} dead letters whose replay committed (--purge-committed)"
    elif not args.dry_run:
        text += "\nnothing deleted (--purge-committed deletes the dead letters whose replay committed)"
    _emit(
        args,
        text,
        {
            "client_id": args.client_id,
            "dry_run": args.dry_run,
            "outcomes": [o.as_json() for o in outcomes],
            "purged": purged,
        },
    )
    _report_missing(prog, missing)
    all_committed = args.dry_run or all(o.status == codes.COMMITTED for o in outcomes)
    return EXIT_OK if all_committed and not missing else EXIT_NOT_DONE


class _CannotReplay(Exception):
    """Replay cannot start: no engine, or another replay holds the client id (exit 2)."""


COMMANDS = {"list": cmd_list, "show": cmd_show, "replay": cmd_replay, "purge": cmd_purge}


def main(argv: Sequence[str] | None = None) -> int:
    from . import enginedb
    from .bench.args import prog as prog_name

    parser = build_parser()
    args = parser.parse_args(argv)
    prog = prog_name("dead_letters")
    command = args.command_parser
    if getattr(args, "since", None) and getattr(args, "until", None) and args.since >= args.until:
        command.error("argument --since: must be before --until")
    if args.command == "purge" and selection(args).unfiltered and not args.all:
        command.error("refusing to purge every dead letter: add a selection flag, or --all to mean it")
    if args.command == "replay" and args.dry_run and args.purge_committed:
        command.error("argument --purge-committed: not with --dry-run (nothing is sent)")
    if args.dsn is None and args.data_dir is None:
        from engine.options import Options

        args.data_dir = Options().data_dir

    def cannot(why: str) -> int:
        print(f"{prog}: {why}", file=sys.stderr)
        return EXIT_USAGE

    # SIGTERM unwinds like Ctrl-C: a database started for --data-dir is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        return COMMANDS[args.command](args, prog)
    except (enginedb.NoDatabase, _CannotReplay) as exc:
        return cannot(str(exc))
    except psycopg.Error as exc:
        return cannot(enginedb.describe(exc))
