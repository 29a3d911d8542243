"""A tiny raw-frame client for black-box protocol tests.

It speaks to a real server over a plain socket: requests are encoded with the project's codec
(``encode_event``), or given as arbitrary bytes; replies are decoded with a client-role
``Connection``. Nothing here hides what goes over the wire: no reader thread, no retries, no
Hello unless asked for.
"""

from __future__ import annotations

import socket
import struct
from typing import Self

from chatserver.protocol import (
    CLOSED,
    NEED_DATA,
    Connection,
    Event,
    Hello,
    Notice,
    Ping,
    Push,
    encode_event,
)

DEFAULT_TIMEOUT = 10.0  # a bound so a broken server cannot hang the suite; never asserted on


# -- building frames by hand (for malformed ones the codec refuses to encode) ---------------

def frame(type_byte: int, payload: bytes = b"") -> bytes:
    """A frame with a correct length prefix: u32 length, type byte, payload."""
    return struct.pack(">IB", 1 + len(payload), type_byte) + payload


def u16(value: int) -> bytes:
    return struct.pack(">H", value)


def u32(value: int) -> bytes:
    return struct.pack(">I", value)


def u64(value: int) -> bytes:
    return struct.pack(">Q", value)


def str_field(raw: bytes) -> bytes:
    """A ``str`` field from raw bytes (which need not be valid UTF-8)."""
    return u16(len(raw)) + raw


def text_field(raw: bytes) -> bytes:
    """A ``text`` field from raw bytes (which need not be valid UTF-8)."""
    return u32(len(raw)) + raw


class Closed(Exception):
    """The server closed the connection while an event was expected."""


class RawClient:
    """One TCP connection, raw. ``send_bytes`` writes anything; ``next_event`` decodes."""

    def __init__(self, host: str, port: int, *, timeout: float = DEFAULT_TIMEOUT,
                 rcvbuf: int | None = None):
        self.timeout = timeout
        if rcvbuf is None:
            self.sock = socket.create_connection((host, port), timeout=timeout)
        else:  # a small receive window must be set before connecting to take effect
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            self.sock.settimeout(timeout)
            self.sock.connect((host, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.codec = Connection(role="client")
        self.eof = False

    # -- output -----------------------------------------------------------------------------

    def send_bytes(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, *events: Event) -> None:
        """Encode ``events`` and write them in one ``sendall``."""
        self.sock.sendall(b"".join(encode_event(e) for e in events))

    # -- input ------------------------------------------------------------------------------

    def next_event(self, timeout: float | None = None):
        """The next decoded frame; raises Closed at EOF (or a reset) with nothing left."""
        self.sock.settimeout(timeout or self.timeout)
        while True:
            event = self.codec.next_event()
            if event is CLOSED:
                raise Closed("the server closed the connection")
            if event is not NEED_DATA:
                return event
            try:
                data = self.sock.recv(256 * 1024)
            except (ConnectionResetError, BrokenPipeError):
                data = b""
            if not data:
                self.eof = True
            self.codec.receive_data(data)

    def reply(self, timeout: float | None = None):
        """The next frame that is not a push (Push, Notice, Ping); pushes are skipped."""
        while True:
            event = self.next_event(timeout)
            if not isinstance(event, (Push, Notice, Ping)):
                return event

    def request(self, event: Event):
        self.send(event)
        return self.reply()

    def hello(self, version: int = 1, request_id: int = 1):
        return self.request(Hello(request_id=request_id, version=version, client="rawframes"))

    def events_until_closed(self, timeout: float | None = None) -> list:
        """Every frame received until the server closes the connection."""
        out = []
        while True:
            try:
                out.append(self.next_event(timeout))
            except Closed:
                return out

    def expect_closed(self, timeout: float | None = None) -> None:
        """Assert that the server closes the connection without sending another frame."""
        try:
            event = self.next_event(timeout)
        except Closed:
            return
        raise AssertionError(f"expected the server to close the connection, got {event!r}")

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

