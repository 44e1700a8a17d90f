"""Bad input never hurts others: hostile bytes against a real running engine.

Every case sends something wrong on its own connection while two
well-behaved clients (one JSON lines, one MessagePack) are connected at the
same time, then proves that

* the hostile connection got exactly the documented reply (status
  ``rejected``, a ``code``, a human ``reason``, ``client_id``/``seq`` echoed
  when readable and null otherwise), and was closed or kept open as the
  README's table says (kept open = a valid intent on it still commits);
* both well-behaved clients still get ``committed`` afterwards;
* neither the ingest nor the flusher was restarted (same pids);
* ``batchscheduler.intent_log`` holds exactly the intents that were
  answered ``committed``/``dead_lettered`` (nothing hostile was stored).

Most cases share one engine (module scope) to keep the file fast; each test
checks only the rows and pids it could have changed.
"""

from __future__ import annotations

import datetime
import itertools
import json
import math
import os
import random
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import psycopg
import pytest
from conftest import RUN_ENGINE, query, start_engine, wait_for

MAX_FRAME = 65536  # the engine's default max_frame_bytes
REPLY_TIMEOUT = 10.0  # a reply (even one waiting for a commit) comes far sooner
REPLY_FIELDS = {"client_id", "seq", "status", "code", "reason", "duplicate"}
STATUSES = {"committed", "dead_lettered", "rejected", "busy"}
ANY = object()  # "don't care" for an echoed client_id/seq
DROP = object()  # "leave this field out" in intent()

_SEQ = itertools.count(1)  # fresh seqs for every good intent in the module


# ---------------------------------------------------------------- encoding
def frame(payload: bytes) -> bytes:
    """A MessagePack-mode frame: 4-byte big-endian length, then the payload."""
    return struct.pack(">I", len(payload)) + payload


def pack(obj) -> bytes:
    return frame(msgspec.msgpack.encode(obj))


def line(obj) -> bytes:
    # json.dumps escapes NUL as \u0000, which is what we want to send.
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def encode(obj, framing: str) -> bytes:
    return pack(obj) if framing == "msgpack" else line(obj)


HOSTILE = {"client_id": "hostile", "seq": 7, "entity": "orc", "kind": "spawn", "args": {"state": {}}}


def intent(**changes) -> dict:
    """The hostile template with some fields changed (or DROPped)."""
    obj = dict(HOSTILE)
    for key, value in changes.items():
        if value is DROP:
            obj.pop(key)
        else:
            obj[key] = value
    return obj


def raw_intent_json(args: bytes, client_id: bytes = b'"hostile"') -> bytes:
    """A JSON intent line with hand-written bytes for ``args``."""
    return b'{"client_id":' + client_id + b',"seq":7,"entity":"orc","kind":"spawn","args":' + args + b"}\n"


def raw_intent_msgpack(args: bytes, client_id: bytes = b"\xa7hostile") -> bytes:
    """A MessagePack intent frame with hand-written bytes for ``args``."""
    return frame(b"\x85\xa9client_id" + client_id + b"\xa3seq\x07\xa6entity\xa3orc\xa4kind\xa5spawn\xa4args" + args)


# ----------------------------------------------------------------- sockets
class Peer:
    """One client connection with a reply reader that never sleeps: every
    read is bounded by a socket timeout."""

    def __init__(self, path: Path, framing: str | None = None, timeout: float = REPLY_TIMEOUT) -> None:
        self.framing = framing  # None: fixed by the first byte sent, as the engine does
        self.buf = bytearray()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        if self.framing is None and data:
            self.framing = "msgpack" if data[0] == 0 else "json"
        self.sock.sendall(data)

    def _fill(self) -> None:
        try:
            chunk = self.sock.recv(1 << 16)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            raise EOFError("connection closed by the engine before a (complete) reply")
        self.buf += chunk

    def _take(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def reply(self) -> dict:
        """Exactly one reply, in the connection's framing."""
        try:
            if self.framing == "msgpack":
                (n,) = struct.unpack(">I", self._take(4))
                return msgspec.msgpack.decode(self._take(n))
            while b"\n" not in self.buf:
                self._fill()
            nl = self.buf.index(b"\n")
            text = bytes(self.buf[:nl])
            del self.buf[: nl + 1]
            return json.loads(text)
        except EOFError as exc:
            raise AssertionError(f"no reply: {exc}") from None
        except TimeoutError:
            raise AssertionError(f"no reply within {self.sock.gettimeout()} s") from None

    def submit(self, obj: dict) -> dict:
        self.send(encode(obj, self.framing or "json"))
        return self.reply()

    def ping(self) -> dict:
        return self.submit({"op": "ping"})

    def expect_closed(self, timeout: float = 5.0) -> None:
        """The engine closed this connection, with nothing (more) sent."""
        self.sock.settimeout(timeout)
        try:
            while True:
                self._fill()
        except EOFError:
            pass
        except TimeoutError:
            raise AssertionError(f"connection still open after {timeout} s") from None
        assert not self.buf, f"unexpected bytes before close: {bytes(self.buf[:200])!r}"

    def silent_for(self, seconds: float) -> bool:
        """True when no byte arrives within ``seconds`` (a bounded read)."""
        old = self.sock.gettimeout()
        self.sock.settimeout(seconds)
        try:
            self._fill()
            return False
        except TimeoutError:
            return True
        finally:
            self.sock.settimeout(old)


def stored_keys(eng, conn: psycopg.Connection | None = None) -> set[tuple[str, int]]:
    sql = "SELECT client_id, seq FROM batchscheduler.intent_log"
    return set(conn.execute(sql).fetchall() if conn is not None else query(eng.dsn, sql))


def worker_pids(eng) -> dict[str, int]:
    return {role: proc.pid for role, proc in eng.workers().items()}


def _same(a, b) -> bool:
    return a is ANY or b is ANY or (a == b and type(a) is type(b))


def assert_well_formed(reply: dict) -> None:
    """Any reply to an intent frame has the README's fields and types."""
    assert set(reply) <= REPLY_FIELDS and {"client_id", "seq", "status"} <= set(reply), reply
    assert reply["client_id"] is None or isinstance(reply["client_id"], str), reply
    assert reply["seq"] is None or (isinstance(reply["seq"], int) and not isinstance(reply["seq"], bool)), reply
    assert reply["status"] in STATUSES, reply
    if reply["status"] == "committed":
        assert "code" not in reply and "reason" not in reply, reply
    else:
        assert isinstance(reply.get("code"), str) and reply["code"], reply
        assert isinstance(reply.get("reason"), str) and " " in reply["reason"].strip(), reply  # a sentence
    assert reply.get("duplicate", True) is True, reply


def assert_rejection(reply: dict, code, client_id=None, seq=None, reason: str | None = None) -> None:
    """``reason``, when given, is how the reply's reason must begin."""
    assert_well_formed(reply)
    codes = code if isinstance(code, (set, frozenset, tuple)) else {code}
    assert reply["status"] == "rejected", reply
    assert reply["code"] in codes, reply
    if reason is not None:
        assert reply["reason"].startswith(reason), reply
    assert "duplicate" not in reply, reply
    assert _same(reply["client_id"], client_id), f"client_id {reply['client_id']!r}, expected {client_id!r}"
    assert _same(reply["seq"], seq), f"seq {reply['seq']!r}, expected {seq!r}"


# ----------------------------------------------------------------- harness
class Harness:
    """One test's view of a running engine: good clients, pids and stored
    rows as they were when the test began."""

    def __init__(self, eng, db: psycopg.Connection | None = None) -> None:
        self.engine = eng
        self.db = db  # one long-lived connection: no PostgreSQL backend comes and goes per check
        self.pids = worker_pids(eng)
        assert set(self.pids) == eng.roles(), self.pids
        self.baseline = self.stored()
        self.answered: set[tuple[str, int]] = set()  # stored outcomes replied during this test
        self.peers: list[Peer] = []

    def peer(self, framing: str | None = None, timeout: float = REPLY_TIMEOUT) -> Peer:
        p = Peer(self.engine.socket, framing, timeout)
        self.peers.append(p)
        return p

    def bystanders(self) -> tuple[Peer, Peer]:
        """Two well-behaved clients, connected (and answered) before the hostile input."""
        pair = self.peer("json"), self.peer("msgpack")
        for p in pair:
            assert p.ping() == {"op": "ping", "status": "ok"}
        return pair

    def stored(self) -> set[tuple[str, int]]:
        return stored_keys(self.engine, self.db)

    def sql(self, text: str, params=None) -> list[tuple]:
        if self.db is None:
            return query(self.engine.dsn, text, params)
        return self.db.execute(text, params).fetchall()

    def note(self, reply: dict) -> None:
        if reply.get("status") in ("committed", "dead_lettered") and reply.get("client_id") is not None:
            self.answered.add((reply["client_id"], reply["seq"]))

    def good_intent(self, client: str = "good") -> dict:
        seq = next(_SEQ)
        return {
            "client_id": client,
            "seq": seq,
            "entity": f"{client}-{seq}",
            "kind": "spawn",
            "args": {"state": {"hp": 10}},
        }

    def submit_good(self, p: Peer, client: str = "good") -> dict:
        obj = self.good_intent(client)
        reply = p.submit(obj)
        self.note(reply)
        assert reply == {"client_id": obj["client_id"], "seq": obj["seq"], "status": "committed"}, reply
        return reply

    def assert_unharmed(self, *bystanders: Peer) -> None:
        """The others carry on: bystanders commit, no worker restarted, and
        the intent log gained exactly the intents answered as stored."""
        for p in bystanders:
            self.submit_good(p)
        assert worker_pids(self.engine) == self.pids, "a worker was restarted"
        assert self.stored() == self.baseline | self.answered

    def close(self) -> None:
        for p in self.peers:
            p.close()


@pytest.fixture(scope="module")
def shared_engine(pg_server):
    """One real engine (own database) for the cases that need no special options."""
    name = "t_" + uuid.uuid4().hex[:12]
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    parts = psycopg.conninfo.conninfo_to_dict(pg_server)
    parts["dbname"] = name
    tmp = Path(tempfile.mkdtemp(prefix="bs-"))
    eng = start_engine(tmp, psycopg.conninfo.make_conninfo(**parts))
    try:
        yield eng
        code = eng.stop()
        assert code == 0, f"engine exited {code}:\n{eng.log()[-3000:]}"
        assert not eng.socket.exists(), "socket file left behind"
    finally:
        if eng.proc.poll() is None:  # only after a failed assertion above
            eng.stop()
        with psycopg.connect(pg_server, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def shared_db(shared_engine):
    with psycopg.connect(shared_engine.dsn, autocommit=True) as conn:
        yield conn


@pytest.fixture
def h(shared_engine, shared_db):
    harness = Harness(shared_engine, shared_db)
    yield harness
    harness.close()


def check_contained(
    h: Harness, data: bytes, code, stays_open: bool, client_id=None, seq=None, reason: str | None = None
) -> None:
    """The core property: ``data`` on its own connection gets one documented
    rejection, the connection is closed or still usable as documented, and
    nobody else notices."""
    bystanders = h.bystanders()
    bad = h.peer()
    bad.send(data)
    assert_rejection(bad.reply(), code, client_id, seq, reason)
    if stays_open:
        h.submit_good(bad, client="after-bad")  # same connection, still serving
    else:
        bad.expect_closed()
    h.assert_unharmed(*bystanders)


FRAMINGS = pytest.mark.parametrize("framing", ["msgpack", "json"])


# ==================================================================== framing
@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"GET / HTTP/1.1\r\nHost: engine\r\n\r\n", id="http_request"),
        pytest.param(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", id="tls_client_hello"),
        pytest.param(b"\x01\x00\x00\x00\x05hello", id="msgpack_length_with_nonzero_first_byte"),
        pytest.param(b"\xff\xfe\xfd", id="high_bytes"),
        pytest.param(b'[{"client_id":"hostile","seq":7}]\n', id="json_array_as_first_line"),
        pytest.param(b"7\n", id="json_number_as_first_line"),
        pytest.param(b'"intent"\n', id="json_string_as_first_line"),
        pytest.param(b"\x7f", id="del_byte"),
    ],
)
def test_garbage_first_byte_gets_one_bad_framing_json_line_then_only_that_connection_closes(h, data):
    check_contained(h, data, "bad_framing", stays_open=False)


# ================================================================== msgpack
@pytest.mark.parametrize(
    "data",
    [
        pytest.param(struct.pack(">I", MAX_FRAME + 1) + b"\x80" * 16, id="one_byte_over_limit"),
        pytest.param(b"\x00\xff\xff\xff", id="16MiB_length"),
    ],
)
def test_oversized_msgpack_frame_gets_frame_too_large_then_only_that_connection_closes(h, data):
    check_contained(h, data, "frame_too_large", stays_open=False)


def test_frame_before_an_oversized_length_in_the_same_write_is_still_answered(h):
    bystanders = h.bystanders()
    bad = h.peer()
    bad.send(pack(intent(kind="fly")) + frame(b"\xc1") + struct.pack(">I", MAX_FRAME + 1) + pack(HOSTILE))
    assert_rejection(bad.reply(), "unknown_kind", "hostile", 7)
    assert_rejection(bad.reply(), "malformed")
    assert_rejection(bad.reply(), "frame_too_large")
    bad.expect_closed()  # and nothing after the oversized length was read
    h.assert_unharmed(*bystanders)


def test_intent_before_an_oversized_length_in_the_same_write_is_answered_as_stored_before_the_close(h):
    bystanders = h.bystanders()
    bad = h.peer()
    good = h.good_intent("before-fatal")
    bad.send(pack(good) + struct.pack(">I", MAX_FRAME + 1))
    replies, lost = [], None
    try:
        for _ in range(2):  # replies may come in any order (README): match by key
            replies.append(bad.reply())
        bad.expect_closed()
    except AssertionError as exc:
        lost = str(exc)
    for r in replies:
        h.note(r)
    assert lost is None, f"{lost}; replies before that: {replies}"
    mine = [r for r in replies if r.get("client_id") == "before-fatal"]
    assert mine == [{"client_id": "before-fatal", "seq": good["seq"], "status": "committed"}], replies
    assert_rejection(next(r for r in replies if r is not mine[0]), "frame_too_large")
    h.assert_unharmed(*bystanders)  # also: nothing stored without a reply


def test_zero_length_msgpack_frame_is_malformed_and_connection_stays_open(h):
    check_contained(h, b"\x00\x00\x00\x00", "malformed", stays_open=True)


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"\xc1", id="reserved_opcode"),
        pytest.param(b"\x85\xa9client_id", id="truncated_map"),
        pytest.param(msgspec.msgpack.encode(HOSTILE) + b"\xc0", id="trailing_bytes"),
        pytest.param(b"\xdf\xff\xff\xff\xff", id="map32_claiming_4G_entries"),
        pytest.param(b"\xdb\xff\xff\xff\xff", id="str32_claiming_4GiB"),
        pytest.param(b"\xd6\xff\x00", id="truncated_timestamp_ext"),
    ],
)
def test_bytes_that_are_not_msgpack_are_malformed_and_connection_stays_open(h, payload):
    check_contained(h, frame(payload), "malformed", stays_open=True)


@pytest.mark.parametrize(
    "value",
    [
        pytest.param([1, 2], id="array"),
        pytest.param([HOSTILE], id="array_of_intent"),
        pytest.param(5, id="int"),
        pytest.param("intent", id="str"),
        pytest.param(None, id="nil"),
        pytest.param(True, id="bool"),
        pytest.param(b"\x00", id="bin"),
        pytest.param(msgspec.msgpack.Ext(5, b"x"), id="ext"),
        pytest.param({1: "x"}, id="map_with_int_key"),
    ],
)
def test_msgpack_value_that_is_not_a_string_keyed_map_is_invalid(h, value):
    check_contained(h, pack(value), "invalid", stays_open=True)


@pytest.mark.parametrize(
    "changes, client_id, seq",
    [
        pytest.param({"client_id": b"hostile"}, None, 7, id="client_id_bin"),
        pytest.param({"seq": 7.0}, "hostile", None, id="seq_float64"),
        pytest.param({"seq": msgspec.msgpack.Ext(1, b"\x07")}, "hostile", None, id="seq_ext"),
        pytest.param({"args": {1: 2}}, "hostile", 7, id="args_int_key"),
        pytest.param({"kind": b"spawn"}, "hostile", 7, id="kind_bin"),
    ],
)
def test_msgpack_only_wrong_types_are_invalid(h, changes, client_id, seq):
    check_contained(h, pack(intent(**changes)), "invalid", True, client_id, seq)


@pytest.mark.parametrize(
    "data, client_id, seq",
    [
        # client_id itself is unreadable, so nothing may be echoed reliably
        pytest.param(
            frame(b"\x84\xa9client_id\xa2\xff\xfe\xa3seq\x07\xa6entity\xa3orc\xa4kind\xa5spawn"),
            None,
            ANY,
            id="client_id",
        ),
        pytest.param(
            raw_intent_msgpack(b"\x81\xa5state\x81\xa1t\xa3\xed\xa0\x80"), "hostile", 7, id="args_value_surrogate"
        ),
        pytest.param(raw_intent_msgpack(b"\x81\xa5state\x81\xa2\xc0\xae\x01"), "hostile", 7, id="args_key_overlong"),
    ],
)
def test_msgpack_string_that_is_not_utf8_is_malformed_and_connection_stays_open(h, data, client_id, seq):
    check_contained(h, data, "malformed", True, client_id, seq, reason="a string is not valid UTF-8")


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(b"\x81\xa5state\x81\xa1x\xd4\x05\x01", id="ext_value"),
        pytest.param(b"\x81\xa5state\x81\xc0\x01", id="nil_key"),
        pytest.param(b"\x81\xa5state\x81\x92\x01\x02\x01", id="array_key"),
        pytest.param(b"\x81\xa5state\x81\xc3\x01", id="bool_key"),
    ],
)
def test_msgpack_args_json_cannot_hold_are_invalid_and_connection_stays_open(h, args):
    check_contained(h, raw_intent_msgpack(args), "invalid", True, "hostile", 7, reason="args cannot be stored as JSON")


def test_msgpack_args_with_a_map_as_key_are_malformed_by_the_decoder_and_connection_stays_open(h):
    check_contained(h, raw_intent_msgpack(b"\x81\xa5state\x81\x81\xa1k\x01\x01"), "malformed", True, ANY, ANY)


def _f64(x: float) -> bytes:
    return b"\xcb" + struct.pack(">d", x)


def _f32(x: float) -> bytes:
    return b"\xca" + struct.pack(">f", x)


def _state_t(value: bytes) -> bytes:
    """MessagePack args ``{"state": {"t": <value>}}`` around hand-written bytes."""
    return b"\x81\xa5state\x81\xa1t" + value


NOT_JSON = "args cannot be stored as JSON: "
TIMESTAMP = "a MessagePack timestamp (extension type -1)"
BIN = "binary data (MessagePack bin)"


@pytest.mark.parametrize(
    "args, reason",
    [
        pytest.param(_state_t(_f64(math.nan)), "args.state.t is NaN", id="nan_float64"),
        pytest.param(
            _state_t(b"\xcb\xff\xf8\x00\x00\x00\x00\x00\x01"), "args.state.t is NaN", id="negative_nan_payload"
        ),
        pytest.param(_state_t(_f64(math.inf)), "args.state.t is Infinity", id="inf_float64"),
        pytest.param(_state_t(_f64(-math.inf)), "args.state.t is -Infinity", id="minus_inf_float64"),
        pytest.param(_state_t(_f32(math.nan)), "args.state.t is NaN", id="nan_float32"),
        pytest.param(_state_t(_f32(math.inf)), "args.state.t is Infinity", id="inf_float32"),
        pytest.param(_state_t(_f32(-math.inf)), "args.state.t is -Infinity", id="minus_inf_float32"),
        pytest.param(b"\x82\xa1a\x01\xa1t" + _f64(math.nan), "args.t is NaN", id="nan_directly_in_args"),
        pytest.param(b"\x81\xa1t\x92\x01" + _f64(math.inf), "args.t[1] is Infinity", id="inf_in_a_list_in_args"),
        pytest.param(
            _state_t(b"\x92\x01\x81\xa1x\x91" + _f64(-math.inf)), "args.state.t[1].x[0] is -Infinity", id="inf_deep"
        ),
        pytest.param(_state_t(b"\xc4\x02ab"), f"args.state.t is {BIN}", id="bin8"),
        pytest.param(_state_t(b"\xc5\x00\x01a"), f"args.state.t is {BIN}", id="bin16"),
        pytest.param(_state_t(b"\xc6\x00\x00\x00\x00"), f"args.state.t is {BIN}", id="bin32_empty"),
        pytest.param(b"\x81\xa1t\xc4\x01a", f"args.t is {BIN}", id="bin_directly_in_args"),
        pytest.param(_state_t(b"\xd6\xff\x00\x00\x00\x01"), f"args.state.t is {TIMESTAMP}", id="timestamp32"),
        pytest.param(
            _state_t(b"\xd7\xff\x00\x00\x00\x04\x00\x00\x00\x01"), f"args.state.t is {TIMESTAMP}", id="timestamp64"
        ),
        pytest.param(
            _state_t(b"\xc7\x0c\xff\x00\x00\x00\x01" + b"\x00" * 7 + b"\x01"),
            f"args.state.t is {TIMESTAMP}",
            id="timestamp96",
        ),
        pytest.param(b"\x81\xa1t\xd6\xff\x00\x00\x00\x01", f"args.t is {TIMESTAMP}", id="timestamp_directly_in_args"),
        pytest.param(_state_t(b"\xd4\x05\x01"), "args.state.t is a MessagePack extension (type 5)", id="fixext1"),
        pytest.param(_state_t(b"\xd5\x05\x01\x02"), "args.state.t is a MessagePack extension (type 5)", id="fixext2"),
        pytest.param(
            _state_t(b"\xd6\x05" + b"\x00" * 4), "args.state.t is a MessagePack extension (type 5)", id="fixext4"
        ),
        pytest.param(
            _state_t(b"\xd7\x05" + b"\x00" * 8), "args.state.t is a MessagePack extension (type 5)", id="fixext8"
        ),
        pytest.param(
            _state_t(b"\xd8\x05" + b"\x00" * 16), "args.state.t is a MessagePack extension (type 5)", id="fixext16"
        ),
        pytest.param(_state_t(b"\xc7\x03\x05abc"), "args.state.t is a MessagePack extension (type 5)", id="ext8"),
        pytest.param(_state_t(b"\xc8\x00\x01\x05x"), "args.state.t is a MessagePack extension (type 5)", id="ext16"),
        pytest.param(
            _state_t(b"\xc9\x00\x00\x00\x01\x05x"), "args.state.t is a MessagePack extension (type 5)", id="ext32"
        ),
        pytest.param(
            _state_t(b"\xd4\x80\x01"), "args.state.t is a MessagePack extension (type -128)", id="ext_negative"
        ),
        pytest.param(b"\x81\xa5state\x81\x01\x02", "a key of args.state is the integer 1, not a string", id="int_key"),
        pytest.param(
            b"\x81\xa5state\x81\xff\x02", "a key of args.state is the integer -1, not a string", id="neg_int_key"
        ),
        pytest.param(
            b"\x81\xa5state\x81" + _f64(1.5) + b"\x02",
            "a key of args.state is the float 1.5, not a string",
            id="float_key",
        ),
        pytest.param(
            b"\x81\xa5state\x82\x01\xa1a\xa11\xa1b",
            "a key of args.state is the integer 1, not a string",
            id="int_key_and_its_text",
        ),
    ],
)
def test_msgpack_value_json_cannot_hold_is_invalid_naming_the_place_and_nothing_is_stored(h, args, reason):
    """NaN, infinities, binary, timestamps, extensions and non-string keys
    are refused, never converted (msgspec would write null, base64, ISO text
    and "1"); the reason names where they are."""
    check_contained(h, raw_intent_msgpack(args), "invalid", True, "hostile", 7, reason=NOT_JSON + reason)


@pytest.mark.parametrize(
    "args, stored",
    [
        pytest.param(_state_t(_f64(1.5)), {"t": 1.5}, id="float64"),
        pytest.param(_state_t(_f32(0.25)), {"t": 0.25}, id="float32"),
        pytest.param(
            _state_t(b"\xcf\xcb\x7f\xf8\x00\x00\x00\x00\x00"), {"t": 0xCB7FF80000000000}, id="int_with_nan_bytes"
        ),
        pytest.param(_state_t(b"\xc0"), {"t": None}, id="nil"),
        pytest.param(
            _state_t(msgspec.msgpack.encode("Ćma źdźbło")), {"t": "Ćma źdźbło"}, id="text_with_bin_type_bytes"
        ),
        pytest.param(_state_t(msgspec.msgpack.encode("ؠ ص")), {"t": "ؠ ص"}, id="text_with_ext_type_bytes"),
        pytest.param(_state_t(msgspec.msgpack.encode("null")), {"t": "null"}, id="text_null"),
        pytest.param(b"\x81\xa5state\xde\x00\x01\xd9\x01t\xcd\x00\x07", {"t": 7}, id="non_minimal_sizes"),
    ],
)
def test_msgpack_values_json_holds_commit_and_are_stored_unchanged(h, args, stored):
    bystanders = h.bystanders()
    p = h.peer("msgpack")
    seq = next(_SEQ)
    data = frame(
        b"\x85\xa9client_id\xa4kept\xa3seq"
        + msgspec.msgpack.encode(seq)
        + b"\xa6entity"
        + msgspec.msgpack.encode(f"kept-{seq}")
        + b"\xa4kind\xa5spawn\xa4args"
        + args
    )
    p.send(data)
    reply = p.reply()
    h.note(reply)
    assert reply == {"client_id": "kept", "seq": seq, "status": "committed"}, reply
    rows = h.sql("SELECT args FROM batchscheduler.intent_log WHERE client_id = 'kept' AND seq = %s", (seq,))
    assert rows == [({"state": stored},)], rows
    h.assert_unharmed(*bystanders)


@pytest.mark.parametrize("number", ["1e999", "-1e999", "1E400", "123456789e999999"])
def test_json_number_beyond_a_double_is_invalid_naming_the_place(h, number):
    check_contained(
        h,
        raw_intent_json(b'{"state":{"t":[1,' + number.encode() + b"]}}"),
        "invalid",
        True,
        "hostile",
        7,
        reason=f"{NOT_JSON}args.state.t[1] is the number {number}, beyond the range of a double",
    )


# ========================================================== duplicate keys
DUPLICATE_JSON = [
    pytest.param(raw_intent_json(b'{"state":{"hp":1,"hp":2}}'), "args.state.hp", id="json_in_state"),
    pytest.param(raw_intent_json(b'{"state":{},"state":{}}'), "args.state", id="json_directly_in_args"),
    pytest.param(raw_intent_json(b'{"state":{"inv":[1,{"a":1,"a":1}]}}'), "args.state.inv[1].a", id="json_in_a_list"),
    pytest.param(raw_intent_json(b'{"state":{"hp":1,"h\\u0070":2}}'), "args.state.hp", id="json_escaped_spelling"),
    pytest.param(raw_intent_json(b'{"state":{"a":1,"a":"\\u003a"}}'), "args.state.a", id="json_escaped_colon"),
    pytest.param(raw_intent_json(b'{"state":{"a:b":1, "a:b" :2}}'), "args.state.a:b", id="json_colons_and_spaces"),
    pytest.param(
        b'{"client_id":"hostile","seq":7,"seq":7,"entity":"orc","kind":"spawn","args":{"state":{}}}\n',
        "seq",
        id="json_seq",
    ),
    pytest.param(
        b'{"client_id":"hostile","seq":7,"entity":"orc","kind":"spawn","args":{"state":{}},"args":{"state":{}}}\n',
        "args",
        id="json_args",
    ),
    pytest.param(
        b'{"client_id":"hostile","seq":7,"entity":"orc","kind":"spawn","kind":"spawn"}\n',
        "kind",
        id="json_kind_no_args",
    ),
    pytest.param(
        b'{"client_id":"hostile","seq":7,"entity":"args","entity":"orc","kind":"spawn"}\n',
        "entity",
        id="json_entity_no_args",
    ),
]
DUPLICATE_MSGPACK = [
    pytest.param(raw_intent_msgpack(b"\x81\xa5state\x82\xa2hp\x01\xa2hp\x02"), "args.state.hp", id="msgpack_in_state"),
    pytest.param(
        raw_intent_msgpack(b"\x81\xa5state\x82\xa2hp\x01\xd9\x02hp\x02"), "args.state.hp", id="msgpack_str8_spelling"
    ),
    pytest.param(
        raw_intent_msgpack(b"\x81\xa5state\x83\xa1f\xca\x3f\x80\x00\x00\xa1y\xa1z\xa1y\xa1z"),
        "args.state.y",
        id="msgpack_hidden_by_a_float32",
    ),
    pytest.param(raw_intent_msgpack(b"\x82\xa5state\x80\xa5state\x80"), "args.state", id="msgpack_directly_in_args"),
    pytest.param(
        frame(b"\x85\xa9client_id\xa7hostile\xa3seq\x07\xa3seq\xcc\x07\xa6entity\xa3orc\xa4kind\xa5spawn"),
        "seq",
        id="msgpack_seq_no_args_hidden_by_a_wider_int",
    ),
    pytest.param(
        frame(
            b"\x86\xa9client_id\xa7hostile\xa3seq\x07\xa6entity\xa3orc\xa4kind\xa5spawn"
            b"\xa4args\x81\xa5state\x80\xa4args\x81\xa5state\x80"
        ),
        "args",
        id="msgpack_args",
    ),
]


@pytest.mark.parametrize("data, path", DUPLICATE_JSON + DUPLICATE_MSGPACK)
def test_duplicate_key_anywhere_is_invalid_naming_it_and_nothing_is_stored(h, data, path):
    """Decoders keep one of two equal keys; the engine refuses the ambiguity."""
    check_contained(h, data, "invalid", True, "hostile", 7, reason=f"duplicate key {path}: ")


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b'{"client_id":"c","seq":%d,"entity":"e%d","kind":"spawn"}\n', id="json_args_left_out"),
        pytest.param(b'{"client_id":"c","seq":%d,"entity":"e%d","kind":"spawn","args":{}}\n', id="json_args_empty"),
        pytest.param(
            b'{ "client_id" : "c:",\t"seq" : %d , "entity" : "e%d", "kind" : "spawn", "args" : { } }\n',
            id="json_spaced",
        ),
        pytest.param(
            b'{"args":{"state":{"a:b":"c:d","p":"\\u003a"}},"kind":"spawn","entity":"e%d","seq":%d,"client_id":"c"}\n',
            id="json_reordered_with_colons",
        ),
    ],
)
def test_json_lines_without_duplicates_commit_however_they_are_spelled(h, data):
    bystanders = h.bystanders()
    p = h.peer("json")
    seq = next(_SEQ)
    p.send(data % (seq, seq))
    reply = p.reply()
    h.note(reply)
    assert reply["status"] == "committed", reply
    h.assert_unharmed(*bystanders)


# ================================================ field rules (both framings)
@FRAMINGS
@pytest.mark.parametrize(
    "changes, client_id, seq",
    [
        pytest.param({"client_id": 5}, None, 7, id="client_id_int"),
        pytest.param({"client_id": None}, None, 7, id="client_id_null"),
        pytest.param({"client_id": ["hostile"]}, None, 7, id="client_id_array"),
        pytest.param({"client_id": True}, None, 7, id="client_id_bool"),
        pytest.param({"seq": "7"}, "hostile", None, id="seq_string"),
        pytest.param({"seq": 7.5}, "hostile", None, id="seq_float"),
        pytest.param({"seq": True}, "hostile", None, id="seq_bool"),
        pytest.param({"seq": None}, "hostile", None, id="seq_null"),
        pytest.param({"seq": [7]}, "hostile", None, id="seq_array"),
        pytest.param({"entity": 5}, "hostile", 7, id="entity_int"),
        pytest.param({"entity": None}, "hostile", 7, id="entity_null"),
        pytest.param({"entity": {"id": "orc"}}, "hostile", 7, id="entity_map"),
        pytest.param({"kind": 1}, "hostile", 7, id="kind_int"),
        pytest.param({"kind": ["spawn"]}, "hostile", 7, id="kind_array"),
        pytest.param({"args": []}, "hostile", 7, id="args_array"),
        pytest.param({"args": "state"}, "hostile", 7, id="args_string"),
        pytest.param({"args": 3}, "hostile", 7, id="args_int"),
        pytest.param({"args": None}, "hostile", 7, id="args_null"),
    ],
)
def test_field_of_wrong_type_is_invalid_and_connection_stays_open(h, framing, changes, client_id, seq):
    check_contained(h, encode(intent(**changes), framing), "invalid", True, client_id, seq)


@FRAMINGS
@pytest.mark.parametrize(
    "obj, client_id, seq",
    [
        pytest.param(intent(client_id=DROP), None, 7, id="no_client_id"),
        pytest.param(intent(seq=DROP), "hostile", None, id="no_seq"),
        pytest.param(intent(entity=DROP), "hostile", 7, id="no_entity"),
        pytest.param(intent(kind=DROP), "hostile", 7, id="no_kind"),
        pytest.param({}, None, None, id="empty_object"),
    ],
)
def test_missing_field_is_invalid_and_connection_stays_open(h, framing, obj, client_id, seq):
    check_contained(h, encode(obj, framing), "invalid", True, client_id, seq)


@FRAMINGS
@pytest.mark.parametrize(
    "obj, client_id, seq",
    [
        pytest.param(intent(extra=1), "hostile", 7, id="extra_field"),
        pytest.param(intent(op="health"), "hostile", 7, id="intent_with_op"),
        pytest.param({"op": "health", "verbose": True}, None, None, id="control_op_with_extra_field"),
        pytest.param({"op": 5}, None, None, id="control_op_not_a_string"),
    ],
)
def test_unknown_extra_field_is_invalid_and_connection_stays_open(h, framing, obj, client_id, seq):
    check_contained(h, encode(obj, framing), "invalid", True, client_id, seq)


@FRAMINGS
@pytest.mark.parametrize("op", ["shutdown", "stats", "HEALTH", ""])
def test_unknown_control_op_is_unknown_op_listing_the_known_ones_and_connection_stays_open(h, framing, op):
    check_contained(
        h,
        encode({"op": op}, framing),
        "unknown_op",
        True,
        reason=f"unknown op {op!r}; known ops: health, metrics, ping",
    )


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b'{"op":"ping","op":"ping"}\n', id="json_same_op_twice"),
        pytest.param(b'{"op":"stats","op":"ping"}\n', id="json_known_op_last"),
        pytest.param(b'{"op":"ping","op":"stats"}\n', id="json_unknown_op_last"),
        pytest.param(frame(b"\x82\xa2op\xa4ping\xa2op\xa4ping"), id="msgpack_same_op_twice"),
        pytest.param(frame(b"\x82\xa2op\xa5stats\xa2op\xa4ping"), id="msgpack_known_op_last"),
    ],
)
def test_control_request_with_op_twice_is_invalid_naming_the_key(h, data):
    check_contained(h, data, "invalid", True, reason="duplicate key op:")


@FRAMINGS
@pytest.mark.parametrize(
    "changes, client_id, seq",
    [
        pytest.param({"seq": -1}, "hostile", -1, id="seq_negative"),
        pytest.param({"seq": -(2**63)}, "hostile", -(2**63), id="seq_int64_min"),
        pytest.param({"seq": 2**63}, "hostile", 2**63, id="seq_2_pow_63"),
        pytest.param({"seq": 2**64 - 1}, "hostile", 2**64 - 1, id="seq_uint64_max"),
        pytest.param({"client_id": ""}, "", 7, id="client_id_empty"),
        pytest.param({"client_id": "c" * 65}, "c" * 65, 7, id="client_id_65_chars"),
        pytest.param({"client_id": "c" * 10_000}, "c" * 10_000, 7, id="client_id_10k_chars"),
        pytest.param({"entity": ""}, "hostile", 7, id="entity_empty"),
        pytest.param({"entity": "e" * 129}, "hostile", 7, id="entity_129_chars"),
        pytest.param({"kind": ""}, "hostile", 7, id="kind_empty"),
        pytest.param({"kind": "k" * 33}, "hostile", 7, id="kind_33_chars"),
    ],
)
def test_out_of_range_value_is_invalid_and_connection_stays_open(h, framing, changes, client_id, seq):
    check_contained(h, encode(intent(**changes), framing), "invalid", True, client_id, seq)


@FRAMINGS
@pytest.mark.parametrize(
    "changes, code, client_id",
    [
        pytest.param({"client_id": "host\x00ile"}, "invalid", "host\x00ile", id="client_id"),
        pytest.param({"client_id": "\x00"}, "invalid", "\x00", id="client_id_only_nul"),
        pytest.param({"entity": "o\x00rc"}, "invalid", "hostile", id="entity"),
        pytest.param({"args": {"state": {"name": "a\x00b"}}}, "invalid", "hostile", id="args_value"),
        pytest.param({"args": {"state": {"na\x00me": 1}}}, "invalid", "hostile", id="args_key"),
        pytest.param({"args": {"\x00": {}}}, "invalid", "hostile", id="args_top_key"),
        pytest.param({"args": {"state": {"inv": ["ok", ["\x00"]]}}}, "invalid", "hostile", id="args_nested_list"),
        pytest.param({"kind": "spawn\x00"}, "unknown_kind", "hostile", id="kind"),
    ],
)
def test_nul_inside_a_string_is_rejected_and_connection_stays_open(h, framing, changes, code, client_id):
    check_contained(h, encode(intent(**changes), framing), code, True, client_id, 7)


@FRAMINGS
@pytest.mark.parametrize("kind", ["fly", "SPAWN", "spawn ", "__init__", "k" * 32])
def test_unknown_kind_is_rejected_naming_the_intent_and_connection_stays_open(h, framing, kind):
    check_contained(h, encode(intent(kind=kind), framing), "unknown_kind", True, "hostile", 7)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(raw_intent_msgpack(b"\x81\xa1a" + b"\x91" * 9_999 + b"\x90"), id="msgpack_10k_arrays"),
        pytest.param(raw_intent_msgpack(b"\x81\xa1a" * 10_000 + b"\x80"), id="msgpack_10k_maps"),
        pytest.param(raw_intent_json(b'{"a":' + b"[" * 10_000 + b"]" * 10_000 + b"}"), id="json_10k_arrays"),
        pytest.param(raw_intent_json(b'{"a":' * 10_000 + b"1" + b"}" * 10_000), id="json_10k_objects"),
        pytest.param(raw_intent_msgpack(b"\x81\xa1a" + b"\x91" * 60_000 + b"\x90"), id="msgpack_60k_arrays"),
    ],
)
def test_deeply_nested_args_are_malformed_not_a_crash_of_the_ingest(h, data):
    assert len(data) <= MAX_FRAME + 5
    check_contained(h, data, "malformed", stays_open=True)


MAX_ARGS_DEPTH = 32  # args deeper than this are rejected at ingest (engine/intent.py)
DEPTH_REASON = f"args nested deeper than {MAX_ARGS_DEPTH} levels"


def nested_args(depth: int) -> dict:
    """Spawn args exactly ``depth`` levels deep, counting ``args`` itself as 1."""
    assert depth >= 3
    inner: list = []
    for _ in range(depth - 3):
        inner = [inner]
    return {"state": {"a": inner}}  # args (1) > state (2) > "a" list (3) > ...


def test_nested_args_helper_builds_exactly_the_requested_depth():
    assert [nesting_depth(nested_args(d)) for d in (3, 32, 33, 900)] == [3, 32, 33, 900]


@FRAMINGS
def test_args_exactly_max_depth_levels_deep_commit(h, framing):
    bystanders = h.bystanders()
    p = h.peer(framing)
    obj = h.good_intent("depth-32")
    obj["args"] = nested_args(MAX_ARGS_DEPTH)
    reply = p.submit(obj)
    h.note(reply)
    assert reply == {"client_id": "depth-32", "seq": obj["seq"], "status": "committed"}, reply
    h.assert_unharmed(*bystanders)


@FRAMINGS
@pytest.mark.parametrize("depth", [MAX_ARGS_DEPTH + 1, 900])
def test_args_nested_deeper_than_max_depth_are_invalid_at_ingest_and_connection_stays_open(h, framing, depth):
    obj = intent(args=nested_args(depth))
    check_contained(h, encode(obj, framing), "invalid", True, "hostile", 7, reason=DEPTH_REASON)


def test_args_nested_just_below_the_decoder_limit_are_invalid_at_ingest_and_batch_neighbours_commit(h):
    # Deep enough to trouble any recursive Python code after the ingest, yet
    # shallow enough for the decoder: the ingest's own depth rule refuses it.
    bystanders = h.bystanders()
    seq = next(_SEQ)
    deep = (
        b'{"client_id":"deep","seq":%d,"entity":"deep-%d","kind":"spawn","args":{"state":{"a":' % (seq, seq)
        + b"[" * 900
        + b"]" * 900
        + b"}}}\n"
    )
    bad = h.peer()
    bad.send(deep)
    # Neighbours in the same batch window.
    neighbours = [h.good_intent("neighbour") for _ in range(20)]
    bystanders[0].send(b"".join(line(n) for n in neighbours))
    replies = [bystanders[0].reply() for _ in neighbours]
    for r in replies:
        h.note(r)
    assert sorted((r["seq"], r["status"]) for r in replies) == [(n["seq"], "committed") for n in neighbours]
    assert_rejection(bad.reply(), "invalid", "deep", seq, reason=DEPTH_REASON)
    h.submit_good(bad, client="after-deep")  # the connection still serves
    h.assert_unharmed(*bystanders)
    assert not [k for k in h.stored() if k[0] == "deep"]


# =============================================================== JSON lines
@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"{not json}\n", id="bare_words"),
        pytest.param(b'{"client_id":"hostile",\n', id="unterminated_object"),
        pytest.param(line(HOSTILE)[:-1] + b"}\n", id="valid_intent_then_trailing_brace"),
        pytest.param(line(HOSTILE)[:-1] + b" {}\n", id="two_objects_on_one_line"),
        pytest.param(b"{'client_id':'hostile'}\n", id="single_quotes"),
        pytest.param(b'{"client_id":"hostile","seq":NaN}\n', id="nan"),
        pytest.param(b'{"client_id":"hostile","seq":07}\n', id="leading_zero"),
        pytest.param(b'{"client_id":"a\x00b","seq":7}\n', id="raw_nul_byte_in_string"),
        pytest.param(b'{"client_id":"a\x01b","seq":7}\n', id="raw_control_char_in_string"),
        pytest.param(b'{"client_id":"\\x41","seq":7}\n', id="bad_escape"),
        pytest.param(raw_intent_json(b'{"state":{"t":"\\ud800"}}'), id="lone_high_surrogate_escape"),
        pytest.param(raw_intent_json(b"{}", client_id=b'"\\udc00"'), id="lone_low_surrogate_client_id"),
        pytest.param(b"\r\n\t {\n", id="whitespace_then_lone_brace"),
    ],
)
def test_invalid_json_line_is_malformed_and_connection_stays_open(h, data):
    check_contained(h, data, "malformed", stays_open=True)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"{\xff}\n", id="outside_strings"),
        pytest.param(line(HOSTILE)[:-1] + b" \xc3\n", id="truncated_sequence_after_object"),
        pytest.param(b'{"client_id":"\xff\xfe","seq":7,"entity":"orc","kind":"spawn"}\n', id="client_id"),
        pytest.param(raw_intent_json(b'{"state":{"t":"\xc0\xae"}}'), id="overlong_encoding_in_args"),
        pytest.param(raw_intent_json(b'{"state":{"t":"\xed\xa0\x80"}}'), id="encoded_surrogate_in_args"),
        pytest.param(
            b'{"client_id":"hostile","seq":7,"entity":"orc","kind":"fly","args":{"t":"\xff"}}\n',
            id="in_args_of_unknown_kind",
        ),
        pytest.param(b'{"op":"\xff"}\n', id="control_op"),
        pytest.param(b'{"seq":"7","client_id":"\xff"}\n', id="after_a_field_of_wrong_type"),
    ],
)
def test_non_utf8_json_line_is_not_utf8_and_connection_stays_open(h, data):
    check_contained(h, data, "not_utf8", True, ANY, ANY)


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(b'{"state":{"t":"\xc0\xae"}}', id="overlong_encoding"),
        pytest.param(b'{"state":{"t":"\xed\xa0\x80"}}', id="encoded_surrogate"),
        pytest.param(b'{"state":{"\xff":1}}', id="in_a_key"),
    ],
)
def test_non_utf8_string_in_json_args_still_echoes_the_readable_client_id_and_seq(h, args):
    check_contained(h, raw_intent_json(args), "not_utf8", True, "hostile", 7, reason="a string is not valid UTF-8")


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b" [1,2]\n", id="array"),
        pytest.param(b"\n" + line([HOSTILE]), id="array_of_intent"),
        pytest.param(b" 5\n", id="number"),
        pytest.param(b' "intent"\n', id="string"),
        pytest.param(b" null\n", id="null"),
        pytest.param(b" true\n", id="bool"),
    ],
)
def test_json_value_that_is_not_an_object_is_invalid_and_connection_stays_open(h, data):
    check_contained(h, data, "invalid", stays_open=True)


@pytest.mark.parametrize(
    "data, seq",
    [
        pytest.param(line(intent(seq=10**30)), 10**30, id="seq_beyond_uint64"),
        pytest.param(line(intent(seq=7.0)), None, id="seq_float_integral"),
        pytest.param(b'{"client_id":"hostile","seq":7e0,"entity":"orc","kind":"spawn"}\n', None, id="seq_exponent"),
    ],
)
def test_json_number_that_is_not_a_valid_seq_is_invalid_and_connection_stays_open(h, data, seq):
    check_contained(h, data, "invalid", True, "hostile", seq)


def test_literal_backslash_u0000_text_is_not_mistaken_for_nul_and_commits(h):
    bystanders = h.bystanders()
    p = h.peer("json")
    spawn = h.good_intent("literal")
    spawn["args"] = {"state": {"note": "\\u0000"}}  # a backslash, then 'u0000'
    reply = p.submit(spawn)
    h.note(reply)
    assert reply["status"] == "committed", reply
    assert h.sql("SELECT state->>'note' FROM batchscheduler.entities WHERE id = %s", (spawn["entity"],)) == [
        ("\\u0000",)
    ]
    h.assert_unharmed(*bystanders)


def _padded_line(size: int, obj: dict) -> bytes:
    """``obj`` as one JSON line of exactly ``size`` bytes (without newline)."""
    obj = json.loads(json.dumps(obj))
    obj["args"]["state"]["pad"] = ""
    base = len(json.dumps(obj, separators=(",", ":")))
    obj["args"]["state"]["pad"] = "x" * (size - base)
    out = json.dumps(obj, separators=(",", ":")).encode()
    assert len(out) == size
    return out


@pytest.mark.parametrize("pieces", [1, 8], ids=["one_write", "eight_writes"])
def test_json_line_longer_than_max_frame_is_skipped_and_next_line_on_same_connection_commits(h, pieces):
    bystanders = h.bystanders()
    p = h.peer()
    too_long = _padded_line(MAX_FRAME + 1, h.good_intent("too-long"))
    nxt = h.good_intent("next-line")
    step = len(too_long) // pieces + 1
    for start in range(0, len(too_long), step):
        p.send(too_long[start : start + step])
    p.send(b"\n" + line(nxt))
    assert_rejection(p.reply(), "frame_too_large")
    reply = p.reply()
    h.note(reply)
    assert reply == {"client_id": "next-line", "seq": nxt["seq"], "status": "committed"}, reply
    h.assert_unharmed(*bystanders)


def test_json_line_of_exactly_max_frame_bytes_commits_in_one_write(h):
    bystanders = h.bystanders()
    p = h.peer()
    obj = h.good_intent("exact")
    p.send(_padded_line(MAX_FRAME, obj) + b"\r\n")
    reply = p.reply()
    h.note(reply)
    assert reply == {"client_id": "exact", "seq": obj["seq"], "status": "committed"}, reply
    h.assert_unharmed(*bystanders)


def test_json_line_of_exactly_max_frame_bytes_commits_even_when_its_crlf_arrives_split(h):
    bystanders = h.bystanders()
    p = h.peer()
    obj = h.good_intent("exact-split")
    p.send(_padded_line(MAX_FRAME, obj) + b"\r")
    # Give the ingest the chance to read the unterminated line (a bounded read):
    # nothing may be answered before the line is complete.
    assert p.silent_for(0.5), f"answered an incomplete line: {bytes(p.buf)!r}"
    p.send(b"\n")
    reply = p.reply()
    h.note(reply)
    assert reply == {"client_id": "exact-split", "seq": obj["seq"], "status": "committed"}, reply
    h.assert_unharmed(*bystanders)


@pytest.mark.parametrize("split", [False, True], ids=["crlf_in_one_write", "crlf_split"])
def test_json_line_one_byte_over_max_frame_is_too_large_once_whether_or_not_its_crlf_arrives_split(h, split):
    # The limit applies to the line without its terminator, the same way
    # whether the terminator arrives with the line or later.
    bystanders = h.bystanders()
    p = h.peer()
    too_long = _padded_line(MAX_FRAME + 1, h.good_intent("over-crlf"))
    nxt = h.good_intent("after-over-crlf")
    if split:
        p.send(too_long + b"\r")
        assert_rejection(p.reply(), "frame_too_large")  # answered before the line ends
        p.send(b"\n" + line(nxt))
    else:
        p.send(too_long + b"\r\n" + line(nxt))
        assert_rejection(p.reply(), "frame_too_large")
    reply = p.reply()  # exactly one rejection: the next reply is the next line's
    h.note(reply)
    assert reply == {"client_id": "after-over-crlf", "seq": nxt["seq"], "status": "committed"}, reply
    h.assert_unharmed(*bystanders)
    assert not [k for k in h.stored() if k[0] == "over-crlf"]


def test_extremely_long_line_without_newline_then_close_gets_one_frame_too_large(h):
    bystanders = h.bystanders()
    p = h.peer()
    p.send(b'{"client_id":"endless","seq":1,"entity":"e","kind":"say","args":{"text":"')
    chunk = b"a" * (1 << 20)
    for _ in range(4):  # 4 MiB, never a newline
        p.send(chunk)
    p.sock.shutdown(socket.SHUT_WR)
    assert_rejection(p.reply(), "frame_too_large")
    p.expect_closed()  # exactly one reply, then the engine closes on our EOF
    h.assert_unharmed(*bystanders)


# ============================================ several frames on one connection
@FRAMINGS
def test_bad_frames_between_good_ones_on_one_connection_get_their_own_replies(h, framing):
    bystanders = h.bystanders()
    goods = [h.good_intent("mixed") for _ in range(3)]
    bads = {
        "msgpack": [
            (b"\x00\x00\x00\x00", "malformed"),
            (pack(intent(kind="fly")), "unknown_kind"),
            (frame(b"\xc1"), "malformed"),
            (pack(intent(seq=-1)), "invalid"),
        ],
        "json": [
            (b"{nope}\n", "malformed"),
            (line(intent(kind="fly")), "unknown_kind"),
            (b"{\xff}\n", "not_utf8"),
            (b"\n\r\n", None),
            (line(intent(seq=-1)), "invalid"),
        ],
    }[framing]
    # good, bad, good, bad, bad, ..., good -- all in one write
    wire_goods = [encode(x, framing) for x in goods]
    data = wire_goods[0] + bads[0][0] + wire_goods[1] + b"".join(bad for bad, _ in bads[1:]) + wire_goods[2]
    p = h.peer()
    p.send(data)
    expected_codes = sorted(code for _, code in bads if code)
    replies = [p.reply() for _ in range(len(goods) + len(expected_codes))]
    for r in replies:
        assert_well_formed(r)
        h.note(r)
    committed = sorted(r["seq"] for r in replies if r["status"] == "committed")
    assert committed == [g["seq"] for g in goods], replies
    assert sorted(r["code"] for r in replies if r["status"] == "rejected") == expected_codes, replies
    assert p.ping() == {"op": "ping", "status": "ok"}  # and the connection still serves
    h.assert_unharmed(*bystanders)


# ======================================================= disconnects, floods
@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"\x00\x00", id="half_msgpack_length"),
        pytest.param(pack(intent(client_id="half"))[:-3], id="msgpack_frame_missing_its_tail"),
        pytest.param(
            struct.pack(">I", 1000) + msgspec.msgpack.encode(intent(client_id="half")),
            id="msgpack_length_longer_than_sent",
        ),
        pytest.param(line(intent(client_id="half"))[:-1], id="whole_json_object_without_newline"),
        pytest.param(line(intent(client_id="half"))[:25], id="half_json_line"),
    ],
)
def test_half_a_frame_then_disconnect_stores_nothing_and_replies_nothing(h, data):
    bystanders = h.bystanders()
    p = h.peer()
    p.send(data)
    p.sock.shutdown(socket.SHUT_WR)  # the disconnect, keeping our read side
    p.expect_closed()  # no reply at all, just the close
    h.assert_unharmed(*bystanders)
    assert not [k for k in h.stored() if k[0] == "half"]


def _metrics(eng) -> dict:
    p = Peer(eng.socket, "json")
    try:
        return p.submit({"op": "metrics"})
    finally:
        p.close()


def test_many_connections_opening_and_closing_rapidly_leave_the_engine_serving(h):
    bystanders = h.bystanders()
    rng = random.Random(7)
    openers = [
        b"",
        b"\x00\x00",
        b'{"client_id":"rapid"',
        b"\xff",
        pack(intent(client_id="rapid"))[:-1],
        b"\x00\xff\xff\xff",
        b"\n\n\n",
    ]
    for _ in range(4):
        burst = []
        for _ in range(100):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(REPLY_TIMEOUT)
            s.connect(str(h.engine.socket))
            burst.append(s)
            data = rng.choice(openers)
            if data:
                s.sendall(data)
        for s in burst:  # slam them shut, never reading
            s.close()
    # Every closed connection is forgotten: only the bystanders and the
    # metrics connection itself remain open.
    wait_for(
        lambda: _metrics(h.engine)["ingests"][0]["connections_open"] == len(bystanders) + 1,
        10,
        "the ingest to forget closed connections",
    )
    h.assert_unharmed(*bystanders)
    assert not [k for k in h.stored() if k[0] == "rapid"]


def test_connections_beyond_max_connections_get_unavailable_and_existing_clients_carry_on(engine_factory):
    eng = engine_factory("--max-connections", "3")
    h = Harness(eng)
    try:
        bystander = h.peer("json")
        assert bystander.ping()["status"] == "ok"
        fillers = [h.peer("msgpack") for _ in range(2)]
        for f in fillers:
            assert f.ping()["status"] == "ok"
        extra = h.peer()
        extra.framing = "json"  # the refusal is one JSON line, whatever the client meant to speak
        assert_rejection(extra.reply(), "unavailable")
        extra.expect_closed()
        h.assert_unharmed(bystander)
        for f in fillers:
            f.close()

        def accepted() -> bool:
            p = Peer(eng.socket, "json")
            try:
                return p.ping().get("status") == "ok"
            finally:
                p.close()

        wait_for(accepted, 10, "a slot to free up")
        h.assert_unharmed(bystander)
    finally:
        h.close()


# ========================================================= hostile files
def test_dangling_symlink_at_the_socket_path_is_refused_and_never_followed(short_tmp, dsn):
    """A symlink at --socket is not ours to follow: the engine refuses to
    start, naming the path, and neither binds nor unlinks its target."""
    target = short_tmp / "elsewhere" / "planted.sock"
    target.parent.mkdir()
    link = short_tmp / "e.sock"
    link.symlink_to(target)
    log_path = short_tmp / "e.log"
    cmd = [sys.executable, str(RUN_ENGINE), "--socket", str(link), "--data-dir", str(short_tmp / "var"), "--dsn", dsn]
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHSCHEDULER_")}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    try:
        # Reads until the engine exits, or until it says it is ready (the
        # bug); no fixed wait either way.
        started = any(line.startswith("ready") for line in proc.stdout)
        bound_target = os.path.lexists(target)
        if started:
            proc.terminate()
        code = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    err = log_path.read_text()
    assert not started and not bound_target, f"the engine followed the symlink and bound {target}:\n{err[-2000:]}"
    assert code == 1, f"exit {code}:\n{err[-2000:]}"
    assert f"{link} is a symbolic link; refusing to follow it" in err, err[-2000:]
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert not os.path.lexists(target)


# ===================================================================== fuzz
# An independent model of the documented protocol (README "Protocol", plus
# the ingest's args depth rule), used to say what every fuzzed input is owed.
KINDS = frozenset({"spawn", "move", "say", "damage", "heal", "pick_up", "drop"})  # the built-ins
CONTROL_OPS = frozenset({"health", "metrics", "ping"})
INTENT_FIELDS = frozenset({"client_id", "seq", "entity", "kind", "args"})
REQUIRED_FIELDS = INTENT_FIELDS - {"args"}
STORED = frozenset({"committed", "dead_lettered"})


@dataclass(frozen=True)
class Owed:
    """One reply the protocol owes: a control reply (``op``), or a rejection
    with one of ``codes``, or -- when ``may_store`` -- a stored outcome for
    exactly (``client_id``, ``seq``). A frame breaking several rules may be
    answered with the code of any of them (the README sets no precedence);
    where the README leaves the outcome open, both are allowed."""

    codes: frozenset = frozenset()
    may_store: bool = False
    client_id: object = None
    seq: object = None
    op: str | None = None
    # Codes an older engine answered instead; marks the cases that
    # test_seeded_fuzz_non_utf8_json_lines_are_answered_not_utf8 checks.
    buggy_codes: frozenset = frozenset()

    def matches(self, reply: dict) -> bool:
        if self.op is not None:
            return reply.get("op") == self.op and reply.get("status") == "ok"
        if "op" in reply:
            return False
        status = reply.get("status")
        if status == "rejected":
            return (
                reply.get("code") in self.codes
                and _same(reply.get("client_id"), self.client_id)
                and _same(reply.get("seq"), self.seq)
            )
        return (
            status in STORED
            and self.may_store
            and (reply.get("client_id"), reply.get("seq")) == (self.client_id, self.seq)
        )


def rejected(*codes: str, client_id=None, seq=None) -> Owed:
    return Owed(codes=frozenset(codes), client_id=client_id, seq=seq)


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _walk(value):
    """Every (key, value) below ``value``, keys of lists being None; iterative."""
    stack = [value]
    while stack:
        node = stack.pop()
        items = node.items() if isinstance(node, dict) else ((None, v) for v in node) if isinstance(node, list) else ()
        for k, v in items:
            yield k, v
            stack.append(v)


def nesting_depth(value) -> int:
    """Containers (maps, arrays) on the deepest path, iteratively."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, (dict, list)):
            deepest = max(deepest, level)
            stack.extend((v, level + 1) for v in (node.values() if isinstance(node, dict) else node))
    return deepest


def _text_ok(value, low: int, high: int) -> bool:
    return isinstance(value, str) and low <= len(value) <= high


def _json_has_duplicate_key(text: str) -> bool:
    found = []

    def pairs(items: list) -> dict:
        keys = [k for k, _ in items]
        if len(set(keys)) < len(keys):
            found.append(keys)
        return dict(items)

    json.loads(text, object_pairs_hook=pairs)
    return bool(found)


# Bytes after the type byte: fixed-size items, and (width of the length,
# extra bytes) for sized ones (bin, ext with its type byte, str).
_MP_FIXED = {0xC0: 0, 0xC2: 0, 0xC3: 0, 0xCA: 4, 0xCB: 8, 0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}
_MP_FIXED.update({0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8, 0xD4: 2, 0xD5: 3, 0xD6: 5, 0xD7: 9, 0xD8: 17})
_MP_SIZED = {0xC4: (1, 0), 0xC5: (2, 0), 0xC6: (4, 0), 0xC7: (1, 1), 0xC8: (2, 1), 0xC9: (4, 1)}
_MP_SIZED.update({0xD9: (1, 0), 0xDA: (2, 0), 0xDB: (4, 0)})


def _msgpack_has_duplicate_key(data: bytes) -> bool:
    """Whether any map in ``data`` (valid MessagePack) holds a key twice: a
    reader of our own that keeps every map's keys (msgspec keeps the last)."""
    stack = [[1, None, 0]]  # per open container: items left, keys seen (maps), items read
    pos = 0
    while stack:
        top = stack[-1]
        if not top[0]:
            stack.pop()
            continue
        top[0] -= 1
        index, top[2] = top[2], top[2] + 1
        t, start = data[pos], pos
        pos += 1
        count, is_map, text = 0, False, None
        if 0x80 <= t <= 0x9F:
            count, is_map = t & 0x0F, t <= 0x8F
        elif 0xA0 <= t <= 0xBF:
            text, pos = data[pos : pos + (t & 0x1F)], pos + (t & 0x1F)
        elif t in _MP_FIXED:
            pos += _MP_FIXED[t]
        elif t in _MP_SIZED:
            width, extra = _MP_SIZED[t]
            size = int.from_bytes(data[pos : pos + width], "big")
            pos += width + extra
            if t >= 0xD9:
                text = data[pos : pos + size]
            pos += size
        elif t in (0xDC, 0xDD, 0xDE, 0xDF):
            width = 2 if t in (0xDC, 0xDE) else 4
            count, is_map = int.from_bytes(data[pos : pos + width], "big"), t >= 0xDE
            pos += width
        if top[1] is not None and index % 2 == 0:  # a key
            key = ("str", text) if text is not None else object() if count else ("raw", data[start:pos])
            if key in top[1]:
                return True
            top[1].add(key)
        if count:
            stack.append([count * (2 if is_map else 1), set() if is_map else None, 0])
    return False


def documented_reply(payload: bytes, packed: bool) -> Owed:
    """What one complete, non-empty frame is owed."""
    undecodable = ("malformed", "invalid")  # a field error may be met before the bad bytes
    if packed:
        try:
            value = msgspec.msgpack.decode(payload)  # a generic MessagePack reader
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError, TypeError):  # TypeError: a map as a key
            return rejected(*undecodable, client_id=ANY, seq=ANY)
    else:
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError:
            return Owed(codes=frozenset({"not_utf8"}), client_id=ANY, seq=ANY, buggy_codes=frozenset({"invalid"}))
        try:
            value = json.loads(text, parse_constant=_refuse_constant)
        except (ValueError, RecursionError):
            return rejected(*undecodable, client_id=ANY, seq=ANY)
    if not isinstance(value, dict):
        return rejected("invalid")
    if not all(isinstance(k, str) for k in value):
        return rejected("invalid", client_id=ANY, seq=ANY)
    duplicate = _msgpack_has_duplicate_key(payload) if packed else _json_has_duplicate_key(text)
    if set(value) == {"op"} and isinstance(value["op"], str):
        if duplicate:
            return rejected("invalid")
        return Owed(op=value["op"]) if value["op"] in CONTROL_OPS else rejected("unknown_op")

    client_id, seq = value.get("client_id"), value.get("seq")
    seq_is_int = isinstance(seq, int) and not isinstance(seq, bool)
    echo_id = client_id if isinstance(client_id, str) else None
    echo_seq = seq if seq_is_int else None
    codes: set[str] = set()  # rules certainly broken
    maybe: set[str] = set()  # outcomes the README leaves open
    if set(value) - INTENT_FIELDS or REQUIRED_FIELDS - set(value) or duplicate:
        codes.add("invalid")
    if not _text_ok(client_id, 1, 64) or not (seq_is_int and 0 <= seq <= 2**63 - 1):
        codes.add("invalid")
    if not _text_ok(value.get("entity"), 1, 128):
        codes.add("invalid")
    kind = value.get("kind")
    if not _text_ok(kind, 1, 32):
        codes.add("invalid")
    elif kind not in KINDS:
        codes.add("unknown_kind")
    for text in (client_id, value.get("entity")):
        if isinstance(text, str) and "\x00" in text:
            codes.add("invalid")
    args = value.get("args", {})
    if not isinstance(args, dict):
        codes.add("invalid")
    else:
        if nesting_depth(args) > MAX_ARGS_DEPTH:
            codes.add("invalid")
        for k, v in _walk(args):
            for x in (k, v):
                if isinstance(x, str) and "\x00" in x:
                    codes.add("invalid")
                elif isinstance(x, float) and not math.isfinite(x):
                    codes.add("invalid")  # JSON has no NaN/Infinity
                elif isinstance(x, (msgspec.msgpack.Ext, bytes, datetime.datetime)):
                    codes.add("invalid")  # JSON cannot hold them (only converted to text)
            if k is not None and not isinstance(k, str):
                codes.add("invalid")  # JSON keys are strings; a number is not converted
        if kind in KINDS and not _args_fit(kind, args):
            codes.add("invalid")  # the kind's argument schema (README, Built-in kinds)
    strings = [x for kv in _walk(value) for x in kv if isinstance(x, str)]
    if any("\ud800" <= c <= "\udfff" for x in strings for c in x):
        # JSON "\ud800" escapes a lone surrogate, which UTF-8 cannot hold
        codes.add("malformed")
        echo_id = echo_seq = ANY  # the engine may not read the rest
    if codes:
        return Owed(codes=frozenset(codes | maybe), client_id=echo_id, seq=echo_seq)
    return Owed(codes=frozenset(maybe), may_store=True, client_id=client_id, seq=seq)


def _args_fit(kind: str, args: dict) -> bool:
    """The README's built-in kinds table, written out independently of the
    engine's schemas: exactly these keys, of these types and ranges."""

    def integer(v, lo, hi):
        return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi

    def text(v, most):
        return isinstance(v, str) and 1 <= len(v) <= most

    big = 1_000_000_000
    rules = {
        "spawn": {"state": lambda v: isinstance(v, dict)},
        "move": {"dx": lambda v: integer(v, -big, big), "dy": lambda v: integer(v, -big, big)},
        "say": {"text": lambda v: text(v, 500)},
        "damage": {"amount": lambda v: integer(v, 0, big)},
        "heal": {"amount": lambda v: integer(v, 0, big)},
        "pick_up": {"item": lambda v: text(v, 64)},
        "drop": {"item": lambda v: text(v, 64)},
    }[kind]
    required = set() if kind == "spawn" else set(rules)
    return set(args) <= set(rules) and required <= set(args) and all(rules[k](v) for k, v in args.items())


def documented_replies(data: bytes) -> tuple[list[Owed], bool]:
    """Every reply the documented protocol owes for ``data`` sent in one write
    on a fresh connection left open, and whether the engine then closes it."""
    if not data:
        return [], False
    owed: list[Owed] = []
    too_large = rejected("frame_too_large")
    if data[0] == 0:  # MessagePack: length-prefixed frames
        pos = 0
        while len(data) - pos >= 4:
            (length,) = struct.unpack_from(">I", data, pos)
            if length > MAX_FRAME:  # every frame before it is answered, then closed
                return owed + [too_large], True
            if length == 0:
                owed.append(rejected("malformed"))
                pos += 4
                continue
            if len(data) - pos - 4 < length:
                break  # incomplete: no reply yet
            owed.append(documented_reply(data[pos + 4 : pos + 4 + length], packed=True))
            pos += 4 + length
        return owed, False
    if data[0] in b"{ \t\r\n":  # JSON lines; the limit excludes the \n or \r\n
        *complete, tail = data.split(b"\n")
        for ln in complete:
            ln = ln[:-1] if ln.endswith(b"\r") else ln
            if len(ln) > MAX_FRAME:
                owed.append(too_large)
            elif ln.strip():  # blank lines are ignored
                owed.append(documented_reply(ln.strip(), packed=False))
        if len(tail) - tail.endswith(b"\r") > MAX_FRAME:  # already too long, unterminated
            owed.append(too_large)
        return owed, False
    return [rejected("bad_framing")], True  # then closed


def replies_match(owed: list[Owed], replies: list[dict]) -> bool:
    """Replies may arrive in any order: is there a one-to-one pairing of
    owed replies and received ones? (Bipartite matching, augmenting paths.)"""
    if len(owed) != len(replies):
        return False
    partner: dict[int, int] = {}  # reply index -> owed index

    def place(i: int, seen: set) -> bool:
        for j, reply in enumerate(replies):
            if j not in seen and owed[i].matches(reply):
                seen.add(j)
                if j not in partner or place(partner[j], seen):
                    partner[j] = i
                    return True
        return False

    return all(place(i, set()) for i in range(len(owed)))


def test_protocol_model_agrees_with_the_documented_examples():
    """The model used by the fuzz tests, on inputs whose outcome the tests
    above pin down against the real engine."""

    def one(data: bytes) -> Owed:
        owed, closes = documented_replies(data)
        assert len(owed) == 1 and not closes, (owed, closes)
        return owed[0]

    good = {"client_id": "m", "seq": 1, "entity": "m1", "kind": "spawn", "args": {"state": {}}}
    for framing in ("msgpack", "json"):
        assert one(encode(good, framing)).may_store
        assert one(encode({**good, "args": nested_args(MAX_ARGS_DEPTH)}, framing)).may_store
        deep = one(encode({**good, "args": nested_args(MAX_ARGS_DEPTH + 1)}, framing))
        assert (deep.codes, deep.may_store, deep.client_id, deep.seq) == ({"invalid"}, False, "m", 1)
        assert one(encode({**good, "kind": "fly"}, framing)).codes == {"unknown_kind"}
        assert one(encode({"op": "ping"}, framing)).op == "ping"
    assert one(b'{"client_id":"\xff","seq":1}\n').codes == {"not_utf8"}
    assert one(frame(b"\xc1")).codes == {"malformed", "invalid"}
    assert one(raw_intent_msgpack(b"\x81\xa5state\x81\xa1x\xd4\x05\x01")).codes == {"invalid"}
    # The size limit excludes the terminator, whether or not it has arrived.
    exact = _padded_line(MAX_FRAME, good)
    assert one(exact + b"\r\n").may_store
    assert documented_replies(exact + b"\r") == ([], False)
    assert documented_replies(exact + b"x\r") == ([rejected("frame_too_large")], False)
    # MessagePack: the frames before a fatal length are still answered.
    owed, closes = documented_replies(pack(good) + frame(b"") + struct.pack(">I", MAX_FRAME + 1) + pack(good))
    assert closes and [o.may_store for o in owed] == [True, False, False]
    assert [o.codes for o in owed[1:]] == [{"malformed"}, {"frame_too_large"}]
    assert documented_replies(b"GET /\r\n") == ([rejected("bad_framing")], True)


def fuzz_inputs(seed: int = 0xB5_2024, count: int = 300) -> list[bytes]:
    rng = random.Random(seed)
    out = []
    for i in range(count):
        kind, args = rng.choice(
            [
                ("spawn", {"state": {"hp": i, "name": "fuzz"}}),
                ("say", {"text": "hello there"}),
                ("move", {"dx": 1, "dy": -1}),
                ("pick_up", {"item": "sword"}),
            ]
        )
        obj = {"client_id": "fz", "seq": i, "entity": f"fz{i}", "kind": kind, "args": args}
        base = bytearray(pack(obj) if rng.random() < 0.5 else line(obj))
        flavour = i % 6
        if flavour == 0:  # random bytes, any first byte
            data = rng.randbytes(rng.randint(1, 64))
        elif flavour == 1:  # msgpack mode, random length and payload
            data = b"\x00" + rng.randbytes(rng.randint(3, 64))
        elif flavour == 2:  # a well-framed random payload
            data = frame(rng.randbytes(rng.randint(1, 48))) if rng.random() < 0.5 else b"{" + rng.randbytes(40) + b"\n"
        elif flavour in (3, 4):  # bit flips of a valid frame
            for _ in range(rng.randint(1, 3)):
                bit = rng.randrange(len(base) * 8)
                base[bit // 8] ^= 1 << (bit % 8)
            data = bytes(base)
        else:  # splice: delete, duplicate or overwrite a slice
            a = rng.randrange(len(base))
            b = min(len(base), a + rng.randint(1, 8))
            op = rng.randrange(3)
            if op == 0:
                del base[a:b]
            elif op == 1:
                base[a:a] = base[a:b]
            else:
                base[a:b] = rng.randbytes(b - a)
            data = bytes(base)
        out.append(data)
    return out


def nested_fuzz_inputs(seed: int = 0xDE_E9, count: int = 40) -> list[bytes]:
    """Spawn intents with args nested around the depth limit (and far beyond
    it, below any decoder's limit): a random mix of maps and arrays, in both
    framings."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        depth = rng.randint(MAX_ARGS_DEPTH - 4, MAX_ARGS_DEPTH + 4) if i % 4 else rng.randint(100, 600)
        packed = rng.random() < 0.5
        # args (level 1) holds "state", a map (level 2, as spawn wants), which
        # holds depth - 2 random containers, each the only element of the one
        # above it; the innermost one is empty or holds a scalar.
        opens, closes = [b"\x81\xa1k" if packed else b'{"k":'], [b"" if packed else b"}"]
        for _ in range(depth - 3):  # levels 3 .. depth - 1
            array = rng.random() < 0.5
            opens.append((b"\x91" if array else b"\x81\xa1k") if packed else (b"[" if array else b'{"k":'))
            closes.append(b"" if packed else (b"]" if array else b"}"))
        innermost = rng.choice(
            [b"\x90", b"\x80", b"\x91\x01", b"\x81\xa1k\x01"] if packed else [b"[]", b"{}", b"[1]", b'{"k":1}']
        )
        nest = b"".join(opens) + innermost + b"".join(reversed(closes))
        entity = f"fzd{i}".encode()
        if packed:
            data = frame(
                b"\x85\xa9client_id\xa3fzd\xa3seq"
                + msgspec.msgpack.encode(i)
                + b"\xa6entity"
                + msgspec.msgpack.encode(entity.decode())
                + b"\xa4kind\xa5spawn\xa4args"
                + b"\x81\xa5state"
                + nest
            )
        else:
            data = (
                b'{"client_id":"fzd","seq":%d,"entity":"%s","kind":"spawn","args":{"state":' % (i, entity)
                + nest
                + b"}}\n"
            )
        out.append(data)
    return out


@dataclass
class FuzzCase:
    data: bytes
    owed: list
    closes: bool
    replies: list = field(default_factory=list)
    lost: str | None = None

    def answered_as_documented(self) -> bool:
        return self.lost is None and replies_match(self.owed, self.replies)

    @property
    def stores_before_a_fatal_error(self) -> bool:
        """An intent the engine may store, then a frame that closes the
        connection, in the same write: the stored intent must still be answered."""
        return self.closes and any(o.may_store for o in self.owed)

    def storable_keys(self) -> set:
        return {(o.client_id, o.seq) for o in self.owed if o.may_store}


@dataclass
class FuzzRun:
    harness: Harness
    bystanders: tuple
    cases: list

    def stored_before_a_fatal_error(self) -> frozenset:
        """Intent-log keys the engine may store before a frame that closes the
        same connection (test_seeded_fuzz_intents_stored_before_a_fatal_frame_are_answered
        checks that each one stored was answered)."""
        return frozenset(k for c in self.cases if c.stores_before_a_fatal_error for k in c.storable_keys())


FUZZ_COUNT, NESTED_FUZZ_COUNT = 300, 40


@pytest.fixture(scope="module")
def fuzz(shared_engine, shared_db):
    """~300 random and mutated frames plus 40 deeply nested intents, each on its own connection."""
    h = Harness(shared_engine, shared_db)
    bystanders = h.bystanders()
    cases = []
    for data in fuzz_inputs(count=FUZZ_COUNT) + nested_fuzz_inputs(count=NESTED_FUZZ_COUNT):
        owed, closes = documented_replies(data)
        case = FuzzCase(data, owed, closes)
        p = Peer(shared_engine.socket, timeout=REPLY_TIMEOUT)
        try:
            p.send(data)
            try:
                for _ in owed:
                    reply = p.reply()
                    case.replies.append(reply)
                    h.note(reply)
                if not closes:
                    # Nothing more is owed: on our EOF the engine closes without
                    # another byte (an incomplete frame is dropped unanswered).
                    p.sock.shutdown(socket.SHUT_WR)
                p.expect_closed()
            except AssertionError as exc:
                case.lost = str(exc)
        finally:
            p.close()
        cases.append(case)
    yield FuzzRun(h, bystanders, cases)
    h.close()


def test_seeded_fuzz_of_random_and_mutated_frames_never_restarts_ingest_and_good_clients_commit(fuzz):
    assert len(fuzz.cases) == FUZZ_COUNT + NESTED_FUZZ_COUNT
    assert sum(len(c.owed) for c in fuzz.cases) > 240  # the fuzz really reached the decoders
    owed = [o for c in fuzz.cases for o in c.owed]
    assert sum(o.may_store for o in owed) >= 20 and sum("invalid" in o.codes for o in owed) >= 40, (
        "the fuzz no longer reaches both the stored and the rejected paths"
    )
    for case in fuzz.cases:
        assert len(case.replies) <= len(case.owed), case
        for reply in case.replies:
            if "op" in reply:  # a mutation that became a control request
                assert reply["status"] == "ok", reply
                continue
            assert_well_formed(reply)
            if reply["status"] == "rejected" and reply["code"] in ("bad_framing", "frame_too_large"):
                assert reply["client_id"] is None and reply["seq"] is None, reply
    # Other clients carry on, no worker restarted, and the intent log holds
    # exactly the fuzzed intents that were answered as stored.
    fuzz.harness.assert_unharmed(*fuzz.bystanders)


def test_seeded_fuzz_every_frame_gets_exactly_its_documented_replies(fuzz):
    """Every input gets exactly the replies (count, codes, echoed client_id
    and seq, stored or not) and the close the model owes it."""
    cases = fuzz.cases
    wrong = [(c.data, c.owed, c.replies, c.lost) for c in cases if not c.answered_as_documented()]
    assert not wrong, f"{len(wrong)} of {len(cases)} fuzzed inputs were not answered as documented, e.g. {wrong[:3]}"


def test_seeded_fuzz_nested_args_are_stored_up_to_the_depth_limit_and_invalid_beyond(fuzz):
    nested = fuzz.cases[FUZZ_COUNT:]
    for case in nested:
        assert case.answered_as_documented(), (case.data[:120], case.owed, case.replies, case.lost)
        (reply,) = case.replies
        deep = nesting_depth(
            msgspec.msgpack.decode(case.data[4:]) if case.data[0] == 0 else json.loads(case.data)
        )  # the whole intent: args is level 2
        if deep - 1 > MAX_ARGS_DEPTH:
            assert_rejection(reply, "invalid", "fzd", ANY, reason=DEPTH_REASON)
        else:
            assert reply["status"] == "committed", reply
    depths = {nesting_depth(json.loads(c.data)) - 1 for c in nested if c.data[0] != 0}
    assert min(depths) <= MAX_ARGS_DEPTH < max(depths)


def test_seeded_fuzz_intents_stored_before_a_fatal_frame_are_answered(fuzz):
    cases = [c for c in fuzz.cases if c.stores_before_a_fatal_error]
    assert cases, "the seed no longer produces this case; the dedicated test still covers it"
    wrong = [(c.data, c.owed, c.replies, c.lost) for c in cases if not c.answered_as_documented()]
    stored = fuzz.harness.stored()
    unanswered = {k for k in fuzz.stored_before_a_fatal_error() if k in stored and k not in fuzz.harness.answered}
    assert not wrong and not unanswered, (
        f"{len(wrong)} of {len(cases)} lost replies, e.g. {wrong[:3]}; stored but never answered: {sorted(unanswered)}"
    )


def test_seeded_fuzz_non_utf8_json_lines_are_answered_not_utf8(fuzz):
    cases = [c for c in fuzz.cases if not c.stores_before_a_fatal_error and any(o.buggy_codes for o in c.owed)]
    assert cases, "the seed no longer produces non-UTF-8 JSON lines"
    wrong = [(c.data, c.replies) for c in cases if not c.answered_as_documented()]
    assert not wrong, f"{len(wrong)} of {len(cases)} non-UTF-8 lines got another code, e.g. {wrong[:3]}"


@pytest.mark.parametrize("framing", ["msgpack", "json"])
def test_an_intent_that_reencodes_past_a_ring_record_is_invalid_and_the_connection_carries_on(engine_factory, framing):
    """A frame within max_frame_bytes can grow when stored (a MessagePack
    \\x01 is six bytes as JSON's \\u0001; JSON's 1e15 is stored as
    1000000000000000.0): refused ``invalid``; the intents around it in the
    same write commit."""
    eng = engine_factory("--ring-bytes", "65536", "--max-frame-bytes", "16384")
    h = Harness(eng)
    try:
        peer = h.peer(framing)
        if framing == "msgpack":
            big = intent(seq=2, entity="big", kind="spawn", args={"state": {"t": "\x01" * 6000}})
            wire_bytes = encode(big, framing)
        else:  # JSON escapes on the wire too; 1e15 grows to 1000000000000000.0 when stored
            big = intent(seq=2, entity="big", kind="spawn", args={"state": {"t": []}})
            wire_bytes = encode(big, framing).replace(b'"t":[]', b'"t":[' + b",".join([b"1e15"] * 3000) + b"]")
        assert len(wire_bytes) < 16384  # the frame itself is within the limit
        first = intent(seq=1, entity="a", kind="spawn", args={})
        last = intent(seq=3, entity="b", kind="spawn", args={})
        peer.send(encode(first, framing) + wire_bytes + encode(last, framing))
        replies = {r["seq"]: r for r in (peer.reply() for _ in range(3))}
        for reply in replies.values():
            h.note(reply)
        assert replies[1]["status"] == replies[3]["status"] == "committed"
        assert_rejection(replies[2], "invalid", client_id="hostile", seq=2, reason="stored as ")
        assert "more than a ring record holds" in replies[2]["reason"]
        assert (big["client_id"], 2) not in stored_keys(eng)
        h.assert_unharmed(peer)
    finally:
        h.close()
