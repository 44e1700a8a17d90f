"""Clients for the engine's socket: ``Client`` (blocking) and ``AsyncClient``.

Both speak the msgpack framing by default (``framing="json"`` for JSON lines),
keep many intents in flight, match replies by ``(client_id, seq)``, and on a
lost connection reconnect and resend every unanswered intent with the same
``seq``: the engine's unique key turns a resend of something already stored
into its original outcome, so nothing is applied twice. A ``busy`` reply
(database down, engine draining) is retried after a backoff unless
``retry_busy=False``.

``seq`` must grow per ``client_id`` and survive the client process if
exactly-once across client restarts matters: persist it with the game
session. Left to the client, ``seq`` starts at the current time in
microseconds, so a restarted client does not reuse one.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import os
import socket
import time
import uuid
from collections.abc import Iterable
from typing import Any

import msgspec

from engine.errors import ClientError
from engine.intent import BUSY, Intent, Reply
from engine.policy import Backoff
from ipc import wire

# Reconnect: first retry after 50 ms, doubling to 2 s, for up to 30 s in all
# (long enough to ride out an ingest restart or an engine restart).
RECONNECT_INITIAL_S = 0.05
RECONNECT_MAX_S = 2.0
RECONNECT_GIVE_UP_S = 30.0
BUSY_RETRY_S = 0.05


def _reconnect_backoff() -> Backoff:
    # Never reset by time: one connect attempt's delays only grow until RECONNECT_GIVE_UP_S.
    return Backoff(initial=RECONNECT_INITIAL_S, maximum=RECONNECT_MAX_S, stable_s=math.inf)


def _new_client_id() -> str:
    return f"client-{uuid.uuid4().hex[:16]}"


class _Codec:
    """Encoding shared by both clients; the framing is ``ipc.wire``'s."""

    def __init__(self, framing: str) -> None:
        self.framing = wire.check_mode(framing)
        packed = framing == wire.MODE_MSGPACK
        self._encode = (msgspec.msgpack.Encoder() if packed else msgspec.json.Encoder()).encode
        self._replies = wire.ReplyReader(
            framing, msgspec.msgpack.Decoder(Reply).decode, msgspec.json.Decoder(Reply).decode
        )

    def frame(self, intent: Intent) -> bytes:
        return wire.frame(self.framing, self._encode(intent))

    def feed(self, data: bytes) -> list[Reply]:
        return self._replies.feed(data)

    def reset(self) -> None:
        self._replies.clear()


def control(path: str | os.PathLike, op: str, *, timeout: float = 5.0) -> dict:
    """The engine's answer to one control message (``{"op": op}``, one of
    ``engine.intent.CONTROL_OPS``) on a connection of its own. Raises OSError
    when the socket cannot be reached or times out, ClientError when the
    engine closes without answering."""
    replies = wire.ReplyReader(wire.MODE_JSON, msgspec.msgpack.decode, msgspec.json.decode)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(os.fspath(path))
        sock.sendall(wire.frame_json(msgspec.json.encode({"op": op})))
        while True:
            data = sock.recv(1 << 16)
            if not data:
                raise ClientError(f"{os.fspath(path)} closed without answering {op!r}")
            for reply in replies.feed(data):
                return reply


class _Seqs:
    def __init__(self, start: int | None) -> None:
        self._counter = itertools.count(time.time_ns() // 1000 if start is None else start)

    def __next__(self) -> int:
        return next(self._counter)


class Client:
    """Blocking client. Not thread-safe: use one per thread."""

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        client_id: str | None = None,
        framing: str = "msgpack",
        first_seq: int | None = None,
        timeout: float = 30.0,
        retry_busy: bool = True,
    ) -> None:
        self.path = os.fspath(path)
        self.client_id = client_id or _new_client_id()
        self.timeout = timeout
        self.retry_busy = retry_busy
        self._codec = _Codec(framing)
        self._seqs = _Seqs(first_seq)
        self._sock: socket.socket | None = None
        self._unanswered: dict[tuple[str, int], bytes] = {}
        self._replies: dict[tuple[str, int], Reply] = {}
        self.reconnects = 0

    def intent(
        self, entity: str, kind: str, args: dict | None = None, *, seq: int | None = None, client_id: str | None = None
    ) -> Intent:
        """Build an intent with this client's id and the next seq."""
        return Intent(client_id or self.client_id, next(self._seqs) if seq is None else seq, entity, kind, args or {})

    def connect(self) -> Client:
        deadline = time.monotonic() + RECONNECT_GIVE_UP_S
        backoff = _reconnect_backoff()
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(self.path)
                sock.settimeout(self.timeout)
                self._sock = sock
                self._codec.reset()
                return self
            except OSError as exc:
                sock.close()
                delay = backoff.next_delay()
                if time.monotonic() + delay > deadline:
                    raise ClientError(f"cannot connect to {self.path}: {exc}") from None
                time.sleep(delay)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Client:
        return self.connect() if self._sock is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def submit(self, intent: Intent) -> Reply:
        """Send one intent and wait for its reply."""
        return self.submit_many([intent])[0]

    def submit_many(self, intents: Iterable[Intent], window: int = 1024) -> list[Reply]:
        """Send intents with up to ``window`` in flight; replies in input order."""
        intents = list(intents)
        keys = [(i.client_id, i.seq) for i in intents]
        pending = iter(zip(keys, intents))
        outstanding: set[tuple[str, int]] = set()
        done: dict[tuple[str, int], Reply] = {}
        deadline = time.monotonic() + self.timeout
        exhausted = False
        while not exhausted or outstanding:
            if not exhausted and len(outstanding) < window:
                batch = []
                for key, intent in itertools.islice(pending, window - len(outstanding)):
                    frame = self._codec.frame(intent)
                    self._unanswered[key] = frame
                    outstanding.add(key)
                    batch.append(frame)
                if not batch:
                    exhausted = True
                else:
                    self._send(b"".join(batch))
                continue
            for reply in self._receive():
                key = (reply.client_id, reply.seq)
                if reply.status == BUSY and self.retry_busy and key in self._unanswered:
                    time.sleep(BUSY_RETRY_S)
                    self._send(self._unanswered[key])
                    continue
                self._unanswered.pop(key, None)
                if key in outstanding:
                    outstanding.discard(key)
                    done[key] = reply
                    deadline = time.monotonic() + self.timeout
                else:
                    self._replies[key] = reply
            if time.monotonic() > deadline:
                raise ClientError(f"no reply within {self.timeout}s for {len(outstanding)} intents")
        return [done[k] for k in keys]

    def _send(self, data: bytes) -> None:
        while True:
            if self._sock is None:
                self._reconnect()
            try:
                self._sock.sendall(data)
                return
            except OSError:
                self._reconnect()

    def _receive(self) -> list[Reply]:
        while True:
            if self._sock is None:
                self._reconnect()
            try:
                data = self._sock.recv(1 << 16)
            except TimeoutError:
                raise ClientError(f"no reply from {self.path} within {self.timeout}s") from None
            except OSError:
                data = b""
            if data:
                return self._codec.feed(data)
            self._reconnect()

    def _reconnect(self) -> None:
        """Reconnect and resend everything unanswered, in seq order."""
        self.close()
        self.reconnects += 1
        self.connect()
        if self._unanswered:
            frames = [self._unanswered[k] for k in sorted(self._unanswered)]
            self._sock.sendall(b"".join(frames))


class AsyncClient:
    """asyncio client: ``await client.submit(intent)`` from many tasks at once."""

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        client_id: str | None = None,
        framing: str = "msgpack",
        first_seq: int | None = None,
        retry_busy: bool = True,
    ) -> None:
        self.path = os.fspath(path)
        self.client_id = client_id or _new_client_id()
        self.retry_busy = retry_busy
        self._codec = _Codec(framing)
        self._seqs = _Seqs(first_seq)
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task | None = None
        self._waiting: dict[tuple[str, int], tuple[bytes, asyncio.Future]] = {}
        self._connected = asyncio.Event()
        self._closing = False
        self.reconnects = 0

    def intent(self, entity: str, kind: str, args: dict | None = None, *, seq: int | None = None) -> Intent:
        return Intent(self.client_id, next(self._seqs) if seq is None else seq, entity, kind, args or {})

    async def connect(self) -> AsyncClient:
        await self._open()
        self._reader_task = asyncio.create_task(self._read_loop())
        return self

    async def _open(self) -> None:
        deadline = time.monotonic() + RECONNECT_GIVE_UP_S
        backoff = _reconnect_backoff()
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(self.path, limit=1 << 20)
                break
            except OSError as exc:
                delay = backoff.next_delay()
                if time.monotonic() + delay > deadline:
                    raise ClientError(f"cannot connect to {self.path}: {exc}") from None
                await asyncio.sleep(delay)
        self._reader, self._writer = reader, writer
        self._codec.reset()
        self._connected.set()

    async def submit(self, intent: Intent) -> Reply:
        """Send ``intent``; returns its reply (committed, dead_lettered, rejected,
        or busy when ``retry_busy`` is off)."""
        key = (intent.client_id, intent.seq)
        if key in self._waiting:
            raise ClientError(f"intent {key} is already in flight")
        frame = self._codec.frame(intent)
        future = asyncio.get_running_loop().create_future()
        self._waiting[key] = (frame, future)
        await self._connected.wait()
        self._writer.write(frame)
        return await future

    async def _read_loop(self) -> None:
        while not self._closing:
            try:
                data = await self._reader.read(1 << 16)
            except OSError:
                data = b""
            if not data:
                if self._closing:
                    return
                await self._reconnect()
                continue
            for reply in self._codec.feed(data):
                key = (reply.client_id, reply.seq)
                entry = self._waiting.get(key)
                if entry is None:
                    continue
                if reply.status == BUSY and self.retry_busy:
                    asyncio.get_running_loop().call_later(BUSY_RETRY_S, self._resend, key)
                    continue
                del self._waiting[key]
                if not entry[1].done():
                    entry[1].set_result(reply)

    def _resend(self, key: tuple[str, int]) -> None:
        entry = self._waiting.get(key)
        if entry is not None and self._writer is not None and self._connected.is_set():
            self._writer.write(entry[0])

    async def _reconnect(self) -> None:
        self._connected.clear()
        self.reconnects += 1
        if self._writer is not None:
            self._writer.close()
        try:
            await self._open()
        except ClientError as exc:
            for _, future in self._waiting.values():
                if not future.done():
                    future.set_exception(exc)
            self._waiting.clear()
            self._closing = True
            return
        frames = [self._waiting[k][0] for k in sorted(self._waiting)]
        if frames:
            self._writer.write(b"".join(frames))

    async def close(self) -> None:
        self._closing = True
        if self._writer is not None:
            self._writer.close()
            try:
                await self._writer.wait_closed()
            except OSError:
                pass
        if self._reader_task is not None:
            self._reader_task.cancel()
            try:
                await self._reader_task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - the reader's failure was already surfaced
                pass
        for _, future in self._waiting.values():
            if not future.done():
                future.set_exception(ClientError("client closed"))
        self._waiting.clear()

    async def __aenter__(self) -> AsyncClient:
        return await self.connect()

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()
