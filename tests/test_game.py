"""The game pipeline through the real engine: determinism, replay, poison
intents, user handlers."""

from __future__ import annotations

import random
import subprocess
import sys
import textwrap

from conftest import ROOT, execute, query

from engine.client import Client
from engine.intent import COMMITTED, DEAD_LETTERED


def scripted_intents(client: Client, n: int, seed: int = 7):
    rng = random.Random(seed)
    out = [client.intent(f"e{i}", "spawn", {"state": {"hp": 50}}) for i in range(20)]
    for _ in range(n):
        entity = f"e{rng.randrange(24)}"  # e20..e23 never spawned: dead letters
        kind = rng.choice(["move", "say", "damage", "heal", "pick_up", "drop", "spawn"])
        args = {
            "move": {"dx": rng.randint(-2, 2), "dy": 1},
            "say": {"text": "hi"},
            "damage": {"amount": rng.randint(0, 20)},
            "heal": {"amount": rng.randint(0, 9)},
            "pick_up": {"item": rng.choice("abc")},
            "drop": {"item": rng.choice("abc")},
            "spawn": {"state": {}},
        }[kind]
        out.append(client.intent(entity, kind, args))
    return out


def run_script(engine) -> tuple[dict, list]:
    with Client(engine.socket, client_id="script", first_seq=1, timeout=60) as client:
        replies = client.submit_many(scripted_intents(client, 1500), window=300)
    states = dict(query(engine.dsn, "SELECT id, state FROM batchscheduler.entities"))
    return states, [(r.seq, r.status, r.code) for r in replies]


def reset(dsn):
    execute(
        dsn,
        "TRUNCATE batchscheduler.intent_log, batchscheduler.entities, batchscheduler.batches, "
        "batchscheduler.dead_letters",
    )


def test_same_intents_cut_differently_give_identical_state(engine_factory):
    small = engine_factory("--time-window-ms", "1", "--max-batch-size", "7")
    states_small, outcomes_small = run_script(small)
    ((batches_small,),) = query(small.dsn, "SELECT count(*) FROM batchscheduler.batches")
    assert small.stop() == 0
    reset(small.dsn)
    big = engine_factory("--time-window-ms", "50", "--max-batch-size", "857")
    states_big, outcomes_big = run_script(big)
    ((batches_big,),) = query(big.dsn, "SELECT count(*) FROM batchscheduler.batches")
    assert batches_small > 3 * batches_big  # really cut differently
    assert states_small == states_big
    assert outcomes_small == outcomes_big
    assert any(status == DEAD_LETTERED for _, status, _ in outcomes_big)


def test_replay_agrees_with_live_state(engine):
    run_script(engine)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "replay"), "--dsn", engine.dsn],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "identical" in proc.stdout
    # Tamper with the live table: replay must notice.
    execute(engine.dsn, "UPDATE batchscheduler.entities SET state = state || '{\"hp\": 999}' WHERE id = 'e3'")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "replay"), "--dsn", engine.dsn],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "entity e3" in proc.stdout and "999" in proc.stdout


def test_poison_intent_in_a_batch_of_857_dead_letters_alone(engine_factory):
    eng = engine_factory("--time-window-ms", "3000", "--max-batch-size", "857")
    execute(eng.dsn, "INSERT INTO batchscheduler.entities (id, state) VALUES ('ogre', '{\"hp\": 10}')")
    execute(eng.dsn, "ALTER TABLE batchscheduler.entities ADD CONSTRAINT hp_cap CHECK ((state->>'hp')::int < 1000)")
    with Client(eng.socket, client_id="poison", first_seq=1, timeout=60) as client:
        intents = [client.intent("ogre", "move", {"dx": 1, "dy": 0}) for _ in range(856)]
        intents.insert(500, client.intent("ogre", "heal", {"amount": 5000}))
        replies = client.submit_many(intents, window=857)
    bad = [r for r in replies if r.status != COMMITTED]
    assert len(bad) == 1 and bad[0].status == DEAD_LETTERED and bad[0].code == "constraint_violation"
    assert "hp_cap" in bad[0].reason
    assert query(eng.dsn, "SELECT count(*), max(size) FROM batchscheduler.batches") == [(1, 857)]
    assert query(eng.dsn, "SELECT state->'pos'->'x' FROM batchscheduler.entities") == [(856,)]
    assert query(eng.dsn, "SELECT code FROM batchscheduler.dead_letters") == [("constraint_violation",)]


def test_user_handlers_from_an_entry_point(engine_factory, short_tmp):
    (short_tmp / "mygame.py").write_text(
        textwrap.dedent("""
        from engine.handlers import BUILTIN, Op, HandlerError

        def cast(intent):
            mana = intent.args.get("mana")
            if not isinstance(mana, int):
                raise HandlerError("args.mana must be an integer")
            return [Op(intent.entity, "stats.mana", "incr", -mana, lo=0),
                    Op(intent.entity, "spells", "append", intent.args.get("spell", "?"), bound=3)]

        REGISTRY = BUILTIN.extend({"cast": cast})
    """)
    )
    eng = engine_factory("--handlers", "mygame:REGISTRY", env={"PYTHONPATH": str(short_tmp)})
    with Client(eng.socket, client_id="mage", first_seq=1) as client:
        replies = client.submit_many(
            [
                client.intent("merlin", "spawn", {"state": {"stats": {"mana": 10}}}),
                client.intent("merlin", "cast", {"mana": 4, "spell": "light"}),
                client.intent("merlin", "cast", {"mana": "lots"}),
                client.intent("merlin", "fly", {}),
            ]
        )
    assert [r.status for r in replies] == [COMMITTED, COMMITTED, DEAD_LETTERED, "rejected"]
    assert replies[2].reason == "HandlerError: args.mana must be an integer"
    assert replies[3].code == "unknown_kind" and "cast" in replies[3].reason
    assert query(eng.dsn, "SELECT state FROM batchscheduler.entities") == [
        ({"stats": {"mana": 6}, "spells": ["light"]},)
    ]
