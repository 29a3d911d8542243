"""The two protocol error kinds, split by whose fault the error is (as in h11)."""

from __future__ import annotations


class ProtocolError(Exception):
    """Base class of both protocol errors.

    ``code`` is the wire error code a server reports for it (PROTOCOL.md section 6).
    """

    code: str = "protocol_error"

    def __init__(self, msg: str, code: str = "protocol_error") -> None:
        super().__init__(msg)
        self.msg = msg
        self.code = code


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol: bad framing, bad encoding, or a frame out of place.

    Once raised by a :class:`Connection`, its receive side stays failed.
    """


class LocalProtocolError(ProtocolError):
    """The caller misused the API: an invalid event, or one this role may not send."""
