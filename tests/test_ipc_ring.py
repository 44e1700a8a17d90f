"""The ring: claim/publish, wrap with padding, full ring, invisible partial
writes, the bulk paths (runs in, runs out) against a model, a writer killed
mid-run, and a two-process stress with a checksum."""

from __future__ import annotations

import collections
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
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipc import layout
from ipc import ring as ring_module
from ipc.control import Control, SegmentMap
from ipc.ring import Ring
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
    import hashlib, os, sys
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
    i = 0
    while i < n:
        with ring.claim() as w:
            while i < n:
                payload = (b"%d:" % i) * (1 + i % 7)
                if not w.try_append(payload, i):
                    break
                digest.update(payload)
                i += 1
        data.signal()
        if i < n:
            space.wait(0.05)
    print(digest.hexdigest())
    ctl.close(); seg.close()
""")


@pytest.mark.slow
def test_two_process_stress_one_million_records_checksum():
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
    digest = hashlib.sha256()
    seen = 0
    pos = 0
    try:
        while seen < n:
            end = ring.published()
            if end == pos:
                data.wait(1.0)
                assert proc.poll() is None or ring.published() > pos, "writer died"
                continue
            run = ring.read(pos, end, 4096)
            for payload, recv in zip(run.payloads, run.recv_ns):
                assert recv == seen, f"record {seen} out of order"
                digest.update(payload)
                seen += 1
            run.detach()
            pos = run.end
            ring.release_to(pos)
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


# ------------------------------------------------------------------ runs
@pytest.fixture(params=["record by record", "one run"])
def run_path(request, monkeypatch):
    """Both ways ``try_append_run`` writes: short runs go record by record,
    longer ones through the bulk path; each test runs both whatever its size."""
    monkeypatch.setattr(ring_module, "_SHORT_RUN", 1 << 30 if request.param == "record by record" else 1)
    return request.param


def fresh_ring(capacity: int = CAP) -> tuple[Segment, Ring]:
    seg = Segment.create(layout.ring_bytes(capacity))
    return seg, Ring(seg.buf, 0, capacity, create=True, name="t")


def close(seg: Segment, *rings: Ring) -> None:
    for r in rings:
        r.close()
    seg.close()


def test_run_reads_back_in_order_with_positions_and_stamps(ring, run_path):
    payloads = [f"rec-{i}".encode() * (1 + i % 5) for i in range(40)]
    positions: list[int] = []
    with ring.claim() as w:
        assert w.try_append_run(payloads, list(range(100, 140)), positions) == 40
    for copy in (False, True):
        run = ring.read(0, ring.published(), 1 << 30, copy=copy)
        assert [bytes(p) for p in run.payloads] == payloads
        assert run.recv_ns == list(range(100, 140))
        assert run.positions == positions
        assert run.end == ring.published()
        run.detach()


def test_run_writes_the_same_records_as_record_by_record(monkeypatch):
    """One layout, whichever path wrote it: the same positions, pads and
    header and payload bytes (only the filler after a payload or a pad
    header, which nobody reads, may differ)."""
    monkeypatch.setattr(ring_module, "_SHORT_RUN", 1)  # every run the bulk way
    rng = random.Random(7)
    seg = Segment.create(2 * layout.ring_bytes(CAP))
    one = Ring(seg.buf, 0, CAP, create=True, name="one")
    bulk = Ring(seg.buf, layout.ring_bytes(CAP), CAP, create=True, name="bulk")
    try:
        for _ in range(30):  # several laps, so runs cross the end of the data area
            payloads = [bytes([rng.randrange(256)]) * rng.randrange(0, 300) for _ in range(rng.randrange(1, 12))]
            start = one.published()
            with one.claim() as w:
                assert all(w.try_append(p, 9) for p in payloads)
            positions: list[int] = []
            with bulk.claim() as w:
                assert w.try_append_run(payloads, 9, positions) == len(payloads)
            assert one.published() == bulk.published()
            assert one.read(start, one.published(), 99, copy=True).positions == positions
            for at, payload in zip([start, *positions], [b"", *payloads]):  # the first: a pad there, if any
                idx = at & (CAP - 1)
                n = layout.RECORD_HEADER_BYTES + len(payload) if at != start else 8
                assert bytes(one._data[idx : idx + n]) == bytes(bulk._data[idx : idx + n])
            assert drain(one) == drain(bulk) == payloads
    finally:
        close(seg, one, bulk)


def test_run_is_invisible_until_published(ring, run_path):
    assert ring.try_append_run([b"a", b"bb", b"ccc"]) == 3
    assert ring.published() == 0
    assert len(ring.read(0, ring.published(), 10)) == 0
    ring.abort()
    with ring.claim() as w:
        w.try_append_run([b"real"])
    assert drain(ring) == [b"real"]


def test_run_claim_aborts_on_exception(ring, run_path):
    with pytest.raises(RuntimeError), ring.claim() as w:
        w.try_append_run([b"x", b"y"])
        raise RuntimeError("boom")
    assert ring.published() == 0 and ring.claimed == 0


def test_run_inserts_one_pad_where_it_crosses_the_end(ring, run_path):
    with ring.claim() as w:
        assert w.try_append_run([b"p" * 1000] * 3) == 3  # 3048 bytes: 1048 left in the lap
    assert drain(ring) == [b"p" * 1000] * 3
    run = [b"a" * 500, b"b" * 500, b"c" * 100]  # 520 + 520 fit; 116 does not fit the last 8
    positions: list[int] = []
    with ring.claim() as w:
        assert w.try_append_run(run, 0, positions) == 3
    lap_end = CAP
    assert positions == [3048, 3568, lap_end]
    assert ring.published() == lap_end + layout.record_size(100)
    assert drain(ring) == run
    assert ring.released() == ring.published()


def test_run_stops_at_a_full_ring_and_keeps_the_rest(ring, run_path):
    payloads = [i.to_bytes(4, "little") * 25 for i in range(100)]  # 100-byte payloads, 116-byte records
    with ring.claim() as w:
        written = w.try_append_run(payloads)
    assert written == CAP // layout.record_size(100) < len(payloads)
    with ring.claim() as w:
        assert w.try_append_run(payloads[written:]) == 0  # still full: nothing more written
    got = drain(ring)
    while written < len(payloads):  # the rest, as space is released
        with ring.claim() as w:
            step = w.try_append_run(payloads[written:])
        assert step > 0  # released space is used again
        written += step
        got += drain(ring)
    assert got == payloads


def test_run_refuses_a_payload_that_could_never_fit_and_writes_nothing(ring, run_path):
    with pytest.raises(ValueError, match="exceeds"):
        ring.try_append_run([b"ok", b"x" * CAP])
    assert ring.claimed == 0


def test_read_takes_at_most_max_records_and_continues_where_it_stopped():
    seg, ring = fresh_ring(1 << 16)
    try:
        payloads = [b"%05d" % i for i in range(300)]  # enough for the vector scan, and a walk after it
        with ring.claim() as w:
            assert w.try_append_run(payloads) == 300
        got, pos = [], 0
        for limit in (100, 1, 64, 70, 200):
            run = ring.read(pos, ring.published(), limit, copy=True)
            assert len(run) == min(limit, 300 - len(got))
            got += run.payloads
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
        with ring.claim() as w:
            assert w.try_append_run(payloads) == 400
        for limit in (1 << 30, 150):
            run = ring.read(0, ring.published(), limit, copy=True)
            assert run.payloads == payloads[:limit]
    finally:
        close(seg, ring)


@pytest.mark.parametrize("count", [5, 200])  # the walk, and the vector scan
def test_read_refuses_a_corrupt_header(count):
    seg, ring = fresh_ring(1 << 16)
    try:
        with ring.claim() as w:
            positions: list[int] = []
            assert w.try_append_run([b"abcdefgh"] * count, 0, positions) == count
        struct.pack_into("<i", ring._data, positions[count // 2] + layout.TYPE_OFFSET, 7)
        with pytest.raises(ValueError, match=f"corrupt record at {positions[count // 2]} .type 7"):
            ring.read(0, ring.published(), 1 << 30)
    finally:
        close(seg, ring)


class Model:
    """What the ring must hold: the published records, in order, and the
    appended-but-unpublished ones."""

    def __init__(self) -> None:
        self.published: collections.deque[tuple[int, bytes, int]] = collections.deque()  # position, payload, stamp
        self.pending: list[tuple[int, bytes, int]] = []


payload_st = st.one_of(
    st.binary(max_size=40),
    st.binary(min_size=200, max_size=CAP // 2 - layout.RECORD_HEADER_BYTES),
    st.integers(0, 40).map(lambda n: header_like(n) * (1 + n % 3)),
)
op_st = st.one_of(
    st.tuples(st.just("run"), st.lists(payload_st, max_size=12), st.booleans()),
    st.tuples(st.just("one"), payload_st, st.booleans()),
    st.tuples(st.just("publish")),
    st.tuples(st.just("abort")),
    st.tuples(st.just("read"), st.integers(1, 20), st.booleans(), st.integers(0, 20)),
)


@pytest.mark.parametrize("short_run", [1, 1 << 30], ids=["one run", "record by record"])
@settings(max_examples=150, deadline=None)
@given(ops=st.lists(op_st, max_size=60))
def test_runs_match_a_model_of_the_ring(short_run, ops):
    """Random appends (runs and single records, any size up to the limit,
    header-like payloads), publishes, aborts, reads of any length and
    releases part way: what is read is exactly what was published, in
    order, at the positions the producer reported."""
    with mock.patch.object(ring_module, "_SHORT_RUN", short_run):
        check_against_model(ops)


def check_against_model(ops) -> None:
    seg, ring = fresh_ring()
    model = Model()
    pos = 0  # the consumer's next read
    stamp = 0
    try:
        for op in ops:
            if op[0] in ("run", "one"):
                payloads = op[1] if op[0] == "run" else [op[1]]
                stamps = list(range(stamp, stamp + len(payloads)))
                stamp += len(payloads)
                positions: list[int] = []
                if op[0] == "run":
                    count = ring.try_append_run(payloads, stamps if op[2] else 5, positions)
                else:
                    before = ring.claimed
                    count = int(ring.try_append(payloads[0], stamps[0] if op[2] else 5))
                    if count:
                        positions = [ring.claimed - layout.record_size(len(payloads[0]))]
                        assert positions[0] >= before
                assert len(positions) == count <= len(payloads)
                if count < len(payloads):  # full: the next one really does not fit, with its pad if it wraps
                    size, tail = layout.record_size(len(payloads[count])), CAP - (ring.claimed & (CAP - 1))
                    assert ring.free_bytes() < (size if size <= tail else tail + size)
                model.pending += zip(positions, payloads, stamps if op[2] else [5] * count)
            elif op[0] == "publish":
                ring.publish()
                model.published.extend(model.pending)
                model.pending = []
            elif op[0] == "abort":
                ring.abort()
                model.pending = []
            else:
                _, limit, copy, keep = op
                run = ring.read(pos, ring.published(), limit, copy=copy)
                expected = list(model.published)[:limit]
                assert run.positions == [p for p, _, _ in expected]
                assert [bytes(x) for x in run.payloads] == [x for _, x, _ in expected]
                assert run.recv_ns == [s for _, _, s in expected]
                run.detach()
                # Release all of it, or stop after ``keep`` records (the
                # flusher releases up to the first record it has not written).
                released = run.end if keep >= len(run) else run.positions[keep]
                ring.release_to(released)
                pos = released
                while model.published and model.published[0][0] < released:
                    model.published.popleft()
        ring.publish()
        model.published.extend(model.pending)
        run = ring.read(pos, ring.published(), 1 << 30, copy=True)
        assert run.payloads == [x for _, x, _ in model.published]
        assert run.end == ring.published()
    finally:
        close(seg, ring)


# ------------------------------------------------------- a writer killed mid-run
def _record(seq: int) -> bytes:
    """A self-checking payload: seq, a body of seq-dependent length, CRC."""
    body = (b"%d|" % seq) * (1 + seq % 23)
    return struct.pack("<q", seq) + body + struct.pack("<I", zlib.crc32(body))


def _check(payload: bytes) -> int:
    (seq,) = struct.unpack_from("<q", payload)
    body = payload[8:-4]
    assert body == (b"%d|" % seq) * (1 + seq % 23) and struct.unpack("<I", payload[-4:])[0] == zlib.crc32(body)
    return seq


def _endless_writer(ring: Ring, first: int, data: Wakeup, space: Wakeup) -> None:
    """Append runs of 1-300 records, publish, repeat, until killed."""
    rng = random.Random(first)
    ring.resume_producer()
    seq = first
    while True:
        run = [_record(s) for s in range(seq, seq + rng.randrange(1, 300))]
        with ring.claim() as w:
            seq += w.try_append_run(run, seq)
        data.signal()
        if ring.free_bytes() < 64 << 10:
            space.wait(0.05)


def test_writer_killed_mid_run_exposes_only_whole_records():
    """SIGKILL a producer while it writes runs, three times: the consumer
    reads only whole records (each checks its own CRC), in sequence, and a
    restarted producer continues right after the last published one."""
    seg, ring = fresh_ring(1 << 20)
    data, space = Wakeup(), Wakeup()
    ctx = multiprocessing.get_context("fork")
    seen = 0  # the next seq the consumer expects
    pos = 0
    rng = random.Random(3)

    def consume() -> int:
        nonlocal pos, seen
        run = ring.read(pos, ring.published(), 1 << 30, copy=True)
        for payload, stamp in zip(run.payloads, run.recv_ns):
            assert _check(payload) == seen
            assert stamp <= seen  # each run is stamped with its first seq
            seen += 1
        pos = run.end
        ring.release_to(pos)
        space.signal()
        return len(run)

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
                # Now, most likely inside try_append_run: the writer spends
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
            assert ring.published() == pos
            ring.resume_producer()  # this process's view of the producer side starts at the cursor too
    finally:
        close(seg, ring)
        data.close()
        space.close()
    assert seen > 6_000
