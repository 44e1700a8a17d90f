"""Wire framing: how bytes on a client socket become frames, and back.

A connection speaks one of two framings, chosen by its first byte:

* ``msgpack``: each frame is a 4-byte big-endian unsigned length ``N`` then
  ``N`` bytes of MessagePack. Frame lengths are capped far below 16 MiB, so
  the first byte of a valid frame is always ``0x00``.
* ``json``: each frame is one line of UTF-8 JSON ending in ``\\n`` (a ``\\r``
  before it is ignored; blank lines are skipped). Chosen when the first byte
  is ``{`` or ASCII whitespace, so a person can type at ``socat``.

Any other first byte is a protocol error and the connection is closed after
one JSON error line. What a frame *contains* is the engine's business.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from typing import Generic, NamedTuple, TypeVar

MODE_MSGPACK = "msgpack"
MODE_JSON = "json"

_LENGTH = struct.Struct(">I")
_JSON_START = frozenset(b"{ \t\r\n")
T = TypeVar("T")


class FrameError:
    """A bad frame the connection survives (reply, then carry on)."""

    __slots__ = ("code", "reason")

    def __init__(self, code: str, reason: str) -> None:
        self.code = code
        self.reason = reason

    def __repr__(self) -> str:
        return f"FrameError({self.code!r}, {self.reason!r})"


class ProtocolError(Exception):
    """The byte stream cannot be resynchronised; the connection must close."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class FrameReader:
    """Incremental splitter. ``feed`` returns complete frames (``bytes``) and
    ``FrameError`` markers in arrival order. When the stream is beyond saving
    it sets ``fatal`` (a ``ProtocolError``) after returning every frame that
    came before the bad bytes, and accepts nothing more.

    The size limit applies to a frame's payload: a msgpack frame's ``N``, or a
    JSON line without its ``\n`` / ``\r\n`` terminator."""

    __slots__ = ("_buf", "_discarding", "fatal", "max_frame", "mode")

    def __init__(self, max_frame: int) -> None:
        self.max_frame = max_frame
        self.mode: str | None = None
        self._buf = bytearray()
        self._discarding = False  # json mode: skipping the rest of an oversized line
        self.fatal: ProtocolError | None = None

    def feed(self, data: bytes) -> list:
        if not data or self.fatal is not None:
            return []
        if self.mode is None:
            first = data[0]
            if first == 0:
                self.mode = MODE_MSGPACK
            elif first in _JSON_START:
                self.mode = MODE_JSON
            else:
                self.fatal = ProtocolError(
                    "bad_framing",
                    f"first byte {first:#04x} starts neither a msgpack frame (0x00, a 4-byte "
                    "big-endian length) nor a JSON line ('{')",
                )
                return []
        buf = self._buf
        buf += data
        if self.mode == MODE_MSGPACK:
            return self._split_msgpack(buf)
        return self._split_json(buf)

    def _split_msgpack(self, buf: bytearray) -> list:
        frames: list = []
        pos = 0
        end = len(buf)
        while end - pos >= 4:
            (n,) = _LENGTH.unpack_from(buf, pos)
            if n > self.max_frame:
                # No way to resynchronise; frames before it are still answered.
                self.fatal = ProtocolError(
                    "frame_too_large", f"frame of {n} bytes exceeds max_frame_bytes={self.max_frame}"
                )
                buf.clear()
                return frames
            if n == 0:
                frames.append(FrameError("malformed", "empty frame (length 0)"))
                pos += 4
                continue
            if end - pos - 4 < n:
                break
            frames.append(bytes(buf[pos + 4 : pos + 4 + n]))
            pos += 4 + n
        del buf[:pos]
        return frames

    def _split_json(self, buf: bytearray) -> list:
        frames: list = []
        pos = 0
        while True:
            nl = buf.find(b"\n", pos)
            if nl < 0:
                break
            if self._discarding:
                self._discarding = False
            else:
                end = nl - 1 if nl > pos and buf[nl - 1] == 13 else nl  # drop "\r"
                if end - pos > self.max_frame:
                    frames.append(_too_long(end - pos, self.max_frame))
                else:
                    line = bytes(buf[pos:end]).strip()
                    if line:
                        frames.append(line)
            pos = nl + 1
        del buf[:pos]
        if len(buf) - (1 if buf.endswith(b"\r") else 0) > self.max_frame:
            # An unterminated line already too long: answer now, drop the rest
            # of the line as it arrives, and resume at the next newline.
            if not self._discarding:
                frames.append(_too_long(len(buf), self.max_frame))
            self._discarding = True
            buf.clear()
        return frames

    def pending(self) -> int:
        """Bytes buffered towards an incomplete frame."""
        return len(self._buf)


def _too_long(n: int, limit: int) -> FrameError:
    return FrameError("frame_too_large", f"line of at least {n} bytes exceeds max_frame_bytes={limit}")


def frame_msgpack(payload: bytes) -> bytes:
    """Prefix a MessagePack payload with its 4-byte big-endian length."""
    return _LENGTH.pack(len(payload)) + payload


def frame_json(payload: bytes) -> bytes:
    """Terminate a JSON payload with a newline."""
    return payload + b"\n"


def frame(mode: str, payload: bytes) -> bytes:
    """``payload`` framed for a connection in ``mode`` (``MODE_MSGPACK`` or ``MODE_JSON``)."""
    return frame_msgpack(payload) if mode == MODE_MSGPACK else frame_json(payload)


def check_mode(mode: str) -> str:
    """``mode`` itself; ValueError unless it names one of the two framings."""
    if mode not in (MODE_MSGPACK, MODE_JSON):
        raise ValueError(f"framing must be {MODE_MSGPACK!r} or {MODE_JSON!r}, got {mode!r}")
    return mode


class ReplyReader(Generic[T]):
    """Client side of the framing: splits the engine's replies out of the
    byte stream and decodes each with ``decode_msgpack`` or ``decode_json``.

    The engine answers in the connection's framing, with one exception: a
    connection it refuses at accept time (``unavailable``) gets one JSON line
    before the client has spoken. A MessagePack frame always starts with
    ``0x00`` (lengths stay far below 16 MiB), so on a msgpack connection any
    other byte at a frame boundary starts a JSON line. Blank JSON lines are
    skipped; a ``\r`` before the newline is dropped.

    A decoder's exception propagates (the replies decoded before it in the
    same ``feed`` are lost with it); the buffer then still starts with the
    undecodable frame, so the caller drops the connection and calls ``clear``
    before reusing the reader."""

    __slots__ = ("_buf", "_decode_json", "_decode_msgpack", "mode")

    def __init__(self, mode: str, decode_msgpack: Callable[[bytes], T], decode_json: Callable[[bytes], T]) -> None:
        self.mode = check_mode(mode)
        self._decode_msgpack = decode_msgpack
        self._decode_json = decode_json
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[T]:
        """The replies completed by ``data``, in arrival order."""
        buf = self._buf
        buf += data
        out: list[T] = []
        pos = 0
        end = len(buf)
        packed = self.mode == MODE_MSGPACK
        try:
            while pos < end:
                if packed and buf[pos] == 0:
                    if end - pos < 4:
                        break
                    (n,) = _LENGTH.unpack_from(buf, pos)
                    if end - pos - 4 < n:
                        break
                    out.append(self._decode_msgpack(bytes(memoryview(buf)[pos + 4 : pos + 4 + n])))
                    pos += 4 + n
                else:
                    nl = buf.find(b"\n", pos)
                    if nl < 0:
                        break
                    line = bytes(memoryview(buf)[pos:nl]).strip()
                    pos = nl + 1
                    if line:
                        out.append(self._decode_json(line))
        finally:
            del buf[:pos]
        return out

    def clear(self) -> None:
        """Forget a partial reply (a new connection starts clean)."""
        self._buf.clear()

    def pending(self) -> int:
        """Bytes buffered towards an incomplete reply."""
        return len(self._buf)


# ---------------------------------------------------------------- UTF-8 checks
# The engine decides for itself whether a frame holds invalid UTF-8, rather
# than reading it off a decoder's exception: msgspec reported it as
# UnicodeDecodeError up to 0.22 and as DecodeError from 0.23 on, and what a
# client is told must not depend on which release pip resolved.

# MessagePack items that carry a payload of fixed size after the type byte.
_FIXED = {
    0xC0: 0,
    0xC2: 0,
    0xC3: 0,
    0xCA: 4,
    0xCB: 8,
    0xCC: 1,
    0xCD: 2,
    0xCE: 4,
    0xCF: 8,
    0xD0: 1,
    0xD1: 2,
    0xD2: 4,
    0xD3: 8,
    0xD4: 2,
    0xD5: 3,
    0xD6: 5,
    0xD7: 9,
    0xD8: 17,
}
# Items whose payload length follows the type byte: (width of the length, extra bytes).
_SIZED = {
    0xC4: (1, 0),
    0xC5: (2, 0),
    0xC6: (4, 0),  # bin
    0xC7: (1, 1),
    0xC8: (2, 1),
    0xC9: (4, 1),  # ext (the extra byte is its type)
    0xD9: (1, 0),
    0xDA: (2, 0),
    0xDB: (4, 0),
}  # str
_STR8_32 = frozenset((0xD9, 0xDA, 0xDB))
# Containers whose item count follows the type byte: (width of the count, items per entry).
_COUNTED = {0xDC: (2, 1), 0xDD: (4, 1), 0xDE: (2, 2), 0xDF: (4, 2)}


class BadUtf8(NamedTuple):
    """Where a frame first holds invalid UTF-8."""

    offset: int  # from the first byte of the frame (the MessagePack map or the JSON line)
    reason: str  # the codec's word for it, e.g. "invalid start byte"
    spans: tuple[tuple[int, int], ...]  # every MessagePack string that is not UTF-8 (empty for JSON)


def msgpack_bad_utf8(frame: bytes) -> BadUtf8 | None:
    """The MessagePack strings in ``frame`` that are not valid UTF-8, or None.

    A linear scan with a count of items still to read (no recursion, so no
    nesting depth can hurt it); it stops quietly where the frame stops making
    sense, reporting what it found before that point. Called on the error
    path only."""
    spans: list[tuple[int, int]] = []
    first: tuple[int, str] | None = None
    pos, end, pending = 0, len(frame), 1
    while pending and pos < end:
        pending -= 1
        t = frame[pos]
        pos += 1
        if t <= 0x7F or t >= 0xE0:  # fixints
            continue
        if t <= 0x8F:  # fixmap
            pending += 2 * (t & 0x0F)
            continue
        if t <= 0x9F:  # fixarray
            pending += t & 0x0F
            continue
        if t <= 0xBF:  # fixstr
            start, pos = pos, pos + (t & 0x1F)
        elif t in _FIXED:
            pos += _FIXED[t]
            continue
        elif t in _SIZED:
            width, extra = _SIZED[t]
            if pos + width > end:
                break
            size = int.from_bytes(frame[pos : pos + width], "big")
            start = pos + width + extra
            pos = start + size
            if t not in _STR8_32:
                continue
        elif t in _COUNTED:
            width, per = _COUNTED[t]
            if pos + width > end:
                break
            pending += per * int.from_bytes(frame[pos : pos + width], "big")
            pos += width
            continue
        else:  # 0xC1 is never used
            break
        if pos > end:
            break
        try:
            frame[start:pos].decode("utf-8")
        except UnicodeDecodeError as bad:
            spans.append((start, pos))
            if first is None:
                first = (start + bad.start, bad.reason)
    if first is None:
        return None
    return BadUtf8(first[0], first[1], tuple(spans))


def json_bad_utf8(line: bytes) -> BadUtf8 | None:
    """Where a JSON line first fails to be UTF-8, or None when it is UTF-8."""
    try:
        line.decode("utf-8")
    except UnicodeDecodeError as bad:
        return BadUtf8(bad.start, bad.reason, ())
    return None


# ------------------------------------------------------------ duplicate keys
# Decoders keep the last of two equal keys in one object (msgspec, like most);
# the engine refuses such input as ambiguous. These exact scans name the first
# duplicate as a dot path (``args.state.hp``, list items as ``[i]``); the
# ingest calls them only when a cheap count says a frame might hold one.


def key_path(parent: str, key: str) -> str:
    """``parent.key``, or ``key`` at the top level."""
    return f"{parent}.{key}" if parent else key


class _Pairs(list):
    """A JSON object as the list of its (key, value) pairs, duplicates kept."""

    __slots__ = ()


def json_duplicate_key(line: bytes) -> str | None:
    """The path of the first key that appears twice in one JSON object of
    ``line``, or None (also when ``line`` is not JSON)."""
    try:
        value = json.loads(line, object_pairs_hook=_Pairs)
    except (ValueError, RecursionError):
        return None
    stack: list[tuple[object, str]] = [(value, "")]
    while stack:
        node, path = stack.pop()
        if isinstance(node, _Pairs):
            seen: set[str] = set()
            for key, child in node:
                if key in seen:
                    return key_path(path, key)
                seen.add(key)
                stack.append((child, key_path(path, key)))
        elif isinstance(node, list):
            stack.extend((child, f"{path}[{i}]") for i, child in enumerate(node))
    return None


_STR_TYPES = frozenset((0xD9, 0xDA, 0xDB))


def msgpack_duplicate_key(frame: bytes) -> str | None:
    """The path of the first key that appears twice in one MessagePack map of
    ``frame``, or None (also where the frame stops making sense).

    A linear scan like ``msgpack_bad_utf8``, with a stack of open containers
    (no recursion). Two string keys are equal when their UTF-8 bytes are,
    whatever size class encodes them; any other key is compared by its
    encoded bytes."""
    # Open containers: [items left, is_map, path, keys seen, items read, current key]
    stack: list[list] = [[1, False, None, None, 0, None]]  # the root value
    pos, end = 0, len(frame)
    while stack:
        top = stack[-1]
        if top[0] == 0:
            stack.pop()
            continue
        if pos >= end:
            return None
        top[0] -= 1
        index = top[4]
        top[4] += 1
        start = pos
        t = frame[pos]
        pos += 1
        count = -1  # a container's item count; -1 for a scalar
        is_map = False
        text: tuple[int, int] | None = None  # a string's payload span
        if t <= 0x7F or t >= 0xE0:  # fixints
            pass
        elif t <= 0x8F:
            count, is_map = t & 0x0F, True
        elif t <= 0x9F:
            count = t & 0x0F
        elif t <= 0xBF:
            text = (pos, pos + (t & 0x1F))
            pos = text[1]
        elif t in _FIXED:
            pos += _FIXED[t]
        elif t in _SIZED:
            width, extra = _SIZED[t]
            if pos + width > end:
                return None
            size = int.from_bytes(frame[pos : pos + width], "big")
            payload = pos + width + extra
            pos = payload + size
            if t in _STR_TYPES:
                text = (payload, pos)
        elif t in _COUNTED:
            width, per = _COUNTED[t]
            if pos + width > end:
                return None
            count, is_map = int.from_bytes(frame[pos : pos + width], "big"), per == 2
            pos += width
        else:  # 0xC1 is never used
            return None
        if pos > end:
            return None
        parent_path = top[2]
        if top[1] and index % 2 == 0:  # a key
            if count >= 0:
                key: object = object()  # a container as a key equals no other key
                name = "<container key>"
            elif text is not None:
                key = frame[text[0] : text[1]]
                name = frame[text[0] : text[1]].decode("utf-8", "replace")
            else:
                key = (t, frame[start:pos])
                name = f"<non-string key {frame[start:pos].hex()}>"
            if key in top[3]:
                return key_path(parent_path, name)
            top[3].add(key)
            top[5] = name
            path = key_path(parent_path, name)
        elif top[1]:
            path = key_path(parent_path, top[5])
        else:
            path = "" if parent_path is None else f"{parent_path}[{index}]"
        if count > 0:
            stack.append([count * (2 if is_map else 1), is_map, path, set() if is_map else None, 0, None])
    return None
