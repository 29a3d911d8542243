"""The threaded TCP server: bytes <-> codec <-> service, one thread per connection.

Each connection has a reader thread (socketserver's handler) that decodes frames and runs
requests in order, and an ``Outbox`` writer thread for its replies and pushes. Errors are
contained per connection: a peer's bad bytes end that connection, never the server.
"""

from __future__ import annotations

import itertools
import logging
import math
import socket
import socketserver
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from chatserver import domain, tls
from chatserver.domain import Account, StoredMessage
from chatserver.errors import (
    AlreadyLoggedIn,
    ChatError,
    InvalidCredentials,
    NotLoggedIn,
    RateLimited,
)
from chatserver.limits import RateLimiter
from chatserver.metrics import Metrics
from chatserver.protocol import (
    CLOSED,
    MAX_FRAME_SIZE,
    NEED_DATA,
    PROTOCOL_VERSION,
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
    Push,
    Register,
    RemoteProtocolError,
    Send,
    Sent,
    Welcome,
    encode_event,
)
from chatserver.service import ChatService
from chatserver.sessions import OUTBOX_MAX_BYTES, Outbox, ReplyQueue, SessionRegistry
from chatserver.throttle import FailureThrottle

log = logging.getLogger("chatserver")

SUPPORTED_VERSIONS = (PROTOCOL_VERSION,)
TLS_HANDSHAKE_RECORD = 0x16  # the first byte a TLS client sends
RECV_BYTES = 256 * 1024  # read big chunks: fewer syscalls when requests are pipelined
MAX_PIPELINED_REQUESTS = 1024  # requests of one connection awaiting their replies
PIPELINE_STALL_SECONDS = 60.0  # the writer is stuck beyond this: give up on the connection
# How long a closing connection may take to write what it still has queued.
SHUTDOWN_FLUSH_SECONDS = 2.0
# Room left in a Messages frame for its fixed fields, so a fetch reply never exceeds the limit.
_MESSAGES_FRAME_OVERHEAD = 64


@dataclass(frozen=True)
class ServerConfig:
    """Settings of a running server (see ``chat serve --help`` and docs/LIMITS)."""

    host: str = "127.0.0.1"
    port: int = 2023
    max_connections: int = 1000
    heartbeat_interval: int = 30  # seconds of silence before a ping; 0 disables heartbeats
    max_message_bytes: int = domain.MAX_MESSAGE_BYTES
    max_frame_size: int = MAX_FRAME_SIZE
    outbox_max_bytes: int = OUTBOX_MAX_BYTES
    max_queued_per_account: int = domain.MAX_QUEUED_PER_ACCOUNT
    send_rate: float = domain.SEND_RATE
    send_burst: int = domain.SEND_BURST
    login_free_failures: int = 5  # per account name and per address; -1 disables
    login_max_lockout: float = 300.0  # seconds; lockouts double from 1 s up to this
    registrations_per_hour: int = 30  # per client address (also the burst); 0 disables
    server_name: str = "chat/0.1"


def message_event(message: StoredMessage) -> Message:
    return Message(id=message.id, sender=message.sender, sent_at=message.sent_at, body=message.body)


class ChatConnection(socketserver.BaseRequestHandler):
    """One client connection: its codec, its login state, its outbox."""

    server: ChatServer

    def setup(self) -> None:
        self.sock: socket.socket = self.request
        self.peer = "%s:%s" % self.client_address[:2]
        self.codec = Connection(role="server", max_frame_size=self.server.config.max_frame_size)
        self.account: Account | None = None
        self.closing = False
        self.server_stopping = False
        self._ping_nonce = itertools.count(1)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.refused = False
        if self.server.ssl_context is not None:
            self.refused = not self._start_tls()
        self.sock.settimeout(self.server.config.heartbeat_interval or None)
        self.outbox = Outbox(self.sock, name=self.peer,
                             max_bytes=self.server.config.outbox_max_bytes)
        self.replies = ReplyQueue(self.outbox)
        self.server.metrics.connections.inc()
        self.server.metrics.connections_total.inc()
        log.info("connect %s", self.peer)

    def _start_tls(self) -> bool:
        """Handshake on this handler's thread (a slow peer must not hold up accepting)."""
        try:
            self.sock.settimeout(tls.HANDSHAKE_TIMEOUT)
            first = self.sock.recv(1, socket.MSG_PEEK)
            if first and first[0] != TLS_HANDSHAKE_RECORD:
                # A plaintext client: tell it in its own language instead of hanging up.
                log.info("plaintext client on the TLS port from %s", self.peer)
                self.sock.sendall(encode_event(Error(
                    request_id=0, code="tls_required", text="this server requires TLS")))
                return False
            secure = tls.TlsSocket(self.sock, self.server.ssl_context, server_side=True)
            secure.handshake()
        except (OSError, ssl.SSLError) as exc:
            log.info("TLS handshake with %s failed: %s", self.peer, exc)
            return False
        self.sock = secure
        return True

    # -- the read loop ----------------------------------------------------------------------

    def handle(self) -> None:
        if self.refused:
            return
        refusal = self.server.admit(self)
        if refusal is not None:
            self.reply_error(0, *refusal)
            return
        unanswered_pings = 0
        while not self.closing:
            try:
                data = self.sock.recv(RECV_BYTES)
            except TimeoutError:
                # Silence for a heartbeat interval: ping; a second silent interval means the
                # peer is gone (half-open TCP) and the connection is closed.
                if unanswered_pings:
                    log.info("no heartbeat from %s, closing", self.peer)
                    return
                unanswered_pings += 1
                self.outbox.put(self.codec.send(Ping(nonce=next(self._ping_nonce) & 0xFFFFFFFF)))
                continue
            except OSError:
                return
            unanswered_pings = 0
            self.codec.receive_data(data)
            if not self.process_events():
                return
            if not data:
                return

    def process_events(self) -> bool:
        """Handle every complete frame received; False when the connection must end."""
        while not self.closing:
            try:
                event = self.codec.next_event()
            except RemoteProtocolError as exc:
                if self.server_stopping:  # our own SHUT_RD cut its frame short: not its fault
                    return False
                log.info("protocol error from %s: %s", self.peer, exc)
                self.reply_error(0, "protocol_error", str(exc))
                return False
            if event is NEED_DATA:
                return True
            if event is CLOSED:
                return False
            # Back-pressure: a client may have this many requests awaiting replies; beyond
            # that we stop reading until the writer catches up.
            if not self.replies.wait_below(MAX_PIPELINED_REQUESTS, timeout=PIPELINE_STALL_SECONDS):
                log.warning("requests of %s stalled; closing", self.peer)
                return False
            self.dispatch(event)
        return False

    def dispatch(self, event) -> None:
        if isinstance(event, Ping):
            self.send(Pong(nonce=event.nonce))  # in order with the replies, like one
            return
        if isinstance(event, Pong):
            return
        handler = _REQUEST_HANDLERS[type(event)]
        try:
            if type(event) in _LOGIN_REQUIRED and self.account is None:
                raise NotLoggedIn("log in first")
            if type(event) in _ANONYMOUS_ONLY and self.account is not None:
                raise AlreadyLoggedIn(f"already logged in as {self.account.name}; log out first")
            reply = handler(self, event)
        except ChatError as exc:
            reply = Error(request_id=event.request_id, code=exc.code, text=exc.message,
                          retry_after_ms=exc.retry_after_ms)
        except Exception:
            log.exception("internal error on %s from %s", type(event).__name__, self.peer)
            reply = Error(request_id=event.request_id, code="internal_error",
                          text="internal server error")
        if reply is not None:
            try:
                self.send(reply)
            except LocalProtocolError:  # a reply that cannot be encoded is our bug
                log.exception("cannot encode the reply to %s", type(event).__name__)
                self.send(Error(request_id=event.request_id, code="internal_error",
                                text="internal server error"))

    # -- requests ---------------------------------------------------------------------------

    def on_hello(self, event: Hello):
        if event.version not in SUPPORTED_VERSIONS:
            self.reply_error(event.request_id, "unsupported_version",
                             f"protocol version {event.version} is not supported; "
                             f"this server speaks {', '.join(map(str, SUPPORTED_VERSIONS))}")
            self.closing = True
            return None
        config = self.server.config
        return Welcome(request_id=event.request_id, version=PROTOCOL_VERSION,
                       server=config.server_name, max_frame_size=config.max_frame_size,
                       max_message_bytes=config.max_message_bytes,
                       heartbeat_interval=config.heartbeat_interval)

    def on_register(self, event: Register):
        wait = self.server.register_limiter.acquire(self.client_address[0])
        if wait:
            raise RateLimited("too many registrations from this address; try again later",
                              retry_after_ms=math.ceil(wait * 1000))
        account = self.server.service.register(event.name, event.password)
        self.log_in(account)
        log.info("register %s from %s", account.name, self.peer)
        return LoggedIn(request_id=event.request_id, name=account.name, pending=0)

    def on_login(self, event: Login):
        throttles = (self.server.account_throttle, self.server.address_throttle)
        try:  # every spelling of a name (case, full-width forms) shares one count
            account_key = domain.name_key(event.name)
        except ChatError:
            account_key = event.name.casefold()[:64]
        keys = (account_key, self.client_address[0])
        wait = max(throttle.locked_for(key) for throttle, key in zip(throttles, keys))
        if wait:
            self.server.metrics.logins.labels("throttled").inc()
            raise RateLimited("too many failed logins; try again later",
                              retry_after_ms=math.ceil(wait * 1000))
        try:
            account, pending = self.server.service.login(event.name, event.password)
        except InvalidCredentials:
            for throttle, key in zip(throttles, keys):
                throttle.failure(key)
            self.server.metrics.logins.labels("failed").inc()
            log.info("failed login from %s", self.peer)
            raise
        # Only the account's count is cleared: succeeding on an account of one's own must
        # not reset the address's count of guesses at other accounts.
        self.server.account_throttle.success(keys[0])
        self.server.metrics.logins.labels("ok").inc()
        self.log_in(account)
        log.info("login %s from %s", account.name, self.peer)
        return LoggedIn(request_id=event.request_id, name=account.name, pending=pending)

    def on_logout(self, event: Logout):
        log.info("logout %s from %s", self.account.name, self.peer)
        self.log_out()
        return Ok(request_id=event.request_id)

    def on_list_accounts(self, event: ListAccounts):
        found, next_after = self.server.service.search(event.pattern, event.after, event.limit)
        registry = self.server.registry
        entries = tuple(AccountEntry(name=a.name, online=registry.is_online(a.id)) for a in found)
        return AccountList(request_id=event.request_id, accounts=entries, next_after=next_after)

    def on_send(self, event: Send):
        """Queue the send for the writer and go on reading; the reply follows its commit."""
        try:
            future = self.server.service.submit_send(self.account, event.to, event.body,
                                                     event.client_msg_id)
        except ChatError as exc:
            self.server.metrics.rejected.labels(exc.code).inc()
            raise
        slot = self.replies.reserve()
        future.add_done_callback(lambda done: self._send_done(event.request_id, slot, done))
        return None

    def _send_done(self, request_id: int, slot: list, future) -> None:
        """After the commit (on the writer's thread): push to the recipient, then reply."""
        metrics = self.server.metrics
        try:
            outcome = future.result()
        except ChatError as exc:
            metrics.rejected.labels(exc.code).inc()
            reply = Error(request_id=request_id, code=exc.code, text=exc.message,
                          retry_after_ms=exc.retry_after_ms)
        except Exception:
            log.exception("internal error storing a message from %s", self.peer)
            reply = Error(request_id=request_id, code="internal_error",
                          text="internal server error")
        else:
            pushed = False
            if outcome.message is not None:
                metrics.stored.inc()
                frame = encode_event(Push(message=message_event(outcome.message)))
                for session in self.server.registry.sessions_of(outcome.recipient_id):
                    if session.push_frame(frame):
                        pushed = True
                        metrics.pushed.inc()
            reply = Sent(request_id=request_id, message_id=outcome.message_id, pushed=pushed,
                         duplicate=outcome.duplicate)
        self.replies.fill(slot, encode_event(reply))

    def on_fetch(self, event: Fetch):
        # A fetch sees the sends this connection made before it (they may still be committing).
        self.replies.wait_below(1, timeout=PIPELINE_STALL_SECONDS)
        found, remaining = self.server.service.fetch(self.account, event.limit)
        budget = self.server.config.max_frame_size - _MESSAGES_FRAME_OVERHEAD
        messages = []
        for message in found:
            size = 24 + len(message.sender.encode()) + len(message.body.encode())
            if size > budget:  # the rest waits for the next fetch
                break
            budget -= size
            messages.append(message_event(message))
        remaining += len(found) - len(messages)
        return Messages(request_id=event.request_id, messages=tuple(messages), remaining=remaining)

    def on_ack(self, event: Ack):
        count = self.server.service.ack(self.account, event.message_ids)
        self.server.metrics.acknowledged.inc(count)
        return Acked(request_id=event.request_id, count=count)

    def on_delete_account(self, event: DeleteAccount):
        account = self.account
        # Password guesses here count against the account like failed logins do.
        throttle, key = self.server.account_throttle, domain.name_key(account.name)
        wait = throttle.locked_for(key)
        if wait:
            raise RateLimited("too many wrong passwords; try again later",
                              retry_after_ms=math.ceil(wait * 1000))
        try:
            discarded = self.server.service.delete_account(account, event.password)
        except InvalidCredentials:
            throttle.failure(key)
            raise
        log.info("delete-account %s from %s (%d undelivered discarded)",
                 account.name, self.peer, discarded)
        self.log_out()
        notice = encode_event(Notice(code="account_deleted",
                                     text=f"the account {account.name} was deleted"))
        for session in self.server.registry.sessions_of(account.id):
            session.account_deleted(notice)
        return AccountDeleted(request_id=event.request_id, discarded=discarded)

    # -- session state (called from other connections' threads too) ------------------------

    def log_in(self, account: Account) -> None:
        self.account = account
        self.server.registry.attach(account.id, self)

    def log_out(self) -> None:
        if self.account is not None:
            self.server.registry.detach(self.account.id, self)
            self.account = None

    def push_frame(self, frame: bytes) -> bool:
        return self.outbox.put(frame)

    def account_deleted(self, frame: bytes) -> None:
        """Another connection deleted our account: tell the peer; we are anonymous now."""
        self.log_out()
        self.outbox.put(frame)

    def begin_shutdown(self) -> None:
        """Stop reading: requests already received are still answered, then the session is
        told the server is stopping and the connection closes (see ``finish``)."""
        self.server_stopping = True
        try:
            self.sock.shutdown(socket.SHUT_RD)  # wakes the blocked recv with end-of-file
        except OSError:
            pass

    # -- output -----------------------------------------------------------------------------

    def send(self, event) -> None:
        """A reply, in request order (after the replies still being completed)."""
        self.replies.reply(self.codec.send(event))

    def reply_error(self, request_id: int, code: str, text: str) -> None:
        self.send(Error(request_id=request_id, code=code, text=text))

    def finish(self) -> None:
        if self.refused:
            self.outbox.close(timeout=0)
            self.server.metrics.connections.dec()
            log.info("disconnect %s", self.peer)
            return
        self.log_out()
        self.replies.wait_below(1, timeout=SHUTDOWN_FLUSH_SECONDS)  # sends being committed
        if self.server_stopping:
            self.outbox.put(encode_event(Notice(code="shutting_down",
                                                text="the server is stopping")))
        self.outbox.close(timeout=SHUTDOWN_FLUSH_SECONDS)
        self.server.release(self)
        self.server.metrics.connections.dec()
        log.info("disconnect %s", self.peer)


_REQUEST_HANDLERS = {
    Hello: ChatConnection.on_hello,
    Register: ChatConnection.on_register,
    Login: ChatConnection.on_login,
    Logout: ChatConnection.on_logout,
    ListAccounts: ChatConnection.on_list_accounts,
    Send: ChatConnection.on_send,
    Fetch: ChatConnection.on_fetch,
    Ack: ChatConnection.on_ack,
    DeleteAccount: ChatConnection.on_delete_account,
}
_LOGIN_REQUIRED = {Logout, Send, Fetch, Ack, DeleteAccount}
_ANONYMOUS_ONLY = {Register, Login}


class ChatServer(socketserver.ThreadingTCPServer):
    """The chat server: accepts connections and serves each on its own thread."""

    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False
    request_queue_size = 1024

    def __init__(self, config: ServerConfig, service: ChatService, metrics: Metrics | None = None,
                 *, ssl_context: ssl.SSLContext | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.service = service
        self.metrics = metrics or Metrics()
        self.ssl_context = ssl_context
        # An address may be shared (NAT, an office): it gets four times the free failures.
        self.account_throttle = FailureThrottle(free_failures=config.login_free_failures,
                                                max_delay=config.login_max_lockout, clock=clock)
        self.address_throttle = FailureThrottle(
            free_failures=config.login_free_failures * 4 if config.login_free_failures >= 0
            else -1, max_delay=config.login_max_lockout, clock=clock)
        self.register_limiter = RateLimiter(config.registrations_per_hour / 3600.0,
                                            max(1, config.registrations_per_hour), clock=clock)
        self.registry = SessionRegistry()
        self._connections: set[ChatConnection] = set()
        self._lock = threading.Lock()
        self._stopped = False
        self._serving = False
        super().__init__((config.host, config.port), ChatConnection)

    @property
    def address(self) -> tuple[str, int]:
        return self.server_address[:2]

    def admit(self, connection: ChatConnection) -> tuple[str, str] | None:
        """Count the connection in, or return the (code, text) of the refusal."""
        with self._lock:
            if self._stopped:
                return "shutting_down", "the server is stopping"
            if len(self._connections) >= self.config.max_connections:
                return "server_full", "the server is at its connection limit"
            self._connections.add(connection)
            return None

    def release(self, connection: ChatConnection) -> None:
        with self._lock:
            self._connections.discard(connection)

    def open_connections(self) -> list[ChatConnection]:
        with self._lock:
            return list(self._connections)

    def connection_count(self) -> int:
        with self._lock:
            return len(self._connections)

    def end_sessions_of_deleted_accounts(self) -> int:
        """Log out sessions whose account no longer exists (deleted by ``chat admin`` or by
        another server on the same database); return how many accounts that was."""
        online = self.registry.online_account_ids()
        if not online:
            return 0
        existing = self.service.existing_account_ids(online)
        gone = [account_id for account_id in online if account_id not in existing]
        for account_id in gone:
            notice = encode_event(Notice(code="account_deleted", text="this account was deleted"))
            for session in self.registry.sessions_of(account_id):
                session.account_deleted(notice)
        return len(gone)

    def handle_error(self, request, client_address) -> None:
        log.exception("unexpected error serving %s", client_address)

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        self._serving = True
        super().serve_forever(poll_interval)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, tell every session, close connections. Safe to call twice."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            connections = list(self._connections)
        deadline = time.monotonic() + timeout
        if self._serving:  # shutdown() waits for serve_forever, which may never have run
            self.shutdown()
        self.server_close()
        for connection in connections:
            connection.begin_shutdown()
        # Each connection finishes its received requests, sends the notice and flushes its
        # outbox; a peer that does not read is cut off after SHUTDOWN_FLUSH_SECONDS.
        while self.connection_count() and time.monotonic() < deadline:
            time.sleep(0.01)
        for connection in self.open_connections():
            try:
                connection.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
