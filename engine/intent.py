"""The intent model and every message that crosses a socket or a ring.

An intent is one player action ``(client_id, seq, entity, kind, args)``.
``(client_id, seq)`` is its idempotency key: the database holds each at most
once, and a resend is answered with the original outcome.

Inbound messages are decoded by msgspec straight into typed structs; field
constraints (lengths, ranges, no NUL) are checked by the decoder itself, so a
wrong type or an unknown field becomes one clear error naming the field.
"""

from __future__ import annotations

import datetime
import math
import re
from collections.abc import Sequence
from typing import Annotated, Any, Literal, get_args

import msgspec

# The statuses live with every reply code in engine.codes; re-exported here.
from engine.codes import BUSY as BUSY
from engine.codes import COMMITTED as COMMITTED
from engine.codes import DEAD_LETTERED as DEAD_LETTERED
from engine.codes import REJECTED as REJECTED
from ipc import wire

# Lengths are checked by the decoder. NUL (which PostgreSQL text and jsonb
# cannot hold) is checked by ``record_problem`` after decoding: a regex here
# doubled the cost of decoding and re-encoding an intent (3.0 vs 1.4 us,
# measured) and words its error worse.
ClientId = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
Seq = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
EntityId = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
Kind = Annotated[str, msgspec.Meta(min_length=1, max_length=32)]


class Intent(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """One player action as a client sends it (a JSON object / msgpack map)."""

    client_id: ClientId
    seq: Seq
    entity: EntityId
    kind: Kind
    args: dict[str, Any] = {}


ControlOp = Literal["health", "metrics", "ping"]
CONTROL_OPS: tuple[str, ...] = get_args(ControlOp)


class Request(msgspec.Struct, forbid_unknown_fields=True):
    """A control message on the intent socket: ``{"op": "health"}``."""

    op: ControlOp


class ControlProbe(msgspec.Struct, forbid_unknown_fields=True):
    """A control message with an op the engine does not know: exactly
    ``{"op": <string>}``, answered ``unknown_op`` rather than ``invalid``."""

    op: str


_CONTROL_PROBE_JSON = msgspec.json.Decoder(ControlProbe)
_CONTROL_PROBE_PACK = msgspec.msgpack.Decoder(ControlProbe)


def unknown_op(frame: bytes, packed: bool) -> str | None:
    """The op of a frame that is exactly ``{"op": <string>}``, or None. Asked
    only after the frame failed to decode as a known ``Request``."""
    try:
        probe = (_CONTROL_PROBE_PACK if packed else _CONTROL_PROBE_JSON).decode(frame)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError, UnicodeDecodeError):
        return None
    return probe.op


class Probe(msgspec.Struct):
    """Lenient view of a bad message, to name the intent in the error reply."""

    client_id: Any = None
    seq: Any = None
    op: Any = None


class Record(msgspec.Struct, array_like=True, gc=False):
    """An intent as stored in a ring and sent to PostgreSQL: a compact JSON
    array ``[client_id, seq, entity, kind, args, received_us]``. JSON because
    PostgreSQL parses it natively, so a batch is the ring payloads joined with
    commas and the flusher does no per-intent encoding (see persistence.lane_store)."""

    client_id: str
    seq: int
    entity: str
    kind: str
    args: msgspec.Raw
    received_us: int


class DecodedRecord(msgspec.Struct, array_like=True, gc=False):
    """``Record`` decoded by the planner, ``args`` as a dict."""

    client_id: str
    seq: int
    entity: str
    kind: str
    args: dict[str, Any]
    received_us: int


class Outcome(msgspec.Struct, array_like=True, gc=False):
    """What the flusher tells an ingest about one record that did not simply
    commit: dead-lettered, or a resend whose original outcome is reported."""

    position: int
    status: str
    code: str = ""
    reason: str = ""
    duplicate: bool = False


class Reply(msgspec.Struct, omit_defaults=True):
    """The one reply each intent gets. ``code``/``reason`` unless committed."""

    client_id: str | None
    seq: int | None
    status: str
    code: str | None = None
    reason: str | None = None
    duplicate: bool = False


class Batch(msgspec.Struct):
    """A committed batch, as the event bus delivers it."""

    id: int
    size: int
    cut_reason: str
    intents: list[Intent]


# Reason strings kept in rings and replies are bounded so an outcome record
# always fits; 480 bytes leaves room for any exception message worth reading.
MAX_REASON = 480


def clip_reason(reason: str) -> str:
    """Bound a reason string (keeps the start, which names the problem)."""
    return reason if len(reason) <= MAX_REASON else reason[: MAX_REASON - 3] + "..."


# Handlers and the database walk args recursively; 32 levels is deeper than
# any game state needs and far from Python's and PostgreSQL's limits.
MAX_ARGS_DEPTH = 32


def record_problem(intent: Intent, record_json: bytes, frame: bytes | None = None, packed: bool = False) -> str | None:
    """Why ``intent`` cannot be stored, or None: NUL in a text field or in
    args, args nested too deeply, args holding what JSON cannot (MessagePack
    only), a key twice in one object (given the ``frame`` it came in).

    ``record_json`` is its encoded ring record: a NUL anywhere shows there as
    the escape ``\\u0000``, nesting needs at least as many brackets as levels,
    and each remaining check starts with a C-speed test of bytes that is
    necessary for the problem, so the value is walked only when it must be."""
    if record_json.find(b"\\u0000") >= 0:  # find: `in` costs twice as much here (it tries an int first)
        for name in ("client_id", "entity", "kind"):
            if "\x00" in getattr(intent, name):
                return f"{name} holds a NUL character, which PostgreSQL text cannot store"
        if _holds_nul(intent.args):
            return "args holds a NUL character, which PostgreSQL jsonb cannot store"
    maps = record_json.count(b"{")
    if maps + record_json.count(b"[") > MAX_ARGS_DEPTH + 1 and _depth(intent.args) > MAX_ARGS_DEPTH:
        return f"args nested deeper than {MAX_ARGS_DEPTH} levels"
    if frame is None:
        return None
    # A JSON line cannot carry NaN, infinities, binary or extension types,
    # and msgspec gives string keys only. MessagePack can carry them all.
    if packed:
        # bin or ext (timestamps included) where their type bytes appear; a
        # float only when NaN/Infinity was written "null" in the record.
        odd = not frame.translate(_MSGPACK_SUSPECT).isascii() and (
            record_json.find(b"null") >= 0 or not frame.translate(_MSGPACK_BIN_EXT).isascii()
        )
        if maps > 1 and (odd or _NUMBER_KEY.search(record_json) is not None):
            # A map below args may also have number keys (the decoder types
            # only args' own keys). Exact and in C: args survive JSON
            # unchanged (NaN -> None, bytes -> text, 1 -> "1" compare
            # unequal); a third of the cost of a walk, measured.
            if _JSON_ANY.decode(_JSON.encode(intent.args)) != intent.args:
                return json_problem(intent.args) or "args cannot be stored as JSON without changing them"
        elif odd:
            bad = json_problem(intent.args)
            if bad is not None:
                return bad
    path = duplicate_key(intent, frame, record_json, packed)
    if path is not None:
        return f"duplicate key {path}: an object may hold each key only once"
    return None


# The MessagePack type bytes of what JSON cannot hold: bin 8/16/32
# (0xc4-0xc6), ext 8/16/32 (0xc7-0xc9), fixext 1-16 (0xd4-0xd8; the timestamp
# is one of these or ext 8), float32/float64 (0xca, 0xcb: NaN, +-Infinity).
# The same bytes inside a string or a number only cost a closer look. The
# test is a translation to 0x80 (suspect) or "a", then isascii(): about 3x
# cheaper than a regex search for these bytes, measured here.
_MSGPACK_SUSPECT = bytes(0x80 if 0xC4 <= b <= 0xCB or 0xD4 <= b <= 0xD8 else 0x61 for b in range(256))
_MSGPACK_BIN_EXT = bytes(0x80 if 0xC4 <= b <= 0xC9 or 0xD4 <= b <= 0xD8 else 0x61 for b in range(256))
# msgspec writes an integer or float key as its number in quotes: "1", "-2",
# "0.5", "1e300", "nan", "inf", "-inf". No such string, no number key.
_NUMBER_KEY = re.compile(rb'"(?:[-0-9]|nan"|inf")')
_JSON = msgspec.json.Encoder()
_JSON_ANY = msgspec.json.Decoder()
_PLAIN = frozenset((str, int, bool, type(None)))
_STR = frozenset((str,))


def json_problem(args: dict) -> str | None:
    """Why ``args`` (decoded from MessagePack) cannot be stored as JSON
    without changing it, naming the place (``args.state.t``), or None.

    Iterative, so any depth the decoder accepted is safe. msgspec's JSON
    encoder would write NaN and infinities as ``null``, binary as base64,
    timestamps as ISO text and integer keys as text: all refused here."""
    stack: list[tuple[Any, str]] = [(args, "args")]
    while stack:
        node, path = stack.pop()
        # Type sets are collected in C; the loop below runs only for a
        # container holding floats, containers, or something wrong.
        if type(node) is dict:
            if not _STR.issuperset(map(type, node)):
                key = next(k for k in node if type(k) is not str)
                return f"args cannot be stored as JSON: a key of {path} is {_describe(key)}, not a string"
            if _PLAIN.issuperset(map(type, node.values())):
                continue
            pairs: Any = node.items()
            keyed = True
        else:
            if _PLAIN.issuperset(map(type, node)):
                continue
            pairs = enumerate(node)
            keyed = False
        for key, value in pairs:
            kind = type(value)
            if kind in _PLAIN or (kind is float and math.isfinite(value)):
                continue
            child = f"{path}.{key}" if keyed else f"{path}[{key}]"
            if kind is dict or kind is list:
                stack.append((value, child))
            else:
                return f"args cannot be stored as JSON: {child} is {_describe(value)}"
    return None


class _OutOfRange(str):
    """A JSON number literal beyond the range of a double (``1e999``)."""

    __slots__ = ()


def _json_float(text: str) -> Any:
    value = float(text)
    return value if math.isfinite(value) else _OutOfRange(text)


_LENIENT_JSON = msgspec.json.Decoder(float_hook=_json_float)


def json_number_problem(line: bytes) -> str | None:
    """The reason for a JSON intent whose args hold a number a double cannot
    hold (``1e999``), naming the place, or None. msgspec refuses such a
    number itself but names only ``$.args[...]``: this is the error path's
    second look."""
    try:
        value = _LENIENT_JSON.decode(line)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError, UnicodeDecodeError):
        return None
    if not isinstance(value, dict) or not isinstance(value.get("args"), dict):
        return None
    return json_problem(value["args"])


def _describe(value: Any) -> str:
    if isinstance(value, _OutOfRange):
        return f"the number {value}, beyond the range of a double"
    if isinstance(value, float):
        if math.isfinite(value):
            return f"the float {value!r}"
        return "NaN" if value != value else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "binary data (MessagePack bin)"
    if isinstance(value, datetime.datetime):
        return "a MessagePack timestamp (extension type -1)"
    if isinstance(value, msgspec.msgpack.Ext):
        return f"a MessagePack extension (type {value.code})"
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"the integer {value}"
    if isinstance(value, tuple):
        return "an array"
    return f"a {type(value).__name__}"


# ------------------------------------------------------------ duplicate keys
# msgspec keeps the last of two equal keys; the engine refuses them instead.
# Exact scans (ipc.wire) cost a pass in Python, so each framing first tests a
# necessary condition in C: when it holds, no key can have been dropped.
_PACK = msgspec.msgpack.Encoder()
_ARGS_DEFAULT = len(b"\xa4args\x80")  # what re-encoding adds when args was left out
_EMPTY_ARGS = re.compile(rb'"args"[ \t\r\n]*:[ \t\r\n]*\{[ \t\r\n]*\}')


def _empty_args(line: bytes) -> bool:
    """The JSON line holds the key ``"args"`` with the value ``{}``."""
    return line.find(b'"args":{}') >= 0 or _EMPTY_ARGS.search(line) is not None


def duplicate_key(intent: Intent, frame: bytes, record_json: bytes, packed: bool) -> str | None:
    """The path of a key that appears twice in one object of ``frame`` (the
    intent's wire bytes), or None.

    MessagePack: re-encoding the decoded intent (msgspec writes the smallest
    form of everything) never makes it longer than the frame, except a
    float32 (0xca: widened to float64) and what ``json_problem`` already
    refused, and a dropped duplicate makes it shorter by at least two bytes.
    So the frame is free of duplicates when the re-encoding is the frame
    itself, as long (args present), or 6 bytes longer (args left out, and
    ``{}`` written in its place).

    JSON: a colon outside strings ends a key. The record has no colon
    outside args (it is an array) and a colon in a string only where the
    line has one (unless written ``\\u003a``), so the line holds exactly 4
    (args left out) or 5 more colons than the record when nothing was
    dropped, and more when something was. Five with empty args is also
    four fields, one of them twice; the key ``"args": {}`` tells them apart.
    """
    if packed:
        canonical = _PACK.encode(intent)
        if canonical == frame:
            return None
        if 0xCA not in frame:
            grown = len(canonical) - len(frame)
            if grown == _ARGS_DEFAULT or (grown == 0 and intent.args):
                return None
        return wire.msgpack_duplicate_key(frame)
    extra = frame.count(b":") - record_json.count(b":")
    if (extra == 4 or (extra == 5 and (intent.args or _empty_args(frame)))) and frame.find(b"\\u003") < 0:
        return None  # (and no colon was written as an escape)
    return wire.json_duplicate_key(frame)


def suspects(intents: Sequence[Intent], records: Sequence[bytes], frames: Sequence[bytes], packed: bool) -> list[int]:
    """The indexes of the intents whose records ``record_problem`` must
    look at; for every other one it would return None.

    One cheap test per check, each a sufficient condition for the check to
    pass, and none a Python call: the record's brackets and backslashes are
    exactly ``[{}]`` (no escape, so no NUL; args one flat object, so not too
    deep and no map below args); MessagePack: no byte of a type JSON cannot
    hold in the frame, and the frame is its own canonical encoding (no key
    dropped); JSON: 5 more colons in the line than in the record with args
    not empty, and no escaped colon (no key dropped, see ``duplicate_key``).
    Strings holding brackets, nested args, other encoders' MessagePack all
    go the long way, to ``record_problem``."""
    out: list[int] = []
    if packed:
        encode = _PACK.encode
        try:
            for k, (intent, record, frame) in enumerate(zip(intents, records, frames)):
                if (
                    record.translate(None, _NOT_SHAPE) != _FLAT_RECORD
                    or not frame.translate(_MSGPACK_SUSPECT).isascii()
                    or encode(intent) != frame
                ):
                    out.append(k)
        except (msgspec.EncodeError, TypeError, ValueError, OverflowError, RecursionError):
            return list(range(len(intents)))
    else:
        for k, (intent, record, frame) in enumerate(zip(intents, records, frames)):
            if (
                record.translate(None, _NOT_SHAPE) != _FLAT_RECORD
                or frame.count(b":") - record.count(b":") != 5
                or not intent.args
                or frame.find(b"\\u003") >= 0
            ):
                out.append(k)
    return out


# A record's shape: its brackets and backslashes, everything else deleted.
_NOT_SHAPE = bytes(b for b in range(256) if b not in b"[]{}\\")
_FLAT_RECORD = b"[{}]"


def _depth(value: Any) -> int:
    """Nesting depth, iteratively (the value may be ~1000 levels deep)."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, dict):
            node = list(node.values())
        elif not isinstance(node, list):
            continue
        deepest = max(deepest, level)
        if deepest > MAX_ARGS_DEPTH:
            return deepest
        stack.extend((child, level + 1) for child in node)
    return deepest


def _holds_nul(value: Any) -> bool:
    # Only reached when the JSON text contains the escape, which a literal
    # backslash before "u0000" also produces; walk the value to be exact.
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            if "\x00" in node:
                return True
        elif isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return False
