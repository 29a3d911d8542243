"""Frame and field encoding (PROTOCOL.md sections 1 and 2), compiled from the event table.

Each event class lists its fields and their wire kinds (``WIRE_FIELDS``). At import, this
module turns each list into a short plan of steps: consecutive fixed-width fields share one
precompiled ``struct.Struct``; strings, lists and records get a step each. Encoding and
decoding then just run the plan, with no per-byte work in Python.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from operator import attrgetter
from typing import Any

from .errors import LocalProtocolError, RemoteProtocolError
from .events import ALL_EVENTS, Boolean, Event, Int, ListOf, Send, Sent, String, Struct

# Largest value of a frame's length field (type byte + payload) in either direction. It
# bounds what a receiver buffers for one frame, so a peer cannot make it allocate more; 1 MiB
# holds the largest reply the server builds (a page of fetched messages) with room to spare.
MAX_FRAME_SIZE = 1_048_576

HEADER = struct.Struct(">IB")  # length, type
LENGTH = struct.Struct(">I")
_COUNT = struct.Struct(">H")  # list<X> item count

# A step of an encode plan appends one or more fields of ``obj`` to ``out``.
EncodeStep = Callable[[Any, bytearray], None]
# A step of a decode plan appends one or more fields read from ``data`` at ``pos`` to
# ``values`` and returns the position after them.
DecodeStep = Callable[[bytes, int, list[Any]], int]


def _short(what: str) -> RemoteProtocolError:
    return RemoteProtocolError(f"payload ends inside {what}")


# ---------------------------------------------------------------------------------------
# Steps, one factory per kind of field


def _fixed_steps(owner: str, names: list[str], kinds: list[Any]) -> tuple[EncodeStep, DecodeStep]:
    """One struct for a run of consecutive integer and bool fields."""
    st = struct.Struct(">" + "".join("B" if isinstance(k, Boolean) else k.fmt for k in kinds))
    size, pack, unpack = st.size, st.pack, st.unpack_from
    get = attrgetter(*names)
    what = f"{owner}.{names[0]}" if len(names) == 1 else f"{owner}.{{{', '.join(names)}}}"
    bools = tuple(i for i, k in enumerate(kinds) if isinstance(k, Boolean))

    if len(names) == 1:
        def encode(obj: Any, out: bytearray) -> None:
            out += pack(get(obj))
    else:
        def encode(obj: Any, out: bytearray) -> None:
            out += pack(*get(obj))

    if not bools:
        def decode(data: bytes, pos: int, values: list[Any]) -> int:
            if pos + size > len(data):
                raise _short(what)
            values.extend(unpack(data, pos))
            return pos + size
    else:
        def decode(data: bytes, pos: int, values: list[Any]) -> int:
            if pos + size > len(data):
                raise _short(what)
            fields = list(unpack(data, pos))
            for i in bools:
                if fields[i] > 1:
                    raise RemoteProtocolError(f"bool value {fields[i]} in {owner}.{names[i]}")
                fields[i] = fields[i] == 1
            values.extend(fields)
            return pos + size

    return encode, decode


def _string_steps(owner: str, name: str, kind: String) -> tuple[EncodeStep, DecodeStep]:
    prefix = struct.Struct(">" + kind.fmt)
    psize, pack, unpack = prefix.size, prefix.pack, prefix.unpack_from
    get = attrgetter(name)
    what = f"{owner}.{name}"

    def encode(obj: Any, out: bytearray) -> None:
        raw = get(obj).encode("utf-8")
        out += pack(len(raw))
        out += raw

    def decode(data: bytes, pos: int, values: list[Any]) -> int:
        start = pos + psize
        if start > len(data):
            raise _short(what)
        stop: int = start + unpack(data, pos)[0]
        if stop > len(data):
            raise _short(what)
        try:
            values.append(data[start:stop].decode("utf-8"))
        except UnicodeDecodeError as e:
            raise RemoteProtocolError(f"invalid UTF-8 in {what}: {e.reason}") from None
        return stop

    return encode, decode


def _record_steps(owner: str, name: str, cls: type[Struct]) -> tuple[EncodeStep, DecodeStep]:
    get = attrgetter(name)
    encode_record, decode_record = _plan(cls)

    def encode(obj: Any, out: bytearray) -> None:
        encode_record(get(obj), out)

    def decode(data: bytes, pos: int, values: list[Any]) -> int:
        item: list[Any] = []
        pos = decode_record(data, pos, item)
        values.append(item[0])
        return pos

    return encode, decode


def _list_steps(owner: str, name: str, kind: ListOf) -> tuple[EncodeStep, DecodeStep]:
    if isinstance(kind.item, Int):
        return _int_list_steps(owner, name, kind.item)
    return _item_list_steps(owner, name, kind.item)


def _int_list_steps(owner: str, name: str, item: Int) -> tuple[EncodeStep, DecodeStep]:
    """A list of integers is one struct call each way, e.g. ">H3Q" for three u64 ids."""
    get = attrgetter(name)
    what = f"{owner}.{name}"
    code, item_size = item.fmt, item.size
    count_size, unpack_count = _COUNT.size, _COUNT.unpack_from

    def encode(obj: Any, out: bytearray) -> None:
        items = get(obj)
        out += struct.pack(f">H{len(items)}{code}", len(items), *items)

    def decode(data: bytes, pos: int, values: list[Any]) -> int:
        if pos + count_size > len(data):
            raise _short(what)
        count: int = unpack_count(data, pos)[0]
        pos += count_size
        stop = pos + count * item_size
        if stop > len(data):
            raise _short(what)
        values.append(struct.unpack_from(f">{count}{code}", data, pos))
        return stop

    return encode, decode


def _item_list_steps(owner: str, name: str, item: type[Struct]) -> tuple[EncodeStep, DecodeStep]:
    """A list of records, item by item with the record's own steps."""
    get = attrgetter(name)
    what = f"{owner}.{name}"
    count_size, pack_count, unpack_count = _COUNT.size, _COUNT.pack, _COUNT.unpack_from
    item_encode, item_decode = _plan(item)

    def encode(obj: Any, out: bytearray) -> None:
        items = get(obj)
        out += pack_count(len(items))
        for one in items:
            item_encode(one, out)

    def decode(data: bytes, pos: int, values: list[Any]) -> int:
        if pos + count_size > len(data):
            raise _short(what)
        count: int = unpack_count(data, pos)[0]
        pos += count_size
        items: list[Any] = []
        for _ in range(count):
            pos = item_decode(data, pos, items)
        values.append(tuple(items))
        return pos

    return encode, decode


# ---------------------------------------------------------------------------------------
# Plans: the steps of one event or record class, run in order


def _steps(cls: type[Struct]) -> list[tuple[EncodeStep, DecodeStep]]:
    owner = cls.__name__
    steps = []
    run_names: list[str] = []
    run_kinds: list[Any] = []
    for name, kind in cls.WIRE_FIELDS + (("", None),):  # a sentinel flushes the last run
        if isinstance(kind, (Int, Boolean)):
            run_names.append(name)
            run_kinds.append(kind)
            continue
        if run_names:
            steps.append(_fixed_steps(owner, run_names, run_kinds))
            run_names, run_kinds = [], []
        if kind is None:
            break
        if isinstance(kind, String):
            steps.append(_string_steps(owner, name, kind))
        elif isinstance(kind, ListOf):
            steps.append(_list_steps(owner, name, kind))
        else:
            steps.append(_record_steps(owner, name, kind))
    return steps


def _plan(cls: type[Struct]) -> tuple[EncodeStep, DecodeStep]:
    """Encode and decode functions for all fields of ``cls``, appending/reading in place."""
    steps = _steps(cls)
    encoders = tuple(e for e, _ in steps)
    decoders = tuple(d for _, d in steps)
    build = cls._unchecked

    def encode(obj: Any, out: bytearray) -> None:
        for step in encoders:
            step(obj, out)

    def decode(data: bytes, pos: int, values: list[Any]) -> int:
        fields: list[Any] = []
        for step in decoders:
            pos = step(data, pos, fields)
        values.append(build(fields))
        return pos

    return encode, decode


# type byte -> event class
EVENT_TYPES: dict[int, type[Event]] = {cls.TYPE: cls for cls in ALL_EVENTS}
_ENCODERS: dict[type, EncodeStep] = {}
_DECODERS: dict[type, DecodeStep] = {}
for _cls in ALL_EVENTS:
    _ENCODERS[_cls], _DECODERS[_cls] = _plan(_cls)
del _cls


# ---------------------------------------------------------------------------------------
# Public functions


def encode_event(event: Event, max_frame_size: int = MAX_FRAME_SIZE) -> bytes:
    """Encode ``event`` as a whole frame, length prefix included.

    Raises LocalProtocolError if ``event`` is not an event or its frame's length field
    would exceed ``max_frame_size``.
    """
    encode = _ENCODERS.get(type(event))
    if encode is None:
        raise LocalProtocolError(f"not a protocol event: {event!r}")
    out = bytearray(HEADER.size)  # filled in once the length is known
    encode(event, out)
    length = len(out) - LENGTH.size
    if length > max_frame_size:
        raise LocalProtocolError(
            f"{type(event).__name__} frame of {length} bytes is over the limit of {max_frame_size}"
        )
    HEADER.pack_into(out, 0, length, event.TYPE)
    return bytes(out)


def decode_body(cls: type[Event], body: bytes) -> Event:
    """Decode a frame body (type byte then payload) known to be of type ``cls``.

    Raises RemoteProtocolError if the payload is short, has bytes left over, or holds a bad
    value (invalid UTF-8, a bool other than 0 or 1).
    """
    if cls is Send:
        event = _decode_send(body)
        if event is not None:
            return event
    elif cls is Sent and len(body) == _SENT_BODY.size:
        _type, request_id, message_id, pushed, duplicate = _SENT_BODY.unpack(body)
        if pushed <= 1 and duplicate <= 1:  # else the generic plan reports the bad bool
            return _build_sent([request_id, message_id, pushed == 1, duplicate == 1])
    values: list[Any] = []
    end = _DECODERS[cls](body, 1, values)
    if end != len(body):
        raise RemoteProtocolError(
            f"{len(body) - end} bytes left over after the last field of {cls.__name__}"
        )
    event: Event = values[0]
    return event



# Send's fields, as _decode_send reads them: the event table must still say the same.
if [(name, getattr(kind, "fmt", None)) for name, kind in Send.WIRE_FIELDS] != [
        ("request_id", "I"), ("to", "H"), ("client_msg_id", "H"), ("body", "I")]:
    raise ImportError("Send's wire fields changed: update _decode_send")
_SEND_HEAD = struct.Struct(">IH")  # request_id, length of ``to``
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_build_send = Send._unchecked


def _decode_send(body: bytes) -> Send | None:
    """The Send that ``decode_body`` builds from a well-formed body, in one straight pass
    (the server decodes one per message); None for any flaw, which the generic plan then
    reports with its exact error."""
    try:
        request_id, to_len = _SEND_HEAD.unpack_from(body, 1)
        pos = 7 + to_len
        cid_len = _U16.unpack_from(body, pos)[0]
        cid_start = pos + 2
        text_start = cid_start + cid_len + 4
        text_len = _U32.unpack_from(body, text_start - 4)[0]
        if text_start + text_len != len(body):
            return None
        return _build_send([request_id, body[7:pos].decode("utf-8"),
                            body[cid_start:cid_start + cid_len].decode("utf-8"),
                            body[text_start:].decode("utf-8")])
    except (struct.error, UnicodeDecodeError):
        return None


_SENT_FRAME = struct.Struct(">IBIQ??")  # length, type, request_id, message_id, pushed, duplicate
_SENT_BODY = struct.Struct(">BIQBB")  # the same without the length; bools read as bytes
_build_sent = Sent._unchecked
if [(name, getattr(kind, "fmt", type(kind))) for name, kind in Sent.WIRE_FIELDS] != [
        ("request_id", "I"), ("message_id", "Q"), ("pushed", Boolean), ("duplicate", Boolean)]:
    raise ImportError("Sent's wire fields changed: update encode_sent and decode_body")


def encode_sent(request_id: int, message_id: int, pushed: bool, duplicate: bool) -> bytes:
    """The frame ``encode_event(Sent(...))`` makes, without building the event first.

    The server writes one per stored message, so this reply alone skips the event object
    and its checks; the caller passes values it knows are in range (a decoded u32 request
    id, a database id). Raises struct.error otherwise.
    """
    return _SENT_FRAME.pack(_SENT_FRAME.size - LENGTH.size, 0x86, request_id, message_id,
                            pushed, duplicate)


def encode_send(request_id: int, to: str, client_msg_id: str, body: str) -> bytes:
    """The frame ``encode_event(Send(...))`` makes, without building the event first.

    For clients that send many messages (``chat bench``'s load generators): no event object
    and no field checks. The caller passes values it knows are valid (a u32 request id, an
    account name, a client id of at most 64 characters); struct.error or UnicodeEncodeError
    otherwise. The frame is not checked against a peer's frame size limit.
    """
    to_bytes = to.encode("utf-8")
    cid_bytes = client_msg_id.encode("utf-8")
    text = body.encode("utf-8")
    length = 1 + 4 + 2 + len(to_bytes) + 2 + len(cid_bytes) + 4 + len(text)
    return b"".join((_SEND_FRAME_HEAD.pack(length, Send.TYPE, request_id, len(to_bytes)),
                     to_bytes, _U16.pack(len(cid_bytes)), cid_bytes, _U32.pack(len(text)),
                     text))


_SEND_FRAME_HEAD = struct.Struct(">IBIH")  # length, type, request_id, length of ``to``
