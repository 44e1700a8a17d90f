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

import struct

MODE_MSGPACK = "msgpack"
MODE_JSON = "json"

_LENGTH = struct.Struct(">I")
_JSON_START = frozenset(b"{ \t\r\n")


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

    __slots__ = ("max_frame", "mode", "_buf", "_discarding", "fatal")

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
                    "big-endian length) nor a JSON line ('{')")
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
            n, = _LENGTH.unpack_from(buf, pos)
            if n > self.max_frame:
                # No way to resynchronise; frames before it are still answered.
                self.fatal = ProtocolError("frame_too_large",
                                           f"frame of {n} bytes exceeds max_frame_bytes={self.max_frame}")
                buf.clear()
                return frames
            if n == 0:
                frames.append(FrameError("malformed", "empty frame (length 0)"))
                pos += 4
                continue
            if end - pos - 4 < n:
                break
            frames.append(bytes(buf[pos + 4:pos + 4 + n]))
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
