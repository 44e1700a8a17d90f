"""A consumer's side of a packed ring: the runs read and not yet released.

The consumer (a flusher lane) reads packed runs (``Ring.read_packed``) into
a ``RunQueue`` and takes items from its front, in any counts: a batch may end
inside a run. ``consume(k)`` is the acknowledgement: the first ``k`` items
are done with. It stores the durable cursor (the item position below which
every item is done, so possibly inside a run) and the release cursor (the
first run that still holds an item: bytes are reused only once a whole run
is done). A consumer that starts over (a restarted flusher) reads from the
release cursor and skips every item below the durable cursor, so an item is
never handed out again once its consumer said it was done with it.

Everything here is per run, not per item: a batch's text is a few slices of
run bodies, and the item positions are made only when someone asks for them
(the outcome hand-off, for intents that did not simply commit).
"""

from __future__ import annotations

import collections
from collections.abc import Iterator

import numpy as np

from ipc.ring import Packed, Ring


class RunQueue:
    """Packed runs read from ``ring`` and not yet released."""

    __slots__ = ("_durable", "count", "end", "ring", "runs")

    def __init__(self, ring: Ring) -> None:
        self.ring = ring
        self.runs: collections.deque[Packed] = collections.deque()
        self.count = 0  # items read and not yet consumed
        self.end = ring.released()  # where the next read starts
        # Items below this were done with before this consumer started.
        self._durable = ring.durable()

    def __len__(self) -> int:
        return self.count

    def fill(self, limit: int) -> int:
        """Read newly published runs while fewer than ``limit`` items are
        queued (whole runs: it may end up with more); returns the count.

        Runs a predecessor was wholly done with (below the durable cursor:
        it was killed between its two cursor stores) are skipped and
        released here, and do not count against ``limit``: nothing else
        would release them, and a full ring would stay full."""
        skipped = False
        while self.count < limit:
            published = self.ring.published()
            if published <= self.end:
                break
            runs, self.end = self.ring.read_packed(self.end, published, limit - self.count)
            durable = self._durable
            for run in runs:
                if run.position < durable:  # a predecessor was done with some of it
                    if run.end <= durable:
                        skipped = True
                        continue
                    run.taken = durable - run.position
                    if run.taken >= len(run):
                        raise ValueError(
                            f"{self.ring.name}: durable cursor {durable} lies past the items "
                            f"of the run at {run.position}"
                        )
                self.runs.append(run)
                self.count += len(run) - run.taken
        if skipped:
            self._store_cursors()
        return self.count

    def oldest_ns(self) -> int:
        """The arrival time of the first queued item (the queue is not empty)."""
        return self.runs[0].recv_ns

    def _spans(self, skip: int, k: int) -> Iterator[tuple[Packed, int, int]]:
        """(run, first, after) for queued items ``skip`` to ``skip + k``."""
        for run in self.runs:
            if k <= 0:
                return
            a = run.taken + skip
            n = len(run)
            if a >= n:
                skip = a - n
                continue
            skip = 0
            b = min(n, a + k)
            yield run, a, b
            k -= b - a

    def slices(self, skip: int, k: int) -> tuple[list[bytes | memoryview], list[tuple[int, int]]]:
        """The items ``skip`` to ``skip + k`` as a few body slices (each
        comma-joined items, so ``b",".join`` of them is the items joined),
        and ``(arrival time, item count)`` per slice."""
        parts: list[bytes | memoryview] = []
        arrivals: list[tuple[int, int]] = []
        for run, a, b in self._spans(skip, k):
            if not a and b == len(run):
                parts.append(run.body)
            else:
                parts.append(memoryview(run.body)[run.start(a) : int(run.ends[b - 1])])
            arrivals.append((run.recv_ns, b - a))
        return parts, arrivals

    def item(self, i: int) -> bytes:
        """Queued item ``i`` (a copy: for checks, not the hot path)."""
        for run, a, _ in self._spans(i, 1):
            return run.item(a)
        raise IndexError(f"{i} is past the {self.count} queued items")

    def positions(self, skip: int, k: int) -> list[int]:
        """The item positions of queued items ``skip`` to ``skip + k``."""
        out: list[int] = []
        for run, a, b in self._spans(skip, k):
            out += range(run.position + a, run.position + b)
        return out

    def consume(self, k: int) -> None:
        """The first ``k`` queued items are done with: drop them, store the
        durable cursor after them and release every run they emptied."""
        self.count -= k
        runs = self.runs
        while k:
            run = runs[0]
            left = len(run) - run.taken
            if k < left:
                run.taken += k
                break
            runs.popleft()
            k -= left
        self._store_cursors()

    def _store_cursors(self) -> None:
        """Durable after the last item done with, release before the first
        run that still holds one."""
        if self.runs:
            run = self.runs[0]
            release, durable = run.position, run.position + run.taken
        else:
            release = durable = self.end
        self.ring.release_to(release, max(durable, self._durable))


def arrival_times(arrivals: list[tuple[int, int]]) -> np.ndarray:
    """Every item's arrival time, from ``(arrival time, count)`` pairs."""
    if not arrivals:
        return np.empty(0, dtype=np.int64)
    stamps, counts = zip(*arrivals)
    return np.repeat(np.array(stamps, dtype=np.int64), counts)
