"""The intent model and every message that crosses a socket or a ring.

An intent is one player action ``(client_id, seq, entity, kind, args)``.
``(client_id, seq)`` is its idempotency key: the database holds each at most
once, and a resend is answered with the original outcome.

Inbound messages are decoded by msgspec straight into typed structs; field
constraints (lengths, ranges, no NUL) are checked by the decoder itself, so a
wrong type or an unknown field becomes one clear error naming the field.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

# Lengths are checked by the decoder. NUL (which PostgreSQL text and jsonb
# cannot hold) is checked by ``record_problem`` after decoding: a regex here
# doubled the cost of decoding and re-encoding an intent (3.0 vs 1.4 us,
# measured) and words its error worse.
ClientId = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
Seq = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
EntityId = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
Kind = Annotated[str, msgspec.Meta(min_length=1, max_length=32)]

COMMITTED = "committed"
DEAD_LETTERED = "dead_lettered"
REJECTED = "rejected"
BUSY = "busy"


class Intent(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """One player action as a client sends it (a JSON object / msgpack map)."""

    client_id: ClientId
    seq: Seq
    entity: EntityId
    kind: Kind
    args: dict[str, Any] = {}


class Request(msgspec.Struct, forbid_unknown_fields=True):
    """A control message on the intent socket: ``{"op": "health"}``."""

    op: Literal["health", "metrics", "ping"]


class Probe(msgspec.Struct):
    """Lenient view of a bad message, to name the intent in the error reply."""

    client_id: Any = None
    seq: Any = None
    op: Any = None


class Record(msgspec.Struct, array_like=True, gc=False):
    """An intent as stored in a ring and sent to PostgreSQL: a compact JSON
    array ``[client_id, seq, entity, kind, args, received_us]``. JSON because
    PostgreSQL parses it natively, so a batch is the ring payloads joined with
    commas and the flusher does no per-intent encoding (see persistence.writer)."""

    client_id: str
    seq: int
    entity: str
    kind: str
    args: msgspec.Raw
    received_us: int


class DecodedRecord(msgspec.Struct, array_like=True, gc=False):
    """``Record`` decoded by the pipeline, ``args`` as a dict."""

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


def record_problem(intent: Intent, record_json: bytes) -> str | None:
    """Why ``intent`` cannot be stored (NUL in a text field or in args, args
    nested too deeply), or None. ``record_json`` is its encoded ring record:
    a NUL anywhere shows there as the escape ``\\u0000``, and nesting needs at
    least as many brackets as levels, so both checks are a C-speed scan of
    bytes in the common case."""
    if b"\\u0000" in record_json:
        for name in ("client_id", "entity", "kind"):
            if "\x00" in getattr(intent, name):
                return f"{name} holds a NUL character, which PostgreSQL text cannot store"
        if _holds_nul(intent.args):
            return "args holds a NUL character, which PostgreSQL jsonb cannot store"
    if record_json.count(b"{") + record_json.count(b"[") > MAX_ARGS_DEPTH + 1 and _depth(intent.args) > MAX_ARGS_DEPTH:
        return f"args nested deeper than {MAX_ARGS_DEPTH} levels"
    return None


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
