"""The receive buffer: bytes in, whole frame bodies out."""

from __future__ import annotations

from .codec import LENGTH
from .errors import RemoteProtocolError

# Compacting moves the unconsumed tail to the front; doing it only once the consumed prefix
# is large and more than half the buffer keeps the copying amortised O(1) per byte.
_COMPACT_AT = 64 * 1024


class ReceiveBuffer:
    """Received bytes not yet consumed, with a read offset instead of per-frame copies."""

    __slots__ = ("_data", "_start")

    def __init__(self) -> None:
        self._data = bytearray()
        self._start = 0  # bytes before this offset have been consumed

    def __len__(self) -> int:
        return len(self._data) - self._start

    def __bool__(self) -> bool:
        return len(self._data) > self._start

    def append(self, data: bytes | bytearray | memoryview) -> None:
        self._data += data

    def extract_frame(self, max_frame_size: int) -> bytes | None:
        """Remove and return the body (type byte + payload) of the next whole frame.

        Returns None if the frame is not complete yet. The length prefix is checked as soon
        as its 4 bytes are here, so a bad one fails before any of its body is waited for:
        RemoteProtocolError if it is 0 or over ``max_frame_size``. Only the 4 prefix bytes
        are read per call, so a frame arriving in many pieces is never rescanned.
        """
        data = self._data
        start = self._start
        if len(data) - start < LENGTH.size:
            return None
        length = LENGTH.unpack_from(data, start)[0]
        if length == 0 or length > max_frame_size:
            raise RemoteProtocolError(
                f"frame length {length} is outside 1..{max_frame_size}"
            )
        body_start = start + LENGTH.size
        end = body_start + length
        if end > len(data):
            return None
        body = bytes(data[body_start:end])
        if end == len(data):
            data.clear()  # fully consumed: the common case, and free
            self._start = 0
        elif end > _COMPACT_AT and end > len(data) // 2:
            del data[:end]
            self._start = 0
        else:
            self._start = end
        return body
