"""Hypothesis properties of the codec and Connection.

- Any bytes, in any chunking, to either role give events, NEED_DATA/CLOSED, or one
  RemoteProtocolError after which the receive side stays failed; never another exception.
- The outcome does not depend on how the bytes were chunked.
- Whatever decodes re-encodes to exactly the bytes it came from (the encoding is canonical).
- Random valid event sequences survive encode + decode unchanged.
"""

import dataclasses
import re

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from chatserver.protocol import (
    CLOSED,
    MAX_FRAME_SIZE,
    NEED_DATA,
    Connection,
    Hello,
    RemoteProtocolError,
    Send,
    Sent,
    encode_event,
)
from chatserver.protocol.events import (
    CLIENT_EVENTS,
    SERVER_EVENTS,
    Boolean,
    Event,
    Int,
    ListOf,
    String,
)

SETTINGS = settings(max_examples=200, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---------------------------------------------------------------------------------------
# Strategies, derived from the same field tables the codec uses


def kind_strategy(kind) -> st.SearchStrategy:
    if isinstance(kind, Int):
        return st.integers(0, kind.max)
    if isinstance(kind, Boolean):
        return st.booleans()
    if isinstance(kind, String):
        return st.text(max_size=12)  # any code point but lone surrogates
    if isinstance(kind, ListOf):
        return st.lists(kind_strategy(kind.item), max_size=4).map(tuple)
    return struct_strategy(kind)


def struct_strategy(cls) -> st.SearchStrategy:
    return st.builds(cls, **{name: kind_strategy(kind) for name, kind in cls.WIRE_FIELDS})


CLIENT_EVENT = st.one_of([struct_strategy(c) for c in CLIENT_EVENTS if c is not Hello])
SERVER_EVENT = st.one_of([struct_strategy(c) for c in SERVER_EVENTS])
HELLO = struct_strategy(Hello)


@st.composite
def valid_sequence(draw, role: str | None = None, min_size: int = 0) -> tuple[str, list]:
    """A receiving role and a sequence of events its peer may validly send it."""
    if role is None:
        role = draw(st.sampled_from(["server", "client"]))
    if role == "server":
        return role, [draw(HELLO)] + draw(st.lists(CLIENT_EVENT, min_size=min_size, max_size=8))
    return role, draw(st.lists(SERVER_EVENT, min_size=min_size, max_size=8))


@st.composite
def chunked(draw, data: bytes) -> list[bytes]:
    """``data`` cut at random places into non-empty chunks."""
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(data) - 1)), max_size=12))))
    return [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)]) if data[a:b]]


@st.composite
def mangled_stream(draw, role: str) -> bytes:
    """Frames for ``role``, then damaged: bytes overwritten, inserted, removed, or cut off."""
    if draw(st.integers(0, 9)) == 0:
        role = "client" if role == "server" else "server"  # frames going the wrong way
    _, events = draw(valid_sequence(role, min_size=2))
    if draw(st.integers(0, 4)) == 0:
        events = events[1:]  # often no Hello: the handshake must catch that
    data = bytearray(b"".join(map(encode_event, events)))
    for _ in range(draw(st.integers(0, 2))):
        op = draw(st.sampled_from(["set", "insert", "delete", "truncate"]))
        pos = draw(st.integers(0, len(data)))
        if op == "set" and pos < len(data):
            data[pos] = draw(st.integers(0, 255))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=6))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 6))]
        elif op == "truncate":
            del data[pos:]
    return bytes(data)



# ---------------------------------------------------------------------------------------
# Driving a Connection


def outcome(role: str, chunks: list[bytes], max_frame_size: int, eof: bool):
    """Feed ``chunks`` (then EOF) to a new Connection; return its events and final state.

    The final state is the error message, CLOSED, or NEED_DATA. Any exception other than
    RemoteProtocolError escapes and fails the test.
    """
    conn = Connection(role, max_frame_size=max_frame_size)
    events: list = []
    error = None
    for chunk in chunks + ([b""] if eof else []):
        conn.receive_data(chunk)
        if error is None:
            try:
                while True:
                    event = conn.next_event()
                    if event is NEED_DATA or event is CLOSED:
                        break
                    assert isinstance(event, Event), event
                    events.append(event)
            except RemoteProtocolError as e:
                error = e
        if error is not None:  # the receive side stays failed, with the same error
            with pytest.raises(RemoteProtocolError) as again:
                conn.next_event()
            assert again.value is error
            assert conn.their_state == "ERROR"
    if error is not None:
        return events, str(error)
    return events, conn.next_event()


@SETTINGS
@given(
    role=st.sampled_from(["server", "client"]),
    max_frame_size=st.sampled_from([MAX_FRAME_SIZE, 64, 16, 1]),  # shrinks towards MAX
    eof=st.booleans(),
    draw=st.data(),
)
def test_any_bytes_give_events_or_a_remote_protocol_error(role, max_frame_size, eof, draw):
    # Mostly damaged valid streams, which get further into the decoder than random bytes.
    any_bytes = st.one_of(st.binary(max_size=300), mangled_stream(role), mangled_stream(role))
    data = draw.draw(any_bytes, label="data")
    whole = outcome(role, [data] if data else [], max_frame_size, eof)
    in_pieces = outcome(role, draw.draw(chunked(data)) if data else [], max_frame_size, eof)
    assert in_pieces == whole

    events, end = whole
    kind = end if end in (CLOSED, NEED_DATA) else re.sub(r"0x[0-9A-F]+|[0-9]+", "N", end)
    event(f"ends with {kind}")  # statistics: pytest --hypothesis-show-statistics
    event(f"events decoded: {min(len(events), 3)}{'+' if len(events) >= 3 else ''}")
    # Canonical encoding: the events re-encode to exactly the bytes they came from...
    encoded = b"".join(encode_event(e, max_frame_size=max_frame_size) for e in events)
    assert data[: len(encoded)] == encoded
    # ...and are valid events: rebuilding them runs the validation the decoder skips.
    for decoded in events:
        assert dataclasses.replace(decoded) == decoded
    if end is CLOSED:
        assert encoded == data and eof
    elif end is NEED_DATA:
        assert not eof and len(data) - len(encoded) < 4 + max_frame_size


@SETTINGS
@given(sequence=valid_sequence(), draw=st.data())
def test_valid_event_sequences_round_trip(sequence, draw):
    role, events = sequence
    data = b"".join(map(encode_event, events))
    chunks = draw.draw(chunked(data)) if data else []
    assert outcome(role, chunks, MAX_FRAME_SIZE, eof=True) == (events, CLOSED)


@SETTINGS
@given(event=st.one_of(CLIENT_EVENT, SERVER_EVENT, HELLO))
def test_encoding_is_length_prefixed_and_typed(event):
    data = encode_event(event)
    assert int.from_bytes(data[:4], "big") == len(data) - 4
    assert data[4] == event.TYPE


# ---------------------------------------------------------------------------------------
# The Send fast path (codec._decode_send) against the generic plan it stands in for


def _generic(body: bytes):
    """What the generic plan makes of a Send body: the event, or the error's text."""
    from chatserver.protocol import codec

    values: list = []
    try:
        end = codec._DECODERS[Send](body, 1, values)
    except RemoteProtocolError as e:
        return ("error", str(e))
    return values[0] if end == len(body) else ("error", "left over")


@st.composite
def event_bodies(draw, cls, *, shortest: int, places, values) -> bytes:
    """Frame bodies of ``cls`` events, well formed or damaged: cut to ``shortest`` bytes or
    more, extended, or a byte at one of ``places(body)`` replaced by one of ``values``."""
    body = encode_event(draw(struct_strategy(cls)))[4:]
    damage = draw(st.sampled_from(["none", "cut", "extend", "replace"]))
    if damage == "cut":
        return body[:draw(st.integers(shortest, len(body)))]
    if damage == "extend":
        return body + draw(st.binary(min_size=1, max_size=4))
    if damage == "replace":
        i = draw(st.sampled_from(places(body)))
        return body[:i] + bytes([draw(values)]) + body[i + 1:]
    return body


def send_bodies():
    """Send bodies: cut anywhere, extended, any byte after the type byte flipped."""
    return event_bodies(Send, shortest=0, places=lambda body: range(1, len(body)),
                        values=st.integers(0, 255))


@SETTINGS
@given(body=st.one_of(send_bodies(), st.binary(max_size=40).map(lambda b: b"\x06" + b)))
def test_send_fast_path_agrees_with_the_generic_plan(body):
    """The fast path decodes exactly what the generic plan decodes, and declines (None, so
    the plan reports its precise error) whatever the plan refuses."""
    from chatserver.protocol.codec import _decode_send, decode_body

    fast = _decode_send(body)
    generic = _generic(body)
    if isinstance(generic, tuple):
        assert fast is None
        with pytest.raises(RemoteProtocolError):
            decode_body(Send, body)
    else:
        assert fast == generic
        assert decode_body(Send, body) == generic


# ---------------------------------------------------------------------------------------
# The load generator's fast paths: encode_send, and decode_body's for Sent


@SETTINGS
@given(event=struct_strategy(Send))
def test_encode_send_is_the_frame_of_the_send_event(event):
    from chatserver.protocol import encode_send

    assert encode_send(event.request_id, event.to, event.client_msg_id, event.body) == \
        encode_event(event)


def sent_bodies():
    """Sent bodies: cut, extended, or a bool byte that is neither 0 nor 1."""
    return event_bodies(Sent, shortest=1, places=lambda body: [len(body) - 2, len(body) - 1],
                        values=st.integers(2, 255))


@SETTINGS
@given(body=sent_bodies())
def test_sent_fast_path_agrees_with_the_generic_plan(body):
    from chatserver.protocol import codec

    values: list = []
    try:
        end = codec._DECODERS[Sent](body, 1, values)
        generic = values[0] if end == len(body) else None
    except RemoteProtocolError:
        generic = None
    if generic is None:
        with pytest.raises(RemoteProtocolError):
            codec.decode_body(Sent, body)
    else:
        decoded = codec.decode_body(Sent, body)
        assert decoded == generic
        assert type(decoded.pushed) is bool and type(decoded.duplicate) is bool
