"""The ring: claim/publish, wrap with padding, full ring, invisible partial
writes, the vector read of many records, packed runs (in and out, taken in
any counts, restarts between the two cursors) against a model, a writer
killed mid-run, and a two-process stress with a checksum."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import random
import signal
import struct
import subprocess
import sys
import textwrap
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipc import layout
from ipc.control import Control, SegmentMap
from ipc.ring import Ring
from ipc.runqueue import RunQueue
from ipc.shm import Segment
from ipc.wakeup import Wakeup

CAP = 1 << 12


@pytest.fixture
def ring():
    seg = Segment.create(layout.ring_bytes(CAP))
    r = Ring(seg.buf, 0, CAP, create=True, name="t")
    yield r
    r.close()
    seg.close()


def drain(ring: Ring) -> list[bytes]:
    run = ring.read(ring.released(), ring.published(), 1 << 30)
    out = [bytes(p) for p in run.payloads]
    run.detach()
    ring.release_to(run.end)
    return out


def test_published_records_read_back_in_order(ring):
    with ring.claim() as w:
        for i in range(10):
            assert w.try_append(f"rec-{i}".encode(), recv_ns=i)
    run = ring.read(0, ring.published(), 100)
    assert [bytes(p) for p in run.payloads] == [f"rec-{i}".encode() for i in range(10)]
    assert run.recv_ns == list(range(10))
    run.detach()


def test_partial_write_is_invisible(ring):
    ring.try_append(b"appended but never published")
    assert ring.published() == 0
    assert len(ring.read(0, ring.published(), 10)) == 0
    # A successor producer (fresh object, same memory) overwrites it.
    ring.abort()
    with ring.claim() as w:
        w.try_append(b"real")
    assert drain(ring) == [b"real"]


def test_claim_aborts_on_exception(ring):
    with pytest.raises(RuntimeError), ring.claim() as w:
        w.try_append(b"x")
        raise RuntimeError("boom")
    assert ring.published() == 0
    assert ring.claimed == 0


def test_inserts_padding_on_wrap(ring):
    payload = b"p" * 1000  # record of 1016 bytes: 4 fit, the 5th wraps
    for _ in range(3):
        with ring.claim() as w:
            assert w.try_append(payload)
        assert drain(ring) == [payload]
    with ring.claim() as w:
        assert w.try_append(payload)  # ends at 4064: tail of 32 bytes remains
    assert drain(ring) == [payload]
    with ring.claim() as w:
        assert w.try_append(b"q" * 100)  # 116 bytes do not fit in 32: pad, then wrap
    assert ring.published() == 4 * layout.record_size(1000) + 32 + layout.record_size(100)
    assert drain(ring) == [b"q" * 100]
    assert ring.released() == ring.published()


def test_full_ring_refuses_and_overwrites_nothing(ring):
    payload = b"z" * 100
    written = 0
    with ring.claim() as w:
        while w.try_append(payload + written.to_bytes(4, "little")):
            written += 1
    assert written == CAP // layout.record_size(104)
    assert not ring.try_append(b"more")  # still full: nothing committed
    got = drain(ring)
    assert got == [payload + i.to_bytes(4, "little") for i in range(written)]
    assert ring.try_append(b"more")  # space again after the commit


def test_oversized_payload_is_an_error(ring):
    with pytest.raises(ValueError):
        ring.try_append(b"x" * CAP)


def test_attach_validates_magic():
    seg = Segment.create(layout.ring_bytes(CAP))
    try:
        with pytest.raises(ValueError, match="no ring"):
            Ring(seg.buf, 0, CAP)
    finally:
        seg.close()


def test_capacity_must_be_power_of_two():
    with pytest.raises(ValueError, match="power of two"):
        layout.check_capacity(5000)


def test_segment_has_no_name_in_dev_shm():
    before = set(os.listdir("/dev/shm"))
    seg = Segment.create(1 << 16)
    assert set(os.listdir("/dev/shm")) == before
    seg.close()


WRITER = textwrap.dedent("""
    import hashlib, os, random, sys
    sys.path.insert(0, {root!r})
    from ipc.control import Control, SegmentMap
    from ipc.shm import Segment
    from ipc.wakeup import Wakeup
    fd, size, n, wake_fd, space_fd = map(int, sys.argv[1:6])
    seg = Segment.attach(fd, size)
    ctl = Control(seg.buf, SegmentMap(1, 1, 1 << 16, 1 << 16))
    ring = ctl.intent_rings[0][0]
    ring.resume_producer()
    data, space = Wakeup(wake_fd), Wakeup(space_fd)
    digest = hashlib.sha256()
    rng = random.Random(5)
    i = 0
    while i < n:
        run = [(b"%d:" % k) * (1 + k % 7) for k in range(i, min(n, i + rng.randrange(1, 400)))]
        with ring.claim() as w:
            written = w.try_append_packed(run, i)
        for payload in run[:written]:
            digest.update(payload)
        i += written
        data.signal()
        if written < len(run):
            space.wait(0.05)
    print(digest.hexdigest())
    ctl.close(); seg.close()
""")


@pytest.mark.slow
def test_two_process_stress_one_million_packed_items_checksum():
    n = 1_000_000
    from ipc.wakeup import Wakeup

    smap = SegmentMap(1, 1, 1 << 16, 1 << 16)
    seg = Segment.create(smap.size)
    ctl = Control(seg.buf, smap, create=True)
    data, space = Wakeup(), Wakeup()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            WRITER.format(root=root),
            str(seg.fd),
            str(seg.size),
            str(n),
            str(data.fd),
            str(space.fd),
        ],
        pass_fds=[seg.fd, data.fd, space.fd],
        stdout=subprocess.PIPE,
        text=True,
    )
    ring = ctl.intent_rings[0][0]
    queue = RunQueue(ring)
    rng = random.Random(6)
    digest = hashlib.sha256()
    seen = 0
    try:
        while seen < n:
            if not queue.fill(4096):
                data.wait(1.0)
                assert proc.poll() is None or ring.published() > queue.end, "writer died"
                continue
            k = rng.randint(1, queue.count)  # batches end anywhere, inside runs too
            parts, _ = queue.slices(0, k)
            items = layout.RUN_SEPARATOR.join(parts).split(layout.RUN_SEPARATOR)
            assert len(items) == k
            for payload in items:
                assert payload.startswith(b"%d:" % seen), f"item {seen} out of order"
                digest.update(payload)
                seen += 1
            queue.consume(k)
            space.signal()
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        ctl.close()
        seg.close()
        data.close()
        space.close()
    assert proc.returncode == 0
    assert out.strip() == digest.hexdigest()


def test_segment_map_gives_every_ingest_lane_pair_its_own_rings():
    smap = SegmentMap(3, 4, 1 << 16, 1 << 12)
    seg = Segment.create(smap.size)
    ctl = Control(seg.buf, smap, create=True)
    try:
        regions = sorted(
            (smap.intent_ring_offset(i, lane), smap.outcome_ring_offset(i, lane)) for i in range(3) for lane in range(4)
        )
        flat = [off for pair in regions for off in pair]
        assert flat == sorted(set(flat)), "two rings share an offset"
        # Each ring holds its own records: writing one leaves the others empty.
        with ctl.intent_rings[2][3].claim() as w:
            assert w.try_append(b"x")
        assert [ring.published() > 0 for row in ctl.intent_rings for ring in row].count(True) == 1
        assert [len(ctl.flushers), len(ctl.ingest), len(ctl.workers)] == [4, 3, 7]
        assert ctl.ingest_slot(0) == 4
    finally:
        ctl.close()
        seg.close()


# ------------------------------------------------------- many records, one read
def fresh_ring(capacity: int = CAP) -> tuple[Segment, Ring]:
    seg = Segment.create(layout.ring_bytes(capacity))
    return seg, Ring(seg.buf, 0, capacity, create=True, name="t")


def close(seg: Segment, *rings: Ring) -> None:
    for r in rings:
        r.close()
    seg.close()


def append_each(ring: Ring, payloads: list[bytes], recv_ns: int = 0) -> list[int]:
    """Append record by record in one claim; the records' positions."""
    positions = []
    with ring.claim() as w:
        for payload in payloads:
            assert w.try_append(payload, recv_ns)
            positions.append(w.claimed - layout.record_size(len(payload)))
    return positions


def test_read_takes_at_most_max_records_and_continues_where_it_stopped():
    seg, ring = fresh_ring(1 << 16)
    try:
        payloads = [b"%05d" % i for i in range(300)]  # enough for the vector scan, and a walk after it
        append_each(ring, payloads)
        got, pos = [], 0
        for limit in (100, 1, 64, 70, 200):
            run = ring.read(pos, ring.published(), limit)
            assert len(run) == min(limit, 300 - len(got))
            got += map(bytes, run.payloads)
            run.detach()
            pos = run.end
        assert got == payloads and pos == ring.published()
    finally:
        close(seg, ring)


def header_like(length: int) -> bytes:
    """Eight payload bytes that read as a data record's first word."""
    return struct.pack("<ii", length, layout.TYPE_DATA)


def test_payloads_that_look_like_headers_are_not_taken_for_records():
    seg, ring = fresh_ring(1 << 16)
    try:
        # Every word of these payloads reads as the first word of a record
        # of 0 or 8 bytes; the chain of lengths must still find the records.
        payloads = [header_like(i % 9) * (1 + i % 4) for i in range(400)]
        append_each(ring, payloads)
        for limit in (1 << 30, 150):
            run = ring.read(0, ring.published(), limit)
            assert list(map(bytes, run.payloads)) == payloads[:limit]
            run.detach()
    finally:
        close(seg, ring)


@pytest.mark.parametrize("count", [5, 200])  # the walk, and the vector scan
def test_read_refuses_a_corrupt_header(count):
    seg, ring = fresh_ring(1 << 16)
    try:
        positions = append_each(ring, [b"abcdefgh"] * count)
        struct.pack_into("<i", ring._data, positions[count // 2] + layout.TYPE_OFFSET, 7)
        with pytest.raises(ValueError, match=f"corrupt record at {positions[count // 2]} .type 7"):
            ring.read(0, ring.published(), 1 << 30)
    finally:
        close(seg, ring)


# ------------------------------------------------------------- packed runs
SEP = layout.RUN_SEPARATOR


def take_all(queue: RunQueue) -> list[bytes]:
    """Everything published, taken and consumed; the items."""
    queue.fill(1 << 30)
    parts, _ = queue.slices(0, queue.count)
    items = SEP.join(parts).split(SEP) if parts else []
    queue.consume(queue.count)
    return items


def test_packed_run_reads_back_as_one_record_with_positions_and_stamp(ring):
    payloads = [b'["p",%d,"e","move",{}]' % i for i in range(40)]
    positions: list[int] = []
    with ring.claim() as w:
        assert w.try_append_packed(payloads, 77, positions) == 40
    assert positions == list(range(40))  # one run at position 0: item j is at 0 + j
    runs, end = ring.read_packed(0, ring.published(), 1)
    assert end == ring.published() == layout.align(layout.RUN_HEADER_BYTES + len(SEP.join(payloads)))
    [run] = runs
    assert (run.position, run.recv_ns, len(run)) == (0, 77, 40)
    assert run.body == SEP.join(payloads)  # a batch's text is "[" + body + "]"
    assert run.items() == payloads
    assert [run.item(j) for j in (0, 17, 39)] == [payloads[0], payloads[17], payloads[39]]
    assert [run.body[run.start(j) : int(run.ends[j])] for j in range(40)] == payloads


def test_packed_run_is_invisible_until_published_and_aborts_on_exception(ring):
    assert ring.try_append_packed([b"a", b"bb"]) == 2
    assert ring.published() == 0
    assert ring.read_packed(0, ring.published(), 10) == ([], 0)
    ring.abort()
    with pytest.raises(RuntimeError), ring.claim() as w:
        w.try_append_packed([b"x", b"y"])
        raise RuntimeError("boom")
    assert ring.published() == 0 and ring.claimed == 0
    with ring.claim() as w:
        w.try_append_packed([b"real"])
    assert take_all(RunQueue(ring)) == [b"real"]


def test_packed_run_is_split_at_the_end_of_the_lap_not_padded():
    seg, ring = fresh_ring()
    try:
        queue = RunQueue(ring)
        with ring.claim() as w:  # 3 runs of one 1000-byte item: 1024 bytes each, 3072 in all
            for _ in range(3):
                assert w.try_append_packed([b"p" * 1000]) == 1
        assert take_all(queue) == [b"p" * 1000] * 3
        items = [b"%03d" % i + b"x" * 96 for i in range(12)]  # 99 bytes each, 101 with the separator
        positions: list[int] = []
        with ring.claim() as w:
            assert w.try_append_packed(items, 5, positions) == 12
        # 1024 bytes left in the lap: a run of 9 items (24 + 9 * 101 - 2 = 931 bytes; 10 would
        # take 1032) fills it as far as whole items go, the other 3 start the next lap.
        assert positions == [3072 + j for j in range(9)] + [CAP + j for j in range(3)]
        runs, _ = ring.read_packed(queue.end, ring.published(), 1 << 30)
        assert [(r.position, len(r)) for r in runs] == [(3072, 9), (CAP, 3)]
        assert take_all(queue) == items
    finally:
        close(seg, ring)


def test_packed_run_pads_only_when_not_one_item_fits_before_the_end():
    seg, ring = fresh_ring()
    try:
        queue = RunQueue(ring)
        first, second = b"p" * 2000, b"r" * 1984  # records of 2024 and 2008 bytes: 64 left in the lap
        with ring.claim() as w:
            assert w.try_append_packed([first]) == 1
            assert w.try_append_packed([second]) == 1
        assert ring.published() == CAP - 64
        assert take_all(queue) == [first, second]
        positions: list[int] = []
        with ring.claim() as w:
            assert w.try_append_packed([b"q" * 100], 0, positions) == 1  # 124 bytes do not fit in 64
        assert positions == [CAP]
        assert take_all(queue) == [b"q" * 100]
        assert ring.released() == ring.durable() == ring.published()
    finally:
        close(seg, ring)


def test_packed_run_stops_at_a_full_ring_and_keeps_the_rest(ring):
    queue = RunQueue(ring)
    payloads = [b"%04d" % i + b"z" * 96 for i in range(200)]  # far more than 4 KiB
    with ring.claim() as w:
        written = w.try_append_packed(payloads)
    assert 0 < written < len(payloads)
    with ring.claim() as w:
        assert w.try_append_packed(payloads[written:]) == 0  # still full: nothing more written
    got = take_all(queue)
    while written < len(payloads):  # the rest, as space is released
        with ring.claim() as w:
            step = w.try_append_packed(payloads[written:])
        assert step > 0  # released space is used again
        written += step
        got += take_all(queue)
    assert got == payloads


def test_packed_run_refuses_what_it_cannot_carry_and_writes_nothing(ring):
    with pytest.raises(ValueError, match="exceeds"):
        ring.try_append_packed([b"ok", b"x" * (ring.max_item + 1)])
    with pytest.raises(ValueError, match="newline"):
        ring.try_append_packed([b"ok", b"two\nlines"])
    with pytest.raises(ValueError, match="newline"):
        ring.try_append_packed([b"one\nitem"])
    assert ring.claimed == 0
    with ring.claim() as w:  # the largest item does fit, alone
        assert w.try_append_packed([b"y" * ring.max_item]) == 1
    assert take_all(RunQueue(ring)) == [b"y" * ring.max_item]


def test_read_packed_refuses_a_corrupt_run(ring):
    with ring.claim() as w:
        w.try_append_packed([b"a", b"b", b"c"])
    struct.pack_into("<i", ring._data, layout.TYPE_OFFSET, 7)
    with pytest.raises(ValueError, match=r"corrupt record at 0 \(type 7"):
        ring.read_packed(0, ring.published(), 10)
    struct.pack_into("<i", ring._data, layout.TYPE_OFFSET, layout.TYPE_RUN)
    struct.pack_into("<I", ring._data, layout.RECORD_HEADER_BYTES, 5)  # 5 items cannot fit in 7 bytes
    with pytest.raises(ValueError, match=r"corrupt record at 0 \(type 3"):
        ring.read_packed(0, ring.published(), 10)
    struct.pack_into("<I", ring._data, layout.RECORD_HEADER_BYTES, 4)  # could fit; found when the items are
    [run], _ = ring.read_packed(0, ring.published(), 10)
    with pytest.raises(ValueError, match="3 items in the body, count 4"):
        _ = run.ends


def test_a_batch_may_end_inside_a_run_and_the_rest_is_durable_only_when_taken(ring):
    queue = RunQueue(ring)
    items = [b"i%d" % j for j in range(10)]
    with ring.claim() as w:
        w.try_append_packed(items, 0)
    assert queue.fill(100) == 10
    parts, arrivals = queue.slices(0, 4)
    assert SEP.join(parts) == SEP.join(items[:4]) and arrivals == [(0, 4)]
    assert queue.positions(2, 3) == [2, 3, 4]
    queue.consume(4)
    assert (ring.released(), ring.durable()) == (0, 4)  # the run's bytes are kept, its first 4 items are done
    restarted = RunQueue(ring)  # a successor skips what was done
    assert restarted.fill(100) == 6 and restarted.positions(0, 6) == list(range(4, 10))
    assert take_all(restarted) == items[4:]
    assert ring.released() == ring.durable() == ring.published()


def test_a_successor_releases_what_its_predecessor_was_done_with_before_it_died():
    """A flusher killed between its durable and its release store, after a
    batch that took everything in a full ring: its successor has nothing to
    take, so it must release the runs it skips itself, or the ingest could
    never write again."""
    seg, ring = fresh_ring()
    try:
        n = 0
        while True:  # the ingest fills the ring, one run per socket read
            with ring.claim() as w:
                got = w.try_append_packed([b'["c",%d,"e","k",{},1]' % i for i in range(n, n + 8)])
            n += got
            if got < 8:
                break
        queue = RunQueue(ring)
        queue.fill(1 << 30)
        ring.durable_cursor.store_release(queue.end)  # consume(all), killed before the release store
        assert ring.released() == 0 and ring.free_bytes() < 64
        successor = RunQueue(ring)
        assert successor.fill(1 << 30) == 0
        assert ring.released() == ring.durable() == ring.published()
        with ring.claim() as w:
            assert w.try_append_packed([b"next"]) == 1
        assert take_all(successor) == [b"next"]
    finally:
        close(seg, ring)


def test_skipped_runs_do_not_count_against_what_a_successor_reads():
    seg, ring = fresh_ring(1 << 16)
    try:
        for r in range(10):
            with ring.claim() as w:
                w.try_append_packed([b"%d" % (8 * r + i) for i in range(8)])
        queue = RunQueue(ring)
        queue.fill(1 << 30)
        ring.durable_cursor.store_release(queue.positions(40, 1)[0])  # a 40-item batch; killed between stores
        successor = RunQueue(ring)
        assert successor.fill(8) == 8  # not 0: the five runs it skips are not what it was asked for
        assert successor.positions(0, 1) == queue.positions(40, 1)
        assert ring.released() == queue.runs[5].position  # the skipped runs are released at once
    finally:
        close(seg, ring)


class PackedModel:
    """What a packed ring must hand out: published items by position, in order."""

    def __init__(self) -> None:
        self.published: list[tuple[int, bytes]] = []
        self.pending: list[tuple[int, bytes]] = []
        self.done = 0  # items consumed (the durable cursor's count)


item_st = st.one_of(
    st.binary(max_size=30).map(lambda b: b.replace(b"\n", b" ")),
    st.integers(200, layout.max_item(CAP)).map(lambda n: b"L" * n),
)
packed_op_st = st.one_of(
    st.tuples(st.just("append"), st.lists(item_st, min_size=1, max_size=15)),
    st.tuples(st.just("publish")),
    st.tuples(st.just("abort")),
    st.tuples(st.just("take"), st.integers(1, 40)),
    st.tuples(st.just("restart")),
    st.tuples(st.just("die_between_cursors"), st.integers(1, 40)),
)


@settings(max_examples=200, deadline=None)
@given(ops=st.lists(packed_op_st, max_size=60))
def test_packed_runs_match_a_model_whatever_the_consumer_takes(ops):
    """Random packed appends (tiny items, items up to the largest, runs
    crossing the end of the lap), publishes, aborts, takes of any count
    (batches ending inside runs), consumer restarts, and a consumer killed
    between storing the durable and the release cursor: every item is handed
    out once, in order, at the position the producer reported, and a
    restarted consumer starts right after the last item it was done with."""
    seg, ring = fresh_ring()
    model = PackedModel()
    queue = RunQueue(ring)
    try:
        for op in ops:
            if op[0] == "append":
                positions: list[int] = []
                count = ring.try_append_packed(op[1], 3, positions)
                assert len(positions) == count
                if count < len(op[1]):  # full: the next item really does not fit, even after a pad
                    tail = CAP - (ring.claimed & (CAP - 1))
                    need = layout.align(layout.RUN_HEADER_BYTES + len(op[1][count]))
                    assert ring.free_bytes() < (need if need <= tail else tail + need)
                model.pending += zip(positions, op[1])
            elif op[0] == "publish":
                ring.publish()
                model.published += model.pending
                model.pending = []
            elif op[0] == "abort":
                ring.abort()
                model.pending = []
            elif op[0] == "restart":
                queue = RunQueue(ring)
            else:
                queue.fill(op[1])
                k = min(op[1], queue.count)
                expected = model.published[model.done : model.done + k]
                assert queue.positions(0, k) == [p for p, _ in expected]
                parts, arrivals = queue.slices(0, k)
                assert SEP.join(parts) == SEP.join(x for _, x in expected)
                assert sum(n for _, n in arrivals) == k
                if op[0] == "take":
                    queue.consume(k)
                else:  # killed after the durable cursor, before the release cursor
                    after = queue.positions(k, 1)[0] if k < queue.count else queue.end
                    ring.durable_cursor.store_release(max(after, ring.durable()))
                    queue = RunQueue(ring)
                model.done += k
                if model.done < len(model.published):  # durable: the next item not done with
                    assert ring.durable() == model.published[model.done][0]
        ring.publish()
        model.published += model.pending
        assert take_all(RunQueue(ring)) == [x for _, x in model.published[model.done :]]
        assert ring.released() == ring.durable() == ring.published()
    finally:
        close(seg, ring)


# ------------------------------------------------------- a writer killed mid-run
def _record(seq: int) -> bytes:
    """A self-checking item (no newline): seq, a body of seq-dependent length, CRC."""
    body = (b"%d|" % seq) * (1 + seq % 23)
    return b"%d:%s:%08x" % (seq, body, zlib.crc32(body))


def _check(payload: bytes) -> int:
    seq, body, crc = payload.split(b":")
    assert body == (b"%d|" % int(seq)) * (1 + int(seq) % 23) and int(crc, 16) == zlib.crc32(body)
    return int(seq)


def _endless_writer(ring: Ring, first: int, data: Wakeup, space: Wakeup) -> None:
    """Append packed runs of 1-300 items, publish, repeat, until killed."""
    rng = random.Random(first)
    ring.resume_producer()
    seq = first
    while True:
        run = [_record(s) for s in range(seq, seq + rng.randrange(1, 300))]
        with ring.claim() as w:
            seq += w.try_append_packed(run, seq)
        data.signal()
        if ring.free_bytes() < 64 << 10:
            space.wait(0.05)


def test_writer_killed_mid_run_exposes_only_whole_runs():
    """SIGKILL a producer while it writes packed runs, three times: the
    consumer reads only whole items (each checks its own CRC), in sequence,
    and a restarted producer continues right after the last published one."""
    seg, ring = fresh_ring(1 << 20)
    data, space = Wakeup(), Wakeup()
    ctx = multiprocessing.get_context("fork")
    queue = RunQueue(ring)
    seen = 0  # the next seq the consumer expects
    rng = random.Random(3)

    def consume() -> int:
        nonlocal seen
        if not queue.fill(1 << 30):
            return 0
        first_stamp = queue.oldest_ns()
        assert first_stamp <= seen  # each run is stamped with its first seq
        items = take_all(queue)
        for payload in items:
            assert _check(payload) == seen
            seen += 1
        space.signal()
        return len(items)

    try:
        for _ in range(3):
            proc = ctx.Process(target=_endless_writer, args=(ring, seen, data, space), daemon=True)
            proc.start()
            target = seen + rng.randrange(2_000, 20_000)
            try:
                while seen < target:
                    if not consume():
                        data.wait(0.5)
                        assert proc.is_alive(), f"writer exited with {proc.exitcode}"
                # Now, most likely inside try_append_packed: the writer spends
                # nearly all its time there.
                os.kill(proc.pid, signal.SIGKILL)
            finally:
                proc.join(10)
                if proc.exitcode is None:  # pragma: no cover - SIGKILL always lands
                    proc.kill()
                    proc.join()
            assert proc.exitcode == -signal.SIGKILL
            while consume():  # everything it published, and nothing else
                pass
            assert ring.published() == queue.end
            ring.resume_producer()  # this process's view of the producer side starts at the cursor too
    finally:
        close(seg, ring)
        data.close()
        space.close()
    assert seen > 6_000
