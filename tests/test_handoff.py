"""The outcome hand-off (engine/handoff.py): a reply is the stored outcome,
whatever the fill level of the outcome ring and whichever side pauses or
restarts. Driven with real rings in shared memory, the smallest outcome ring
the layout allows, and random interleavings of the two sides.

The intent ring carries packed runs, used exactly as the engine uses them:
the ingest appends many intents per run (``try_append_packed``), the flusher
queues runs in a ``RunQueue`` and cuts batches of any size, so a batch often
ends inside a run, and acknowledges with ``consume`` (durable cursor, then
release cursor). A flusher may die between those two stores: its successor
then finds the durable cursor ahead of the release cursor, maybe several
runs ahead, and must skip every item below it."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.handoff import OutcomeInbox, OutcomeOutbox
from engine.intent import Outcome
from ipc import layout
from ipc.ring import Ring
from ipc.runqueue import RunQueue
from ipc.shm import Segment

INTENT_CAP = 1 << 16
OUTCOME_CAP = layout.MIN_CAPACITY  # a handful of outcomes fill it
LONG_REASON = "x" * 450  # as long as a handler's refusal can be


class World:
    """One intent ring and one outcome ring; a scripted flusher and ingest."""

    def __init__(self, seed: int) -> None:
        self.rnd = random.Random(seed)
        size = layout.ring_bytes(INTENT_CAP) + layout.ring_bytes(OUTCOME_CAP)
        self.seg = Segment.create(size)
        self.intents = Ring(self.seg.buf, 0, INTENT_CAP, create=True, name="intents")
        self.outcome_ring = Ring(self.seg.buf, layout.ring_bytes(INTENT_CAP), OUTCOME_CAP, create=True, name="out")
        self.outbox = OutcomeOutbox(self.outcome_ring)
        self.inbox = OutcomeInbox(self.intents, self.outcome_ring)
        self.stored: dict[int, tuple[str, str]] = {}  # position -> (status, code): the database
        self.waiting: list[int] = []  # positions this ingest process wrote and awaits
        self.replies: dict[int, tuple[str, str]] = {}
        self.queue = RunQueue(self.intents)  # the flusher's runs read and not yet released
        self.batch: list[int] | None = None  # cut, written, outcomes being published
        self.unpublished: list[bytes] = []
        self.durable = 0  # the highest durable cursor seen: it never moves back

    def close(self) -> None:
        self.intents.close()
        self.outcome_ring.close()
        self.seg.close()

    # ------------------------------------------------------------- ingest
    def ingest_write(self) -> None:
        """One packed run per claim, as the ingest writes a frame's intents;
        a full ring takes a prefix and the rest is dropped here."""
        payloads = [b"intent"] * self.rnd.randint(1, 30)
        with self.intents.claim() as claim:
            claim.try_append_packed(payloads, 0, self.waiting)

    def ingest_reply(self) -> None:
        released = self.inbox.released()
        while self.waiting and self.waiting[0] < released:
            position = self.waiting.pop(0)
            out = self.inbox.take(position)
            assert position not in self.replies, f"two replies for {position}"
            self.replies[position] = ("committed", "") if out is None else (out.status, out.code)
        self.inbox.forget_below(released)

    def ingest_restart(self) -> None:
        """Its connections are gone: nothing it waited for gets a reply."""
        self.waiting = []
        self.inbox = OutcomeInbox(self.intents, self.outcome_ring)

    # ------------------------------------------------------------ flusher
    def flusher_cut(self, most: int | None = None) -> None:
        """Queue the published runs and take ``most`` items (random: a
        batch usually ends inside a run, since runs are read whole)."""
        if self.batch is not None:
            return
        want = most or self.rnd.randint(1, 60)
        k = min(want, self.queue.fill(want))
        if not k:
            return
        positions = self.queue.positions(0, k)
        # An item the durable cursor passed is done (maybe replied): a
        # flusher, restarted or not, must never take it again.
        durable = self._durable_now()
        assert positions[0] >= durable, f"cut from {positions[0]}, below the durable cursor {durable}"
        again = self.replies.keys() & set(positions)
        assert not again, f"positions {sorted(again)[:5]} were replied and are cut again"
        outs = []
        for pos in positions:  # "write" the batch: outcomes decided once, stored
            duplicate = pos in self.stored
            if not duplicate:
                roll = self.rnd.random()
                self.stored[pos] = (
                    ("dead_lettered", "handler_error")
                    if roll < 0.5
                    else ("rejected", "seq_reused")
                    if roll < 0.55
                    else ("committed", "")
                )
            status, code = self.stored[pos]
            if status != "committed" or duplicate:
                outs.append(self.outbox.encode(Outcome(pos, status, code, LONG_REASON, duplicate)))
        self.batch, self.unpublished = positions, outs

    def flusher_publish(self) -> None:
        if self.batch is None:
            return
        del self.unpublished[: self.outbox.publish(self.unpublished)]
        if not self.unpublished:  # every outcome handed over: durable, then released
            durable = self._durable_after_batch()
            self.queue.consume(len(self.batch))
            assert self._durable_now() == durable, f"consume stored {self.intents.durable()}, expected {durable}"
            self.batch = None

    def flusher_restart(self) -> None:
        """Killed at any point: the successor reads from the release cursor,
        skips the items below the durable cursor and writes the rest again
        (duplicates, stored outcome)."""
        self.batch, self.unpublished = None, []
        self.queue = RunQueue(self.intents)

    def flusher_die_between_cursors(self) -> None:
        """Killed inside ``consume``: every outcome published and the durable
        cursor stored, the release cursor not. The successor finds DURABLE
        ahead of RELEASE (inside a run, or several runs on)."""
        if self.batch is None:
            return
        del self.unpublished[: self.outbox.publish(self.unpublished)]
        if self.unpublished:
            return  # outcomes still pending: consume is not reached yet
        self.intents.durable_cursor.store_release(self._durable_after_batch())
        self.flusher_restart()

    def _durable_after_batch(self) -> int:
        """What ``consume`` stores as the durable cursor for the current
        batch: the position of the first item left queued, or where the
        queue's reading ended when the batch emptied it."""
        assert self.batch is not None
        left = self.queue.positions(len(self.batch), 1)
        return left[0] if left else self.queue.end

    def _durable_now(self) -> int:
        """The durable cursor, checked never to move back."""
        durable = self.intents.durable()
        assert durable >= self.durable, f"durable cursor moved back from {self.durable} to {durable}"
        assert durable >= self.intents.released(), "durable cursor behind the release cursor"
        self.durable = durable
        return durable


STEPS = ["ingest_write", "ingest_reply", "flusher_cut", "flusher_publish"]


def run_world(seed: int, steps: int, restarts: bool) -> World:
    world = World(seed)
    try:
        restart_steps = ["ingest_restart", "flusher_restart", "flusher_die_between_cursors"]
        choices = STEPS + (restart_steps if restarts else [])
        weights = [5, 4, 3, 6] + ([0.05, 0.05, 0.05] if restarts else [])
        for _ in range(steps):
            getattr(world, world.rnd.choices(choices, weights)[0])()
        # Quiesce: the flusher finishes, the ingest replies.
        for _ in range(10_000):
            world.flusher_cut()
            world.flusher_publish()
            world.ingest_reply()
            queue = world.queue
            idle = world.batch is None and not queue.count and queue.end == world.intents.published()
            if idle and not world.waiting:
                break
        for position, reply in world.replies.items():
            assert reply == world.stored[position], (
                f"position {position}: replied {reply}, stored {world.stored[position]}"
            )
        assert not world.waiting, f"{len(world.waiting)} intents never answered"
        assert world.inbox.held() == 0, "outcomes held for positions already released"
        return world
    finally:
        world.close()


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32))
def test_every_reply_is_the_stored_outcome_with_a_tiny_outcome_ring(seed):
    run_world(seed, steps=400, restarts=False)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32))
def test_every_reply_is_the_stored_outcome_across_restarts(seed):
    run_world(seed, steps=400, restarts=True)


def test_outcomes_read_before_their_release_are_kept_until_it():
    """The reported failure: part of a batch's outcomes published (the ring
    filled), the ingest woken and draining them, the cursor not yet moved."""
    world = World(1)
    try:
        while len(world.waiting) < 40:
            world.ingest_write()
        world.flusher_cut(most=40)
        for pos in world.batch:  # make every outcome exceptional and long
            world.stored[pos] = ("dead_lettered", "handler_error")
        world.unpublished = [
            world.outbox.encode(Outcome(p, "dead_lettered", "handler_error", LONG_REASON)) for p in world.batch
        ]
        rounds = 0
        while world.batch is not None:
            world.flusher_publish()
            world.ingest_reply()  # drains the outcome ring before the release
            rounds += 1
        assert rounds > 1, "the outcomes fitted at once; the test needs a fuller ring"
        world.ingest_reply()
        assert world.replies and all(r == ("dead_lettered", "handler_error") for r in world.replies.values())
    finally:
        world.close()


@pytest.mark.parametrize("seed", range(3))
def test_long_random_run(seed):
    world = run_world(seed, steps=5000, restarts=True)
    assert len(world.replies) > 100
