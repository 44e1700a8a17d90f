"""The ring: claim/publish, wrap with padding, full ring, invisible partial
writes, and a two-process stress with a checksum."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap

import pytest

from ipc import layout
from ipc.control import Control, SegmentMap
from ipc.ring import Ring
from ipc.shm import Segment

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
