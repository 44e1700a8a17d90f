"""Batching does not change the game: batched writes equal one-by-one."""

from __future__ import annotations

import time
from contextlib import closing

import msgspec
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.handlers import BUILTIN, Op, Registry
from engine.intent import DecodedRecord, Record
from engine.planner import StatePlanner, apply_one_by_one, apply_op
from persistence.lane_store import ISOLATED, READING, LaneStore
from persistence.migrations import migrate

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


@pytest.fixture
def open_store(dsn):
    """Connected lane stores on the test's database, closed afterwards."""
    stores = []

    def make(planning):
        store = LaneStore(dsn, planning=planning)
        store.connect()
        stores.append(store)
        return store

    yield make
    for store in stores:
        store.close()


def reset(conn):
    conn.execute(
        "TRUNCATE batchscheduler.intent_log, batchscheduler.entities, batchscheduler.batches, "
        "batchscheduler.dead_letters"
    )
    conn.commit()


def commit(store, payloads, reason="size"):
    """Plan and commit one batch, as the flusher does."""
    now = time.time()
    return store.commit(store.plan(b"[" + b",".join(payloads) + b"]", len(payloads), reason, now, now))


def write_in_batches(store, payloads, sizes, *, reading=False):
    """Commit ``payloads`` cut into batches of ``sizes``; with ``reading``,
    the cache is dropped before each batch, so every batch is planned from
    what the reading path reads instead of from the cache."""
    outcomes = {}
    i = 0
    for size in sizes:
        chunk = payloads[i : i + size]
        if not chunk:
            break
        if reading:
            store._planning.forget()
        result = commit(store, chunk)
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
def test_batched_writes_equal_one_by_one(db, dsn, intents, sizes):
    payloads = [record("p", seq, entity, kind, args) for seq, (entity, (kind, args)) in enumerate(intents)]
    sizes = sizes + [len(payloads)]  # whatever is left goes in one last batch

    def run(sizes, reading=False):
        reset(db)
        with closing(LaneStore(dsn, planning=StatePlanner(BUILTIN))) as store:
            store.connect()
            outcomes = write_in_batches(store, payloads, sizes, reading=reading)
        return outcomes, snapshot(db)

    batched_outcomes, batched = run(sizes)  # optimistic wherever the cache can plan the batch
    read_outcomes, read = run(sizes, reading=True)  # every batch by the reading path
    single_outcomes, single = run([1] * len(payloads))

    assert batched == read == single
    assert batched_outcomes == read_outcomes == single_outcomes
    # And all equal the in-memory reference applied in order.
    decoded = [msgspec.json.decode(p, type=DecodedRecord) for p in payloads]
    reference, dead = apply_one_by_one(BUILTIN, decoded)
    assert batched == reference
    assert {seq for _, seq, _ in dead} == {k for k, v in batched_outcomes.items() if v == "dead_lettered"}


def test_poison_intent_dead_letters_alone_in_a_batch_of_857(db, open_store):
    db.execute("ALTER TABLE batchscheduler.entities ADD CONSTRAINT hp_cap CHECK ((state->>'hp')::int < 1000)")
    db.commit()
    payloads = [record("w", 0, "troll", "spawn", {"state": {"hp": 10}})]
    payloads += [record("w", seq, "troll", "move", {"dx": 1, "dy": 0}) for seq in range(1, 428)]
    payloads += [record("w", 428, "troll", "heal", {"amount": 5000})]  # violates hp_cap
    payloads += [record("w", seq, "troll", "move", {"dx": 1, "dy": 0}) for seq in range(429, 857)]
    assert len(payloads) == 857
    # The reading path fails on hp_cap; the batch is redone intent by intent.
    result = commit(open_store(StatePlanner(BUILTIN)), payloads)
    assert result.path == ISOLATED
    assert result.outcomes == {429: ("dead_lettered", "constraint_violation", result.outcomes[429][2], False)}
    assert "hp_cap" in result.outcomes[429][2]
    counts = dict(db.execute("SELECT status, count(*) FROM batchscheduler.intent_log GROUP BY 1").fetchall())
    assert counts == {"committed": 856, "dead_lettered": 1}
    assert db.execute("SELECT state->'pos'->'x', state->'hp' FROM batchscheduler.entities").fetchone() == (855, 10)
    assert db.execute("SELECT seq, code FROM batchscheduler.dead_letters").fetchall() == [(428, "constraint_violation")]


def test_handler_that_raises_dead_letters_only_its_intent(db, open_store):
    def explode(intent):
        raise RuntimeError("the dragon refuses")

    store = open_store(StatePlanner(BUILTIN.extend({"explode": explode})))
    payloads = [
        record("h", 1, "x", "spawn", {"state": {}}),
        record("h", 2, "x", "explode", {}),
        record("h", 3, "x", "say", {"text": "still here"}),
    ]
    outcomes = write_in_batches(store, payloads, [3])
    assert outcomes == {0: "committed", 1: "dead_lettered", 2: "committed"}
    assert (
        db.execute("SELECT reason FROM batchscheduler.dead_letters").fetchone()[0] == "RuntimeError: the dragon refuses"
    )


def test_resend_in_later_batch_is_not_applied_twice(db, open_store):
    planner_of_states = StatePlanner(BUILTIN)
    store = open_store(planner_of_states)
    spawn = record("r", 1, "x", "spawn", {"state": {"hp": 1}})
    heal = record("r", 2, "x", "heal", {"amount": 5})
    write_in_batches(store, [spawn, heal], [2])
    assert planner_of_states.cache == {"x": ({"hp": 6}, 2)}
    outcomes = write_in_batches(store, [heal, heal], [2])
    assert outcomes == {0: "committed", 1: "committed"}
    assert snapshot(db) == {"x": {"hp": 6}}


def test_another_intent_under_a_stored_key_is_rejected_seq_reused_on_every_write_path(db, open_store):
    """Same batch (the reading path answers), and the intent-by-intent
    fallback: the record that only shares the key is rejected and applies
    nothing; the identical one is a duplicate."""
    db.execute("ALTER TABLE batchscheduler.entities ADD CONSTRAINT hp_cap CHECK ((state->>'hp')::int < 1000)")
    db.commit()
    store = open_store(StatePlanner(BUILTIN))
    spawn = record("k", 1, "orc", "spawn", {"state": {"hp": 10}})
    damage = record("k", 2, "orc", "damage", {"amount": 3})
    heal = record("k", 2, "orc", "heal", {"amount": 5})
    reused = (
        "rejected",
        "seq_reused",
        "seq 2 of client k was already used for a different intent (stored: damage on orc, committed)",
        False,
    )
    result = commit(store, [spawn, damage, heal])
    assert (result.path, result.new, result.outcomes) == (READING, 2, {3: reused})
    assert snapshot(db) == {"orc": {"hp": 7}}

    # hp_cap fails the batch on its data, so it is isolated intent by intent.
    poison = record("k", 3, "orc", "heal", {"amount": 5000})
    result = commit(store, [heal, damage, poison])
    assert result.path == ISOLATED
    assert result.new == 1
    assert result.outcomes[1] == reused
    assert result.outcomes[2] == ("committed", "", "", True)
    assert result.outcomes[3][:2] == ("dead_lettered", "constraint_violation")
    assert snapshot(db) == {"orc": {"hp": 7}}
    assert db.execute("SELECT count(*) FROM batchscheduler.intent_log").fetchone() == (3,)
    db.commit()


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
