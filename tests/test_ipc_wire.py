"""The wire module's own UTF-8 checks: what a client is told about invalid
UTF-8 must not depend on how a msgspec release reports it."""

from __future__ import annotations

import msgspec
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
