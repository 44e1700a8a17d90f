"""Each kind declares its args schema; the ingest rejects what does not fit
(a client error, nothing stored), and handlers keep dead letters for what
depends on state."""

from __future__ import annotations

import json
import socket

import msgspec
import pytest
from conftest import query

from engine import handlers


@pytest.mark.parametrize(
    "kind, args, field",
    [
        ("move", {"dx": "x", "dy": 0}, "args.dx"),
        ("move", {"dx": 1}, "args"),  # dy missing
        ("move", {"dx": True, "dy": 0}, "args.dx"),
        ("move", {"dx": 10**10, "dy": 0}, "args.dx"),
        ("move", {"dx": 1, "dy": 0, "dz": 1}, "args"),
        ("damage", {"amount": -1}, "args.amount"),
        ("heal", {"amount": 1.5}, "args.amount"),
        ("say", {"text": ""}, "args.text"),
        ("say", {"text": "x" * 501}, "args.text"),
        ("pick_up", {"item": 7}, "args.item"),
        ("drop", {}, "args"),
        ("spawn", {"state": [1, 2]}, "args.state"),
    ],
)
def test_malformed_args_are_rejected_invalid_naming_the_field_and_nothing_is_stored(engine, kind, args, field):
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(engine.socket))
        f = s.makefile("rb")
        s.sendall(b'{"client_id":"args","seq":1,"entity":"hero","kind":"spawn","args":{"state":{"hp":5}}}\n')
        assert json.loads(f.readline())["status"] == "committed"
        intent = {"client_id": "args", "seq": 2, "entity": "hero", "kind": kind, "args": args}
        s.sendall(json.dumps(intent).encode() + b"\n")
        reply = json.loads(f.readline())
    assert (reply["status"], reply["code"], reply["seq"]) == ("rejected", "invalid", 2)
    assert reply["reason"].startswith(f"invalid args for {kind}: {field}")
    assert query(engine.dsn, "SELECT count(*) FROM batchscheduler.intent_log WHERE seq = 2") == [(0,)]
    assert query(engine.dsn, "SELECT count(*) FROM batchscheduler.dead_letters") == [(0,)]


def test_state_dependent_refusals_stay_dead_letters(engine):
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(engine.socket))
        s.sendall(b'{"client_id":"args","seq":1,"entity":"nobody","kind":"move","args":{"dx":1,"dy":0}}\n')
        reply = json.loads(s.makefile("rb").readline())
    assert (reply["status"], reply["code"]) == ("dead_lettered", "no_such_entity")


def test_every_builtin_kind_declares_a_schema_and_custom_kinds_may():
    assert all(schema is not None for schema in handlers.BUILTIN.schemas().values())

    class Teleport(msgspec.Struct, forbid_unknown_fields=True):
        x: int

    @handlers.takes(Teleport)
    def teleport(intent):
        return [handlers.Op(intent.entity, "pos.x", "set", intent.args["x"])]

    def anything(intent):
        return []

    registry = handlers.BUILTIN.extend({"teleport": teleport, "wave": anything})
    schemas = registry.schemas()
    assert schemas["teleport"] is Teleport and schemas["wave"] is None
    assert handlers.args_problem(Teleport, {"x": "far"}) == "args.x: Expected `int`, got `str`"
    with pytest.raises(TypeError):
        handlers.takes(dict)
