"""A blocking client library over the same codec, used by ``chat client`` and the tests.

A reader thread decodes everything the server sends: replies resolve the future of the
request with the same request id, pushes and notices go to ``on_push`` (or a queue), and
pings are answered at once.
"""

from __future__ import annotations

import itertools
import queue
import socket
import ssl
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future

from chatserver.protocol import (
    CLOSED,
    NEED_DATA,
    PROTOCOL_VERSION,
    AccountList,
    Ack,
    Connection,
    DeleteAccount,
    Error,
    Fetch,
    Hello,
    ListAccounts,
    LoggedIn,
    Login,
    Logout,
    Messages,
    Notice,
    Ping,
    Pong,
    ProtocolError,
    Push,
    Register,
    Send,
    Sent,
    Welcome,
)
from chatserver.tls import TlsSocket


class ServerError(Exception):
    """The server answered a request with an Error frame."""

    def __init__(self, code: str, text: str, retry_after_ms: int = 0):
        super().__init__(f"{code}: {text}")
        self.code = code
        self.text = text
        self.retry_after_ms = retry_after_ms


class ConnectionLost(Exception):
    """The connection closed (or failed) before the reply arrived."""


class ChatClient:
    """One connection to a chat server. Methods block until the server replies."""

    def __init__(self, host: str = "127.0.0.1", port: int = 2023, *, timeout: float = 30.0,
                 on_push: Callable[[object], None] | None = None, client_name: str = "chat-client",
                 sock: socket.socket | None = None, heartbeat: float | None = None,
                 tls_context: ssl.SSLContext | None = None):
        self.timeout = timeout
        self.pushes: queue.Queue = queue.Queue()
        self._on_push = on_push or self.pushes.put
        self._codec = Connection(role="client")
        self._ids = itertools.count(1)
        self._pending: dict[int, Future] = {}
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._closed = False
        self._heartbeat = heartbeat
        self.close_reason: str | None = None
        raw = sock or socket.create_connection((host, port), timeout=timeout)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls_context is not None:
            secure = TlsSocket(raw, tls_context, server_side=False, server_hostname=host)
            try:
                secure.handshake(timeout)
            except (OSError, ssl.SSLError):
                raw.close()
                raise
            raw = secure
        self._sock = raw
        self._sock.settimeout(None)
        self._reader = threading.Thread(target=self._read_loop, name="chat-client-reader",
                                        daemon=True)
        self._reader.start()
        self.welcome: Welcome = self.request(
            lambda rid: Hello(request_id=rid, version=PROTOCOL_VERSION, client=client_name))

    # -- requests ---------------------------------------------------------------------------

    def submit(self, make: Callable[[int], object]) -> Future:
        """Send the request built by ``make(request_id)``; its future gets the reply event."""
        future: Future = Future()
        with self._lock:
            if self._closed:
                raise ConnectionLost(self.close_reason or "connection closed")
            request_id = next(self._ids) & 0xFFFFFFFF
            self._pending[request_id] = future
        self._write(self._codec.send(make(request_id)))
        return future

    def request(self, make: Callable[[int], object]):
        """Send a request and wait for its reply; an Error reply raises ServerError."""
        reply = self.submit(make).result(self.timeout)
        if isinstance(reply, Error):
            raise ServerError(reply.code, reply.text, reply.retry_after_ms)
        return reply

    def register(self, name: str, password: str) -> LoggedIn:
        return self.request(lambda rid: Register(request_id=rid, name=name, password=password))

    def login(self, name: str, password: str) -> LoggedIn:
        return self.request(lambda rid: Login(request_id=rid, name=name, password=password))

    def logout(self) -> None:
        self.request(lambda rid: Logout(request_id=rid))

    def list_accounts(self, pattern: str = "", after: str = "", limit: int = 0) -> AccountList:
        return self.request(
            lambda rid: ListAccounts(request_id=rid, pattern=pattern, after=after, limit=limit))

    def send(self, to: str, body: str, client_msg_id: str = "") -> Sent:
        return self.request(
            lambda rid: Send(request_id=rid, to=to, client_msg_id=client_msg_id, body=body))

    def fetch(self, limit: int = 0) -> Messages:
        return self.request(lambda rid: Fetch(request_id=rid, limit=limit))

    def ack(self, message_ids: Iterable[int]) -> int:
        return self.request(lambda rid: Ack(request_id=rid, message_ids=tuple(message_ids))).count

    def ack_nowait(self, message_ids: Iterable[int]) -> Future:
        """Acknowledge without waiting (safe to call from the ``on_push`` callback)."""
        return self.submit(lambda rid: Ack(request_id=rid, message_ids=tuple(message_ids)))

    def delete_account(self, password: str) -> int:
        return self.request(lambda rid: DeleteAccount(request_id=rid, password=password)).discarded

    # -- plumbing ---------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        try:
            with self._send_lock:
                self._sock.sendall(data)
        except OSError as exc:
            self._fail(f"send failed: {exc}")
            raise ConnectionLost(self.close_reason) from exc

    def _read_loop(self) -> None:
        reason = "the server closed the connection"
        unanswered_pings = 0
        try:
            while True:
                try:
                    data = self._sock.recv(256 * 1024)
                except TimeoutError:
                    if unanswered_pings:
                        reason = "the server stopped answering (no heartbeat)"
                        return
                    unanswered_pings += 1
                    self._write(self._codec.send(Ping(nonce=unanswered_pings)))
                    continue
                unanswered_pings = 0
                self._codec.receive_data(data)
                while True:
                    event = self._codec.next_event()
                    if event is NEED_DATA:
                        break
                    if event is CLOSED:
                        return
                    self._deliver(event)
        except ProtocolError as exc:
            reason = f"protocol error from server: {exc}"
        except ConnectionLost:
            reason = self.close_reason or "connection lost"
        except OSError as exc:
            reason = f"connection lost: {exc}"
        finally:
            self._fail(reason)

    def _deliver(self, event) -> None:
        if isinstance(event, Ping):
            try:
                self._write(self._codec.send(Pong(nonce=event.nonce)))
            except ConnectionLost:
                pass
            return
        if isinstance(event, (Push, Notice)):
            self._on_push(event)
            return
        if isinstance(event, Welcome):
            # Heartbeat as the server does: after an interval of silence ping the server;
            # after a second silent interval consider it dead (half-open TCP) and fail what
            # is pending. Set here, on the reader's own thread, before its next read.
            interval = self._heartbeat if self._heartbeat is not None else event.heartbeat_interval
            self._sock.settimeout(interval or None)
        request_id = getattr(event, "request_id", 0)
        with self._lock:
            future = self._pending.pop(request_id, None)
        if future is not None:
            future.set_result(event)
        elif isinstance(event, Error):  # a connection-level error (server_full, protocol_error)
            self.close_reason = f"{event.code}: {event.text}"
            self._on_push(event)

    def _fail(self, reason: str) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self.close_reason = self.close_reason or reason
            pending, self._pending = self._pending, {}
        for future in pending.values():
            future.set_exception(ConnectionLost(self.close_reason))

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Close the connection; pending requests fail with ConnectionLost."""
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        self._reader.join(5)
        self._fail("closed by the client")

    def __enter__(self) -> ChatClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
