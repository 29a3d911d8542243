"""Events: one frozen dataclass per frame type of PROTOCOL.md section 3.

Each field's annotation names its wire encoding (``U32``, ``Str``, ``Text``...), so the
class body is the frame layout: the codec reads it, and ``__post_init__`` checks every value
against it (raising LocalProtocolError). An event that exists therefore always encodes; only
the frame size limit is left to check, by the encoder.
"""

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Annotated, Any, ClassVar, get_origin

from .errors import LocalProtocolError

PROTOCOL_VERSION = 1

# ---------------------------------------------------------------------------------------
# Field kinds (PROTOCOL.md section 2)


@dataclass(frozen=True, slots=True)
class Int:
    """An unsigned big-endian integer; ``fmt`` is its struct code."""

    name: str
    fmt: str
    size: int

    @property
    def max(self) -> int:
        return (1 << (8 * self.size)) - 1


@dataclass(frozen=True, slots=True)
class Boolean:
    """A u8 that must be 0 or 1."""

    name: str = "bool"


@dataclass(frozen=True, slots=True)
class String:
    """UTF-8 bytes after a length prefix of struct code ``fmt``."""

    name: str
    fmt: str
    max_bytes: int


@dataclass(frozen=True, slots=True)
class ListOf:
    """A u16 count, then that many items; ``item`` is a kind or a record class."""

    item: Any
    name: str = "list"
    max_items: int = 0xFFFF


U8_KIND = Int("u8", "B", 1)
U16_KIND = Int("u16", "H", 2)
U32_KIND = Int("u32", "I", 4)
U64_KIND = Int("u64", "Q", 8)
BOOL_KIND = Boolean()
STR_KIND = String("str", "H", 0xFFFF)
TEXT_KIND = String("text", "I", 0xFFFF_FFFF)

# Annotations for event fields: the Python type plus the wire kind.
U8 = Annotated[int, U8_KIND]
U16 = Annotated[int, U16_KIND]
U32 = Annotated[int, U32_KIND]
U64 = Annotated[int, U64_KIND]
Bool = Annotated[bool, BOOL_KIND]
Str = Annotated[str, STR_KIND]
Text = Annotated[str, TEXT_KIND]


# ---------------------------------------------------------------------------------------
# Validation, compiled once per class from its annotations


class _Invalid(Exception):
    pass


def _int_check(kind: Int) -> Callable[[Any], Any]:
    hi = kind.max

    def check(v: Any) -> Any:
        if type(v) is int and 0 <= v <= hi:  # fast path
            return v
        # bool is an int subclass, but passing one for a number is almost surely a bug.
        if not isinstance(v, int) or isinstance(v, bool):
            raise _Invalid(f"expected an int for {kind.name}, got {type(v).__name__}")
        if not 0 <= v <= hi:
            raise _Invalid(f"{v} out of range for {kind.name} (0..{hi})")
        return v

    return check


def _bool_check(v: Any) -> Any:
    if v is True or v is False:
        return v
    raise _Invalid(f"expected a bool, got {type(v).__name__}")


def _string_check(kind: String) -> Callable[[Any], Any]:
    limit = kind.max_bytes

    def check(v: Any) -> Any:
        if not isinstance(v, str):
            raise _Invalid(f"expected a str for {kind.name}, got {type(v).__name__}")
        if v.isascii():  # common case: the UTF-8 length is the str length, no encoding
            n = len(v)
        elif len(v) > limit:  # every code point takes at least one byte
            raise _Invalid(f"over the {kind.name} limit of {limit} UTF-8 bytes")
        else:
            try:
                n = len(v.encode("utf-8"))
            except UnicodeEncodeError as e:
                raise _Invalid(f"not encodable as UTF-8: {e.reason}") from None
        if n > limit:
            raise _Invalid(f"over the {kind.name} limit of {limit} UTF-8 bytes")
        return v

    return check


def _record_check(cls: type) -> Callable[[Any], Any]:
    def check(v: Any) -> Any:
        if not isinstance(v, cls):  # already validated when it was built
            raise _Invalid(f"expected a {cls.__name__}, got {type(v).__name__}")
        return v

    return check


def _list_check(kind: ListOf) -> Callable[[Any], Any]:
    item_check = _checker(kind.item)

    def check(v: Any) -> Any:
        # A list is accepted for convenience and stored as a tuple so events stay hashable.
        if not isinstance(v, (tuple, list)):
            raise _Invalid(f"expected a tuple, got {type(v).__name__}")
        if len(v) > kind.max_items:
            raise _Invalid(f"{len(v)} items is over the list limit of {kind.max_items}")
        for item in v:
            item_check(item)
        return v if type(v) is tuple else tuple(v)

    return check


def _checker(kind: Any) -> Callable[[Any], Any]:
    if isinstance(kind, Int):
        return _int_check(kind)
    if isinstance(kind, Boolean):
        return _bool_check
    if isinstance(kind, String):
        return _string_check(kind)
    if isinstance(kind, ListOf):
        return _list_check(kind)
    if isinstance(kind, type) and issubclass(kind, Struct):
        return _record_check(kind)
    raise TypeError(f"not a wire kind: {kind!r}")


def _kind_of(annotation: Any) -> Any:
    if get_origin(annotation) is Annotated:
        return annotation.__metadata__[0]
    if isinstance(annotation, type) and issubclass(annotation, Struct):
        return annotation  # a record embedded as a field, e.g. Push.message
    raise TypeError(f"field annotation {annotation!r} names no wire kind")


def _wire(cls: Any) -> Any:
    """Class decorator: derive WIRE_FIELDS and the field checks from the annotations."""
    kinds = tuple((f.name, _kind_of(f.type)) for f in fields(cls))
    cls.WIRE_FIELDS = kinds
    cls._CHECKS = tuple((name, _checker(kind)) for name, kind in kinds)
    cls._unchecked = staticmethod(_unchecked_builder(cls, [name for name, _ in kinds]))
    return cls


def _unchecked_builder(cls: Any, names: list[str]) -> Callable[[list[Any]], Any]:
    # The codec builds events from values it has just decoded, which are valid by
    # construction; skipping __post_init__ there more than halves the cost of an event.
    # The slot descriptors' __set__ bypasses the frozen __setattr__.
    new = object.__new__
    setters = tuple(getattr(cls, name).__set__ for name in names)

    def build(values: list[Any]) -> Any:
        obj = new(cls)
        for set_field, value in zip(setters, values):
            set_field(obj, value)
        return obj

    return build


class Struct:
    """Base of events and records: validates every field on construction."""

    __slots__ = ()
    # ((field name, wire kind), ...) in wire order; set by @_wire.
    WIRE_FIELDS: ClassVar[tuple[tuple[str, Any], ...]]
    _CHECKS: ClassVar[tuple[tuple[str, Callable[[Any], Any]], ...]]
    _unchecked: ClassVar[Callable[[list[Any]], Any]]

    def __post_init__(self) -> None:
        name = ""
        try:
            for name, check in self._CHECKS:
                value = getattr(self, name)
                checked = check(value)
                if checked is not value:
                    object.__setattr__(self, name, checked)
        except _Invalid as e:
            raise LocalProtocolError(f"{type(self).__name__}.{name}: {e}") from None


class Event(Struct):
    """Base of all frame events. ``TYPE`` is the frame type byte."""

    __slots__ = ()
    TYPE: ClassVar[int]


# ---------------------------------------------------------------------------------------
# Records: composite field types


@_wire
@dataclass(frozen=True, slots=True)
class Message(Struct):
    """A stored message as the server delivers it (in ``Push`` and ``Messages``)."""

    id: U64
    sender: Str
    sent_at: U64  # milliseconds since the Unix epoch, UTC
    body: Text


@_wire
@dataclass(frozen=True, slots=True)
class AccountEntry(Struct):
    """One ``ListAccounts`` result."""

    name: Str
    online: Bool


# ---------------------------------------------------------------------------------------
# Client to server


@_wire
@dataclass(frozen=True, slots=True)
class Hello(Event):
    """First frame of every connection."""

    TYPE: ClassVar[int] = 0x01
    request_id: U32
    version: U16 = PROTOCOL_VERSION
    client: Str = ""


@_wire
@dataclass(frozen=True, slots=True)
class Register(Event):
    TYPE: ClassVar[int] = 0x02
    request_id: U32
    name: Str
    password: Str


@_wire
@dataclass(frozen=True, slots=True)
class Login(Event):
    TYPE: ClassVar[int] = 0x03
    request_id: U32
    name: Str
    password: Str


@_wire
@dataclass(frozen=True, slots=True)
class Logout(Event):
    TYPE: ClassVar[int] = 0x04
    request_id: U32


@_wire
@dataclass(frozen=True, slots=True)
class ListAccounts(Event):
    """Search accounts; ``limit`` 0 means the server default."""

    TYPE: ClassVar[int] = 0x05
    request_id: U32
    pattern: Str = ""
    after: Str = ""
    limit: U16 = 0


@_wire
@dataclass(frozen=True, slots=True)
class Send(Event):
    """Send ``body`` to account ``to``; a non-empty ``client_msg_id`` makes it idempotent."""

    TYPE: ClassVar[int] = 0x06
    request_id: U32
    to: Str
    client_msg_id: Str = ""
    body: Text = ""


@_wire
@dataclass(frozen=True, slots=True)
class Fetch(Event):
    """Fetch undelivered messages; ``limit`` 0 means the server default."""

    TYPE: ClassVar[int] = 0x07
    request_id: U32
    limit: U16 = 0


@_wire
@dataclass(frozen=True, slots=True)
class Ack(Event):
    """Acknowledge (and so delete) delivered messages."""

    TYPE: ClassVar[int] = 0x08
    request_id: U32
    message_ids: Annotated[tuple[int, ...], ListOf(U64_KIND)] = ()


@_wire
@dataclass(frozen=True, slots=True)
class DeleteAccount(Event):
    TYPE: ClassVar[int] = 0x09
    request_id: U32
    password: Str


# ---------------------------------------------------------------------------------------
# Server to client


@_wire
@dataclass(frozen=True, slots=True)
class Ok(Event):
    TYPE: ClassVar[int] = 0x80
    request_id: U32


@_wire
@dataclass(frozen=True, slots=True)
class Welcome(Event):
    """Reply to ``Hello``: the server's version and limits."""

    TYPE: ClassVar[int] = 0x81
    request_id: U32
    version: U16
    server: Str
    max_frame_size: U32
    max_message_bytes: U32
    heartbeat_interval: U16  # seconds; 0 = the server sends no pings


@_wire
@dataclass(frozen=True, slots=True)
class LoggedIn(Event):
    TYPE: ClassVar[int] = 0x82
    request_id: U32
    name: Str
    pending: U32 = 0


@_wire
@dataclass(frozen=True, slots=True)
class AccountList(Event):
    """One page of ``ListAccounts`` results; empty ``next_after`` = no more pages."""

    TYPE: ClassVar[int] = 0x85
    request_id: U32
    accounts: Annotated[tuple[AccountEntry, ...], ListOf(AccountEntry)] = ()
    next_after: Str = ""


@_wire
@dataclass(frozen=True, slots=True)
class Sent(Event):
    TYPE: ClassVar[int] = 0x86
    request_id: U32
    message_id: U64
    pushed: Bool = False
    duplicate: Bool = False


@_wire
@dataclass(frozen=True, slots=True)
class Messages(Event):
    TYPE: ClassVar[int] = 0x87
    request_id: U32
    messages: Annotated[tuple[Message, ...], ListOf(Message)] = ()
    remaining: U32 = 0


@_wire
@dataclass(frozen=True, slots=True)
class Acked(Event):
    TYPE: ClassVar[int] = 0x88
    request_id: U32
    count: U32


@_wire
@dataclass(frozen=True, slots=True)
class AccountDeleted(Event):
    TYPE: ClassVar[int] = 0x89
    request_id: U32
    discarded: U32


@_wire
@dataclass(frozen=True, slots=True)
class Push(Event):
    """A message pushed to a live session of its recipient."""

    TYPE: ClassVar[int] = 0x90
    message: Message


@_wire
@dataclass(frozen=True, slots=True)
class Notice(Event):
    TYPE: ClassVar[int] = 0x91
    code: Str
    text: Str


@_wire
@dataclass(frozen=True, slots=True)
class Error(Event):
    """Error reply; ``request_id`` 0 when it belongs to no request."""

    TYPE: ClassVar[int] = 0xFF
    request_id: U32
    code: Str
    text: Str
    retry_after_ms: U32 = 0


# ---------------------------------------------------------------------------------------
# Either direction


@_wire
@dataclass(frozen=True, slots=True)
class Ping(Event):
    TYPE: ClassVar[int] = 0x20
    nonce: U32


@_wire
@dataclass(frozen=True, slots=True)
class Pong(Event):
    TYPE: ClassVar[int] = 0x21
    nonce: U32


# ---------------------------------------------------------------------------------------
# Who sends what (PROTOCOL.md section 3)

REQUEST_TYPES: tuple[type[Event], ...] = (
    Hello, Register, Login, Logout, ListAccounts, Send, Fetch, Ack, DeleteAccount,
)
CLIENT_EVENTS: tuple[type[Event], ...] = REQUEST_TYPES + (Ping, Pong)
SERVER_EVENTS: tuple[type[Event], ...] = (
    Ok, Welcome, LoggedIn, AccountList, Sent, Messages, Acked, AccountDeleted,
    Push, Notice, Error, Ping, Pong,
)
ALL_EVENTS: tuple[type[Event], ...] = tuple(dict.fromkeys(CLIENT_EVENTS + SERVER_EVENTS))
