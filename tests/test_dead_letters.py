"""``tools/dead_letters``: dead letters a real engine stored are listed by
every filter, shown whole, replayed through the engine as new intents under
fresh seqs (two replays in a row never collide), and purged only when asked
twice (a selection or --all, and --yes). Exit 0 done, 1 not found or not all
committed, 2 bad usage, no database or no engine."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys

import psycopg
import pytest
from conftest import ROOT, execute, query, wait_for

from engine.client import Client

DEAD_LETTERS = ROOT / "tools" / "dead_letters"
LOG = "batchscheduler.intent_log"
DL = "batchscheduler.dead_letters"


def dead_letters(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHSCHEDULER_")}
    return subprocess.run(
        [sys.executable, str(DEAD_LETTERS), *args], capture_output=True, text=True, timeout=120, env=env
    )


def ok(proc: subprocess.CompletedProcess, code: int = 0) -> str:
    assert proc.returncode == code, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.stdout


def send(engine, client_id: str, intents: list[tuple[str, str, dict]], first_seq: int = 1) -> list[str]:
    """Submit (entity, kind, args) intents; their reply codes (``None``: committed)."""
    with Client(engine.socket, client_id=client_id, first_seq=first_seq, timeout=60) as client:
        replies = client.submit_many([client.intent(e, k, a) for e, k, a in intents])
    return [r.code for r in replies]


def produce(engine) -> None:
    """Five dead letters from two clients, three kinds, two codes."""
    assert send(
        engine,
        "alice",
        [
            ("hero", "spawn", {"state": {"hp": 10}}),
            ("ghost1", "move", {"dx": 2, "dy": 3}),
            ("ghost2", "say", {"text": "boo"}),
            ("hero", "spawn", {}),
        ],
    ) == [None, "no_such_entity", "no_such_entity", "entity_exists"]
    assert send(engine, "bob", [("ghost3", "damage", {"amount": 5}), ("ghost1", "move", {"dx": 1, "dy": 1})]) == [
        "no_such_entity",
        "no_such_entity",
    ]


def ids(dsn: str, where: str = "true") -> list[int]:
    return [r[0] for r in query(dsn, f"SELECT id FROM {DL} WHERE {where} ORDER BY id")]


def id_of(dsn: str, client_id: str, seq: int) -> int:
    """The dead letter of the intent ``(client_id, seq)`` (lanes write in their own order)."""
    return query(dsn, f"SELECT id FROM {DL} WHERE client_id = %s AND seq = %s", (client_id, seq))[0][0]


def listed(*args: str) -> list[dict]:
    doc = json.loads(ok(dead_letters("list", "--json", *args)))
    assert doc["tool"] == "dead_letters" and doc["command"] == "list"
    return doc["dead_letters"]


def test_list_selects_by_every_filter_and_show_prints_one_whole(engine):
    produce(engine)
    dsn = engine.dsn
    alice, bob = ids(dsn, "client_id = 'alice'"), ids(dsn, "client_id = 'bob'")
    assert len(alice) == 3 and len(bob) == 2

    # The table: a header, one line per row (oldest first), the count.
    out = ok(dead_letters("list", "--dsn", dsn))
    lines = out.splitlines()
    assert lines[0].split() == ["id", "created_at", "client_id", "seq", "entity", "kind", "code", "reason"]
    rows = [line.split() for line in lines[2:-1]]
    assert [int(r[0]) for r in rows] == alice + bob
    assert {tuple(r[3:8]) for r in rows} == {
        ("alice", "2", "ghost1", "move", "no_such_entity"),
        ("alice", "3", "ghost2", "say", "no_such_entity"),
        ("alice", "4", "hero", "spawn", "entity_exists"),
        ("bob", "1", "ghost3", "damage", "no_such_entity"),
        ("bob", "2", "ghost1", "move", "no_such_entity"),
    }
    assert lines[-1] == "5 dead letters match"

    def selected(*flags: str) -> list[int]:
        return [d["id"] for d in listed("--dsn", dsn, *flags)]

    assert selected("--client", "alice") == alice
    assert selected("--client", "alice,bob") == selected("--client", "bob", "--client", "alice") == alice + bob
    move, say = id_of(dsn, "alice", 2), id_of(dsn, "alice", 3)
    assert selected("--kind", "move") == [move, id_of(dsn, "bob", 2)]
    assert selected("--kind", "say,damage") == [say, id_of(dsn, "bob", 1)]
    assert [(d["client_id"], d["seq"]) for d in listed("--dsn", dsn, "--code", "entity_exists")] == [("alice", 4)]
    assert selected("--code", "no_such_entity", "--client", "bob") == bob
    assert selected("--id", str(bob[1]), "--id", f"{alice[0]},{alice[2]}") == [alice[0], alice[2], bob[1]]
    assert selected("--client", "carol") == []

    # Time: bob's rows three days old; ISO (UTC and local) and ages.
    execute(dsn, f"UPDATE {DL} SET created_at = now() - interval '3 days' WHERE client_id = 'bob'")
    assert selected("--since", "2d") == alice
    assert selected("--until", "2d") == bob
    assert selected("--since", "5d", "--until", "48h") == bob
    assert selected("--since", "1w") == alice + bob
    (bob_at,) = {d["created_at"] for d in listed("--dsn", dsn, "--client", "bob")}
    at = dt.datetime.fromisoformat(bob_at)
    assert selected("--since", at.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")) == alice + bob
    assert selected("--until", at.isoformat()) == []  # exclusive
    naive_local = at.astimezone().replace(tzinfo=None).isoformat()
    assert selected("--since", naive_local, "--client", "bob") == bob
    assert selected("--since", (dt.datetime.now() + dt.timedelta(hours=1)).isoformat(timespec="seconds")) == []

    # --limit: the first N, and how many match in all.
    out = ok(dead_letters("list", "--dsn", dsn, "--limit", "2"))
    assert [int(line.split()[0]) for line in out.splitlines()[2:-1]] == alice[:2]
    assert out.splitlines()[-1] == "5 dead letters match; the first 2 shown (--limit)"
    assert len(listed("--dsn", dsn, "--limit", "0")) == 5
    doc = json.loads(ok(dead_letters("list", "--dsn", dsn, "--json", "--limit", "1")))
    assert (doc["matching"], doc["shown"]) == (5, 1)
    assert ok(dead_letters("list", "--dsn", dsn, "--client", "carol")).strip() == "no dead letters match"

    # JSON rows are whole rows; args an object.
    (row,) = listed("--dsn", dsn, "--id", str(move))
    assert row["args"] == {"dx": 2, "dy": 3} and row["reason"] and row["batch_id"] > 0
    assert set(row) == {"id", "client_id", "seq", "entity", "kind", "args", "code", "reason", "batch_id", "created_at"}

    # show: every column, args as indented JSON; --json the same row.
    out = ok(dead_letters("show", "--dsn", dsn, str(say)))
    assert out.splitlines()[0].split() == ["id", str(say)]
    for name, value in [("client_id", "alice"), ("seq", "3"), ("entity", "ghost2"), ("kind", "say")]:
        assert f"{name:<11} {value}" in out
    (reason,) = query(dsn, f"SELECT reason FROM {DL} WHERE id = %s", (say,))[0]
    assert f"reason      {reason}" in out
    assert out.rstrip().endswith('args\n  {\n    "text": "boo"\n  }')
    doc = json.loads(ok(dead_letters("show", "--dsn", dsn, "--json", str(say))))
    assert doc["dead_letter"]["args"] == {"text": "boo"} and doc["dead_letter"]["id"] == say

    # Unknown ids: 1, with a clear message; list still lists what exists.
    proc = dead_letters("show", "--dsn", dsn, "999999")
    ok(proc, 1)
    assert "no dead letter with id 999999" in proc.stderr and proc.stdout == ""
    proc = dead_letters("list", "--dsn", dsn, "--id", f"{alice[0]},999999")
    assert "1 dead letters match" in ok(proc, 1)
    assert "no dead letter with id 999999" in proc.stderr


def test_replay_sends_new_intents_and_purges_only_what_committed(engine):
    produce(engine)
    dsn = engine.dsn
    move, say, spawn = id_of(dsn, "alice", 2), id_of(dsn, "alice", 3), id_of(dsn, "alice", 4)
    # Replayed oldest (lowest id) first: seqs 1, 2, 3 in id order.
    seq = {dl: i + 1 for i, dl in enumerate(sorted((move, say, spawn)))}
    assert send(engine, "setup", [("ghost1", "spawn", {})]) == [None]

    # --dry-run: the plan, and nothing sent.
    out = ok(dead_letters("replay", "--dsn", dsn, "--socket", str(engine.socket), "--client", "alice", "--dry-run"))
    assert "dry run: would send 3 intents as client 'dead-letters-replay', seqs 1..3; nothing sent" in out
    assert query(dsn, f"SELECT count(*) FROM {LOG} WHERE client_id = 'dead-letters-replay'") == [(0,)]

    # ghost1 exists now: its move and say commit; spawn of hero is refused again.
    proc = dead_letters(
        "replay", "--dsn", dsn, "--socket", str(engine.socket), "--client", "alice", "--purge-committed"
    )
    out = ok(proc, 1)
    table = {int(line.split()[0]): line.split()[1:6] for line in out.splitlines()[2:5]}
    assert table == {
        move: [str(seq[move]), "ghost1", "move", "committed"],
        say: [str(seq[say]), "ghost2", "say", "dead_lettered", "no_such_entity"],  # ghost2 still missing
        spawn: [str(seq[spawn]), "hero", "spawn", "dead_lettered", "entity_exists"],
    }
    assert "replayed 3 dead letters as client 'dead-letters-replay', seqs 1..3: 1 committed, 2 dead_lettered" in out
    assert "deleted 1 dead letters whose replay committed (--purge-committed)" in out
    assert query(
        dsn,
        f"SELECT seq, entity, kind, status, code FROM {LOG} WHERE client_id = %s ORDER BY seq",
        ("dead-letters-replay",),
    ) == sorted(
        [
            (seq[move], "ghost1", "move", "committed", None),
            (seq[say], "ghost2", "say", "dead_lettered", "no_such_entity"),
            (seq[spawn], "hero", "spawn", "dead_lettered", "entity_exists"),
        ]
    )
    assert query(dsn, "SELECT state->'pos' FROM batchscheduler.entities WHERE id = 'ghost1'") == [({"x": 2, "y": 3},)]
    assert move not in ids(dsn) and say in ids(dsn)  # only the committed one purged
    assert query(dsn, f"SELECT seq FROM {DL} WHERE client_id = 'dead-letters-replay' ORDER BY seq") == sorted(
        [(seq[say],), (seq[spawn],)]
    )

    # A second replay: seqs after every stored one (4, 5), none reused; JSON report; nothing deleted.
    assert send(engine, "setup", [("ghost2", "spawn", {})], first_seq=2) == [None]
    args = ("replay", "--dsn", dsn, "--socket", str(engine.socket), "--id", str(say), "--json")
    doc = json.loads(ok(dead_letters(*args)))
    assert doc["outcomes"] == [
        {"dead_letter": say, "seq": 4, "status": "committed", "code": None, "reason": None, "duplicate": False}
    ]
    assert doc["purged"] == [] and say in ids(dsn)
    # And a third, of the same row: a new seq again, applied again.
    doc = json.loads(ok(dead_letters(*args)))
    assert [(o["seq"], o["status"]) for o in doc["outcomes"]] == [(5, "committed")]
    assert query(dsn, "SELECT state->'log' FROM batchscheduler.entities WHERE id = 'ghost2'") == [(["boo", "boo"],)]

    # --client-id: another client id starts its own seqs.
    out = ok(
        dead_letters("replay", "--dsn", dsn, "--socket", str(engine.socket), "--id", str(say), "--client-id", "ops-1")
    )
    assert "as client 'ops-1', seqs 1..1: 1 committed" in out and "nothing deleted" in out
    assert ok(dead_letters("replay", "--dsn", dsn, "--socket", str(engine.socket), "--client", "carol")).startswith(
        "no dead letters match"
    )


def test_a_second_replay_under_the_same_client_id_waits_its_turn(engine):
    produce(engine)
    with psycopg.connect(engine.dsn, autocommit=True) as held:
        held.execute("SELECT pg_advisory_lock(hashtext('batchscheduler.dead_letters replay dead-letters-replay'))")
        proc = dead_letters("replay", "--dsn", engine.dsn, "--socket", str(engine.socket), "--client", "bob")
        ok(proc, 2)
        assert "another replay under client id 'dead-letters-replay' is running" in proc.stderr
        # Another client id is not held up.
        args = ("replay", "--dsn", engine.dsn, "--socket", str(engine.socket), "--client", "bob", "--client-id", "x")
        ok(dead_letters(*args), 1)  # ghost1 and ghost3 still do not exist
    assert query(engine.dsn, f"SELECT count(*) FROM {LOG} WHERE client_id = 'dead-letters-replay'") == [(0,)]


def test_replies_that_never_come_are_unknown_and_a_later_replay_starts_after_them(engine_factory):
    eng = engine_factory("--lanes", "1")
    produce(eng)
    bob = ids(eng.dsn, "client_id = 'bob'")
    assert send(eng, "setup", [("ghost1", "spawn", {}), ("ghost3", "spawn", {})]) == [None, None]
    flusher = eng.worker("flusher 0")
    flusher.send_signal(signal.SIGSTOP)  # the intents wait in the ring: no reply within --timeout
    try:
        args = ("replay", "--dsn", eng.dsn, "--socket", str(eng.socket), "--client", "bob", "--timeout", "1", "--json")
        doc = json.loads(ok(dead_letters(*args, "--purge-committed"), 1))
    finally:
        flusher.send_signal(signal.SIGCONT)
    assert [(o["seq"], o["status"]) for o in doc["outcomes"]] == [(1, "unknown"), (2, "unknown")]
    assert "not in the intent log yet" in doc["outcomes"][0]["reason"]
    assert doc["purged"] == [] and ids(eng.dsn, "client_id = 'bob'") == bob  # unknown is not committed

    # They commit once the flusher runs again; the next replay starts after them.
    wait_for(lambda: query(eng.dsn, f"SELECT count(*) FROM {LOG} WHERE client_id = 'dead-letters-replay'") == [(2,)])
    doc = json.loads(ok(dead_letters(*args)))
    assert [(o["seq"], o["status"]) for o in doc["outcomes"]] == [(3, "committed"), (4, "committed")]


def test_purge_needs_a_selection_and_yes(engine):
    produce(engine)
    dsn = engine.dsn
    bob = ids(dsn, "client_id = 'bob'")

    proc = dead_letters("purge", "--dsn", dsn, "--client", "bob")
    ok(proc, 2)
    assert "would delete 2 dead letters; add --yes" in proc.stderr
    assert len(ids(dsn)) == 5

    proc = dead_letters("purge", "--dsn", dsn, "--yes")  # no selection
    ok(proc, 2)
    assert "refusing to purge every dead letter" in proc.stderr
    assert len(ids(dsn)) == 5

    doc = json.loads(ok(dead_letters("purge", "--dsn", dsn, "--client", "bob", "--yes", "--json")))
    assert doc["deleted"] == bob and set(ids(dsn)).isdisjoint(bob)
    assert ok(dead_letters("purge", "--dsn", dsn, "--code", "entity_exists", "--yes")).strip() == (
        "deleted 1 dead letters"
    )

    proc = dead_letters("purge", "--dsn", dsn, "--all", "--limit", "1")
    ok(proc, 2)
    assert "would delete 1 dead letters" in proc.stderr
    ok(dead_letters("purge", "--dsn", dsn, "--all", "--yes"))
    assert ids(dsn) == []
    # The intent log keeps the history.
    assert query(dsn, f"SELECT count(*) FROM {LOG} WHERE status = 'dead_lettered'") == [(5,)]

    proc = dead_letters("purge", "--dsn", dsn, "--id", "424242", "--yes")
    ok(proc, 1)
    assert "no dead letter with id 424242" in proc.stderr


def test_data_dir_reaches_a_running_engine_and_a_stopped_one(engine_factory, short_tmp):
    eng = engine_factory(use_dsn=False)  # embedded PostgreSQL in short_tmp/var/pg
    data_dir = str(short_tmp / "var")
    pgdata = short_tmp / "var" / "pg"
    assert send(eng, "alice", [("ghost", "move", {"dx": 1, "dy": 0})]) == ["no_such_entity"]

    # Running: its live server; replay through its socket.
    assert [d["entity"] for d in listed("--data-dir", data_dir)] == ["ghost"]
    assert send(eng, "setup", [("ghost", "spawn", {})]) == [None]
    out = ok(dead_letters("replay", "--data-dir", data_dir, "--socket", str(eng.socket), "--purge-committed"))
    assert "1 committed" in out
    assert send(eng, "alice", [("ghost2", "say", {"text": "x"})], first_seq=2) == ["no_such_entity"]
    assert eng.stop() == 0
    assert eng.proc.poll() is not None

    # Stopped: its server is started for the command and stopped after it.
    assert [(d["client_id"], d["entity"]) for d in listed("--data-dir", data_dir)] == [("alice", "ghost2")]
    assert not (pgdata / "postmaster.pid").exists()
    # Replay needs the engine: its socket is gone.
    proc = dead_letters("replay", "--data-dir", data_dir)
    ok(proc, 2)
    assert f"no engine answers at {data_dir}/engine.sock" in proc.stderr
    assert not (pgdata / "postmaster.pid").exists()


def test_unreachable_or_foreign_database_and_missing_engine_exit_2(dsn, short_tmp):
    proc = dead_letters("list", "--dsn", f"host={short_tmp}/nothing dbname=x")
    ok(proc, 2)
    assert "cannot reach the database" in proc.stderr
    proc = dead_letters("list", "--dsn", dsn)
    ok(proc, 2)
    assert "not an engine's database" in proc.stderr
    proc = dead_letters("list", "--data-dir", str(short_tmp))
    ok(proc, 2)
    assert "no embedded engine database" in proc.stderr and not (short_tmp / "engine.lock").exists()
    proc = dead_letters("replay", "--dsn", dsn, "--socket", str(short_tmp / "none.sock"))
    ok(proc, 2)
    assert f"no engine answers at {short_tmp}/none.sock" in proc.stderr


BAD_ARGS = [
    (["list", "--code", "nope"], "unknown code 'nope'; dead-letter codes: handler_error"),
    (["list", "--code", "no_such_entity,invalid"], "'invalid' is a rejected code, never stored"),
    (["list", "--code", "busy"], "unknown code 'busy'"),
    (["list", "--since", "yesterday"], "argument --since: must be an ISO-8601 timestamp"),
    (["list", "--until", "15x"], "argument --until"),
    (["list", "--since", "-2h"], "argument --since"),
    (["list", "--since", "99999999999d"], "reaches before year 1"),
    (["list", "--since", "1h", "--until", "2h"], "--since: must be before --until"),
    (["list", "--limit", "-1"], "argument --limit: must be at least 0"),
    (["list", "--limit", "ten"], "argument --limit"),
    (["list", "--limit", "99999999999999999999"], "argument --limit: must be at most 9223372036854775807"),
    (["purge", "--all", "--limit", "9223372036854775808"], "argument --limit: must be at most"),
    (["show", "99999999999999999999"], "ids are positive integers up to"),
    (["list", "--id", "0"], "argument --id: ids are positive integers"),
    (["list", "--id", "1,,2"], "argument --id"),
    (["list", "--client", ""], "argument --client"),
    (["list", "--kind", "a\x01b,"], "argument --kind"),
    (["list", "--dsn", "not a dsn ="], "argument --dsn"),
    (["list", "--dsn", "host=/x", "--data-dir", "/tmp"], "--data-dir"),
    (["list", "--json", "out.json"], "unrecognized arguments: out.json"),
    (["show"], "ID"),
    (["show", "-3"], "ID"),
    (["show", "abc"], "argument ID: ids are positive integers"),
    (["purge"], "refusing to purge every dead letter"),
    (["purge", "--limit", "5", "--yes"], "refusing to purge every dead letter"),
    (["replay", "--client-id", "x" * 65], "argument --client-id: must be 1-64 characters"),
    (["replay", "--timeout", "0"], "argument --timeout"),
    (["replay", "--dry-run", "--purge-committed"], "not with --dry-run"),
    (["frobnicate"], "invalid choice"),
    ([], "COMMAND"),
]


@pytest.mark.parametrize(("args", "message"), BAD_ARGS, ids=[" ".join(a) or "nothing" for a, _ in BAD_ARGS])
def test_bad_arguments_exit_2_naming_the_flag(args, message):
    proc = dead_letters(*args)
    ok(proc, 2)
    assert message in proc.stderr, proc.stderr
