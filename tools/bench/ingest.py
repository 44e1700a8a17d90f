"""``tools/bench_ipc --ingest-breakdown``: where an ingest's CPU goes, per intent.

An ingest turns socket bytes into ring records and, once the flusher
releases them, into replies. This measurement builds a real
``engine.ingest.IngestProcess`` over a real shared segment (its rings, its
counters), with one connection whose transport only counts what it is given,
and feeds it realistic traffic: the load generator's MUD mix
(``tools.loadgen``: 70% move, 10% say, ...) over 10,000 entities, in
MessagePack frames (what ``tools/load_gen`` sends) and in JSON lines, ``--chunk``
intents per socket read.

The stages, timed one socket read at a time:

``framing``      ``ipc.wire.FrameReader.feed``: socket bytes to frames
``decode``       msgspec: frame to ``engine.intent.Intent`` (the field checks run
                 here), the kind known
``encode``       the ring record: ``DecodedRecord`` to JSON
``validate``     ``engine.intent.record_problem`` (NUL, depth, what JSON cannot
                 hold, duplicate keys) and the kind's args schema
``route+append`` ``engine.lanes.lane_of``, the ring, the ``waiting`` entries
``reply``        ``IngestProcess.on_release``: each released intent's reply

``now`` times the ingest's own stage methods (``IngestProcess.decode_frames``,
``encode_records``, ``check_records``, ``route_and_append``, ``on_release``):
whole socket reads, the cheap checks as C loops, one ring run per lane.
``before`` runs the same functions one intent at a time, as the ingest did
until issue #9 (``record_problem`` and ``args_problem`` per intent,
``Ring.try_append`` per record, where the ingest now appends one packed run
per lane); it is kept so both are measured in one run.
``end to end`` is the ingest's whole path: one ``Connection.data_received``
per socket read, the flusher's release simulated (release cursors moved to
the published ones), ``on_release`` replying. Times are CPU time of this
process (``time.process_time``), so a busy shared machine moves them less
than it moves wall time; each figure is the median over ``--repeat`` rounds.

Nothing here asserts a speed; the tests only check that it runs and writes
its JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import random
import socket
import statistics
import time
from typing import Any, TextIO

import msgspec

from engine import intent as im
from engine.handlers import BUILTIN, args_problem
from engine.ingest import Connection, IngestProcess
from engine.intent import DecodedRecord, Intent
from engine.lanes import lane_of
from engine.options import Options
from ipc import wire
from ipc.control import Control, SegmentMap
from ipc.control import Flusher as F
from ipc.control import Ingest as I
from ipc.layout import record_size
from ipc.ring import Ring
from ipc.shm import Segment
from ipc.wakeup import Wakeup
from tools.loadgen import MIX, make_args

from . import report

log = logging.getLogger(__name__)

DEFAULT_N = 100_000
# A busy connection's socket read: ~64 intents of ~80 bytes in ~5 KiB.
DEFAULT_CHUNK = 64
ENTITIES = 10_000
FRAMINGS = (wire.MODE_MSGPACK, wire.MODE_JSON)
STAGES = ("framing", "decode", "encode", "validate", "route+append", "reply")


def make_intents(n: int, seed: int = 1) -> list[Intent]:
    """``n`` intents of the load generator's MUD mix, seq 0..n-1."""
    rng = random.Random(seed)
    kinds = [k for k, _ in MIX]
    weights = [w for _, w in MIX]
    out = []
    for seq, kind in enumerate(rng.choices(kinds, weights, k=n)):
        out.append(Intent("load-4242-0", seq, f"mob-{rng.randrange(ENTITIES)}", kind, make_args(kind, rng)))
    return out


def encode_frames(intents: list[Intent], mode: str) -> list[bytes]:
    """Each intent as the client sends it: a MessagePack map or a JSON line (unframed)."""
    encode = msgspec.msgpack.Encoder().encode if mode == wire.MODE_MSGPACK else msgspec.json.Encoder().encode
    return [encode(i) for i in intents]


class _Transport:
    """Enough of an asyncio transport for one Connection: counts writes."""

    def __init__(self) -> None:
        self.written = 0
        self.closed = False

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def pause_reading(self) -> None:
        raise RuntimeError("the ingest paused reading: a ring or the in-flight limit filled up")

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


class Harness:
    """A real ingest over a real segment, one connection, the flusher's
    release simulated."""

    def __init__(self, lanes: int, options: Options) -> None:
        smap = SegmentMap(1, lanes, options.ring_bytes, 1 << 16)
        self.segment = Segment.create(smap.size, name="bench_ingest")
        self.control = Control(self.segment.buf, smap, create=True)
        self.data_wakes = [Wakeup() for _ in range(lanes)]
        self.release_wake = Wakeup()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.ingest = IngestProcess(
            0, self.control, self.listener, self.data_wakes, self.release_wake, options, BUILTIN.schemas()
        )
        self.rings = self.control.intent_rings[0]

    def connect(self) -> tuple[Connection, _Transport]:
        conn = Connection(self.ingest)
        transport = _Transport()
        conn.connection_made(transport)  # type: ignore[arg-type]
        return conn, transport

    def release_all(self) -> None:
        """What the flusher does once a batch is durable: move every release cursor to the published one."""
        for ring in self.rings:
            ring.release_to(ring.published())

    def close(self) -> None:
        for wake in (*self.data_wakes, self.release_wake):
            wake.close()
        self.listener.close()
        self.control.close()
        self.segment.close()


class Breakdown:
    """One framing's measurements over all the intents, ``chunk`` per socket read."""

    def __init__(self, harness: Harness, intents: list[Intent], mode: str, chunk: int) -> None:
        self.h = harness
        self.mode = mode
        self.packed = mode == wire.MODE_MSGPACK
        self.n = len(intents)
        self.frames = encode_frames(intents, mode)
        frame = wire.frame_msgpack if self.packed else wire.frame_json
        self.reads = [b"".join(map(frame, self.frames[i : i + chunk])) for i in range(0, self.n, chunk)]
        self.chunks = [self.frames[i : i + chunk] for i in range(0, self.n, chunk)]
        ingest = harness.ingest
        self.decode = (ingest._dec_pack if self.packed else ingest._dec_json).decode
        self.intents = [self.decode(f) for f in self.frames]
        now_us = time.time_ns() // 1000
        encode = ingest._json.encode
        self.records = [
            encode(DecodedRecord(i.client_id, i.seq, i.entity, i.kind, i.args, now_us)) for i in self.intents
        ]
        self.max_frame = ingest.options.max_frame_bytes

    # ------------------------------------------------------------- now
    def staged(self) -> dict[str, float]:
        """The ingest's own stages, one socket read at a time, each stage's
        CPU seconds summed over the reads."""
        h = self.h
        ingest = h.ingest
        conn, _ = h.connect()
        took = dict.fromkeys(STAGES, 0.0)
        clock = time.process_time
        reader = wire.FrameReader(self.max_frame)
        packed = self.packed
        for data in self.reads:
            t0 = clock()
            frames = reader.feed(data)
            t1 = clock()
            refusals: list[tuple[int, bytes]] = []
            order, intents, sources, _ = ingest.decode_frames(conn, frames, packed, refusals)
            t2 = clock()
            payloads, bad = ingest.encode_records(intents)
            t3 = clock()
            ingest.check_records(intents, payloads, sources, packed, bad)
            t4 = clock()
            accepted = ingest.route_and_append(conn, intents, payloads, bad, order, time.monotonic_ns(), refusals)
            t5 = clock()
            conn.in_flight += accepted
            h.release_all()
            t6 = clock()
            ingest.on_release()
            t7 = clock()
            if bad or refusals or accepted != len(frames):
                raise AssertionError("the ingest refused intents of the MUD mix")
            took["framing"] += t1 - t0
            took["decode"] += t2 - t1
            took["encode"] += t3 - t2
            took["validate"] += t4 - t3
            took["route+append"] += t5 - t4
            took["reply"] += t7 - t6
        conn.connection_lost(None)
        return took

    # -------------------------------------------------------- end to end
    def end_to_end(self, *, before: bool = False) -> float:
        """The ingest's whole path: one ``data_received`` per socket read,
        then the release and ``on_release``'s replies. CPU seconds. With
        ``before``, the connection's frames go through ``handle_frames_before``."""
        h = self.h
        conn, transport = h.connect()
        if before:
            h.ingest.handle_frames = functools.partial(handle_frames_before, h.ingest)  # type: ignore[method-assign]
        counters = h.ingest.counters
        received, replies, rejected = counters.get(I.RECEIVED), counters.get(I.REPLIES), counters.get(I.REJECTED)
        try:
            t0 = time.process_time()
            for data in self.reads:
                conn.data_received(data)
                h.release_all()
                h.ingest.on_release()
            took = time.process_time() - t0
        finally:
            vars(h.ingest).pop("handle_frames", None)
            conn.connection_lost(None)
        if counters.get(I.RECEIVED) - received != self.n or counters.get(I.REPLIES) - replies != self.n:
            raise AssertionError("the ingest did not accept and answer every intent")
        if counters.get(I.REJECTED) != rejected:
            raise AssertionError("the ingest rejected intents of the MUD mix")
        if not transport.written:
            raise AssertionError("no reply reached the transport")
        return took

    def timed(self) -> dict[str, Any]:
        """CPU seconds of every stage now, and of the whole path before and now: one round."""
        return {
            "stages": self.staged(),
            "end_to_end": {"before": self.end_to_end(before=True), "now": self.end_to_end()},
        }


def handle_frames_before(ingest: IngestProcess, conn: Connection, frames: list) -> None:
    """The ingest's frames-to-records path as it was until issue #9, kept to
    be measured against in the same run: one intent at a time through
    decode, encode, ``record_problem``, ``args_problem`` and ``lane_of``,
    into the connection's backlog, then ``Ring.try_append`` per record
    (``IngestProcess._write_backlog``). Intents of known kinds that pass
    every check only: anything else is the new path's to answer."""
    packed = conn.reader.mode == wire.MODE_MSGPACK
    decode = ingest._dec_pack.decode if packed else ingest._dec_json.decode
    encode_record = ingest._json.encode
    lanes = ingest.lanes
    open_lanes = [f.get(F.BREAKER) == 1 for f in ingest.control.flushers]
    recv_ns = time.monotonic_ns()
    recv_us = time.time_ns() // 1000
    schemas = ingest.schemas
    backlog = conn.backlog
    accepted = 0
    for frame in frames:
        if isinstance(frame, wire.FrameError):
            raise AssertionError(frame.reason)
        intent = decode(frame)
        if intent.kind not in schemas:
            raise AssertionError(f"unknown kind {intent.kind}")
        payload = encode_record(
            DecodedRecord(intent.client_id, intent.seq, intent.entity, intent.kind, intent.args, recv_us)
        )
        bad = im.record_problem(intent, payload, frame, packed)
        if not bad:
            schema = schemas[intent.kind]
            if schema is not None and (wrong := args_problem(schema, intent.args)) is not None:
                bad = f"invalid args for {intent.kind}: {wrong}"
        if bad:
            raise AssertionError(bad)
        lane = lane_of(intent.entity, lanes)
        if open_lanes[lane] or ingest.draining:
            raise AssertionError("lane busy")
        backlog.append((payload, recv_ns, intent.client_id, intent.seq, lane))
        accepted += 1
    if accepted:
        ingest.counters.add(I.RECEIVED, accepted)
        conn.in_flight += accepted
        _write_backlog_before(ingest, conn)
    conn.flush()


def _write_backlog_before(ingest: IngestProcess, conn: Connection) -> None:
    """``IngestProcess._write_backlog`` as it was until issue #9: one ring
    record per intent (``Ring.try_append``), its position counted back from
    the claim. Nothing reads these records here: the release is simulated."""
    backlog, waiting = conn.backlog, ingest.waiting
    with contextlib.ExitStack() as stack:
        claimed: dict[int, Ring] = {}
        while backlog:
            payload, recv_ns, client_id, seq, lane = backlog.popleft()
            claim = claimed.get(lane)
            if claim is None:
                claim = claimed[lane] = stack.enter_context(ingest.rings[lane].claim())
            if not claim.try_append(payload, recv_ns):
                raise AssertionError("ring full")
            waiting[lane].append((claim.claimed - record_size(len(payload)), conn, client_id, seq))
    for lane in claimed:
        ingest.data_wakes[lane].signal()


def run_breakdown(
    *, n: int = DEFAULT_N, repeat_: int = 3, chunk: int = DEFAULT_CHUNK, lanes: int | None = None
) -> dict:
    """Measure every stage for both framings, ``repeat_`` rounds; returns the JSON document."""
    options = Options()
    lanes = lanes or options.lanes
    intents = make_intents(n)
    harness = Harness(lanes, options)
    try:
        breakdowns = {mode: Breakdown(harness, intents, mode, chunk) for mode in FRAMINGS}
        rounds: dict[str, list[dict[str, dict[str, float]]]] = {mode: [] for mode in FRAMINGS}
        for r in range(repeat_):
            for mode, b in breakdowns.items():  # interleaved, like bench_ipc's rounds
                rounds[mode].append(b.timed())
                log.info(
                    "round %d/%d %-7s %6.0f ns/intent end to end",
                    r + 1,
                    repeat_,
                    mode,
                    rounds[mode][-1]["end_to_end"]["now"] / n * 1e9,
                )
        frame_bytes = {mode: sum(map(len, b.frames)) / n for mode, b in breakdowns.items()}
    finally:
        harness.close()
    results = {}
    for mode in FRAMINGS:
        stages = {k: statistics.median(r["stages"][k] for r in rounds[mode]) / n * 1e9 for k in STAGES}
        before = [r["end_to_end"]["before"] / n * 1e9 for r in rounds[mode]]
        now = [r["end_to_end"]["now"] / n * 1e9 for r in rounds[mode]]
        results[mode] = {
            "frame_bytes_mean": round(frame_bytes[mode], 1),
            "stages": {**stages, "sum": sum(stages.values())},
            "end_to_end_before": statistics.median(before),
            "end_to_end_now": statistics.median(now),
            # Each round ran both back to back: the ratio least moved by a busy machine.
            "round_ratios": [b / x for b, x in zip(before, now)],
            "rounds": rounds[mode],
        }
    return {
        "tool": "bench_ipc --ingest-breakdown",
        "machine": report.machine(report.embedded_pg_version() + " (embedded wheel; not used here)"),
        "params": {
            "n": n,
            "repeat": repeat_,
            "chunk": chunk,
            "lanes": lanes,
            "entities": ENTITIES,
            "mix": [list(m) for m in MIX],
            "clock": "time.process_time",
            "unit": "ns of CPU per intent",
        },
        "results": results,
    }


LABELS = {
    "framing": "framing (socket bytes -> frames)",
    "decode": "decode (msgspec -> Intent, kind)",
    "encode": "encode (ring record, JSON)",
    "validate": "validate (record checks, args schema)",
    "route+append": "route + append (lanes, ring)",
    "reply": "reply (on release)",
    "sum": "sum of the stages",
}


def render(doc: dict) -> str:
    p = doc["params"]
    res = doc["results"]
    lines = [
        report.machine_line(doc["machine"]),
        f"ingest CPU per intent: {p['n']:,} intents of the MUD mix, {p['chunk']} per socket read, {p['lanes']} "
        f"lanes; CPU ns per intent, median of {p['repeat']} rounds; frames of "
        + " / ".join(f"~{res[m]['frame_bytes_mean']:.0f} bytes ({m})" for m in FRAMINGS),
        "",
    ]
    rows = []
    for key in (*STAGES, "sum"):
        cells = [LABELS[key]]
        for mode in FRAMINGS:
            ns = res[mode]["stages"][key]
            cells += [f"{ns:,.0f}", f"{ns / res[mode]['end_to_end_now'] * 100:.0f}%"]
        rows.append(cells)
    headers = ["stage (the ingest's own, per socket read)"]
    for mode in FRAMINGS:
        headers += [f"{mode} ns/intent", "of end to end"]
    lines.append(report.table(headers, rows))
    lines.append("")
    totals = []
    for mode in FRAMINGS:
        r = res[mode]
        totals.append(
            (
                mode,
                f"{r['end_to_end_before']:,.0f}",
                f"{r['end_to_end_now']:,.0f}",
                report.fmt_ratio(r["end_to_end_before"] / r["end_to_end_now"]),
                f"{report.fmt_ratio(min(r['round_ratios']))}…{report.fmt_ratio(max(r['round_ratios']))}",
            )
        )
    lines.append(
        report.table(
            (
                "end to end (data_received + on_release)",
                "before #9 ns/intent",
                "now ns/intent",
                "before/now",
                "per round",
            ),
            totals,
        )
    )
    return "\n".join(lines)


def main(args: argparse.Namespace, out: TextIO) -> int:
    """``tools/bench_ipc --ingest-breakdown``: run, print, write JSON."""
    doc = run_breakdown(n=args.n or DEFAULT_N, repeat_=args.repeat, chunk=args.chunk or DEFAULT_CHUNK, lanes=args.lanes)
    out.write(render(doc) + "\n")
    if args.json:
        report.write_json(args.json, doc)
    return 0
