"""The wire module's own UTF-8 checks: what a client is told about invalid
UTF-8 must not depend on how a msgspec release reports it."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ipc import wire

# Values MessagePack can carry, strings included, nested a few levels.
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(),
    st.text(max_size=300),
    st.binary(max_size=300),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=20), st.dictionaries(st.text(max_size=40), inner, max_size=20)),
    max_leaves=60,
)

BAD = [b"\xff", b"\xc0\xae", b"\xed\xa0\x80", b"ok\xe2\x82"]  # start byte, overlong, surrogate, truncated


@given(_values)
def test_valid_msgpack_has_no_bad_utf8(value):
    assert wire.msgpack_bad_utf8(msgspec.msgpack.encode(value)) is None


@given(_values, st.sampled_from(BAD), st.integers(0, 40))
def test_a_bad_string_anywhere_is_found_with_its_span(value, bad, pad):
    # A string of any size class (fixstr, str8, str16) holding invalid bytes,
    # placed after an arbitrary valid value inside an array.
    body = b"a" * pad + bad + (b"b" * 300 if pad % 3 == 0 else b"")
    n = len(body)
    header = bytes([0xA0 | n]) if n < 32 else (b"\xd9" + bytes([n]) if n < 256 else b"\xda" + n.to_bytes(2, "big"))
    prefix = b"\x92" + msgspec.msgpack.encode(value)
    frame = prefix + header + body
    found = wire.msgpack_bad_utf8(frame)
    assert found is not None
    start = len(prefix) + len(header)
    assert found.spans == ((start, start + n),)
    assert start + pad <= found.offset < start + n


def test_every_bad_string_is_reported_and_the_first_one_locates_the_error():
    frame = msgspec.msgpack.encode({"a": "x", "b": "y"}).replace(b"\xa1x", b"\xa1\xff").replace(b"\xa1y", b"\xa1\xfe")
    found = wire.msgpack_bad_utf8(frame)
    assert found is not None and len(found.spans) == 2
    assert found.offset == found.spans[0][0] and found.reason == "invalid start byte"


def test_bin_and_ext_payloads_are_not_strings():
    frame = msgspec.msgpack.encode([b"\xff\xfe", msgspec.msgpack.Ext(3, b"\xff")])
    assert wire.msgpack_bad_utf8(frame) is None


@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_raise(data):
    found = wire.msgpack_bad_utf8(data)
    assert found is None or all(0 <= s <= e <= len(data) for s, e in found.spans)


def test_truncated_frame_reports_only_what_it_could_read():
    assert wire.msgpack_bad_utf8(b"\x92\xa2\xff\xfe\xda\xff") is not None
    assert wire.msgpack_bad_utf8(b"\xdb\xff\xff\xff\xff") is None


def test_json_line_reports_the_first_bad_byte():
    found = wire.json_bad_utf8(b'{"t":"ab\xc0\xae"}')
    assert found is not None and found.offset == 8 and found.spans == ()
    assert wire.json_bad_utf8('{"t":"é"}'.encode()) is None


# ------------------------------------------------------- the client's side
def _reader(mode: str) -> wire.ReplyReader:
    return wire.ReplyReader(mode, msgspec.msgpack.decode, msgspec.json.decode)


_replies = st.lists(
    st.fixed_dictionaries({"client_id": st.text(max_size=20), "seq": st.integers(0, 2**63 - 1), "status": st.text()}),
    max_size=8,
)


@given(_replies, st.sampled_from([wire.MODE_MSGPACK, wire.MODE_JSON]), st.integers(1, 64))
def test_replies_come_out_whole_however_the_stream_is_cut(replies, mode, chunk):
    encode = msgspec.msgpack.encode if mode == wire.MODE_MSGPACK else msgspec.json.encode
    stream = b"".join(wire.frame(mode, encode(r)) for r in replies)
    reader = _reader(mode)
    got = []
    for i in range(0, len(stream), chunk):
        got += reader.feed(stream[i : i + chunk])
    assert got == replies
    assert reader.pending() == 0


@given(_replies)
def test_what_a_client_frames_the_engine_reads_as_the_same_frames(replies):
    for mode, encode in ((wire.MODE_MSGPACK, msgspec.msgpack.encode), (wire.MODE_JSON, msgspec.json.encode)):
        payloads = [encode(r) for r in replies]
        engine_side = wire.FrameReader(max_frame=1 << 20)
        assert engine_side.feed(b"".join(wire.frame(mode, p) for p in payloads)) == payloads


def test_json_replies_drop_a_carriage_return_and_skip_blank_lines():
    reader = _reader(wire.MODE_JSON)
    assert reader.feed(b'{"seq":1}\r\n\n  \n{"seq":2}\n{"seq"') == [{"seq": 1}, {"seq": 2}]
    assert reader.pending() == len(b'{"seq"')
    assert reader.feed(b":3}\n") == [{"seq": 3}]


def test_a_refusal_line_on_a_msgpack_connection_is_read_as_json():
    # The engine refuses a connection at accept time with one JSON line,
    # before the client has spoken; a msgpack frame always starts with 0x00.
    reader = _reader(wire.MODE_MSGPACK)
    refusal = b'{"client_id":null,"seq":null,"status":"rejected","code":"unavailable"}\n'
    packed = wire.frame_msgpack(msgspec.msgpack.encode({"seq": 7}))
    assert reader.feed(refusal + packed) == [
        {"client_id": None, "seq": None, "status": "rejected", "code": "unavailable"},
        {"seq": 7},
    ]


def test_clear_forgets_a_partial_reply():
    reader = _reader(wire.MODE_MSGPACK)
    frame = wire.frame_msgpack(msgspec.msgpack.encode({"seq": 1}))
    assert reader.feed(frame[:3]) == [] and reader.pending() == 3
    reader.clear()
    assert reader.feed(frame) == [{"seq": 1}]


def test_an_undecodable_reply_raises_and_stays_buffered():
    reader = _reader(wire.MODE_MSGPACK)
    good = wire.frame_msgpack(msgspec.msgpack.encode({"seq": 1}))
    bad = wire.frame_msgpack(b"\xc1")
    with pytest.raises(msgspec.DecodeError):
        reader.feed(good + bad)
    assert reader.pending() == len(bad)


def test_an_unknown_framing_is_refused():
    with pytest.raises(ValueError, match="'msgpack' or 'json', got 'xml'"):
        _reader("xml")
