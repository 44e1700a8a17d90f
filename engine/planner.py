"""The planner: a batch of intents becomes the fewest state writes.

Pure planning over Python data: no connection, no SQL. The lane store
(``persistence.lane_store``) owns the write and calls in here through its
``StatePlanning`` protocol. Per batch:

1. Decode the whole batch in one msgspec call (``list[DecodedRecord]``).
2. Know the current state of every entity the batch touches: from the
   lane's entity cache (``plan_optimistic``, no read at all), or else from
   the rows the store read for ``entity_ids()`` in the same round trip as
   the intent-log insert.
3. For the intents that are new (not resends), in batch order: run the
   handler (pure), check existence (``spawn`` needs absence, everything else
   presence), and apply its ops to the batch's working copy of the entity.
   A handler that raises, or an existence check that fails, dead-letters that
   intent only.
4. Say what to write, each touched entity once (``Plan``): the spawned
   entities, and the updated ones with the version each new state was
   computed from (intents on the same entity are combined first, so each
   entity is one entry). The store writes them set-based and checks those
   versions, so a cached state that went stale is never written over.

Why apply in Python rather than as ``jsonb_set`` chains in SQL: the ops are
applied to state read in the same round trip, so reduction ends at the final
value of each entity, the fewest writes there can be; and one function
(``apply_op``) defines the semantics for the batched path, the one-by-one
path and ``tools/replay`` alike, which is what makes "batching does not
change the game" provable rather than hoped for.

All ops are total (they never fail on the state they meet), so dropping or
combining ops can never hide an error the one-by-one order would have hit:
``incr`` treats a non-number as 0, ``append`` a non-list as ``[]``,
``set`` replaces a non-object on its path with ``{}``, ``remove`` and
``delete`` on a missing path do nothing.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterable, Sequence
from typing import Any

import msgspec

from engine import codes
from engine.handlers import Op, Registry, Spawn
from engine.intent import DecodedRecord, clip_reason
from persistence.lane_store import Plan


# ---------------------------------------------------------------- semantics
def _descend(state: dict, keys: list[str], create: bool) -> dict | None:
    node = state
    for key in keys:
        child = node.get(key)
        if not isinstance(child, dict):
            if not create:
                return None
            child = {}
            node[key] = child
        node = child
    return node


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _copy(value: Any) -> Any:
    # Handlers may reuse one value in several ops; only containers need a
    # private copy; deepcopy of a scalar is wasted work on the hot path.
    return copy.deepcopy(value) if isinstance(value, (dict, list)) else value


def apply_op(state: dict, op: Op) -> None:
    """Apply one op to ``state`` in place. Total: never raises on any state."""
    keys = op.path.split(".")
    last = keys[-1]
    kind = op.op
    if kind in ("remove", "delete"):
        parent = _descend(state, keys[:-1], create=False)
        if parent is None or last not in parent:
            return
        if kind == "delete":
            del parent[last]
            return
        items = parent[last]
        if isinstance(items, list):
            for i, item in enumerate(items):
                if type(item) is type(op.value) and item == op.value:
                    del items[i]
                    break
        return
    parent = _descend(state, keys[:-1], create=True)
    if kind == "set":
        parent[last] = _copy(op.value)
    elif kind == "incr":
        current = parent.get(last)
        value = (current if _is_number(current) else 0) + op.value
        if op.lo is not None and value < op.lo:
            value = op.lo
        if op.hi is not None and value > op.hi:
            value = op.hi
        parent[last] = value
    elif kind == "append":
        items = parent.get(last)
        if not isinstance(items, list):
            items = []
        items.append(_copy(op.value))
        if op.bound is not None and len(items) > op.bound:
            del items[: len(items) - op.bound]
        parent[last] = items
    else:
        raise ValueError(f"unknown op {kind!r}")


def check_ops(ops: Iterable, entity: str) -> None:
    """Reject what a handler must not return (ops on other entities, bad ops,
    a spawn that is not the first op)."""
    for i, op in enumerate(ops):
        if isinstance(op, Spawn):
            if op.entity != entity:
                raise ValueError(f"handler spawned {op.entity!r} from an intent on {entity!r}")
            if i:
                raise ValueError("a Spawn must be the first op a handler returns")
            continue
        if not isinstance(op, Op):
            raise TypeError(f"handler returned {type(op).__name__}, expected Op or Spawn")
        if op.op not in ("set", "incr", "append", "remove", "delete"):
            raise ValueError(f"unknown op {op.op!r}")
        if op.entity != entity:
            raise ValueError(f"handler wrote {op.entity!r} from an intent on {entity!r}")
        if not op.path or any(not part for part in op.path.split(".")):
            raise ValueError(f"bad path {op.path!r}")
        if op.op == "incr" and not (isinstance(op.value, int) and not isinstance(op.value, bool)):
            raise ValueError("incr needs an integer value (exact sums, batch-order independent)")


class World:
    """Working copies of entity states during one batch."""

    __slots__ = ("spawned", "states", "touched", "versions")

    def __init__(self, states: dict[str, dict], versions: dict[str, int] | None = None) -> None:
        self.states = states  # entity -> state (present entities only)
        self.versions = versions or {}  # entity -> version before this batch
        self.spawned: set[str] = set()  # created in this batch
        self.touched: dict[str, int] = {}  # entity -> applied intents

    def apply(self, registry: Registry, rec: DecodedRecord) -> tuple[str, str] | None:
        """Run one intent; None if applied, else (code, reason) to dead-letter."""
        try:
            ops = registry[rec.kind](rec)
            if not registry.trusted:
                check_ops(ops, rec.entity)
        except Exception as exc:  # noqa: BLE001 - a handler may raise anything: isolate it
            return codes.HANDLER_ERROR, clip_reason(f"{type(exc).__name__}: {exc}")
        entity = rec.entity
        state = self.states.get(entity)
        spawn = bool(ops) and type(ops[0]) is Spawn
        if spawn:
            if state is not None:
                return codes.ENTITY_EXISTS, f"entity {entity!r} already exists"
            state = self.states[entity] = {}
            self.spawned.add(entity)
        elif state is None:
            return codes.NO_SUCH_ENTITY, f"entity {entity!r} does not exist (spawn it first)"
        for op in ops:
            if type(op) is Spawn:
                state.clear()
                state.update(copy.deepcopy(op.state))
            else:
                apply_op(state, op)
        self.touched[entity] = self.touched.get(entity, 0) + 1
        return None


_MISS = object()


class BatchPlanner:
    """Plans one batch for the lane store, which supplies the new ords and
    the current states it read -- or, on the optimistic path, plans from the
    entity cache with no read at all."""

    def __init__(self, owner: StatePlanner, batch: bytes) -> None:
        self.owner = owner
        self.records: list[DecodedRecord] = owner.decode_batch(batch)
        self.world: World | None = None

    def entity_ids(self, ords: Sequence[int] | None = None) -> list[str]:
        """The entities the batch (or ``ords``) touches, in first-touch order."""
        chosen = self.records if ords is None else [self.records[o - 1] for o in ords]
        return list(dict.fromkeys(rec.entity for rec in chosen))

    def plan(self, new_ords: Sequence[int], rows: Iterable[tuple[str, str, int]]) -> Plan:
        """Plan ``new_ords`` from the rows read for ``entity_ids`` (id, state as JSON text, version)."""
        decode = self.owner.decode_state
        states, versions = {}, {}
        for entity, text, version in rows:
            states[entity] = decode(text)
            versions[entity] = version
        return self._plan(World(states, versions), new_ords)

    def plan_optimistic(self) -> Plan | None:
        """Plan every intent as new from cached entities; None when an entity
        is not cached (the store then takes the reading path).

        The cache is updated at once, in place: it then holds the state
        *after* this batch, so the next batch can be planned while this one
        is still being written. That holds only while every planned batch
        commits as planned: the lane store calls ``StatePlanner.forget``
        whenever one does not."""
        cache = self.owner.cache
        states, versions = {}, {}
        for rec in self.records:
            entity = rec.entity
            if entity in states:
                continue
            hit = cache.get(entity, _MISS)
            if hit is _MISS:
                return None
            states[entity], versions[entity] = hit
        plan = self._plan(World(states, versions), range(1, len(self.records) + 1))
        self.owner.remember(self.world)
        self.world = None  # already remembered; committed() has nothing to add
        return plan

    def _plan(self, world: World, new_ords: Iterable[int]) -> Plan:
        dead: dict[int, tuple[str, str]] = {}
        apply = world.apply
        registry = self.owner.registry
        records = self.records
        for ord_ in new_ords:
            failure = apply(registry, records[ord_ - 1])
            if failure is not None:
                dead[ord_] = failure
        self.world = world
        return _writes(world, dead)

    def committed(self) -> None:
        """The batch's transaction committed: its states become the cache."""
        if self.world is not None:
            self.owner.remember(self.world)


class StatePlanner:
    """The handler registry, the codecs the planner reuses, and the lane's
    entity cache: the lane is the only writer of its entities, so the states
    it committed are the states in the database -- unless someone else
    writes the table, which the store's version check detects. When the
    cache may be wrong is the lane store's call alone (``forget``)."""

    # 200k entities of a few hundred bytes each stays well inside the
    # worker's default 512 MiB RSS limit.
    CACHE_MAX = 200_000

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._batch_dec = msgspec.json.Decoder(list[DecodedRecord])
        self._state_dec = msgspec.json.Decoder(dict)
        self.cache: dict[str, tuple[dict, int]] = {}  # entity -> (state, version); oldest first

    def planner(self, batch: bytes) -> BatchPlanner:
        return BatchPlanner(self, batch)

    def decode_batch(self, batch: bytes) -> list[DecodedRecord]:
        return self._batch_dec.decode(batch)

    def decode_state(self, text: str) -> dict:
        return self._state_dec.decode(text)

    def remember(self, world: World) -> None:
        cache = self.cache
        for entity, state in world.states.items():
            version = world.versions.get(entity, 0) + world.touched.get(entity, 0)
            cache.pop(entity, None)  # re-inserted last: most recently used
            cache[entity] = (state, version)
        excess = len(cache) - self.CACHE_MAX
        if excess > 0:
            for entity in list(itertools.islice(cache, excess)):
                del cache[entity]

    def forget(self) -> None:
        """Drop every cached state: a planned write did not commit as
        planned. Called by the lane store only."""
        self.cache.clear()


def _writes(world: World, dead: dict[int, tuple[str, str]]) -> Plan:
    """Each touched entity once: spawned ones whole, the rest with the
    version their new state was computed from."""
    plan = Plan(dead=dead)
    for entity, n in world.touched.items():
        if entity in world.spawned:
            plan.spawned.append((entity, world.states[entity], n))
        else:
            plan.updated[entity] = (world.states[entity], n, world.versions.get(entity, 0))
    return plan


def apply_one_by_one(
    registry: Registry, records: Iterable[DecodedRecord], states: dict[str, dict] | None = None
) -> tuple[dict[str, dict], list[tuple]]:
    """The reference: apply intents one at a time, in order, from ``states``.
    Returns the final states and the dead letters ``(client_id, seq, code)``."""
    world = World(copy.deepcopy(states or {}))
    dead = []
    for rec in records:
        failure = world.apply(registry, rec)
        if failure is not None:
            dead.append((rec.client_id, rec.seq, failure[0]))
    return world.states, dead
