"""The payload of a new-messages announcement between servers (storage/announce.py)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chatserver.storage.announce import (
    MAX_PAYLOAD,
    decode_announcement,
    encode_announcements,
    new_origin,
)

ID = st.integers(min_value=1, max_value=2**63 - 1)


@given(st.lists(st.tuples(ID, ID), max_size=2000))
def test_payloads_carry_every_pair_in_order_and_each_fits_a_notify(items):
    origin = new_origin()
    payloads = encode_announcements(origin, items)
    decoded = []
    for payload in payloads:
        assert len(payload.encode()) < MAX_PAYLOAD
        sender, pairs = decode_announcement(payload)
        assert sender == origin and pairs
        decoded += pairs
    assert decoded == items
    assert (payloads == []) == (items == [])


def test_a_big_batch_is_split():
    items = [(2**62 + i, 2**62 + i) for i in range(1000)]  # ~38 bytes a pair
    assert len(encode_announcements("o", items)) > 1


@pytest.mark.parametrize("payload", ["", "origin", "origin 1", "origin 1:x", "o 1:2,", "o a:b"])
def test_malformed_payloads_raise_value_error(payload):
    with pytest.raises(ValueError):
        decode_announcement(payload)
