"""An ingest process: sockets in, ring records out, replies after commit.

One asyncio loop. Each connection decodes its frames (``ipc.wire``) into
``Intent`` structs, validates them, and appends ring records; one publish and
one flusher wake-up per socket read, not per intent. The ingest remembers
``(ring position, connection, client_id, seq)`` for every record it wrote.
When the flusher's release cursor passes a position, that intent is durable:
the ingest replies with the outcome the flusher handed over for it, or
``committed`` when there is none (``engine/handoff.py`` states the rule that
keeps a reply equal to the stored outcome).

Backpressure, never loss: a full ring, too many unanswered intents on one
connection, or a client that does not read its replies each pause reading
from the socket(s) concerned until it clears.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import operator
import os
import signal
import socket
import time
from collections.abc import Sequence
from itertools import repeat
from typing import Any

import msgspec

from engine import codes, metrics
from engine import intent as im
from engine.handlers import args_problem
from engine.handoff import OutcomeInbox
from engine.intent import DecodedRecord, Intent, Probe, Reply, Request
from engine.lanes import lane_of
from engine.options import Options
from ipc import wire
from ipc.control import Control
from ipc.control import Flusher as F
from ipc.control import Ingest as I
from ipc.control import Worker as W
from ipc.ring import Ring
from ipc.wakeup import Wakeup

log = logging.getLogger(__name__)

_FRAME_INDEX = operator.itemgetter(0)
_REPLY = operator.itemgetter(1)
_KIND = operator.attrgetter("kind")
# What encoding a record (or re-encoding a MessagePack intent) can raise:
# args MessagePack carries and JSON cannot hold.
_UNENCODABLE = (msgspec.EncodeError, TypeError, ValueError, RecursionError, OverflowError)
# Entities whose lane (engine.lanes.lane_of) an ingest remembers: a dict
# lookup instead of a CRC per intent. Cleared when full, so a client that
# invents ids cannot grow it without bound (~10 MB at most).
LANE_CACHE_ENTITIES = 1 << 16

# What msgspec raises on bytes it cannot turn into the expected type. Invalid
# UTF-8 surfaces as UnicodeDecodeError or DecodeError depending on the msgspec
# release; which one is never used to classify it (see _rejection).
# A map used as a map key is DecodeError on recent releases and TypeError
# ("unhashable type") on older ones: both are a frame we cannot decode.
_UNDECODABLE = (msgspec.DecodeError, msgspec.ValidationError, RecursionError, UnicodeDecodeError, TypeError)

# Drain deadlines nest inside the supervisor's (engine/supervisor.py): an
# ingest gives up waiting for releases at this share of drain_timeout_s, the
# supervisor kills a still-running ingest only at DRAIN_KILL_SHARE, and the
# flusher at the full drain_timeout_s.
DRAIN_SHARE = 0.6
# When the supervisor died, the flusher drains too and the embedded
# PostgreSQL is shutting down: wait this long for its last releases, then let
# the clients go, so a restarted engine has them back at once.
ORPHAN_DRAIN_S = 1.0

# A client that stops reading its replies: past this much unsent reply data
# we stop reading its requests (asyncio's default high-water mark is 64 KiB).
WRITE_HIGH_WATER = 1 << 20


class Connection(asyncio.Protocol):
    """One client connection."""

    def __init__(self, ingest: IngestProcess) -> None:
        self.ingest = ingest
        self.reader = wire.FrameReader(ingest.options.max_frame_bytes)
        self.transport: asyncio.Transport | None = None
        self.in_flight = 0
        self.backlog: collections.deque = collections.deque()  # (payload, recv_ns, client_id, seq, lane)
        self.out: list[bytes] = []
        self.paused = set()  # reasons reading is paused: "ring", "inflight", "writes", "drain", "fatal"
        self.closed = False
        self.closing = False  # a fatal framing error: close once every reply is sent

    # asyncio callbacks ---------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)  # type: ignore[attr-defined]
        self.ingest.connection_opened(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.ingest.connection_closed(self)

    def data_received(self, data: bytes) -> None:
        frames = self.reader.feed(data)
        if frames:
            self.ingest.handle_frames(self, frames)
        fatal = self.reader.fatal
        if fatal is not None and not self.closing:
            # Nothing more is read, but intents already accepted from this
            # connection still get their replies before it closes.
            self.ingest.counters.add(I.REJECTED, 1)
            self.send(self.ingest.encode_reply(self, Reply(None, None, im.REJECTED, fatal.code, fatal.reason)))
            self.flush()
            self.pause("fatal")
            self.closing = True
            self.close_if_done()

    def close_if_done(self) -> None:
        """Close a connection that is closing once nothing is owed to it."""
        if self.closing and self.in_flight <= 0 and not self.backlog:
            self.close()

    def eof_received(self) -> bool:
        """The client half-closed (``printf … | socat``): it sends nothing
        more, but still reads. Keep the connection until every intent it
        sent is answered, then close."""
        self.closing = True
        self.close_if_done()
        return True  # keep the transport open for our replies

    def pause_writing(self) -> None:
        self.pause("writes")

    def resume_writing(self) -> None:
        self.resume("writes")

    # helpers --------------------------------------------------------------
    def pause(self, why: str) -> None:
        if not self.paused and self.transport is not None and not self.closed:
            self.transport.pause_reading()
        self.paused.add(why)

    def resume(self, why: str) -> None:
        self.paused.discard(why)
        if not self.paused and self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def send(self, data: bytes) -> None:
        self.out.append(data)

    def flush(self) -> None:
        if self.out and not self.closed and self.transport is not None:
            self.transport.write(b"".join(self.out))
        self.out.clear()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.flush()
            self.transport.close()
        self.closed = True


class IngestProcess:
    def __init__(
        self,
        index: int,
        control: Control,
        listener: socket.socket,
        data_wakes: list[Wakeup],
        release_wake: Wakeup,
        options: Options,
        schemas: dict[str, type[msgspec.Struct] | None],
    ) -> None:
        self.index = index
        self.control = control
        self.lanes = control.map.lanes
        # One ring per lane: ring [index][l] feeds flusher lane l.
        self.rings = control.intent_rings[index]
        # The largest stored record a ring takes. A frame within max_frame_bytes
        # can still re-encode larger (escapes, floats): such an intent is refused.
        self.max_record = min(ring.max_item for ring in self.rings)
        for ring in self.rings:
            ring.resume_producer()
        self.inboxes = [OutcomeInbox(ring, out) for ring, out in zip(self.rings, control.outcome_rings[index])]
        self.parent_pid = os.getppid()  # the supervisor; a change means it died
        self.listener = listener
        self.data_wakes = data_wakes
        self.release_wake = release_wake
        self.options = options
        self.schemas = schemas  # kind -> the Struct its args must fit (None: any object)
        self._lane_cache: dict[str, int] = {}
        self.counters = control.ingest[index]
        self.connections: set[Connection] = set()
        # Per lane, in ring order: (position, conn, client_id, seq) of every
        # record written and not yet released.
        self.waiting: list[collections.deque] = [collections.deque() for _ in range(self.lanes)]
        self.blocked: collections.deque[Connection] = collections.deque()  # conns with a backlog
        self.draining = False
        self._stop = asyncio.Event()
        self._server: asyncio.AbstractServer | None = None
        self._dec_json = msgspec.json.Decoder(Intent)
        self._dec_pack = msgspec.msgpack.Decoder(Intent)
        self._probe_json = msgspec.json.Decoder(Probe)
        self._probe_pack = msgspec.msgpack.Decoder(Probe)
        self._req_json = msgspec.json.Decoder(Request)
        self._req_pack = msgspec.msgpack.Decoder(Request)
        self._json = msgspec.json.Encoder()
        self._pack = msgspec.msgpack.Encoder()

    # -------------------------------------------------------------- lifecycle
    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.begin_drain)
        # Ctrl-C reaches the whole process group: the supervisor turns it into
        # an ordered drain (SIGTERM to the ingests, then the flusher lanes).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        loop.add_reader(self.release_wake.fd, self.on_release)
        self._server = await loop.create_unix_server(lambda: Connection(self), sock=self.listener, backlog=1024)
        # Outcomes left by a predecessor belong to connections that are gone.
        self.on_release()
        self._set_paused(False)  # a pause a killed predecessor left open ends here
        self.counters.set(I.READY_NS, time.time_ns())
        await self._stop.wait()
        loop.remove_reader(self.release_wake.fd)

    def begin_drain(self) -> None:
        """Stop accepting and reading; answer ``busy`` at once to what never
        reached the ring; reply to what is in the ring as the flusher
        releases it; exit when nothing is owed, or at the deadline."""
        if self.draining:
            return
        self.draining = True
        asked = self.control.workers[self.control.ingest_slot(self.index)].get(W.STOP_ASKED)
        orphaned = os.getppid() != self.parent_pid or not asked
        deadline = ORPHAN_DRAIN_S if orphaned else self.options.drain_timeout_s * DRAIN_SHARE
        log.info(
            "ingest %d draining%s: %d awaiting release, %d connections; deadline %.1fs",
            self.index,
            " (the supervisor is gone)" if orphaned else "",
            self.awaiting(),
            len(self.connections),
            deadline,
        )
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.pause("drain")
        self._refuse_backlog()
        asyncio.get_running_loop().call_later(deadline, self._drain_deadline)
        self._maybe_finish_drain()

    def _refuse_backlog(self) -> None:
        """Intents read but never written to the ring are not stored:
        ``busy``/``shutting_down`` tells the client to resend them."""
        for conn in self.blocked:
            while conn.backlog:
                _, _, client_id, seq, _ = conn.backlog.popleft()
                conn.in_flight -= 1
                conn.send(
                    self.encode_reply(
                        conn,
                        Reply(
                            client_id,
                            seq,
                            im.BUSY,
                            "shutting_down",
                            "engine stopped before this intent was stored; resend",
                        ),
                    )
                )
            conn.flush()
        self.blocked.clear()
        self._set_paused(False)

    def _maybe_finish_drain(self) -> None:
        if self.draining and not self.awaiting() and not self.blocked:
            for conn in list(self.connections):
                conn.close()
            self._stop.set()

    def _drain_deadline(self) -> None:
        # Intents still in the ring have an outcome nobody knows yet (the
        # flusher may commit them after we are gone): no reply can be
        # promised for them. Their connections close; the client's resend
        # gets the stored outcome, or stores it. Nothing is acknowledged
        # that is not durable.
        if self.awaiting():
            log.warning(
                "ingest %d: %d intents in the ring were not released by the drain deadline; closing their "
                "connections without a reply (a resend gets the stored outcome)",
                self.index,
                self.awaiting(),
            )
        for conn in list(self.connections):
            conn.close()
        self._stop.set()

    def connection_opened(self, conn: Connection) -> None:
        if self.draining or len(self.connections) >= self.options.max_connections:
            why = (
                "engine is shutting down"
                if self.draining
                else f"too many connections (max_connections={self.options.max_connections})"
            )
            conn.transport.write(self._json.encode(Reply(None, None, im.REJECTED, "unavailable", why)) + b"\n")
            conn.transport.close()
            conn.closed = True
            return
        self.connections.add(conn)
        self.counters.set(I.CONNECTIONS_OPEN, len(self.connections))
        self.counters.add(I.CONNECTIONS_TOTAL, 1)

    def connection_closed(self, conn: Connection) -> None:
        self.connections.discard(conn)
        conn.backlog.clear()
        self.counters.set(I.CONNECTIONS_OPEN, len(self.connections))

    # ------------------------------------------------------------------ input
    def encode_reply(self, conn: Connection, reply: Any) -> bytes:
        # A connection that failed on its first byte has no mode: answer in
        # JSON, the framing a person at a terminal reads.
        if conn.reader.mode == wire.MODE_MSGPACK:
            return wire.frame_msgpack(self._pack.encode(reply))
        return wire.frame_json(self._json.encode(reply))

    def handle_frames(self, conn: Connection, frames: list) -> None:
        """One socket read's frames to ring records, stage by stage over the
        whole read: decode the frames; encode the records; check them (cheap
        tests first, ``record_problem`` only for what they do not clear,
        then the args schema); route them; append one ring run per lane.
        Every refusal is answered in frame order, whichever stage found it."""
        packed = conn.reader.mode == wire.MODE_MSGPACK
        recv_ns = time.monotonic_ns()
        refusals: list[tuple[int, bytes]] = []  # (frame index, reply): what is answered now
        order, intents, sources, rejected = self.decode_frames(conn, frames, packed, refusals)
        accepted = 0
        if intents:
            payloads, bad = self.encode_records(intents)
            self.check_records(intents, payloads, sources, packed, bad)
            for k, reason in bad.items():
                reply = Reply(intents[k].client_id, intents[k].seq, im.REJECTED, codes.INVALID, im.clip_reason(reason))
                refusals.append((order[k], self.encode_reply(conn, reply)))
            rejected += len(bad)
            accepted = self.route_and_append(conn, intents, payloads, bad, order, recv_ns, refusals)
        if accepted:
            self.counters.add(I.RECEIVED, accepted)
            conn.in_flight += accepted
            if conn.backlog and conn not in self.blocked:
                self.blocked.append(conn)
                conn.pause("ring")
                self._set_paused(True)
            if conn.in_flight >= self.options.max_in_flight_per_connection:
                conn.pause("inflight")
        if rejected:
            self.counters.add(I.REJECTED, rejected)
        if refusals:
            refusals.sort(key=_FRAME_INDEX)
            conn.out += map(_REPLY, refusals)
        conn.flush()

    def decode_frames(
        self, conn: Connection, frames: list, packed: bool, refusals: list[tuple[int, bytes]]
    ) -> tuple[Sequence[int], list[Intent], list[bytes], int]:
        """Decode every frame: the intents of a known kind, with their frame
        indexes and bytes, and how many frames were rejected. Control
        messages are answered, everything else refused (``refusals``).
        A read of nothing but intents of known kinds takes one C loop."""
        decode = self._dec_pack.decode if packed else self._dec_json.decode
        schemas = self.schemas
        try:
            intents: list[Intent] = list(map(decode, frames))  # a FrameError is a TypeError here
            if schemas.keys() >= set(map(_KIND, intents)):
                return range(len(frames)), intents, frames, 0
        except _UNDECODABLE:
            pass
        order: list[int] = []
        intents = []
        sources: list[bytes] = []
        rejected = 0
        for index, frame in enumerate(frames):
            if isinstance(frame, wire.FrameError):
                rejected += 1
                refusals.append(
                    (index, self.encode_reply(conn, Reply(None, None, im.REJECTED, frame.code, frame.reason)))
                )
                continue
            try:
                intent = decode(frame)
            except _UNDECODABLE as exc:
                control = self._control_request(conn, frame, packed)
                if control is None:
                    rejected += 1
                    control = self._rejection(conn, frame, packed, exc)
                refusals.append((index, control))
                continue
            if intent.kind not in schemas:
                reason = f"unknown kind {intent.kind!r}; known kinds: {', '.join(sorted(schemas))}"
                reply = Reply(intent.client_id, intent.seq, im.REJECTED, codes.UNKNOWN_KIND, reason)
                refusals.append((index, self.encode_reply(conn, reply)))
                rejected += 1
                continue
            order.append(index)
            intents.append(intent)
            sources.append(frame)
        return order, intents, sources, rejected

    def encode_records(self, intents: list[Intent]) -> tuple[list[bytes], dict[int, str]]:
        """Each intent's ring record (a compact JSON array, ``DecodedRecord``),
        and why, by intent index, a record could not be encoded at all."""
        encode = self._json.encode
        recv_us = time.time_ns() // 1000
        bad: dict[int, str] = {}
        try:
            return [encode(DecodedRecord(i.client_id, i.seq, i.entity, i.kind, i.args, recv_us)) for i in intents], bad
        except _UNENCODABLE:
            pass
        payloads: list[bytes] = []
        for k, intent in enumerate(intents):
            try:
                payloads.append(
                    encode(
                        DecodedRecord(intent.client_id, intent.seq, intent.entity, intent.kind, intent.args, recv_us)
                    )
                )
            except _UNENCODABLE as exc:
                # msgpack can carry what JSON cannot: ext types, non-string
                # keys, lone surrogates. Name the place where we can.
                payloads.append(b"")
                bad[k] = im.json_problem(intent.args) or f"args cannot be stored as JSON ({type(exc).__name__}: {exc})"
        return payloads, bad

    def check_records(
        self, intents: list[Intent], payloads: list[bytes], sources: list[bytes], packed: bool, bad: dict[int, str]
    ) -> None:
        """Why, by intent index, a record cannot be stored (added to ``bad``):
        ``record_problem`` for what the cheap tests (``im.suspects``) do not
        clear, then the kind's args schema."""
        for k in im.suspects(intents, payloads, sources, packed):
            if k not in bad:
                try:
                    reason = im.record_problem(intents[k], payloads[k], sources[k], packed)
                except _UNENCODABLE as exc:
                    reason = im.json_problem(intents[k].args) or (
                        f"args cannot be stored as JSON ({type(exc).__name__}: {exc})"
                    )
                if reason is not None:
                    bad[k] = reason
        if payloads and max(map(len, payloads)) > self.max_record:
            for k, payload in enumerate(payloads):
                if len(payload) > self.max_record and k not in bad:
                    bad[k] = (
                        f"stored as {len(payload)} bytes, more than a ring record holds ({self.max_record}); "
                        "shorten args or raise ring_bytes"
                    )
        schemas, convert = self.schemas, msgspec.convert
        for k, intent in enumerate(intents):
            schema = schemas[intent.kind]
            if schema is None or k in bad:
                continue
            try:  # msgspec directly; args_problem only to name what failed
                convert(intent.args, schema)
            except msgspec.ValidationError:
                bad[k] = f"invalid args for {intent.kind}: {args_problem(schema, intent.args)}"

    def route_and_append(
        self,
        conn: Connection,
        intents: list[Intent],
        payloads: list[bytes],
        bad: dict[int, str],
        order: Sequence[int],
        recv_ns: int,
        refusals: list[tuple[int, bytes]],
    ) -> int:
        """Route the storable intents (all but ``bad``) to their lanes
        (``busy`` where the lane's breaker is open or the ingest drains) and
        append one ring run per lane; what a full ring does not take waits
        in the connection's backlog. Returns how many were accepted."""
        lanes = self.lanes
        # A lane whose breaker is open answers busy; the others carry on.
        open_lanes = [f.get(F.BREAKER) == 1 for f in self.control.flushers]
        lane_cache = self._lane_cache
        runs: list[list[int]] = [[] for _ in range(lanes)]  # intent indexes, per lane
        for k, intent in enumerate(intents):
            if bad and k in bad:
                continue
            lane = lane_cache.get(intent.entity)
            if lane is None:
                if len(lane_cache) >= LANE_CACHE_ENTITIES:
                    lane_cache.clear()
                lane = lane_cache[intent.entity] = lane_of(intent.entity, lanes)
            if open_lanes[lane] or self.draining:
                reply = Reply(
                    intent.client_id,
                    intent.seq,
                    im.BUSY,
                    codes.SHUTTING_DOWN if self.draining else codes.DATABASE_UNAVAILABLE,
                    "engine is shutting down; resend later"
                    if self.draining
                    else "database unavailable (circuit breaker open); nothing stored, resend later",
                )
                refusals.append((order[k], self.encode_reply(conn, reply)))
                continue
            runs[lane].append(k)
        accepted = 0
        backlog = conn.backlog
        for lane, ks in enumerate(runs):
            if not ks:
                continue
            accepted += len(ks)
            written = 0
            if not backlog:  # else behind what already waits: in order, through the backlog
                positions: list[int] = []
                with self.rings[lane].claim() as claim:
                    written = claim.try_append_packed([payloads[k] for k in ks], recv_ns, positions)
                if written:
                    self.waiting[lane].extend(
                        zip(positions, repeat(conn), [intents[k].client_id for k in ks], [intents[k].seq for k in ks])
                    )
                    self.data_wakes[lane].signal()
            backlog.extend((payloads[k], recv_ns, intents[k].client_id, intents[k].seq, lane) for k in ks[written:])
        if backlog:
            self._write_backlog(conn)
        return accepted

    def _write_backlog(self, conn: Connection) -> bool:
        """Move the connection's backlog into its lanes' rings, in order;
        True when emptied. A full ring stops the connection's backlog there
        (its later intents may be for the same entity)."""
        rings = self.rings
        backlog = conn.backlog
        waiting = self.waiting
        with contextlib.ExitStack() as stack:
            claimed: dict[int, Ring] = {}
            while backlog:
                # One packed run per stretch of the backlog that shares a lane
                # and an arrival time (one socket read's intents for a lane).
                head = backlog[0]
                lane = head[4]
                group = list(itertools.takewhile(lambda e, h=head: e[4] == h[4] and e[1] == h[1], backlog))
                recv_ns = head[1]
                claim = claimed.get(lane)
                if claim is None:
                    claim = claimed[lane] = stack.enter_context(rings[lane].claim())
                positions: list[int] = []
                written = claim.try_append_packed([e[0] for e in group], recv_ns, positions)
                waiting[lane].extend(zip(positions, repeat(conn), [e[2] for e in group], [e[3] for e in group]))
                for _ in range(written):
                    backlog.popleft()
                if written < len(group):
                    break
        for lane in claimed:  # published as the stack closed
            self.data_wakes[lane].signal()
        return not backlog

    def _control_request(self, conn: Connection, frame: bytes, packed: bool) -> bytes | None:
        """The answer to ``frame`` when it is a control message (``{"op": …}``,
        nothing else): its reply, or ``unknown_op``, or ``invalid`` for a
        duplicate key. None when it is not one."""
        try:
            req = (self._req_pack if packed else self._req_json).decode(frame)
        except _UNDECODABLE:
            req = None
        op = req.op if req is not None else im.unknown_op(frame, packed)
        if op is None:
            return None
        dup = wire.msgpack_duplicate_key(frame) if packed else wire.json_duplicate_key(frame)
        if dup is not None or req is None:
            code, reason = (
                (codes.INVALID, f"duplicate key {dup}: an object may hold each key only once")
                if dup is not None
                else (codes.UNKNOWN_OP, f"unknown op {op!r}; known ops: {', '.join(im.CONTROL_OPS)}")
            )
            self.counters.add(I.REJECTED, 1)
            return self.encode_reply(conn, Reply(None, None, im.REJECTED, code, im.clip_reason(reason)))
        body = {"op": req.op, "status": "ok"}
        if req.op in ("health", "metrics"):
            body.update(self.health() if req.op == "health" else self.metrics())
        return wire.frame_msgpack(self._pack.encode(body)) if packed else wire.frame_json(self._json.encode(body))

    def _rejection(self, conn: Connection, frame: bytes, packed: bool, exc: Exception) -> bytes:
        # Invalid UTF-8 is found by the engine itself and takes precedence
        # over every other problem, so the reply is the same whichever
        # msgspec release decoded the frame and whichever error it hit first.
        bad = wire.msgpack_bad_utf8(frame) if packed else wire.json_bad_utf8(frame)
        if bad is not None:
            return self._bad_utf8_rejection(conn, frame, packed, bad)
        client_id, seq = self._probe(frame, packed)
        if isinstance(exc, msgspec.ValidationError):
            # msgspec names no more than `$.args[...]` for a number like 1e999.
            number = None if packed or "out of range" not in str(exc) else im.json_number_problem(frame)
            code, reason = codes.INVALID, number or f"invalid intent: {exc}"
        elif isinstance(exc, RecursionError):
            code, reason = codes.MALFORMED, "message nested too deeply"
        else:
            code = codes.MALFORMED
            what = "MessagePack" if packed else "JSON"
            reason = f"not valid {what}: {exc}"
        return self.encode_reply(conn, Reply(client_id, seq, im.REJECTED, code, im.clip_reason(reason)))

    def _bad_utf8_rejection(self, conn: Connection, frame: bytes, packed: bool, bad: wire.BadUtf8) -> bytes:
        """``malformed`` (MessagePack) or ``not_utf8`` (JSON), echoing the
        client_id and seq when they themselves are readable.

        To read them, the bad bytes are overwritten with something no valid
        client_id holds (NUL in a MessagePack string, U+FFFD in a JSON line)
        and the frame is probed again."""
        if packed:
            repaired = bytearray(frame)
            for start, end in bad.spans:
                repaired[start:end] = bytes(end - start)
            client_id, seq = self._probe(bytes(repaired), packed)
            if client_id is not None and "\0" in client_id:
                client_id = None
            reason = f"a string is not valid UTF-8 ({bad.reason} at byte {bad.offset} of the frame)"
            return self.encode_reply(conn, Reply(client_id, seq, im.REJECTED, codes.MALFORMED, reason))
        text = frame.decode("utf-8", "replace")
        client_id, seq = self._probe(text.encode(), packed)
        if client_id is not None and "\ufffd" in client_id:
            client_id = None
        try:
            # Replaced bytes inside strings leave valid JSON; outside, not.
            msgspec.json.decode(text)
            where = "a string"
        except _UNDECODABLE:
            where = "line"
        reason = f"{where} is not valid UTF-8 ({bad.reason} at byte {bad.offset} of the line)"
        return self.encode_reply(conn, Reply(client_id, seq, im.REJECTED, codes.NOT_UTF8, reason))

    def _probe(self, frame: bytes, packed: bool) -> tuple[str | None, int | None]:
        """The client_id and seq of a frame that failed to decode, where readable."""
        try:
            probe = (self._probe_pack if packed else self._probe_json).decode(frame)
        except _UNDECODABLE:
            return None, None
        client_id = probe.client_id if isinstance(probe.client_id, str) else None
        seq = probe.seq if isinstance(probe.seq, int) and not isinstance(probe.seq, bool) else None
        return client_id, seq

    # ----------------------------------------------------------------- output
    def on_release(self) -> None:
        """A lane moved one of our release cursors: reply to what is durable."""
        self.release_wake.drain()
        touched: set[Connection] = set()
        replies = 0
        for inbox, waiting in zip(self.inboxes, self.waiting):
            replies += self._release(inbox, waiting, touched)
        if replies:
            self.counters.add(I.REPLIES, replies)
        limit = self.options.max_in_flight_per_connection
        for conn in touched:
            conn.flush()
            if "inflight" in conn.paused and conn.in_flight < limit // 2 + 1:
                conn.resume("inflight")
            conn.close_if_done()
        self._unblock()
        self._maybe_finish_drain()

    def _release(self, inbox: OutcomeInbox, waiting: collections.deque, touched: set[Connection]) -> int:
        """Reply to one lane's released intents with the outcome it handed over."""
        released = inbox.released()
        encode_json = self._json.encode
        encode_pack = self._pack.encode
        replies = 0
        while waiting and waiting[0][0] < released:
            position, conn, client_id, seq = waiting.popleft()
            replies += 1
            out = inbox.take(position)
            if conn.closed:
                continue
            reply = (
                Reply(client_id, seq, im.COMMITTED)
                if out is None
                else Reply(client_id, seq, out.status, out.code or None, out.reason or None, out.duplicate)
            )
            if conn.reader.mode == wire.MODE_MSGPACK:
                conn.out.append(wire.frame_msgpack(encode_pack(reply)))
            else:
                conn.out.append(wire.frame_json(encode_json(reply)))
            conn.in_flight -= 1
            touched.add(conn)
        inbox.forget_below(released)
        return replies

    def awaiting(self) -> int:
        """Intents written to a ring and not yet released."""
        return sum(len(w) for w in self.waiting)

    def _unblock(self) -> None:
        blocked = self.blocked
        while blocked:
            conn = blocked[0]
            if conn.closed or self._write_backlog(conn):
                blocked.popleft()
                if not self.draining:
                    conn.resume("ring")
            else:
                break
        if not blocked:
            self._set_paused(False)

    def _set_paused(self, paused: bool) -> None:
        """Keep ``PAUSED`` and the backpressure time: a pause's length is
        added when it ends; ``PAUSED_SINCE_NS`` lets a reader add the one
        still running (and a restarted ingest close one its predecessor left)."""
        c = self.counters
        since = c.get(I.PAUSED_SINCE_NS)
        if paused and not since:
            c.set(I.PAUSED_SINCE_NS, time.monotonic_ns())
        elif not paused and since:
            c.add(I.BACKPRESSURE_US, (time.monotonic_ns() - since) // 1000)
            c.set(I.PAUSED_SINCE_NS, 0)
        c.set(I.PAUSED, int(paused))

    def health(self) -> dict:
        return metrics.health(self.control, draining=self.draining)

    def metrics(self) -> dict:
        return metrics.snapshot(self.control)


def run(
    index: int,
    control: Control,
    listener: socket.socket,
    data_wakes: list[Wakeup],
    release_wake: Wakeup,
    options: Options,
    schemas: dict[str, type[msgspec.Struct] | None],
) -> None:
    ingest = IngestProcess(index, control, listener, data_wakes, release_wake, options, schemas)
    asyncio.run(ingest.serve())
