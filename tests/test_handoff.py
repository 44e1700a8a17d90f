"""The outcome hand-off (engine/handoff.py): a reply is the stored outcome,
whatever the fill level of the outcome ring and whichever side pauses or
restarts. Driven with real rings in shared memory, the smallest outcome ring
the layout allows, and random interleavings of the two sides."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.handoff import OutcomeInbox, OutcomeOutbox
from engine.intent import Outcome
from ipc import layout
from ipc.ring import Ring
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
        self.next_cut = 0  # the flusher's scan position
        self.batch: list[int] | None = None  # cut, written, outcomes being published
        self.unpublished: list[bytes] = []

    def close(self) -> None:
        self.intents.close()
        self.outcome_ring.close()
        self.seg.close()

    # ------------------------------------------------------------- ingest
    def ingest_write(self) -> None:
        with self.intents.claim() as claim:
            for _ in range(self.rnd.randint(1, 30)):
                if not claim.try_append(b"intent"):
                    break
                self.waiting.append(claim.claimed - layout.record_size(6))

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
        if self.batch is not None:
            return
        published = self.intents.published()
        if published <= self.next_cut:
            return
        run = self.intents.read(self.next_cut, published, most or self.rnd.randint(1, 60))
        positions = list(run.positions)
        self.next_cut = run.end
        run.detach()
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
        self._batch_end = self.next_cut

    def flusher_publish(self) -> None:
        if self.batch is None:
            return
        del self.unpublished[: self.outbox.publish(self.unpublished)]
        if not self.unpublished:  # every outcome handed over: release
            self.intents.release_to(self._batch_end)
            self.batch = None

    def flusher_restart(self) -> None:
        """Killed at any point: the successor starts at the release cursor
        and writes the unreleased records again (duplicates, stored outcome)."""
        self.batch, self.unpublished = None, []
        self.next_cut = self.intents.released()


STEPS = ["ingest_write", "ingest_reply", "flusher_cut", "flusher_publish"]


def run_world(seed: int, steps: int, restarts: bool) -> World:
    world = World(seed)
    try:
        choices = STEPS + (["ingest_restart", "flusher_restart"] if restarts else [])
        weights = [5, 4, 3, 6] + ([0.05, 0.05] if restarts else [])
        for _ in range(steps):
            getattr(world, world.rnd.choices(choices, weights)[0])()
        # Quiesce: the flusher finishes, the ingest replies.
        for _ in range(10_000):
            world.flusher_cut()
            world.flusher_publish()
            world.ingest_reply()
            if world.batch is None and world.next_cut == world.intents.published() and not world.waiting:
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
