"""The lane store owns the batch write: its fallback chain, the cache rule
and connection failures, against the real database; and nobody else holds
a piece of it (checked on the source)."""

from __future__ import annotations

import ast
import re
import threading
import time
from contextlib import closing
from pathlib import Path

import msgspec
import psycopg
import pytest
from conftest import wait_for

from engine.handlers import BUILTIN
from engine.intent import Record
from engine.planner import StatePlanner
from persistence.lane_store import ISOLATED, OPTIMISTIC, READING, DatabaseUnavailable, LaneStore
from persistence.migrations import migrate

ROOT = Path(__file__).resolve().parent.parent
ENC = msgspec.json.Encoder()
LANE = 7  # the store's session is "batchscheduler flusher 7" in pg_stat_activity


def record(seq: int, entity: str, kind: str, args: dict, client: str = "c") -> bytes:
    return ENC.encode(Record(client, seq, entity, kind, msgspec.Raw(ENC.encode(args)), 1_700_000_000_000_000))


def plan(store: LaneStore, payloads: list[bytes]):
    now = time.time()
    return store.plan(b"[" + b",".join(payloads) + b"]", len(payloads), "size", now, now)


@pytest.fixture
def db(dsn):
    migrate(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        yield conn


@pytest.fixture
def planning():
    return StatePlanner(BUILTIN)


@pytest.fixture
def store(db, dsn, planning):
    with closing(LaneStore(dsn, lane=LANE, planning=planning)) as store:
        store.connect()
        yield store


def state(db, entity: str):
    return db.execute("SELECT state FROM batchscheduler.entities WHERE id = %s", (entity,)).fetchone()[0]


def logged(db) -> int:
    return db.execute("SELECT count(*) FROM batchscheduler.intent_log").fetchone()[0]


def test_a_batch_of_cached_entities_commits_in_the_optimistic_write(db, store, planning):
    first = store.commit(plan(store, [record(1, "x", "spawn", {"state": {"hp": 1}})]))
    assert first.path == READING  # nothing was cached yet
    write = plan(store, [record(2, "x", "heal", {"amount": 5}), record(3, "x", "heal", {"amount": 1})])
    assert write.optimistic
    result = store.commit(write)
    assert (result.path, result.new, result.outcomes) == (OPTIMISTIC, 2, {})
    assert state(db, "x") == {"hp": 7}
    assert planning.cache == {"x": ({"hp": 7}, 3)}


def test_a_data_error_in_the_optimistic_write_dead_letters_the_culprit_and_commits_the_rest(db, store, planning):
    store.commit(plan(store, [record(1, "troll", "spawn", {"state": {"hp": 10}})]))
    db.execute("ALTER TABLE batchscheduler.entities ADD CONSTRAINT hp_cap CHECK ((state->>'hp')::int < 1000)")
    payloads = [record(seq, "troll", "move", {"dx": 1, "dy": 0}) for seq in range(2, 6)]
    payloads.append(record(6, "troll", "heal", {"amount": 5000}))  # violates hp_cap
    payloads += [record(seq, "troll", "move", {"dx": 1, "dy": 0}) for seq in range(7, 10)]
    write = plan(store, payloads)
    assert write.optimistic

    result = store.commit(write)

    assert result.path == ISOLATED
    assert result.new == 8
    assert list(result.outcomes) == [5]
    assert result.outcomes[5][:2] == ("dead_lettered", "constraint_violation")
    assert "hp_cap" in result.outcomes[5][2]
    assert state(db, "troll") == {"hp": 10, "pos": {"x": 7, "y": 0}}
    assert db.execute("SELECT seq, code FROM batchscheduler.dead_letters").fetchall() == [(6, "constraint_violation")]
    assert logged(db) == 9
    assert planning.cache == {}  # it held the plan's unwritten states


def test_an_entity_changed_behind_the_stores_back_is_noticed_and_the_cache_forgotten(db, store, planning):
    store.commit(plan(store, [record(1, "x", "spawn", {"state": {"hp": 1}}), record(2, "y", "spawn", {})]))
    assert set(planning.cache) == {"x", "y"}
    db.execute("""UPDATE batchscheduler.entities SET state = '{"hp": 50}', version = version + 1 WHERE id = 'x'""")
    write = plan(store, [record(3, "x", "heal", {"amount": 5})])
    assert write.optimistic  # planned from the stale {"hp": 1}

    result = store.commit(write)

    # The version check failed, nothing of the optimistic write was kept, and
    # the reading path applied the heal to what is really stored.
    assert (result.path, result.new, result.outcomes) == (READING, 1, {})
    assert state(db, "x") == {"hp": 55}
    assert logged(db) == 3
    assert planning.cache == {"x": ({"hp": 55}, 3)}  # y was forgotten with the stale x


def test_a_batch_planned_before_a_forget_is_not_written_as_planned(db, store, planning):
    """The flusher plans batch k+1 while k is written; once k leaves its
    plan, k+1's plan rests on states never written: it goes straight to the
    reading path, without a doomed optimistic attempt."""
    store.commit(plan(store, [record(1, "x", "spawn", {"state": {"hp": 1}})]))
    first = plan(store, [record(2, "x", "heal", {"amount": 1})])
    second = plan(store, [record(3, "x", "heal", {"amount": 10})])  # planned from first's result
    assert first.optimistic and second.optimistic
    db.execute("""UPDATE batchscheduler.entities SET state = '{"hp": 100}', version = version + 1""")

    assert store.commit(first).path == READING  # stale: the cache is forgotten
    store.commit(plan(store, [record(4, "y", "spawn", {})]))  # cached afresh
    assert set(planning.cache) == {"x", "y"}
    assert store.commit(second).path == READING
    # An optimistic attempt would have failed the version check and made the
    # store forget y too.
    assert set(planning.cache) == {"x", "y"}
    assert state(db, "x") == {"hp": 111}


def test_a_connection_killed_mid_write_raises_unavailable_and_a_retry_commits_exactly_once(db, store, planning):
    store.commit(plan(store, [record(1, "x", "spawn", {"state": {"hp": 1}})]))
    payloads = [record(seq, "x", "heal", {"amount": 1}) for seq in range(2, 12)]
    write = plan(store, payloads)
    assert write.optimistic
    failures: list[BaseException] = []

    def commit() -> None:
        try:
            store.commit(write)
        except BaseException as exc:  # noqa: BLE001 - examined by the test
            failures.append(exc)

    with psycopg.connect(db.info.dsn) as holder:
        # Hold x's row lock, so the store's UPDATE waits mid-transaction.
        holder.execute("SELECT 1 FROM batchscheduler.entities WHERE id = 'x' FOR UPDATE")
        writer = threading.Thread(target=commit)
        writer.start()
        stuck = f"""SELECT pid FROM pg_stat_activity
            WHERE application_name = 'batchscheduler flusher {LANE}' AND wait_event_type = 'Lock'"""
        pid = wait_for(lambda: (row := db.execute(stuck).fetchone()) and row[0], 10, "the store's write to wait")
        db.execute("SELECT pg_terminate_backend(%s)", (pid,))
        writer.join(10)
        assert not writer.is_alive()
        holder.rollback()

    assert len(failures) == 1 and isinstance(failures[0], DatabaseUnavailable), failures
    assert not store.is_connected
    assert planning.cache == {}
    assert logged(db) == 1 and state(db, "x") == {"hp": 1}  # the batch rolled back

    store.connect()
    retry = store.commit(plan(store, payloads))
    assert (retry.path, retry.new, retry.outcomes) == (READING, 10, {})
    # Again, as after a COMMIT whose acknowledgement was lost: every intent is
    # answered from the log, nothing is applied twice.
    again = store.commit(plan(store, payloads))
    assert again.new == 0
    assert set(again.outcomes.values()) == {("committed", "", "", True)} and len(again.outcomes) == 10
    assert logged(db) == 11
    assert state(db, "x") == {"hp": 11}


def test_a_server_gone_between_writes_is_noticed_without_a_query(db, store):
    pid = db.execute(
        "SELECT pid FROM pg_stat_activity WHERE application_name = %s", (f"batchscheduler flusher {LANE}",)
    ).fetchone()[0]
    db.execute("SELECT pg_terminate_backend(%s)", (pid,))

    def noticed() -> bool:
        try:
            store.check_connection()
        except DatabaseUnavailable:
            return True
        return False

    wait_for(noticed, 10, "the store to notice the terminated backend")
    assert not store.is_connected


def test_a_log_only_store_answers_a_resent_batch_from_the_stored_outcomes(db, dsn):
    with closing(LaneStore(dsn, lane=LANE)) as store:
        store.connect()
        payloads = [record(1, "x", "say", {"text": "hi"}), record(2, "x", "say", {"text": "yo"})]
        first = store.commit(plan(store, payloads))
        again = store.commit(plan(store, payloads))
    assert (first.path, first.new, first.outcomes) == (OPTIMISTIC, 2, {})
    assert (again.path, again.new) == (READING, 0)
    assert again.outcomes == {1: ("committed", "", "", True), 2: ("committed", "", "", True)}
    assert logged(db) == 2


def test_unreachable_server_and_no_connection_are_unavailable(tmp_path):
    store = LaneStore(f"host={tmp_path} port=1 dbname=nowhere connect_timeout=2")
    with pytest.raises(DatabaseUnavailable):
        store.connect()
    assert not store.is_connected
    write = plan(store, [record(1, "x", "say", {"text": "hi"})])  # planning needs no connection
    with pytest.raises(DatabaseUnavailable, match="not connected"):
        store.commit(write)


# ------------------------------------------------------------ one owner, on the source
def _tree(relative: str) -> ast.Module:
    return ast.parse((ROOT / relative).read_text(), relative)


def _imports(tree: ast.Module) -> set[str]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


_SQL = re.compile(
    r"""^\s*(SELECT\s.*\b(FROM|pg_\w+)\b|INSERT\s+INTO\s|UPDATE\s+\S+\s.*\bSET\s|DELETE\s+FROM\s|TRUNCATE\s
    |LISTEN\s+\w+\s*$|NOTIFY\s+\w+\s*(,.*)?$)|\bbatchscheduler\.\w""",
    re.DOTALL | re.VERBOSE,
)


def _sql_strings(tree: ast.Module) -> list[str]:
    """String literals and f-strings (their literal parts) that read as SQL;
    docstrings (a string standing alone as a statement) are prose and skipped."""
    prose = {
        id(node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
    }
    texts = []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            texts.append("".join(v.value for v in node.values if isinstance(v, ast.Constant)))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in prose:
            texts.append(node.value)
    return [t for t in texts if _SQL.search(t)]


def _calls_of(tree: ast.Module, name: str) -> int:
    return sum(
        1
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == name
    )


def test_the_flusher_and_the_planner_import_no_driver():
    for relative in ("engine/flusher.py", "engine/planner.py"):
        imports = _imports(_tree(relative))
        assert "persistence.lane_store" in imports  # the scan sees this file's imports
        assert not {m for m in imports if m.split(".")[0] == "psycopg"}, relative


def test_no_sql_statement_lives_in_the_engine():
    assert len(_sql_strings(_tree("persistence/lane_store.py"))) >= 10  # the scan finds statements
    offenders = {
        str(path.relative_to(ROOT)): found
        for path in sorted((ROOT / "engine").glob("*.py"))
        if (found := _sql_strings(_tree(str(path.relative_to(ROOT)))))
    }
    assert offenders == {}


def test_only_the_lane_store_forgets_the_cache_and_persistence_imports_no_engine():
    callers = {
        str(path.relative_to(ROOT))
        for package in ("engine", "persistence", "ipc")
        for path in (ROOT / package).glob("*.py")
        if _calls_of(_tree(str(path.relative_to(ROOT))), "forget")
    }
    assert callers == {"persistence/lane_store.py"}
    assert "psycopg" in _imports(_tree("persistence/lane_store.py"))  # the scan sees imports
    for path in sorted([*(ROOT / "persistence").glob("*.py"), *(ROOT / "ipc").glob("*.py")]):
        relative = str(path.relative_to(ROOT))
        imports = _imports(_tree(relative))
        assert not {m for m in imports if m.split(".")[0] == "engine"}, relative


def test_the_statements_that_find_the_current_batch_use_an_index_on_a_large_log(db):
    """A batch with dead letters finds them in the log by their unique key,
    and a trimmed or dropped batch row by its primary key: never a scan of a
    table that grows without end (by batch_id, with currval() volatile and
    the newest BRIN ranges unsummarized, each dead letter scanned more of
    the log than the last). Held on a 100k-row log with fresh statistics,
    through the planner's own plans."""
    from persistence import lane_store as ls

    db.execute(
        """INSERT INTO batchscheduler.intent_log
        (client_id, seq, entity, kind, args, status, batch_id, batch_ord, received_at)
        SELECT 'c', g, 'e' || (g % 1000), 'say', '{}', 'committed', g / 5 + 1, g % 5, now()
        FROM generate_series(1, 100000) g"""
    )
    db.execute(
        """INSERT INTO batchscheduler.batches (size, cut_reason, first_received_at, cut_at)
        SELECT 5, 'size', now(), now() FROM generate_series(1, 20000)"""
    )
    db.execute("ANALYZE batchscheduler.intent_log")
    db.execute("ANALYZE batchscheduler.batches")
    db.execute("SELECT nextval('batchscheduler.batches_id_seq')")  # currval is defined in this session
    plans = {}
    for name, sql, params in [
        (
            "MARK_DEAD",
            ls.MARK_DEAD,
            {"clients": ["c", "c"], "seqs": [7, 8], "codes": ["x", "x"], "reasons": ["r", "r"]},
        ),
        ("COPY_DEAD", ls.COPY_DEAD, {"clients": ["c", "c"], "seqs": [7, 8]}),
        ("ORIGINAL_OUTCOMES", ls.ORIGINAL_OUTCOMES, {"batch": '[["c", 7, "e7", "say", {}, 1]]', "ords": [1]}),
        ("TRIM_BATCH", ls.TRIM_BATCH, {"stored": 1, "resends": 1}),
        ("DROP_BATCH", ls.DROP_BATCH, {}),
    ]:
        rows = db.execute(("EXPLAIN " + sql).encode(), params or None).fetchall()
        plans[name] = "\n".join(r[0] for r in rows)
    assert all("intent_log_key" in plans[name] for name in ("MARK_DEAD", "COPY_DEAD", "ORIGINAL_OUTCOMES")), plans
    assert "batches_pkey" in plans["TRIM_BATCH"] and "batches_pkey" in plans["DROP_BATCH"]
    assert not any("Seq Scan on intent_log" in p or "Seq Scan on batches" in p for p in plans.values()), plans
