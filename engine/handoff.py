"""The flusher → ingest outcome hand-off, one pair of rings per ingest.

The flusher tells an ingest two things after a batch is durable:

* **outcomes**: one record in the *outcome ring* for every intent that did
  not simply commit (dead-lettered, rejected, or a resend answered with its
  stored outcome), keyed by the intent's position in the intent ring;
* **release**: it moves the intent ring's durable cursor past the batch
  (and the release cursor past every run the batch emptied; a batch may
  end inside a packed run, ``ipc/runqueue.py``). Every intent below the
  durable cursor is durable; those without an outcome record committed.

The ordering rule that makes a reply the stored outcome: **every outcome of
a batch is published before the durable cursor passes the batch**
(``OutcomeOutbox`` never advances the cursor itself; the flusher calls
``consume`` only after ``publish`` took everything). The ingest loads the
cursor *before* it drains the outcome ring, so it has read every outcome
below the cursor it loaded (x86-TSO: ``ipc/cursors.py`` states the argument).

The outcome ring is small and a batch's outcomes may not fit: the flusher
publishes part, wakes the ingest and waits for room. So the ingest may read
outcomes whose release has not happened yet. ``OutcomeInbox`` holds every
outcome it read until the cursor passes its position and the reply is
taken; it never drops one early. After a flusher restart the successor
rewrites the unreleased batch and publishes its outcomes again (as
duplicates, with the stored status): the later record for a position
replaces the earlier. After an ingest restart the new inbox drains outcomes
for positions it never wrote (the old process's intents, whose clients
reconnect and resend); those are forgotten once the cursor passes them.
"""

from __future__ import annotations

import msgspec

from engine.intent import Outcome
from ipc.ring import Ring


class OutcomeOutbox:
    """Flusher side: writes outcome records, never waits, never drops."""

    __slots__ = ("_encode", "ring")

    def __init__(self, ring: Ring) -> None:
        self.ring = ring
        self._encode = msgspec.msgpack.Encoder().encode

    def encode(self, outcome: Outcome) -> bytes:
        return self._encode(outcome)

    def publish(self, pending: list[bytes]) -> int:
        """Publish as many of ``pending`` as fit, in order, with one cursor
        store; returns how many. The caller keeps the rest, wakes the ingest
        (which makes room) and calls again; it releases the batch only when
        every outcome was published."""
        written = 0
        with self.ring.claim() as claim:
            for payload in pending:
                if not claim.try_append(payload):
                    break
                written += 1
        return written


class OutcomeInbox:
    """Ingest side: every outcome read is held until its position is released."""

    __slots__ = ("_decode", "_held", "outcomes", "ring")

    def __init__(self, ring: Ring, outcomes: Ring) -> None:
        self.ring = ring  # the intent ring whose durable cursor the flusher moves
        self.outcomes = outcomes
        self._decode = msgspec.msgpack.Decoder(Outcome).decode
        self._held: dict[int, Outcome] = {}

    def released(self) -> int:
        """Load the intent ring's durable cursor, then drain the outcome
        ring: afterwards every outcome for a position below the returned
        cursor is held."""
        released = self.ring.durable()
        self._drain()
        return released

    def take(self, position: int) -> Outcome | None:
        """The outcome for a released ``position`` (None: it committed)."""
        return self._held.pop(position, None) if self._held else None

    def forget_below(self, released: int) -> None:
        """Drop outcomes below ``released`` that nobody took: they belong to
        intents of an earlier ingest process, whose connections are gone."""
        if self._held:
            for position in [p for p in self._held if p < released]:
                del self._held[position]

    def held(self) -> int:
        return len(self._held)

    def _drain(self) -> None:
        ring = self.outcomes
        start, end = ring.released(), ring.published()
        if end <= start:
            return
        run = ring.read(start, end, 1 << 30)
        decode, held = self._decode, self._held
        for view in run.payloads:
            out = decode(view)
            held[out.position] = out
        run.detach()
        ring.release_to(run.end)  # room for the flusher; the outcomes live on in _held
