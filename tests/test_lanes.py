"""The documented lane rule: CRC-32 of the entity id's UTF-8 bytes, mod lanes."""

from __future__ import annotations

import zlib

from hypothesis import given
from hypothesis import strategies as st

from engine.lanes import lane_of


def test_the_rule_is_the_documented_one():
    # Pinned values (the README's example): changing the rule would change
    # which flusher writes an entity.
    assert zlib.crc32(b"hero") == 0x51CE6E86
    assert lane_of("hero", 4) == 2
    assert lane_of("orc", 4) == 1
    assert [lane_of(e, 4) for e in ("hero-0", "é", "a" * 128)] == [
        zlib.crc32(e.encode("utf-8")) % 4 for e in ("hero-0", "é", "a" * 128)
    ]


@given(st.text(min_size=1, max_size=128), st.integers(1, 64))
def test_every_entity_has_exactly_one_lane_in_range(entity, lanes):
    lane = lane_of(entity, lanes)
    assert 0 <= lane < lanes
    assert lane_of(entity, lanes) == lane  # stable: no per-process salt
    assert lane_of(entity, 1) == 0
