"""The sans-I/O connection: bytes in, events out; events in, bytes out."""

from __future__ import annotations

import enum

from .buffer import ReceiveBuffer
from .codec import EVENT_TYPES, MAX_FRAME_SIZE, decode_body, encode_event
from .errors import LocalProtocolError, RemoteProtocolError
from .events import CLIENT_EVENTS, SERVER_EVENTS, Event, Hello


class Signal(enum.Enum):
    """What ``next_event()`` returns when it has no event."""

    NEED_DATA = "NEED_DATA"  # call receive_data() with more bytes, then try again
    CLOSED = "CLOSED"  # the peer closed its side and every frame has been consumed

    def __repr__(self) -> str:
        return self.value

    __str__ = __repr__


NEED_DATA = Signal.NEED_DATA
CLOSED = Signal.CLOSED

# Receive-side states. The table below is the whole state machine: for each role, its
# initial state, and for each state the frame classes accepted and the state each leads to.
# A frame its peer may send but missing from the current state's row is refused with that
# state's message. (The server's states past the handshake, such as logged in or not, are the
# application's business: those refusals are Error replies, not protocol errors.)
AWAIT_HELLO = "AWAIT_HELLO"
OPEN = "OPEN"

_RECEIVE_TABLE: dict[str, tuple[str, dict[str, dict[type[Event], str]]]] = {
    "server": (
        AWAIT_HELLO,
        {
            AWAIT_HELLO: {Hello: OPEN},
            OPEN: {cls: OPEN for cls in CLIENT_EVENTS if cls is not Hello},
        },
    ),
    "client": (OPEN, {OPEN: {cls: OPEN for cls in SERVER_EVENTS}}),
}
_REFUSALS = {
    AWAIT_HELLO: "the first frame must be Hello, not {name}",
    OPEN: "{name} is not allowed once the connection is open (a second Hello?)",
}
# What each role may send; it receives what the other role sends.
_SENDS: dict[str, frozenset[type[Event]]] = {
    "server": frozenset(SERVER_EVENTS),
    "client": frozenset(CLIENT_EVENTS),
}
_PEER = {"server": "client", "client": "server"}
# The table re-keyed by type byte, so that accepting a frame is one dict lookup.
_ACCEPTS: dict[str, dict[str, dict[int, tuple[type[Event], str]]]] = {
    role: {state: {cls.TYPE: (cls, nxt) for cls, nxt in row.items()} for state, row in rows.items()}
    for role, (_, rows) in _RECEIVE_TABLE.items()
}


class Connection:
    """One end of a chat protocol connection, with no I/O of its own.

    Feed received bytes to :meth:`receive_data` and take events from :meth:`next_event`;
    turn events into bytes to write with :meth:`send`. ``role`` is ``"server"`` (receives
    client frames, sends server frames) or ``"client"``.

    Errors: a peer that breaks the protocol gets RemoteProtocolError from ``next_event()``,
    and every later call raises that same error: the receive side stays failed, while
    ``send()`` still works so that one ``Error`` frame can be sent before closing. Misuse of
    this object raises LocalProtocolError.
    """

    def __init__(self, role: str, max_frame_size: int = MAX_FRAME_SIZE) -> None:
        if role not in _RECEIVE_TABLE:
            raise LocalProtocolError(f"role must be 'server' or 'client', not {role!r}")
        if not isinstance(max_frame_size, int) or not 1 <= max_frame_size <= 0xFFFF_FFFF:
            raise LocalProtocolError(f"max_frame_size out of range: {max_frame_size!r}")
        self.role = role
        self.max_frame_size = max_frame_size
        self.their_error: RemoteProtocolError | None = None
        self._state = _RECEIVE_TABLE[role][0]
        self._accepts = _ACCEPTS[role]
        self._accept = self._accepts[self._state]
        self._peer_sends = _SENDS[_PEER[role]]
        self._may_send = _SENDS[role]
        self._buffer = ReceiveBuffer()
        self._eof = False

    @property
    def their_state(self) -> str:
        """The receive side's state: AWAIT_HELLO, OPEN, CLOSED (EOF seen) or ERROR."""
        if self.their_error is not None:
            return "ERROR"
        if self._eof:
            return "CLOSED"
        return self._state

    @property
    def trailing_data(self) -> int:
        """How many received bytes are not yet consumed as events."""
        return len(self._buffer)

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Add bytes received from the peer; ``b""`` means the peer closed its side (EOF).

        Calling it again after EOF raises LocalProtocolError.
        """
        if self._eof:
            raise LocalProtocolError("receive_data() called after EOF")
        if not data:
            self._eof = True
        elif self.their_error is None:  # once failed, nothing more will be parsed
            self._buffer.append(data)

    def next_event(self) -> Event | Signal:
        """Return the next event, NEED_DATA, or CLOSED (after EOF, once all is consumed).

        Raises RemoteProtocolError if the next frame is bad, and again on every later call.
        """
        if self.their_error is not None:
            raise self.their_error.with_traceback(None)
        try:
            body = self._buffer.extract_frame(self.max_frame_size)
            if body is None:
                if not self._eof:
                    return NEED_DATA
                if self._buffer:
                    raise RemoteProtocolError("connection closed mid-frame")
                return CLOSED
            accepted = self._accept.get(body[0])
            if accepted is None:
                raise self._refusal(body[0])
            cls, next_state = accepted
            event = decode_body(cls, body)
        except RemoteProtocolError as e:
            self.their_error = e
            raise
        if next_state is not self._state:
            self._state = next_state
            self._accept = self._accepts[next_state]
        return event

    def events(self) -> list[Event]:
        """Return all events that are complete now, stopping at NEED_DATA or CLOSED.

        If a bad frame is reached, RemoteProtocolError is raised at once and the events
        before it in this call are lost with it; a caller that must act on every good frame
        before the bad one should loop over :meth:`next_event` instead.
        """
        out: list[Event] = []
        while True:
            event = self.next_event()
            if isinstance(event, Signal):  # NEED_DATA or CLOSED
                return out
            out.append(event)

    def send(self, event: Event) -> bytes:
        """Return the bytes of ``event``'s frame, to be written to the peer.

        Raises LocalProtocolError if this role may not send that event type or its frame
        would exceed ``max_frame_size``. It changes no state, so any thread may call it.
        """
        if type(event) not in self._may_send:
            raise LocalProtocolError(f"a {self.role} may not send {type(event).__name__}")
        return encode_event(event, self.max_frame_size)

    def _refusal(self, type_byte: int) -> RemoteProtocolError:
        cls = EVENT_TYPES.get(type_byte)
        if cls is None:
            return RemoteProtocolError(f"unknown frame type 0x{type_byte:02X}")
        if cls not in self._peer_sends:
            return RemoteProtocolError(
                f"{cls.__name__} (0x{type_byte:02X}) may not be sent by a {_PEER[self.role]}"
            )
        return RemoteProtocolError(_REFUSALS[self._state].format(name=cls.__name__))
