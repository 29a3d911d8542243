"""Events and their encoding: exact bytes, round trips, validation, and PROTOCOL.md."""

import re
from pathlib import Path

import pytest

import chatserver.protocol as proto
from chatserver.protocol import (
    CLOSED,
    MAX_FRAME_SIZE,
    PROTOCOL_VERSION,
    REQUEST_TYPES,
    AccountDeleted,
    AccountEntry,
    AccountList,
    Ack,
    Acked,
    Connection,
    DeleteAccount,
    Error,
    Fetch,
    Hello,
    ListAccounts,
    LocalProtocolError,
    LoggedIn,
    Login,
    Logout,
    Message,
    Messages,
    Notice,
    Ok,
    Ping,
    Pong,
    ProtocolError,
    Push,
    Register,
    RemoteProtocolError,
    Send,
    Sent,
    Welcome,
    encode_event,
)
from chatserver.protocol.events import ALL_EVENTS, CLIENT_EVENTS, SERVER_EVENTS

PROTOCOL_MD = Path(__file__).resolve().parents[2] / "PROTOCOL.md"

U8, U16, U32, U64 = 0xFF, 0xFFFF, 0xFFFF_FFFF, 0xFFFF_FFFF_FFFF_FFFF
HELLO = Hello(request_id=0, version=1, client="")


def decode_all(data: bytes, role: str) -> list:
    """Every event in ``data`` as received by a fresh ``role`` connection, then EOF."""
    conn = Connection(role)
    conn.receive_data(data)
    conn.receive_data(b"")
    events = conn.events()
    assert conn.next_event() is CLOSED
    return events


def receive_one(event) -> object:
    """Encode ``event`` and decode it at the receiving end; returns the decoded event."""
    if type(event) in SERVER_EVENTS:
        [decoded] = decode_all(encode_event(event), "client")
        return decoded
    if isinstance(event, Hello):
        [decoded] = decode_all(encode_event(event), "server")
        return decoded
    hello, decoded = decode_all(encode_event(HELLO) + encode_event(event), "server")
    assert hello == HELLO
    return decoded


# ---------------------------------------------------------------------------------------
# Exact bytes, worked out by hand from PROTOCOL.md sections 1-3 (not from the encoder)

GOLDEN = [
    (
        Hello(request_id=1, version=1, client="chat-cli/1.0"),
        "00000015" "01" "00000001" "0001" "000c" "636861742d636c692f312e30",
    ),
    (
        Register(request_id=2, name="alice", password="s3cret"),
        "00000014" "02" "00000002" "0005" "616c696365" "0006" "733363726574",
    ),
    (Logout(request_id=9), "00000005" "04" "00000009"),
    (
        ListAccounts(request_id=4, pattern="a*", after="", limit=500),
        "0000000d" "05" "00000004" "0002" "612a" "0000" "01f4",
    ),
    (
        Send(request_id=3, to="bob", client_msg_id="m1", body="héllo"),
        "00000018" "06" "00000003" "0003" "626f62" "0002" "6d31" "00000006" "68c3a96c6c6f",
    ),
    (Fetch(request_id=5, limit=0), "00000007" "07" "00000005" "0000"),
    (
        Ack(request_id=5, message_ids=(1, U64)),
        "00000017" "08" "00000005" "0002" "0000000000000001" "ffffffffffffffff",
    ),
    (Ack(request_id=5, message_ids=()), "00000007" "08" "00000005" "0000"),
    (
        Welcome(request_id=1, version=1, server="chatserver/0.1", max_frame_size=MAX_FRAME_SIZE,
                max_message_bytes=65536, heartbeat_interval=30),
        "00000021" "81" "00000001" "0001" "000e" "636861747365727665722f302e31"
        "00100000" "00010000" "001e",
    ),
    (
        AccountList(request_id=6, next_after="",
                    accounts=(AccountEntry("alice", True), AccountEntry("bob", False))),
        "00000017" "85" "00000006" "0002" "0005616c696365" "01" "0003626f62" "00" "0000",
    ),
    (
        Sent(request_id=3, message_id=42, pushed=True, duplicate=False),
        "0000000f" "86" "00000003" "000000000000002a" "01" "00",
    ),
    (
        Push(Message(id=42, sender="alice", sent_at=1_700_000_000_000, body="hi")),
        "0000001e" "90" "000000000000002a" "0005616c696365" "0000018bcfe56800" "00000002" "6869",
    ),
    (
        Messages(request_id=7, messages=(Message(1, "al", 2, ""),), remaining=U32),
        "00000023" "87" "00000007" "0001" "0000000000000001" "0002616c" "0000000000000002"
        "00000000" "ffffffff",
    ),
    (
        Error(request_id=0, code="protocol_error", text="frame before Hello"),
        "0000002d" "ff" "00000000" "000e" "70726f746f636f6c5f6572726f72"
        "0012" "6672616d65206265666f72652048656c6c6f" "00000000",
    ),
    (Ping(nonce=U32), "00000005" "20" "ffffffff"),
    (Pong(nonce=0), "00000005" "21" "00000000"),
]


@pytest.mark.parametrize("event, hexbytes", GOLDEN, ids=[type(e).__name__ for e, _ in GOLDEN])
def test_golden_bytes(event, hexbytes):
    assert encode_event(event).hex() == hexbytes
    assert receive_one(event) == event


# ---------------------------------------------------------------------------------------
# Round trips of every frame type

LONG = "x" * 1000
UNICODE = "naïve ☺ 𝄞 中文 \u0000 end"  # 1-, 2-, 3- and 4-byte UTF-8, and a NUL
MSG = Message(id=U64, sender="ålice", sent_at=U64, body=UNICODE)

SAMPLES = [
    Hello(request_id=U32, version=U16, client=UNICODE),
    Hello(request_id=0),
    Register(request_id=1, name="a", password="p" * 1024),
    Login(request_id=2, name="Ålice", password=UNICODE),
    Logout(request_id=0),
    ListAccounts(request_id=3),
    ListAccounts(request_id=3, pattern="*a?", after="bob", limit=U16),
    Send(request_id=4, to="bob", body="hi"),
    Send(request_id=U32, to=UNICODE, client_msg_id="x" * 64, body=LONG),
    Send(request_id=0, to="", client_msg_id="", body=""),
    Fetch(request_id=5),
    Fetch(request_id=5, limit=U16),
    Ack(request_id=6, message_ids=()),
    Ack(request_id=6, message_ids=tuple(range(1000)) + (U64,)),
    DeleteAccount(request_id=7, password="pw"),
    Ok(request_id=U32),
    Welcome(request_id=1, version=1, server="s", max_frame_size=U32, max_message_bytes=0,
            heartbeat_interval=U16),
    LoggedIn(request_id=2, name="alice", pending=U32),
    AccountList(request_id=3, accounts=(), next_after=""),
    AccountList(request_id=3, accounts=(AccountEntry(UNICODE, True), AccountEntry("", False)),
                next_after=UNICODE),
    Sent(request_id=4, message_id=U64, pushed=False, duplicate=True),
    Messages(request_id=5, messages=(), remaining=0),
    Messages(request_id=5, messages=(MSG, Message(0, "", 0, ""), MSG), remaining=3),
    Acked(request_id=6, count=U32),
    AccountDeleted(request_id=7, discarded=U32),
    Push(MSG),
    Push(Message(id=0, sender="", sent_at=0, body="")),
    Notice(code="account_deleted", text=UNICODE),
    Error(request_id=U32, code="storage_unavailable", text=LONG, retry_after_ms=U32),
    Error(request_id=0, code="", text=""),
    Ping(nonce=0),
    Pong(nonce=U32),
]


def test_samples_cover_every_frame_type():
    assert {type(e) for e in SAMPLES} == set(ALL_EVENTS)


@pytest.mark.parametrize("event", SAMPLES, ids=[type(e).__name__ for e in SAMPLES])
def test_round_trip(event):
    assert receive_one(event) == event


def test_all_samples_in_one_stream_each_way():
    client = [e for e in SAMPLES if type(e) in CLIENT_EVENTS and not isinstance(e, Hello)]
    server = [e for e in SAMPLES if type(e) in SERVER_EVENTS]
    stream = b"".join(map(encode_event, [HELLO] + client))
    assert decode_all(stream, "server") == [HELLO] + client
    assert decode_all(b"".join(map(encode_event, server)), "client") == server


def test_ping_and_pong_travel_both_ways():
    for event in (Ping(7), Pong(7)):
        assert decode_all(encode_event(event), "client") == [event]
        assert decode_all(encode_event(HELLO) + encode_event(event), "server") == [HELLO, event]


def test_str_field_of_exactly_65535_bytes():
    name = "é" * 32767 + "a"  # 2 * 32767 + 1 = 65535 UTF-8 bytes
    event = Register(request_id=1, name=name, password="x" * 65535)
    assert receive_one(event) == event
    with pytest.raises(LocalProtocolError):
        Register(request_id=1, name=name + "a", password="x")
    with pytest.raises(LocalProtocolError):
        Register(request_id=1, name="x", password="x" * 65536)


def test_decoded_events_are_equal_and_hashable():
    decoded = receive_one(SAMPLES[13])  # Ack with 1001 ids
    assert type(decoded.message_ids) is tuple
    assert hash(decoded) == hash(SAMPLES[13])
    assert decoded == SAMPLES[13]


# ---------------------------------------------------------------------------------------
# Event classes: the API others build on


def test_public_api():
    assert MAX_FRAME_SIZE == 1_048_576
    assert PROTOCOL_VERSION == 1
    assert issubclass(LocalProtocolError, ProtocolError)
    assert issubclass(RemoteProtocolError, ProtocolError)
    assert issubclass(ProtocolError, Exception)
    assert REQUEST_TYPES == (Hello, Register, Login, Logout, ListAccounts, Send, Fetch, Ack,
                             DeleteAccount)
    for name in proto.__all__:
        assert hasattr(proto, name), name


def test_type_codes():
    codes = {cls.__name__: cls.TYPE for cls in ALL_EVENTS}
    assert codes == {
        "Hello": 0x01, "Register": 0x02, "Login": 0x03, "Logout": 0x04, "ListAccounts": 0x05,
        "Send": 0x06, "Fetch": 0x07, "Ack": 0x08, "DeleteAccount": 0x09,
        "Ok": 0x80, "Welcome": 0x81, "LoggedIn": 0x82, "AccountList": 0x85, "Sent": 0x86,
        "Messages": 0x87, "Acked": 0x88, "AccountDeleted": 0x89, "Push": 0x90, "Notice": 0x91,
        "Error": 0xFF, "Ping": 0x20, "Pong": 0x21,
    }


def test_defaults():
    assert Send(request_id=1, to="bob", body="hi") == Send(1, "bob", "", "hi")
    assert ListAccounts(1) == ListAccounts(1, pattern="", after="", limit=0)
    assert Fetch(1) == Fetch(1, 0)
    assert Hello(1) == Hello(1, PROTOCOL_VERSION, "")
    assert Error(1, "c", "t") == Error(1, "c", "t", retry_after_ms=0)
    assert Ack(1) == Ack(1, ())


def test_events_are_frozen():
    event = Send(1, "bob", body="hi")
    with pytest.raises(AttributeError):
        event.body = "changed"  # type: ignore[misc]


def test_lists_become_tuples():
    ack = Ack(1, [3, 4])
    assert ack.message_ids == (3, 4) and type(ack.message_ids) is tuple
    assert ack == Ack(1, (3, 4))
    assert len({ack, Ack(1, (3, 4))}) == 1
    listing = AccountList(1, [AccountEntry("a", True)], "")
    assert type(listing.accounts) is tuple
    assert type(Messages(1, [MSG], 0).messages) is tuple


INVALID = [
    # integers at N+1 and below 0, for each width
    lambda: Hello(request_id=U32 + 1),
    lambda: Hello(request_id=-1),
    lambda: Hello(request_id=1, version=U16 + 1),
    lambda: Sent(request_id=1, message_id=U64 + 1),
    lambda: Fetch(request_id=1, limit=-1),
    lambda: Error(request_id=1, code="c", text="t", retry_after_ms=U32 + 1),
    # wrong Python types
    lambda: Ping(nonce=1.0),
    lambda: Ping(nonce="1"),
    lambda: Ping(nonce=True),
    lambda: Sent(request_id=1, message_id=1, pushed=1),
    lambda: Sent(request_id=1, message_id=1, duplicate=None),
    lambda: AccountEntry(name="a", online=2),
    lambda: Login(request_id=1, name=b"alice", password="p"),
    lambda: Send(request_id=1, to="bob", body=None),
    # strings that do not fit or cannot be encoded
    lambda: Notice(code="x" * 65536, text=""),
    lambda: Notice(code="☺" * 21846, text=""),  # 65538 bytes in 21846 characters
    lambda: Login(request_id=1, name="\ud800", password="p"),
    lambda: Send(request_id=1, to="bob", body="lone surrogate \udfff"),
    # lists
    lambda: Ack(request_id=1, message_ids=[1, -1]),
    lambda: Ack(request_id=1, message_ids=[True]),
    lambda: Ack(request_id=1, message_ids=range(3)),
    lambda: Ack(request_id=1, message_ids=[0] * 65536),
    lambda: Messages(request_id=1, messages=[Push(MSG)], remaining=0),
    lambda: AccountList(request_id=1, accounts=[("a", True)], next_after=""),
    # records
    lambda: Push(message=(1, "a", 2, "b")),
    lambda: Message(id=-1, sender="a", sent_at=0, body=""),
]


@pytest.mark.parametrize("make", INVALID, ids=range(len(INVALID)))
def test_invalid_events_raise_local_protocol_error(make):
    with pytest.raises(LocalProtocolError):
        make()


def test_list_of_65535_items_is_allowed():
    assert len(Ack(1, [0] * 65535).message_ids) == 65535


def test_validation_message_names_the_field():
    with pytest.raises(LocalProtocolError, match=r"Sent\.message_id.*u64"):
        Sent(request_id=1, message_id=-5)


def test_encode_event_refuses_non_events_and_oversized_frames():
    with pytest.raises(LocalProtocolError):
        encode_event(MSG)  # a record, not a frame
    with pytest.raises(LocalProtocolError):
        encode_event("hello")  # type: ignore[arg-type]
    body = "x" * (MAX_FRAME_SIZE - 1 - 4 - 2 - 2 - 4)  # a Send frame of exactly the limit
    assert len(encode_event(Send(1, "", "", body))) == 4 + MAX_FRAME_SIZE
    with pytest.raises(LocalProtocolError, match="over the limit"):
        encode_event(Send(1, "", "", body + "x"))
    assert len(encode_event(Send(1, "", "", body + "x"), max_frame_size=MAX_FRAME_SIZE + 1)) == (
        4 + MAX_FRAME_SIZE + 1
    )


# ---------------------------------------------------------------------------------------
# PROTOCOL.md stays true: its frame tables match the classes, its examples match the encoder

_KIND_NAMES = {"u8": "u8", "u16": "u16", "u32": "u32", "u64": "u64", "bool": "bool",
               "str": "str", "text": "text"}


def _doc() -> str:
    if not PROTOCOL_MD.exists():
        pytest.skip("PROTOCOL.md is not next to the package (installed tests)")
    return PROTOCOL_MD.read_text(encoding="utf-8")


def _kind_name(kind) -> str:
    if isinstance(kind, type):
        return kind.__name__
    if kind.name == "list":
        return f"list<{_kind_name(kind.item)}>"
    return kind.name


def _layout(cls) -> list[tuple[str, str]]:
    return [(name, _kind_name(kind)) for name, kind in cls.WIRE_FIELDS]


def test_frame_tables_in_protocol_md_match_the_event_classes():
    doc = _doc()
    rows = re.findall(r"^\| (0x[0-9A-F]{2}) \| `(\w+)` \| ([^|]*) \|", doc, re.MULTILINE)
    documented = {name: (int(code, 16), re.findall(r"`(\w+)` ([\w<>]+)", cells))
                  for code, name, cells in rows}
    actual = {cls.__name__: (cls.TYPE, _layout(cls)) for cls in ALL_EVENTS}
    assert documented == actual
    for record in (Message, AccountEntry):
        [cells] = re.findall(rf"^\| `{record.__name__}` \| ([^|]*) \|", doc, re.MULTILINE)
        assert re.findall(r"`(\w+)` ([\w<>]+)", cells) == _layout(record)


def _examples(doc: str) -> list[tuple[str, bytes]]:
    section = doc.split("## 8. Examples", 1)[1]
    found = []
    for block in re.findall(r"```\n(.*?)```", section, re.DOTALL):
        lines = [line for line in block.splitlines() if line.strip()]
        # The first line is the event as Python; each other line is hex bytes, then two or
        # more spaces, then a note.
        data = "".join(re.split(r"\s{2,}", line.strip(), maxsplit=1)[0] for line in lines[1:])
        found.append((lines[0], bytes.fromhex(data)))
    return found


def test_protocol_md_examples_are_what_the_encoder_produces():
    examples = _examples(_doc())
    assert len(examples) >= 6
    namespace = {name: getattr(proto, name) for name in proto.__all__}
    for source, data in examples:
        event = eval(source, namespace)  # noqa: S307 - our own document
        assert encode_event(event) == data, source
        assert receive_one(event) == event


@pytest.mark.parametrize("request_id, message_id, pushed, duplicate", [
    (0, 1, False, False), (4, 42, True, False), (2**32 - 1, 2**63 - 1, False, True),
    (7, 2**64 - 1, True, True),
])
def test_encode_sent_is_the_frame_of_a_sent_event(request_id, message_id, pushed, duplicate):
    """The server's fast path for Sent writes exactly what encode_event would."""
    from chatserver.protocol import encode_sent

    assert encode_sent(request_id, message_id, pushed, duplicate) == encode_event(
        Sent(request_id=request_id, message_id=message_id, pushed=pushed, duplicate=duplicate))
