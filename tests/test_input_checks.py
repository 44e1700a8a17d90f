"""The ingest's checks on a decoded intent, without an engine: what JSON
cannot hold (``engine.intent.json_problem``) and duplicate keys
(``engine.intent.duplicate_key`` with its exact scans in ``ipc.wire``).

The fast paths are necessary conditions on bytes, so they are tested against
encoders the engine does not use: hand-written MessagePack (non-minimal
sizes, float32, any key order) and JSON (any whitespace, escaped
characters), with and without an injected duplicate key. The real-engine
cases are in test_hostile_input.py.
"""

from __future__ import annotations

import datetime
import json
import math
import struct

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import intent as im
from ipc import wire

# ------------------------------------------------------------ hand encoders
# A map is a list of (key, value) pairs, so a key may appear twice.


class Pairs(list):
    pass


def to_pairs(value):
    if isinstance(value, dict):
        return Pairs((k, to_pairs(v)) for k, v in value.items())
    if isinstance(value, list):
        return [to_pairs(v) for v in value]
    return value


def pack(value, wide: bool = False) -> bytes:
    """MessagePack; ``wide`` writes every size one class larger than needed
    and every float that fits as float32."""
    if value is None:
        return b"\xc0"
    if value is True or value is False:
        return b"\xc3" if value else b"\xc2"
    if isinstance(value, int):
        if wide:
            return (
                (b"\xcf" + value.to_bytes(8, "big"))
                if value >= 0
                else (b"\xd3" + value.to_bytes(8, "big", signed=True))
            )
        return msgspec.msgpack.encode(value)
    if isinstance(value, float):
        if wide and _fits_float32(value):
            return b"\xca" + struct.pack(">f", value)
        return b"\xcb" + struct.pack(">d", value)
    if isinstance(value, str):
        data = value.encode()
        if wide and len(data) < 256:
            return (
                b"\xd9" + bytes([len(data)]) + data
                if len(data) >= 32
                else b"\xda" + struct.pack(">H", len(data)) + data
            )
        return msgspec.msgpack.encode(value)
    if isinstance(value, Pairs):
        head = (b"\xde" + struct.pack(">H", len(value))) if wide or len(value) > 15 else bytes([0x80 | len(value)])
        return head + b"".join(pack(k, wide) + pack(v, wide) for k, v in value)
    if isinstance(value, list):
        head = (b"\xdc" + struct.pack(">H", len(value))) if wide or len(value) > 15 else bytes([0x90 | len(value)])
        return head + b"".join(pack(v, wide) for v in value)
    raise TypeError(value)


def _fits_float32(value: float) -> bool:
    try:
        return struct.unpack(">f", struct.pack(">f", value))[0] == value
    except OverflowError:
        return False


def dump(value, sep: str = "", escape: bool = False) -> str:
    """JSON with ``sep`` around every ':' and ','; ``escape`` writes every
    ':' and 'p' inside strings as a \\u escape."""

    def text(s: str) -> str:
        out = json.dumps(s)
        return out.replace(":", "\\u003a").replace("p", "\\u0070") if escape else out

    if isinstance(value, Pairs):
        return "{" + f"{sep},{sep}".join(f"{text(k)}{sep}:{sep}{dump(v, sep, escape)}" for k, v in value) + "}"
    if isinstance(value, list):
        return "[" + f"{sep},{sep}".join(dump(v, sep, escape) for v in value) + "]"
    if isinstance(value, str):
        return text(value)
    return json.dumps(value)


def check(frame: bytes, packed: bool) -> str | None:
    """What the ingest says about ``frame`` after decoding it."""
    intent = (msgspec.msgpack.decode if packed else msgspec.json.decode)(frame, type=im.Intent)
    record = msgspec.json.encode(
        im.DecodedRecord(intent.client_id, intent.seq, intent.entity, intent.kind, intent.args, 1_700_000_000_000_000)
    )
    return im.record_problem(intent, record, frame, packed)


def frame_of(fields: Pairs, packed: bool, wide: bool = False, sep: str = "", escape: bool = False) -> bytes:
    return pack(fields, wide) if packed else dump(fields, sep, escape).encode()


def intent_pairs(args, with_args: bool = True, order: int = 0) -> Pairs:
    fields = [("client_id", "c:1"), ("seq", 7), ("entity", "e:p"), ("kind", "spawn")]
    if with_args:
        fields.append(("args", args))
    fields = fields[order % len(fields) :] + fields[: order % len(fields)]
    return Pairs(fields)


# --------------------------------------------------------------- strategies
_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12)
_keys = st.one_of(_text, st.sampled_from(["a", "p", "a:b", "hp", "args", "1", "null", '"', "\\"]))
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([0.5, -2.0, 1e308]),
    _text,
)
_json_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(_keys, inner, max_size=4)),
    max_leaves=12,
)
_args = st.dictionaries(_keys, _json_values, max_size=4)
_framing = st.sampled_from([(True, False, ""), (True, True, ""), (False, False, ""), (False, False, " \n")])


def _maps(value, path: str):
    """Every (map, path) in ``value`` (pairs form)."""
    if isinstance(value, Pairs):
        yield value, path
        for k, v in value:
            yield from _maps(v, wire.key_path(path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _maps(v, f"{path}[{i}]")


# ------------------------------------------------------------------- tests
@settings(max_examples=300, deadline=None)
@given(_args, _framing, st.booleans(), st.integers(0, 4), st.booleans())
def test_args_without_duplicates_pass_whatever_the_encoding(args, framing, with_args, order, escape):
    packed, wide, sep = framing
    fields = intent_pairs(to_pairs(args), with_args or bool(args), order)
    assert check(frame_of(fields, packed, wide, sep, escape and not packed), packed) is None


@settings(max_examples=300, deadline=None)
@given(_args, _framing, st.integers(0, 4), st.booleans(), st.data())
def test_a_duplicate_key_anywhere_in_args_is_found_and_named(args, framing, order, escape, data):
    packed, wide, sep = framing
    fields = intent_pairs(to_pairs(args), True, order)
    maps = list(_maps(fields[[k for k, _ in fields].index("args")][1], "args"))
    target, path = data.draw(st.sampled_from(maps))
    key = data.draw(st.sampled_from([k for k, _ in target]) if target else _keys)
    if not target:
        target.append((key, 1))
    existing = next(v for k, v in target if k == key)
    target.insert(data.draw(st.integers(0, len(target))), (key, data.draw(st.sampled_from([existing, 1, "x"]))))
    reason = check(frame_of(fields, packed, wide, sep, escape and not packed), packed)
    assert reason == f"duplicate key {wire.key_path(path, key)}: an object may hold each key only once"


@pytest.mark.parametrize(
    "packed, wide",
    [(True, False), (True, True), (False, False)],  # JSON has no wide encodings
    ids=["msgpack-minimal", "msgpack-wide", "json"],
)
@pytest.mark.parametrize("field", ["client_id", "seq", "entity", "kind", "args"])
@pytest.mark.parametrize("with_args", [True, False], ids=["args", "no_args"])
def test_a_top_level_field_twice_is_found(packed, field, with_args, wide):
    fields = intent_pairs(Pairs(), with_args)
    value = dict(fields).get(field, Pairs())
    if field not in dict(fields):  # args left out: write it twice
        fields.append((field, value))
    fields.append((field, value))
    assert (
        check(frame_of(fields, packed, wide), packed) == f"duplicate key {field}: an object may hold each key only once"
    )


def test_a_dropped_seq_cannot_hide_behind_a_wider_encoding_when_args_is_left_out():
    # 5 bytes dropped (the first "seq": 7) and 1 byte wider (the kept seq as
    # uint8): exactly what re-encoding adds for the missing args.
    frame = b"\x85\xa9client_id\xa1c\xa3seq\x07\xa3seq\xcc\x07\xa6entity\xa1e\xa4kind\xa5spawn"
    assert check(frame, packed=True) == "duplicate key seq: an object may hold each key only once"


def test_a_dropped_key_cannot_hide_behind_a_float32_widened_on_reencoding():
    # {"f": float32 1.0, "y": "z", "y": "z"}: 4 bytes dropped, 4 bytes gained.
    args = b"\x81\xa5state\x83\xa1f\xca\x3f\x80\x00\x00\xa1y\xa1z\xa1y\xa1z"
    frame = b"\x85\xa9client_id\xa1c\xa3seq\x07\xa6entity\xa1e\xa4kind\xa5spawn\xa4args" + args
    assert check(frame, packed=True) == "duplicate key args.state.y: an object may hold each key only once"


def test_an_escaped_colon_cannot_hide_a_dropped_json_key():
    line = b'{"client_id":"c","seq":7,"entity":"e","kind":"spawn","args":{"a":1,"a":"\\u003a"}}'
    assert check(line, packed=False) == "duplicate key args.a: an object may hold each key only once"


def test_four_fields_one_of_them_twice_is_not_mistaken_for_empty_args():
    line = b'{"client_id":"c","seq":7,"entity":"args","entity":"e","kind":"spawn"}'
    assert check(line, packed=False) == "duplicate key entity: an object may hold each key only once"
    for spaced in (b'"args":{}', b'"args" : { }', b'"args":\n{\t}'):
        ok = b'{"client_id":"c","seq":7,"entity":"e","kind":"spawn",' + spaced + b"}"
        assert check(ok, packed=False) is None


@pytest.mark.parametrize(
    "value, path, what",
    [
        pytest.param(math.nan, "args.state.t", "NaN", id="nan"),
        pytest.param(math.inf, "args.state.t", "Infinity", id="inf"),
        pytest.param(-math.inf, "args.state.t", "-Infinity", id="minus_inf"),
        pytest.param(b"\x00\x01", "args.state.t", "binary data (MessagePack bin)", id="bin"),
        pytest.param(
            datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC),
            "args.state.t",
            "a MessagePack timestamp (extension type -1)",
            id="timestamp",
        ),
        pytest.param(msgspec.msgpack.Ext(7, b"x"), "args.state.t", "a MessagePack extension (type 7)", id="ext"),
        pytest.param([1, [2, math.nan]], "args.state.t[1][1]", "NaN", id="nan_in_nested_list"),
        pytest.param({"u": [{"v": b""}]}, "args.state.t.u[0].v", "binary data (MessagePack bin)", id="bin_deep"),
    ],
)
def test_json_problem_names_the_place_and_what(value, path, what):
    assert im.json_problem({"state": {"ok": 1, "t": value}}) == f"args cannot be stored as JSON: {path} is {what}"


@pytest.mark.parametrize(
    "key, what",
    [(1, "the integer 1"), (-2, "the integer -2"), (1.5, "the float 1.5"), (None, "nil"), (True, "the boolean true")],
)
def test_json_problem_names_a_key_that_is_not_a_string(key, what):
    assert im.json_problem({"state": {"a": {key: 1}}}) == (
        f"args cannot be stored as JSON: a key of args.state.a is {what}, not a string"
    )


@settings(max_examples=200, deadline=None)
@given(_args)
def test_json_problem_passes_what_json_holds(args):
    assert im.json_problem(args) is None


@pytest.mark.parametrize(
    "value",
    [math.nan, math.inf, b"x", datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC), {1: "int key"}, {2.5: 1}],
    ids=["nan", "inf", "bin", "timestamp", "int_key", "float_key"],
)
@pytest.mark.parametrize("nested", [False, True], ids=["flat", "below_a_map"])
def test_msgpack_intents_holding_what_json_cannot_are_refused_by_the_ingest_check(value, nested):
    args = {"state": {"t": value}} if nested else {"t": value}
    frame = msgspec.msgpack.encode({"client_id": "c", "seq": 7, "entity": "e", "kind": "spawn", "args": args})
    reason = check(frame, packed=True)
    assert reason is not None and reason.startswith("args cannot be stored as JSON: "), reason


def test_json_number_beyond_a_double_is_named():
    line = b'{"client_id":"c","seq":7,"entity":"e","kind":"spawn","args":{"state":{"t":[1,-1e999]}}}'
    assert im.json_number_problem(line) == (
        "args cannot be stored as JSON: args.state.t[1] is the number -1e999, beyond the range of a double"
    )


@settings(max_examples=200, deadline=None)
@given(st.one_of(_json_values, st.binary(max_size=40)))
def test_exact_scans_never_raise_and_agree_on_clean_input(value):
    if isinstance(value, bytes):
        assert wire.msgpack_duplicate_key(value) is None or isinstance(wire.msgpack_duplicate_key(value), str)
        assert wire.json_duplicate_key(value) is None or isinstance(wire.json_duplicate_key(value), str)
        return
    assert wire.msgpack_duplicate_key(msgspec.msgpack.encode(value)) is None
    assert wire.json_duplicate_key(msgspec.json.encode(value)) is None


# ------------------------------------------- JSON-ability against an oracle
def _json_clean(value) -> bool:
    """Independent: what JSON holds unchanged."""
    if value is None or isinstance(value, (str, bool, int)):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(_json_clean(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _json_clean(v) for k, v in value.items())
    return False


_odd_scalars = st.one_of(
    _scalars,
    st.sampled_from([math.nan, math.inf, -math.inf, b"", b"\xcb\x7f", msgspec.msgpack.Ext(3, b"x")]),
    st.datetimes(timezones=st.just(datetime.UTC)),
)
_odd_keys = st.one_of(_keys, st.integers(-(2**63), 2**64 - 1), st.floats(), st.sampled_from(["0", "-", "nan", "inf"]))
_odd_values = st.recursive(
    _odd_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(_odd_keys, inner, max_size=4)),
    max_leaves=10,
)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(_keys, _odd_values, max_size=4))
def test_msgpack_args_are_refused_exactly_when_json_cannot_hold_them(args):
    frame = msgspec.msgpack.encode({"client_id": "c", "seq": 7, "entity": "e", "kind": "spawn", "args": args})
    try:
        reason = check(frame, packed=True)
    except TypeError:  # msgspec cannot write it as JSON at all (an ext): handle_frames refuses it
        reason = im.json_problem(msgspec.msgpack.decode(frame, type=im.Intent).args)
        assert reason is not None
    assert (reason is None) == _json_clean(args), (args, reason)
    if reason is not None:
        assert reason.startswith("args cannot be stored as JSON: "), reason
