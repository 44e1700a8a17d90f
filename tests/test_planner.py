"""Batching does not change the game: batched writes equal one-by-one."""

from __future__ import annotations

import time

import msgspec
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.handlers import BUILTIN, Op, Registry
from engine.intent import DecodedRecord, Record
from engine.planner import StatePlanner, apply_one_by_one, apply_op
from persistence.migrations import migrate
from persistence.writer import BatchWriter

ENC = msgspec.json.Encoder()
ENTITIES = ["a", "b", "c"]


def record(client: str, seq: int, entity: str, kind: str, args: dict) -> bytes:
    return ENC.encode(Record(client, seq, entity, kind, msgspec.Raw(ENC.encode(args)), 1_700_000_000_000_000))


@pytest.fixture
def db(dsn):
    migrate(dsn)
    conn = psycopg.connect(dsn)
    yield conn
    conn.close()


def reset(conn):
    conn.execute(
        "TRUNCATE batchscheduler.intent_log, batchscheduler.entities, batchscheduler.batches, "
        "batchscheduler.dead_letters"
    )
    conn.commit()


def write_in_batches(conn, planner_of_states, payloads, sizes, *, fast=False):
    """Write like the flusher: with ``fast``, the one-round-trip optimistic
    path from the entity cache first, the reading path when it declines."""
    writer = BatchWriter(conn)
    outcomes = {}
    i = 0
    for size in sizes:
        chunk = payloads[i : i + size]
        if not chunk:
            break
        batch = b"[" + b",".join(chunk) + b"]"
        text = batch.decode()
        result = (
            writer.write_fast(text, len(chunk), "size", time.time(), time.time(), planner_of_states.planner(batch))
            if fast
            else None
        )
        if result is None:
            result = writer.write(text, len(chunk), "size", time.time(), time.time(), planner_of_states.planner(batch))
        for j in range(len(chunk)):
            outcomes[i + j] = result.outcomes.get(j + 1, ("committed",))[0]
        i += size
    return outcomes


def snapshot(conn):
    rows = conn.execute("SELECT id, state FROM batchscheduler.entities ORDER BY id").fetchall()
    conn.commit()
    return dict(rows)


SPAWN_STATE = st.fixed_dictionaries(
    {},
    optional={
        "hp": st.integers(-5, 50),
        "pos": st.fixed_dictionaries({"x": st.integers(-3, 3)}),
        "inv": st.lists(st.sampled_from(["sword", "key"]), max_size=2),
    },
)
intent_strategy = st.one_of(
    st.tuples(st.just("spawn"), st.fixed_dictionaries({"state": SPAWN_STATE})),
    st.tuples(st.just("move"), st.fixed_dictionaries({"dx": st.integers(-5, 5), "dy": st.integers(-5, 5)})),
    st.tuples(st.just("say"), st.fixed_dictionaries({"text": st.sampled_from(["hi", "yo", "bye"])})),
    st.tuples(st.sampled_from(["damage", "heal"]), st.fixed_dictionaries({"amount": st.integers(0, 30)})),
    st.tuples(st.sampled_from(["pick_up", "drop"]), st.fixed_dictionaries({"item": st.sampled_from(["sword", "key"])})),
    st.tuples(st.just("move"), st.fixed_dictionaries({"dx": st.just("north"), "dy": st.just(1)})),  # poison
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(st.tuples(st.sampled_from(ENTITIES), intent_strategy), min_size=1, max_size=60),
    st.lists(st.integers(1, 25), min_size=1, max_size=60),
)
def test_batched_writes_equal_one_by_one(db, intents, sizes):
    payloads = [record("p", seq, entity, kind, args) for seq, (entity, (kind, args)) in enumerate(intents)]
    planner_of_states = StatePlanner(BUILTIN)
    sizes = sizes + [len(payloads)]  # whatever is left goes in one last batch

    reset(db)
    batched_outcomes = write_in_batches(db, planner_of_states, payloads, sizes, fast=True)
    batched = snapshot(db)

    reset(db)
    single_outcomes = write_in_batches(db, StatePlanner(BUILTIN), payloads, [1] * len(payloads))
    single = snapshot(db)

    assert batched == single
    assert batched_outcomes == single_outcomes
    # And both equal the in-memory reference applied in order.
    decoded = [msgspec.json.decode(p, type=DecodedRecord) for p in payloads]
    reference, dead = apply_one_by_one(BUILTIN, decoded)
    assert batched == reference
    assert {seq for _, seq, _ in dead} == {k for k, v in batched_outcomes.items() if v == "dead_lettered"}


def test_poison_intent_dead_letters_alone_in_a_batch_of_857(db):
    db.execute("ALTER TABLE batchscheduler.entities ADD CONSTRAINT hp_cap CHECK ((state->>'hp')::int < 1000)")
    db.commit()
    planner_of_states = StatePlanner(BUILTIN)
    payloads = [record("w", 0, "troll", "spawn", {"state": {"hp": 10}})]
    payloads += [record("w", seq, "troll", "move", {"dx": 1, "dy": 0}) for seq in range(1, 428)]
    payloads += [record("w", 428, "troll", "heal", {"amount": 5000})]  # violates hp_cap
    payloads += [record("w", seq, "troll", "move", {"dx": 1, "dy": 0}) for seq in range(429, 857)]
    assert len(payloads) == 857
    batch = b"[" + b",".join(payloads) + b"]"
    writer = BatchWriter(db)
    with pytest.raises(psycopg.errors.CheckViolation):
        writer.write(batch.decode(), 857, "size", time.time(), time.time(), planner_of_states.planner(batch))
    db.rollback()
    result = writer.write_isolated(
        batch.decode(),
        [p.decode() for p in payloads],
        "size",
        time.time(),
        time.time(),
        planner_of_states.planner(batch),
    )
    assert result.outcomes == {429: ("dead_lettered", "constraint_violation", result.outcomes[429][2], False)}
    assert "hp_cap" in result.outcomes[429][2]
    counts = dict(db.execute("SELECT status, count(*) FROM batchscheduler.intent_log GROUP BY 1").fetchall())
    assert counts == {"committed": 856, "dead_lettered": 1}
    assert db.execute("SELECT state->'pos'->'x', state->'hp' FROM batchscheduler.entities").fetchone() == (855, 10)
    assert db.execute("SELECT seq, code FROM batchscheduler.dead_letters").fetchall() == [(428, "constraint_violation")]


def test_handler_that_raises_dead_letters_only_its_intent(db):
    def explode(intent):
        raise RuntimeError("the dragon refuses")

    planner_of_states = StatePlanner(BUILTIN.extend({"explode": explode}))
    payloads = [
        record("h", 1, "x", "spawn", {"state": {}}),
        record("h", 2, "x", "explode", {}),
        record("h", 3, "x", "say", {"text": "still here"}),
    ]
    outcomes = write_in_batches(db, planner_of_states, payloads, [3])
    assert outcomes == {0: "committed", 1: "dead_lettered", 2: "committed"}
    assert (
        db.execute("SELECT reason FROM batchscheduler.dead_letters").fetchone()[0] == "RuntimeError: the dragon refuses"
    )


def test_resend_in_later_batch_is_not_applied_twice(db):
    planner_of_states = StatePlanner(BUILTIN)
    spawn = record("r", 1, "x", "spawn", {"state": {"hp": 1}})
    heal = record("r", 2, "x", "heal", {"amount": 5})
    write_in_batches(db, planner_of_states, [spawn, heal], [2], fast=True)
    assert planner_of_states.cache == {"x": ({"hp": 6}, 2)}
    outcomes = write_in_batches(db, planner_of_states, [heal, heal], [2], fast=True)
    assert outcomes == {0: "committed", 1: "committed"}
    assert snapshot(db) == {"x": {"hp": 6}}


def test_another_intent_under_a_stored_key_is_rejected_seq_reused_on_every_write_path(db):
    """Same batch (the plain insert declines, the general write answers),
    and the intent-by-intent fallback: the record that only shares the key
    is rejected and applies nothing; the identical one is a duplicate."""
    planner_of_states = StatePlanner(BUILTIN)
    writer = BatchWriter(db)
    spawn = record("k", 1, "orc", "spawn", {"state": {"hp": 10}})
    damage = record("k", 2, "orc", "damage", {"amount": 3})
    heal = record("k", 2, "orc", "heal", {"amount": 5})
    reused = (
        "rejected",
        "seq_reused",
        "seq 2 of client k was already used for a different intent (stored: damage on orc, committed)",
        False,
    )
    batch = b"[" + b",".join([spawn, damage, heal]) + b"]"
    now = time.time()
    assert writer.write_fast(batch.decode(), 3, "size", now, now, planner_of_states.planner(batch)) is None
    result = writer.write(batch.decode(), 3, "size", now, now, planner_of_states.planner(batch))
    assert (result.new, result.outcomes) == (2, {3: reused})
    assert snapshot(db) == {"orc": {"hp": 7}}

    again = [heal, damage]
    batch = b"[" + b",".join(again) + b"]"
    result = writer.write_isolated(
        batch.decode(), [r.decode() for r in again], "size", now, now, planner_of_states.planner(batch)
    )
    assert (result.new, result.outcomes) == (0, {1: reused, 2: ("committed", "", "", True)})
    assert snapshot(db) == {"orc": {"hp": 7}}
    assert db.execute("SELECT count(*) FROM batchscheduler.intent_log").fetchone() == (2,)
    db.commit()


def test_cached_path_notices_a_row_changed_behind_its_back(db):
    planner_of_states = StatePlanner(BUILTIN)
    write_in_batches(db, planner_of_states, [record("s", 1, "x", "spawn", {"state": {"hp": 1}})], [1], fast=True)
    assert "x" in planner_of_states.cache
    db.execute("UPDATE batchscheduler.entities SET state = '{\"hp\": 50}', version = version + 1")
    db.commit()
    payload = record("s", 2, "x", "heal", {"amount": 5})
    batch = b"[" + payload + b"]"
    writer = BatchWriter(db)
    # The optimistic write plans from the stale cache, the version check
    # fails, everything rolls back and the caller is told to read instead.
    assert (
        writer.write_fast(batch.decode(), 1, "time", time.time(), time.time(), planner_of_states.planner(batch)) is None
    )
    assert planner_of_states.cache == {}
    assert snapshot(db) == {"x": {"hp": 50}}
    assert db.execute("SELECT count(*) FROM batchscheduler.intent_log").fetchone() == (1,)
    db.commit()
    write_in_batches(db, planner_of_states, [payload], [1], fast=True)
    assert snapshot(db) == {"x": {"hp": 55}}


@pytest.mark.parametrize(
    "op, before, after",
    [
        (Op("e", "pos.x", "incr", 2), {}, {"pos": {"x": 2}}),
        (Op("e", "pos.x", "incr", 2), {"pos": 5}, {"pos": {"x": 2}}),
        (Op("e", "hp", "incr", -9, lo=0), {"hp": 3}, {"hp": 0}),
        (Op("e", "hp", "incr", 1), {"hp": "full"}, {"hp": 1}),
        (Op("e", "a.b.c", "set", [1]), {"a": {"z": 1}}, {"a": {"z": 1, "b": {"c": [1]}}}),
        (Op("e", "log", "append", "x", bound=2), {"log": ["a", "b"]}, {"log": ["b", "x"]}),
        (Op("e", "inv", "remove", "k"), {"inv": ["k", 1, "k"]}, {"inv": [1, "k"]}),
        (Op("e", "inv", "remove", 1), {"inv": [True, 1]}, {"inv": [True]}),
        (Op("e", "a.b", "delete"), {"a": {"b": 1, "c": 2}}, {"a": {"c": 2}}),
        (Op("e", "a.b", "delete"), {"a": 3}, {"a": 3}),
    ],
)
def test_ops_are_total_and_exact(op, before, after):
    apply_op(before, op)
    assert before == after


def test_registry_rejects_non_callables():
    with pytest.raises(TypeError):
        Registry({"x": 3})


def test_spawn_state_must_be_object():
    world_state, dead = apply_one_by_one(BUILTIN, [DecodedRecord("c", 1, "e", "spawn", {"state": [1]}, 0)])
    assert world_state == {} and dead == [("c", 1, "handler_error")]


def test_handlers_may_not_touch_other_entities():
    def sneaky(intent):
        return [Op("someone-else", "hp", "set", 0)]

    registry = BUILTIN.extend({"sneaky": sneaky})
    states, dead = apply_one_by_one(
        registry, [DecodedRecord("c", 1, "e", "spawn", {}, 0), DecodedRecord("c", 2, "e", "sneaky", {}, 0)]
    )
    assert dead == [("c", 2, "handler_error")]
    assert states == {"e": {}}  # the spawn applied; the sneaky write did not
