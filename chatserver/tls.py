"""TLS on memory buffers: for a socket that one thread reads while another writes, and for
the server's non-blocking sockets (``TlsSession``).

OpenSSL does not allow one SSL object to be used by two threads at once, and our connections
read on one thread and write on another. So the SSL object works on memory buffers
(``ssl.MemoryBIO``) behind a lock that is never held during network I/O, and a second lock
keeps the encrypted records going out in the order they were produced.
``TlsSocket`` offers the few socket methods the server and client use.
"""

from __future__ import annotations

import socket
import ssl
import threading

TLS_RECORD_READ = 64 * 1024
HANDSHAKE_TIMEOUT = 10.0  # seconds a peer has to complete the handshake


def server_context(certfile: str, keyfile: str) -> ssl.SSLContext:
    """A server context with TLS 1.2 as the minimum."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certfile, keyfile)
    return context


def client_context(cafile: str | None = None, insecure: bool = False) -> ssl.SSLContext:
    """A client context that verifies the certificate and host name unless ``insecure``."""
    context = ssl.create_default_context(cafile=cafile)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class TlsSocket:
    """A connected TCP socket speaking TLS, safe for one reader and one writer thread."""

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, *, server_side: bool,
                 server_hostname: str | None = None):
        self._sock = sock
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl = context.wrap_bio(self._incoming, self._outgoing, server_side=server_side,
                                     server_hostname=server_hostname)
        self._ssl_lock = threading.Lock()  # guards the SSL object; never held during I/O
        self._send_lock = threading.Lock()  # keeps outgoing records in order
        self._eof = False

    def handshake(self, timeout: float = HANDSHAKE_TIMEOUT) -> None:
        """Complete the handshake; raises ssl.SSLError or OSError (TimeoutError) on failure."""
        previous = self._sock.gettimeout()
        self._sock.settimeout(timeout)
        try:
            while True:
                try:
                    with self._ssl_lock:
                        self._ssl.do_handshake()
                    self._flush()
                    return
                except ssl.SSLWantReadError:
                    self._flush()
                    data = self._sock.recv(TLS_RECORD_READ)
                    if not data:
                        raise ConnectionResetError("the peer closed the connection during the "
                                                   "TLS handshake") from None
                    with self._ssl_lock:
                        self._incoming.write(data)
                except ssl.SSLError:
                    # Send the alert OpenSSL prepared (e.g. protocol_version), so the peer
                    # learns why, then give up.
                    try:
                        self._flush()
                    except OSError:
                        pass
                    raise
        finally:
            self._sock.settimeout(previous)

    def _flush(self) -> None:
        with self._send_lock:
            with self._ssl_lock:
                data = self._outgoing.read()
            if data:
                self._sock.sendall(data)

    def recv(self, size: int) -> bytes:
        """Up to ``size`` bytes of plaintext; b"" at end of stream."""
        while True:
            with self._ssl_lock:
                try:
                    data = self._ssl.read(size)
                except ssl.SSLWantReadError:
                    data = None
                except ssl.SSLZeroReturnError:
                    data = b""
                pending = self._outgoing.pending
            if pending:  # e.g. a key update or session ticket the read produced
                self._flush()
            if data is not None:
                return data
            if self._eof:
                return b""
            raw = self._sock.recv(TLS_RECORD_READ)
            if not raw:
                # End of the peer's stream (or our own SHUT_RD when stopping). The SSL object
                # is not told: it would refuse to write afterwards, and we may still have a
                # shutdown notice to send.
                self._eof = True
                return b""
            with self._ssl_lock:
                self._incoming.write(raw)

    def sendall(self, data: bytes) -> None:
        with self._send_lock:
            with self._ssl_lock:
                self._ssl.write(data)
                encrypted = self._outgoing.read()
            self._sock.sendall(encrypted)

    # -- plain socket operations ------------------------------------------------------------

    def settimeout(self, timeout: float | None) -> None:
        self._sock.settimeout(timeout)

    def gettimeout(self) -> float | None:
        return self._sock.gettimeout()

    def setsockopt(self, *args) -> None:
        self._sock.setsockopt(*args)

    def shutdown(self, how: int) -> None:
        self._sock.shutdown(how)

    def close(self) -> None:
        self._sock.close()

    def fileno(self) -> int:
        return self._sock.fileno()


class TlsSession:
    """TLS for a non-blocking socket served by an event loop: bytes in, bytes out, no I/O.

    The loop's thread feeds received records (``handshake``, ``decrypt``); any thread may
    ``encrypt`` (replies are written by the threads that complete them). A lock guards the
    SSL object; the caller keeps the encrypted records in order on the wire.
    """

    def __init__(self, context: ssl.SSLContext, *, server_side: bool = True):
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl = context.wrap_bio(self._incoming, self._outgoing, server_side=server_side)
        self._lock = threading.Lock()

    def handshake(self, received: bytes) -> tuple[bool, bytes]:
        """Feed handshake records: (done, records to send). Raises ssl.SSLError on failure
        (what is left to send then is the alert: ``take_outgoing()``)."""
        with self._lock:
            if received:
                self._incoming.write(received)
            try:
                self._ssl.do_handshake()
                done = True
            except ssl.SSLWantReadError:
                done = False
            return done, self._outgoing.read()

    def decrypt(self, received: bytes) -> tuple[bytes, bool]:
        """Feed records: (plaintext, peer closed TLS). The plaintext may be empty (a record
        not complete yet). Records the read produced (a reply to a key update) wait in the
        outgoing buffer: send them with ``take_outgoing`` before anything encrypted later."""
        chunks = []
        closed = False
        with self._lock:
            self._incoming.write(received)
            while True:
                try:
                    data = self._ssl.read(TLS_RECORD_READ)
                except ssl.SSLWantReadError:
                    break
                except ssl.SSLZeroReturnError:
                    closed = True
                    break
                if not data:
                    closed = True
                    break
                chunks.append(data)
            return b"".join(chunks), closed

    def encrypt(self, data: bytes) -> bytes:
        with self._lock:
            self._ssl.write(data)
            return self._outgoing.read()

    def take_outgoing(self) -> bytes:
        with self._lock:
            return self._outgoing.read()
