"""Intent handlers: pure functions ``intent -> list[Op]``, one per kind.

A handler sees the decoded intent and nothing else: no database, no clock,
no global state, so batching cannot change what it returns. Raising (any
exception; ``HandlerError`` for a clean message) dead-letters that intent
with the reason; the rest of the batch commits.

An ``Op`` is ``(entity, path, op, value, lo, hi, bound)`` on the entity's
JSONB state, ``path`` a dot path (``"pos.x"``):

========  ===============================================================
``set``     put ``value`` at ``path`` (intermediate objects are created)
``incr``    add the integer ``value`` (missing counts as 0), then clamp to
            ``[lo, hi]`` where given (``damage`` floors ``hp`` at 0)
``append``  append ``value`` to the list at ``path`` (missing: empty); with
            ``bound``, keep only the last ``bound`` items
``remove``  remove the first element equal to ``value`` (absent: no-op)
``delete``  remove the key at ``path``
========  ===============================================================

The special kind ``spawn`` creates the entity (``Spawn`` op); every other
kind needs the entity to exist, else the intent is dead-lettered with
``no_such_entity``. Spawning an existing entity is dead-lettered with
``entity_exists``.

Arguments are checked before an intent is stored: a kind declares the
schema of its ``args`` (a ``msgspec.Struct``, with ``@takes(Schema)``), and
the ingest rejects an intent whose args do not fit it (``rejected
invalid``, naming the field; nothing stored). A malformed argument is a
client error, not a game event. Handlers keep dead letters for refusals
that depend on state (``no_such_entity``, a handler's own rule).

Users add kinds with ``--handlers package.module:REGISTRY`` where
``REGISTRY`` is a ``Registry`` (usually ``BUILTIN.extend({...})``); a kind
without ``@takes`` accepts any args object.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Annotated, Any, NamedTuple

import msgspec

from engine.errors import ConfigError, HandlerError

OPS = ("set", "incr", "append", "remove", "delete")


class Op(NamedTuple):
    entity: str
    path: str
    op: str
    value: Any = None
    lo: int | None = None
    hi: int | None = None
    bound: int | None = None


class Spawn(NamedTuple):
    entity: str
    state: dict


Handler = Callable[[Any], list]


class Registry(Mapping[str, Handler]):
    """An immutable kind -> handler map.

    ``trusted`` skips checking each returned op (right entity, known op,
    integer incr): only for handlers shipped and tested with the engine.
    ``extend`` always yields an untrusted registry."""

    def __init__(self, handlers: Mapping[str, Handler], *, trusted: bool = False) -> None:
        for kind, fn in handlers.items():
            if not callable(fn):
                raise TypeError(f"handler for {kind!r} is not callable")
        self._handlers = dict(handlers)
        self.trusted = trusted

    def __getitem__(self, kind: str) -> Handler:
        return self._handlers[kind]

    def __iter__(self):
        return iter(self._handlers)

    def __len__(self) -> int:
        return len(self._handlers)

    def extend(self, more: Mapping[str, Handler]) -> Registry:
        return Registry({**self._handlers, **more})

    def kinds(self) -> frozenset[str]:
        return frozenset(self._handlers)

    def schemas(self) -> dict[str, type[msgspec.Struct] | None]:
        """kind -> the Struct its args must fit (None: any object)."""
        return {kind: getattr(fn, "args_schema", None) for kind, fn in self._handlers.items()}


def takes(schema: type[msgspec.Struct]) -> Callable[[Handler], Handler]:
    """Declare the schema of a kind's ``args``; the ingest enforces it."""
    if not (isinstance(schema, type) and issubclass(schema, msgspec.Struct)):
        raise TypeError(f"takes() needs a msgspec.Struct subclass, got {schema!r}")

    def mark(fn: Handler) -> Handler:
        fn.args_schema = schema  # type: ignore[attr-defined]
        return fn

    return mark


# --- the built-in kinds' argument schemas -------------------------------------
# Integers stay within +-1e9 so sums over a long game never leave int64.
Amount = Annotated[int, msgspec.Meta(ge=0, le=1_000_000_000)]
Delta = Annotated[int, msgspec.Meta(ge=-1_000_000_000, le=1_000_000_000)]
Item = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]


class SpawnArgs(msgspec.Struct, forbid_unknown_fields=True):
    state: dict[str, Any] = {}


class MoveArgs(msgspec.Struct, forbid_unknown_fields=True):
    dx: Delta
    dy: Delta


class SayArgs(msgspec.Struct, forbid_unknown_fields=True):
    text: Annotated[str, msgspec.Meta(min_length=1, max_length=500)]


class AmountArgs(msgspec.Struct, forbid_unknown_fields=True):
    amount: Amount


class ItemArgs(msgspec.Struct, forbid_unknown_fields=True):
    item: Item


def args_problem(schema: type[msgspec.Struct], args: dict) -> str | None:
    """Why ``args`` does not fit ``schema`` (None when it does), naming the field."""
    try:
        msgspec.convert(args, schema)
    except msgspec.ValidationError as exc:
        text = str(exc)
        message, _, where = text.partition(" - at ")
        field = where.strip("`").replace("$", "args", 1) if where else "args"
        return f"{field}: {message}"
    return None


def _int_arg(args: dict, name: str, *, minimum: int | None = None) -> int:
    value = args.get(name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise HandlerError(f"args.{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise HandlerError(f"args.{name} must be >= {minimum}, got {value}")
    if abs(value) > 1_000_000_000:
        raise HandlerError(f"args.{name} is out of range (|{value}| > 1e9)")
    return value


def _str_arg(args: dict, name: str, *, max_length: int) -> str:
    value = args.get(name)
    if not isinstance(value, str) or not value:
        raise HandlerError(f"args.{name} must be a non-empty string, got {value!r}")
    if len(value) > max_length:
        raise HandlerError(f"args.{name} is longer than {max_length} characters")
    return value


# The say log keeps the last 20 lines: enough scroll-back for a room, small
# enough that the row stays well under PostgreSQL's 2 kB TOAST threshold.
SAY_LOG_BOUND = 20


@takes(SpawnArgs)
def spawn(intent) -> list:
    state = intent.args.get("state", {})
    if not isinstance(state, dict):
        raise HandlerError(f"args.state must be an object, got {type(state).__name__}")
    return [Spawn(intent.entity, state)]


@takes(MoveArgs)
def move(intent) -> list:
    dx = _int_arg(intent.args, "dx")
    dy = _int_arg(intent.args, "dy")
    return [Op(intent.entity, "pos.x", "incr", dx), Op(intent.entity, "pos.y", "incr", dy)]


@takes(SayArgs)
def say(intent) -> list:
    text = _str_arg(intent.args, "text", max_length=500)
    return [Op(intent.entity, "log", "append", text, bound=SAY_LOG_BOUND)]


@takes(AmountArgs)
def damage(intent) -> list:
    amount = _int_arg(intent.args, "amount", minimum=0)
    return [Op(intent.entity, "hp", "incr", -amount, lo=0)]


@takes(AmountArgs)
def heal(intent) -> list:
    amount = _int_arg(intent.args, "amount", minimum=0)
    return [Op(intent.entity, "hp", "incr", amount, lo=0)]


@takes(ItemArgs)
def pick_up(intent) -> list:
    return [Op(intent.entity, "inv", "append", _str_arg(intent.args, "item", max_length=64))]


@takes(ItemArgs)
def drop(intent) -> list:
    return [Op(intent.entity, "inv", "remove", _str_arg(intent.args, "item", max_length=64))]


BUILTIN = Registry(
    {"spawn": spawn, "move": move, "say": say, "damage": damage, "heal": heal, "pick_up": pick_up, "drop": drop},
    trusted=True,
)


def load(spec: str) -> Registry:
    """Import ``package.module:ATTRIBUTE`` and check it is a handler map."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError("handlers", spec, f"cannot import {module_name}: {exc}") from None
    try:
        registry = getattr(module, attr)
    except AttributeError:
        raise ConfigError("handlers", spec, f"{module_name} has no attribute {attr!r}") from None
    if not isinstance(registry, Mapping) or not registry:
        raise ConfigError("handlers", spec, "must name a non-empty mapping of kind -> handler")
    if not isinstance(registry, Registry):
        registry = Registry(registry)
    for kind in registry:
        if not isinstance(kind, str) or not kind or len(kind) > 32:
            raise ConfigError("handlers", spec, f"kind {kind!r} must be a string of 1-32 characters")
    return registry
