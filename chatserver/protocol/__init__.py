"""Sans-I/O codec of the chat wire protocol (PROTOCOL.md): events, frames, Connection.

Standard library only: no sockets, threads, clocks or logging, so that the server, the
client and the tests all drive the same code with plain bytes.
"""

from .codec import EVENT_TYPES, MAX_FRAME_SIZE, encode_event, encode_send, encode_sent
from .connection import CLOSED, NEED_DATA, Connection, Signal
from .errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from .events import (
    CLIENT_EVENTS,
    PROTOCOL_VERSION,
    REQUEST_TYPES,
    SERVER_EVENTS,
    AccountDeleted,
    AccountEntry,
    AccountList,
    Ack,
    Acked,
    DeleteAccount,
    Error,
    Event,
    Fetch,
    Hello,
    ListAccounts,
    LoggedIn,
    Login,
    Logout,
    Message,
    Messages,
    Notice,
    Ok,
    Ping,
    Pong,
    Push,
    Register,
    Send,
    Sent,
    Welcome,
)

__all__ = [
    "CLIENT_EVENTS", "CLOSED", "EVENT_TYPES", "MAX_FRAME_SIZE", "NEED_DATA", "PROTOCOL_VERSION",
    "REQUEST_TYPES", "SERVER_EVENTS", "AccountDeleted", "AccountEntry", "AccountList", "Ack",
    "Acked", "Connection", "DeleteAccount", "Error", "Event", "Fetch", "Hello", "ListAccounts",
    "LocalProtocolError", "LoggedIn", "Login", "Logout", "Message", "Messages", "Notice", "Ok",
    "Ping", "Pong", "ProtocolError", "Push", "Register", "RemoteProtocolError", "Send", "Sent",
    "Signal", "Welcome", "encode_event", "encode_send", "encode_sent",
]
