"""The threaded TCP server: bytes <-> codec <-> service.

Threads and what each does:

- the **I/O loop** (``chatserver.eventloop``, one thread): accepts, reads every socket,
  decodes frames, answers the cheap requests at once (Hello, Ping, Logout) and hands each
  Send to the writer without waiting for it;
- the **database writer** (``GroupCommitWriter``, one thread): commits sends in groups; the
  replies and pushes of a group are written straight to the sockets from that thread;
- the **workers** (a small pool): requests that block (password hashing for Register, Login
  and DeleteAccount; reads for Fetch and ListAccounts; Ack, which waits for its commit).
  While a worker serves one of a connection's requests, that connection's later requests
  wait, so each connection's requests still take effect in order.

Sockets are non-blocking; a reply is written by whichever thread completes it, straight to
the socket, and only what the socket does not take waits for the loop (``sessions.Output``).
Errors are contained per connection: a peer's bad bytes end that connection, never the server.
"""

from __future__ import annotations

import itertools
import logging
import math
import socket
import ssl
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from chatserver import domain, tls
from chatserver.domain import Account, SendOutcome, StoredMessage
from chatserver.errors import (
    AlreadyLoggedIn,
    ChatError,
    InvalidCredentials,
    NotLoggedIn,
    RateLimited,
)
from chatserver.eventloop import READ, WRITE, EventLoop
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
    Welcome,
    encode_event,
    encode_sent,
)
from chatserver.service import ChatService
from chatserver.sessions import OUTPUT_MAX_BYTES, Output, ReplyQueue, SessionRegistry
from chatserver.throttle import FailureThrottle

log = logging.getLogger("chatserver")

SUPPORTED_VERSIONS = (PROTOCOL_VERSION,)
TLS_HANDSHAKE_RECORD = 0x16  # the first byte a TLS client sends
RECV_BYTES = 256 * 1024  # read big chunks: fewer syscalls when requests are pipelined
MAX_PIPELINED_REQUESTS = 1024  # requests of one connection awaiting their replies
# How long a closing connection may take to get its last replies and write what it has queued.
SHUTDOWN_FLUSH_SECONDS = 2.0
# What a stopping server still reads of each connection (whole socket buffers, typically).
STOP_READ_BYTES = 8 * 1024 * 1024
ACCEPTS_PER_TURN = 256  # new connections taken per loop turn, so reads are not starved
WORKER_THREADS = 8  # blocking requests (hashing is also bounded by passwords.py)
# PostgreSQL: most messages pushed to this server's sessions after its announcement listener
# reconnects (storage/announce.py); any more wait for a fetch.
MAX_CATCH_UP = 10_000

# Room left in a Messages frame for its fixed fields, so a fetch reply never exceeds the limit.
_MESSAGES_FRAME_OVERHEAD = 64


class ListenError(OSError):
    """An address the server was to listen on could not be bound (``address``: host:port)."""

    def __init__(self, exc: OSError, address: str):
        super().__init__(exc.errno, exc.strerror or str(exc))
        self.address = address


@dataclass(frozen=True)
class ServerConfig:
    """Settings of a running server (see ``chat serve --help`` and docs/LIMITS)."""

    host: str = "127.0.0.1"
    port: int = 2023
    max_connections: int = 1000
    heartbeat_interval: int = 30  # seconds of silence before a ping; 0 disables heartbeats
    max_message_bytes: int = domain.MAX_MESSAGE_BYTES
    max_frame_size: int = MAX_FRAME_SIZE
    output_max_bytes: int = OUTPUT_MAX_BYTES
    max_queued_per_account: int = domain.MAX_QUEUED_PER_ACCOUNT
    send_rate: float = domain.SEND_RATE
    send_burst: int = domain.SEND_BURST
    login_free_failures: int = 5  # per account name and per address; -1 disables
    login_max_lockout: float = 300.0  # seconds; lockouts double from 1 s up to this
    registrations_per_hour: int = 30  # per client address (also the burst); 0 disables
    busy_poll_us: int = 100  # longest poll before the I/O loop sleeps (eventloop.py); 0: none
    server_name: str = "chat/0.1"


def message_event(message: StoredMessage) -> Message:
    return Message(id=message.id, sender=message.sender, sent_at=message.sent_at, body=message.body)


class ChatConnection:
    """One client connection: its codec, login state, pending replies and output.

    Everything here runs on the I/O loop's thread except where a method says otherwise.
    """

    def __init__(self, server: ChatServer, sock: socket.socket, client_address):
        self.server = server
        self.loop = server.loop
        self.sock = sock
        self.client_address = client_address
        self.peer = "%s:%s" % client_address[:2]
        self.codec = Connection(role="server", max_frame_size=server.config.max_frame_size)
        self.account: Account | None = None
        self._session_lock = threading.Lock()
        self.output = Output(sock, max_bytes=server.config.output_max_bytes,
                             on_blocked=self._output_blocked, on_failed=self._output_failed)
        self.replies = ReplyQueue(self.output.write)
        self.tls: tls.TlsSession | None = None
        self.handshaking = server.ssl_context is not None
        self.admitted = False
        self.busy = False  # a worker is serving one of its requests
        self._sends: list[tuple[Send, list]] = []  # this pump's sends, not yet queued
        self.deferred = None  # a request waiting for the replies before it (Fetch)
        self.eof = False  # the peer closed its side
        self.gone = False  # the peer reset the connection or was dropped
        self.stopping = False  # the server is stopping
        self.finishing = False  # no more requests: last replies, flush, close
        self.closed = False
        self.notice_sent = False
        self._read_left = False  # _read_what_is_left has run
        self._mask = 0
        self._want_read = True
        self._want_write = False
        self._finish_timer = None
        now = time.monotonic()
        self.opened_at = now
        self.last_heard = now
        self.pinged_at: float | None = None
        self._ping_nonce = itertools.count(1)

    # -- readiness ----------------------------------------------------------------------

    def start(self) -> None:
        if not self.handshaking:
            self._admit()
        self._update_interest()

    def on_ready(self, mask: int) -> None:
        if mask & WRITE:
            self._on_writable()
        if mask & READ and not self.closed:
            self._on_readable()

    def _update_interest(self) -> None:
        if self.closed:
            return
        mask = (READ if self._want_read else 0) | (WRITE if self._want_write else 0)
        if mask == self._mask:
            return
        if self._mask == 0:
            self.loop.register(self.sock, mask, self.on_ready)
        elif mask == 0:
            self.loop.unregister(self.sock)
        else:
            self.loop.modify(self.sock, mask, self.on_ready)
        self._mask = mask

    def _on_readable(self) -> None:
        if self.busy or not self._want_read:  # the codec is a worker's now, or we wait
            return
        try:
            data = self.sock.recv(RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # reset by the peer
            if self.handshaking:
                self.close()
            else:
                self._peer_gone()
            return
        if self.handshaking:
            self._handshake(data)
            return
        self._received(data)
        self.pump()

    def _received(self, data: bytes) -> None:
        """Feed what the socket gave (b"" is end of stream) to the codec."""
        self.last_heard = time.monotonic()
        self.pinged_at = None
        if self.tls is not None and data:
            try:
                plaintext, tls_closed = self.tls.decrypt(data)
            except ssl.SSLError as exc:
                log.info("TLS error from %s: %s", self.peer, exc)
                self.close()
                return
            self.output.write_pending(self.tls.take_outgoing)
            if plaintext:  # nothing yet if the bytes ended inside a record
                self.codec.receive_data(plaintext)
            if not tls_closed:
                return
            data = b""
        if not data:
            self.eof = True
            self._want_read = False
        self.codec.receive_data(data)

    def _on_writable(self) -> None:
        if self.output.flush():
            self._want_write = False
            self._update_interest()
            if self.finishing:
                self._finish_step()

    def _output_blocked(self) -> None:
        """(Any thread.) The socket is full: let the loop wait until it is writable."""
        self.loop.call_soon(self._wait_writable)

    def _wait_writable(self) -> None:
        if not self.closed and self.output.pending:
            self._want_write = True
            self._update_interest()

    def _output_failed(self) -> None:
        """(Any thread.) The peer is gone or too slow: end the connection."""
        self.loop.call_soon(self._peer_gone)

    def _peer_gone(self) -> None:
        """Nothing more can be read or written; requests already received still take
        effect (a send the peer wrote just before vanishing is stored), then we close."""
        if self.closed:
            return
        self.gone = True
        self._want_read = False
        if self.handshaking:
            self.close()
        elif not self.busy:  # else the worker's hand-back comes to pump
            self.pump()

    # -- TLS handshake ------------------------------------------------------------------

    def _handshake(self, data: bytes) -> None:
        if not data:
            log.info("TLS handshake with %s failed: the peer closed the connection", self.peer)
            self.close()
            return
        if self.tls is None:
            if data[0] != TLS_HANDSHAKE_RECORD:
                # A plaintext client: tell it in its own language instead of hanging up.
                log.info("plaintext client on the TLS port from %s", self.peer)
                self.output.write(encode_event(Error(
                    request_id=0, code="tls_required", text="this server requires TLS")))
                self.handshaking = False
                self.finish()
                return
            self.tls = tls.TlsSession(self.server.ssl_context, server_side=True)
        try:
            done, records = self.tls.handshake(data)
        except ssl.SSLError as exc:
            # Send the alert OpenSSL prepared (e.g. protocol_version), so the peer learns why.
            self.output.write(self.tls.take_outgoing(), raw=True)
            log.info("TLS handshake with %s failed: %s", self.peer, exc)
            self.handshaking = False
            self.finish()
            return
        if records:
            self.output.write(records, raw=True)
        if done:
            self.handshaking = False
            self.output.encrypt = self.tls.encrypt
            self._admit()
            if not self.finishing:
                self._received_after_handshake()

    def _received_after_handshake(self) -> None:
        """Application data that came in the same reads as the end of the handshake."""
        try:
            data, tls_closed = self.tls.decrypt(b"")
        except ssl.SSLError:
            self.close()
            return
        self.output.write_pending(self.tls.take_outgoing)
        if data:
            self.codec.receive_data(data)
        if tls_closed:
            self.eof = True
            self._want_read = False
            self.codec.receive_data(b"")
        self.pump()

    def _admit(self) -> None:
        refusal = self.server.admit(self)
        if refusal is None:
            self.admitted = True
        else:
            self.reply_error(0, *refusal)
            self.finish()

    # -- requests -----------------------------------------------------------------------

    def pump(self) -> None:
        """Take the requests received so far, in order, as far as they can go now.

        The Sends among them are queued for the writer together, as one job, when something
        else comes or the pass ends (``_flush_sends``): one queue entry and one completion
        for a chunk of pipelined sends instead of one per send."""
        try:
            self._pump()
        finally:
            if self._sends:
                self._flush_sends()

    def _pump(self) -> None:
        if self.closed:
            return
        if self.finishing:
            self._finish_step()
            return
        if (self.stopping or self.gone) and not self._read_left and not self.handshaking:
            self._read_what_is_left()
            if self.closed:
                return
        while True:
            if self.busy:
                self._want_read = False
                break
            event = self.deferred
            if event is None:
                if self.replies.outstanding >= MAX_PIPELINED_REQUESTS and \
                        self.replies.call_when_below(MAX_PIPELINED_REQUESTS, self._resume):
                    # Back-pressure: that many replies are owed; stop reading until fewer.
                    self._want_read = False
                    break
                try:
                    event = self.codec.next_event()
                except RemoteProtocolError as exc:
                    if not self.stopping:
                        log.info("protocol error from %s: %s", self.peer, exc)
                        self.reply_error(0, "protocol_error", str(exc))
                    self.finish()
                    return
                if event is NEED_DATA:
                    if self.stopping or self.gone:  # what was received is answered; no more
                        self.finish()
                        return
                    self._want_read = not (self.eof or self.gone)
                    break
                if event is CLOSED:
                    self.finish()
                    return
            if type(event) is Fetch and self.replies.call_when_below(1, self._resume):
                # A fetch sees the sends this connection made before it (still committing).
                self.deferred = event
                self._want_read = False
                break
            self.deferred = None
            self.dispatch(event)
            if self.finishing or self.closed:
                return
        self._update_interest()

    def _resume(self) -> None:
        """(Any thread.) What the connection waited for happened: go on, on the loop."""
        self.loop.call_soon(self.pump)

    def dispatch(self, event) -> None:
        kind = type(event)
        if self._sends and kind is not Send:  # the sends before it take effect first
            self._flush_sends()
        if kind is Ping:
            self.send(Pong(nonce=event.nonce))  # in order with the replies, like one
        elif kind is Pong or self._refused(event):
            pass
        elif kind in _BLOCKING:
            if self.server.hold_sends:  # the sends before it take effect first
                self.server.service.writer.release_held()
            self.busy = True
            self._want_read = False
            try:
                self.server.workers.submit(self._serve_blocking, event)
            except RuntimeError:  # the pool is shut down: the server is stopping
                self.busy = False
                self.reply_error(event.request_id, "shutting_down", "the server is stopping")
        else:  # Send, Hello, Logout: answered here, on the loop
            self._answer(event)

    def _refused(self, event) -> bool:
        """Reply with the error if the request is not allowed in the login state."""
        kind = type(event)
        if kind in _LOGIN_REQUIRED and self.account is None:
            refusal: ChatError = NotLoggedIn("log in first")
        elif kind in _ANONYMOUS_ONLY and self.account is not None:
            refusal = AlreadyLoggedIn(f"already logged in as {self.account.name}; log out first")
        else:
            return False
        self.reply_error(event.request_id, refusal.code, refusal.message)
        return True

    def _serve_blocking(self, event) -> None:
        """(A worker thread.) Serve a blocking request, and the blocking requests pipelined
        right after it, then hand the connection back to the loop.

        While ``busy`` the worker owns the codec (the loop does not read), so taking the
        next requests here saves two thread hand-offs per request (a drain's Ack + Fetch).
        """
        try:
            while event is not None:
                self._answer(event)
                event = self._next_blocking()
        finally:
            self.loop.call_soon(self._blocking_done)

    def _next_blocking(self):
        """(A worker thread.) The next request if it is one for a worker too; anything
        else is left for the loop (in ``deferred``, or in the codec)."""
        while not (self.closed or self.finishing or self.stopping):
            try:
                event = self.codec.next_event()
            except RemoteProtocolError:  # raised again to the loop, which reports it
                return None
            if event is NEED_DATA or event is CLOSED:  # both are returned again
                return None
            if type(event) not in _BLOCKING or type(event) is Fetch and self.replies.outstanding:
                self.deferred = event
                return None
            if not self._refused(event):
                return event
        return None

    def _blocking_done(self) -> None:
        self.busy = False
        self.pump()

    def _answer(self, event) -> None:
        handler = _REQUEST_HANDLERS[type(event)]
        try:
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
            self.finish()
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
        """Reserve the send's reply and hold it for ``_flush_sends`` (the end of this pump
        pass, or the next request that is not a Send); the reply follows its commit.

        The only request that does not wait for its outcome: many of a connection's sends
        can be in one commit."""
        if self.account is None:
            raise NotLoggedIn("log in first")
        self._sends.append((event, self.replies.reserve()))

    def _flush_sends(self) -> None:
        """Queue the held sends for the writer, in order (see ``ChatService.submit_sends``)."""
        sends, self._sends = self._sends, []
        if len(sends) == 1:
            self._submit_send(*sends[0])
            return
        account = self.account  # once: another thread may log us out meanwhile
        try:
            if account is None:
                raise NotLoggedIn("log in first")
            # A pipelined chunk goes to the writer thread, so the loop reads the next one
            # meanwhile (a lone send may be committed right here: _submit_send).
            refusals = self.server.service.submit_sends(
                account, [(event.to, event.body, event.client_msg_id) for event, _ in sends],
                on_done=lambda indexes, results, error: self._sends_done(
                    sends, indexes, results, error))
        except ChatError as exc:
            refusals = [exc] * len(sends)
        except Exception:  # every slot must be filled whatever happens, or replies stop here
            log.exception("internal error on Send from %s", self.peer)
            refusals = [None] * len(sends)
            for event, slot in sends:
                self.replies.fill(slot, encode_event(Error(
                    request_id=event.request_id, code="internal_error",
                    text="internal server error")))
        for (event, slot), refusal in zip(sends, refusals):
            if refusal is not None:
                self._send_done(event.request_id, slot, None, refusal)

    def _submit_send(self, event: Send, slot: list) -> None:
        """A lone send: the plainest path, and the only one committed on the loop thread:
        at once when the writer is idle and nothing else is ready (see ``_alone``), for a
        client waiting for each reply; else held for the turn's end (``hold_sends``), to
        share a commit with the other connections' sends of this turn."""
        account = self.account  # once: another thread may log us out meanwhile
        request_id = event.request_id
        try:
            if account is None:
                raise NotLoggedIn("log in first")
            alone = self._alone()
            hold = (not alone and self.server.hold_sends
                    and threading.get_ident() == self.loop.thread_id)
            self.server.service.submit_send(
                account, event.to, event.body, event.client_msg_id,
                on_done=lambda outcome, error: self._send_done(request_id, slot, outcome, error),
                inline_if_idle=alone, hold=hold)
        except ChatError as exc:
            self._send_done(request_id, slot, None, exc)
        except Exception:  # the slot must be filled whatever happens, or replies stop here
            log.exception("internal error on Send from %s", self.peer)
            self.replies.fill(slot, encode_event(Error(
                request_id=request_id, code="internal_error", text="internal server error")))

    def _sends_done(self, sends: list, indexes: list[int], results: list | None,
                    error: BaseException | None) -> None:
        """(The writer's thread, after the commit.) Each send's push and reply.

        One pass for the chunk: a send stored for a recipient with no live session (or a
        duplicate) is answered right here, its count added once; a push or a refusal goes
        through ``_send_done``. Half the cost per send of calling it for each."""
        if error is not None:
            for index in indexes:
                event, slot = sends[index]
                self._send_done(event.request_id, slot, None, error)
            return
        fill = self.replies.fill
        sessions_of = self.server.registry.sessions_of
        offline: set[int] = set()  # recipients seen without a session in this chunk
        stored = 0
        for position, index in enumerate(indexes):
            event, slot = sends[index]
            outcome = results[position]
            if type(outcome) is SendOutcome:
                if outcome.message is None:  # a duplicate: nothing stored, nothing pushed
                    fill(slot, encode_sent(event.request_id, outcome.message_id, False,
                                           outcome.duplicate))
                    continue
                recipient_id = outcome.recipient_id
                if recipient_id in offline or not sessions_of(recipient_id):
                    offline.add(recipient_id)
                    stored += 1
                    fill(slot, encode_sent(event.request_id, outcome.message_id, False, False))
                    continue
            if isinstance(outcome, ChatError):  # this send's refusal
                self._send_done(event.request_id, slot, None, outcome)
            else:
                self._send_done(event.request_id, slot, outcome, None)
        if stored:
            self.server.metrics.stored.inc(stored)

    def _alone(self) -> bool:
        """Whether the loop has nothing else to do this turn: this connection alone was ready
        and this request is the last one it sent. A send may then be committed on the loop's
        thread (if the writer is idle), saving two thread hand-offs for a client that waits
        for each reply; when others are waiting, the writer thread batches them instead."""
        return (self.loop.ready_count <= 1 and not self.codec.trailing_data
                and threading.get_ident() == self.loop.thread_id)

    def _send_done(self, request_id: int, slot: list, outcome, error) -> None:
        """(The writer's thread, after the commit.) Push to the recipient, then reply."""
        metrics = self.server.metrics
        if error is None:
            pushed = False
            stored = outcome.message is not None  # else a duplicate: nothing new to push
            if stored:
                sessions = self.server.registry.sessions_of(outcome.recipient_id)
                if sessions:
                    frame = encode_event(Push(message=message_event(outcome.message)))
                    for session in sessions:
                        if session.push_frame(frame):
                            pushed = True
                            metrics.pushed.inc()
            self.replies.fill(slot, encode_sent(request_id, outcome.message_id, pushed,
                                                outcome.duplicate))
            if stored:  # counted once the reply is out: its client need not wait for it
                metrics.stored.inc()
            return
        if isinstance(error, ChatError):
            metrics.rejected.labels(error.code).inc()
            reply = Error(request_id=request_id, code=error.code, text=error.message,
                          retry_after_ms=error.retry_after_ms)
        else:
            log.error("internal error storing a message from %s", self.peer, exc_info=error)
            reply = Error(request_id=request_id, code="internal_error",
                          text="internal server error")
        self.replies.fill(slot, encode_event(reply))

    def on_fetch(self, event: Fetch):
        # (A worker thread, once this connection's earlier sends have their replies: ``pump``.)
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

    # -- session state (called from other threads too) ---------------------------------

    def log_in(self, account: Account) -> None:
        with self._session_lock:  # against a concurrent log_out (account_deleted)
            self.account = account
            self.server.registry.attach(account.id, self)

    def log_out(self) -> None:
        with self._session_lock:
            account = self.account
            if account is not None:
                self.server.registry.detach(account.id, self)
                self.account = None

    def push_frame(self, frame: bytes) -> bool:
        """(Any thread.) A push to this session: written now, or queued behind earlier output."""
        return self.output.write(frame)

    def account_deleted(self, frame: bytes) -> None:
        """(Any thread.) Another connection deleted our account: tell the peer; we are
        anonymous now."""
        self.log_out()
        self.output.write(frame)

    def password_reset(self, version: int, frame: bytes) -> bool:
        """(Any thread.) The account's password was reset to ``version``: if this session
        logged in before that (with an older password), tell the peer and log out; True if
        so. Checked under the session lock: a session that logged in again meanwhile, with
        the new password, stays."""
        with self._session_lock:
            account = self.account
            if account is None or account.password_version >= version:
                return False
            self.server.registry.detach(account.id, self)
            self.account = None
        self.output.write(frame)
        return True

    # -- output -------------------------------------------------------------------------

    def send(self, event) -> None:
        """(Any thread.) A reply, in request order (after the replies still being completed)."""
        self.replies.reply(self.codec.send(event))

    def reply_error(self, request_id: int, code: str, text: str) -> None:
        self.send(Error(request_id=request_id, code=code, text=text))

    def ping(self) -> None:
        self.pinged_at = time.monotonic()
        self.output.write(self.codec.send(Ping(nonce=next(self._ping_nonce) & 0xFFFFFFFF)))

    # -- the end ------------------------------------------------------------------------

    def begin_shutdown(self) -> None:
        """The server is stopping: answer what was already received, tell the session, close."""
        if self.closed or self.stopping:
            return
        self.stopping = True
        if self.handshaking:
            self.close()
            return
        if not self.busy:  # else the worker's hand-back comes to pump
            self.pump()

    def _read_what_is_left(self) -> None:
        """Before a connection ends (server stopping, peer gone): requests already in the
        socket's receive buffer count as received (up to STOP_READ_BYTES: a peer that keeps
        writing must not grow our memory meanwhile). A reset peer's data that arrived before
        its reset is still read, so the sends it wrote before vanishing are stored."""
        self._read_left = True
        budget = STOP_READ_BYTES
        while budget > 0 and not self.eof and not self.finishing and not self.closed:
            budget -= RECV_BYTES
            try:
                data = self.sock.recv(RECV_BYTES)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:  # reset: what came before it has been read
                self.gone = True
                break
            self._received(data)
        self._want_read = False

    def finish(self) -> None:
        """No more requests: wait for the replies owed, write what is queued, then close
        (at most 2 x SHUTDOWN_FLUSH_SECONDS, for a peer that does not read)."""
        if self.finishing or self.closed:
            return
        self.finishing = True
        self._want_read = False
        self._update_interest()
        self._finish_timer = self.loop.call_later(2 * SHUTDOWN_FLUSH_SECONDS, self.close)
        self._finish_step()

    def _finish_step(self) -> None:
        if self.closed or self.busy:  # a worker's request: _blocking_done comes back here
            return
        if self.replies.call_when_below(1, self._resume):
            return
        if self.stopping and self.admitted and not self.notice_sent:
            self.notice_sent = True
            self.output.write(encode_event(Notice(code="shutting_down",
                                                  text="the server is stopping")))
        if self.output.pending:
            self._want_write = True
            self._update_interest()
            return
        self.close()

    def close(self) -> None:
        """Close now (idempotent); the session ends and the server forgets the connection."""
        if self.closed:
            return
        self.closed = True
        if self._finish_timer is not None:
            self._finish_timer.cancel()
        if self._mask:
            self.loop.unregister(self.sock)
            self._mask = 0
        self.log_out()
        self.output.close()
        try:
            self.sock.close()
        except OSError:
            pass
        self.server.release(self)
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
# Served by a worker thread: they hash passwords, read the database or wait for a commit.
_BLOCKING = {Register, Login, ListAccounts, Fetch, Ack, DeleteAccount}


class ChatServer:
    """The chat server: a listening socket and its connections, served by an I/O loop."""

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
        # The loop polls only while the writer is idle: the writer thread needs the GIL
        # that polling holds between its system calls.
        self.loop = EventLoop(busy_poll=config.busy_poll_us / 1e6,
                              may_poll=lambda: service.writer.idle)
        self.metrics.track_polling(lambda: self.loop.polled_seconds)
        # Where a commit is cheap (SQLite at --sync normal: no fsync, ~25 us), the loop holds
        # a turn's lone sends and commits them together at the turn's end, on its own
        # thread: no hand-off to the writer thread and back (~30 us of wake-ups each way on a
        # VM). At --sync full the fsync (~120 us, without the GIL) is better spent decoding
        # the next requests while the writer thread waits in it. Measured: BENCHMARKS.md.
        self.hold_sends = service.db.is_sqlite and service.db.sync != "full"
        if self.hold_sends:
            self.loop.at_turn_end(service.writer.release_held)
        self.workers = ThreadPoolExecutor(WORKER_THREADS, thread_name_prefix="worker")
        family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        try:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.socket.bind((config.host, config.port))
            self.socket.listen(4096)  # a burst of connections waits here, not refused
            self.socket.setblocking(False)
        except BaseException as exc:
            self.socket.close()
            if isinstance(exc, OSError):
                raise ListenError(exc, f"{config.host}:{config.port}") from exc
            raise
        self._connections: set[ChatConnection] = set()  # every open one, admitted or not
        self._admitted: set[ChatConnection] = set()
        self._lock = threading.Lock()
        self._stopped = False
        self._serving = False
        self._loop_done = threading.Event()
        self._drained = threading.Event()

    @property
    def address(self) -> tuple[str, int]:
        return self.socket.getsockname()[:2]

    # -- bookkeeping (any thread) --------------------------------------------------------

    def admit(self, connection: ChatConnection) -> tuple[str, str] | None:
        """Count the connection in, or return the (code, text) of the refusal."""
        with self._lock:
            if self._stopped:
                return "shutting_down", "the server is stopping"
            if len(self._admitted) >= self.config.max_connections:
                return "server_full", "the server is at its connection limit"
            self._admitted.add(connection)
            return None

    def release(self, connection: ChatConnection) -> None:
        with self._lock:
            self._admitted.discard(connection)
            self._connections.discard(connection)
            remaining = len(self._connections)
        self.metrics.connections.dec()
        if self._stopped and not remaining:
            self._drained.set()

    def open_connections(self) -> list[ChatConnection]:
        with self._lock:
            return list(self._admitted)

    def push_announced(self, items: list[tuple[int, int]]) -> int:
        """(The announcement listener's thread.) Another server on the database stored these
        (recipient id, message id) pairs: push those of recipients logged in here. Returns
        how many pushes were written."""
        wanted = [message_id for recipient_id, message_id in items
                  if self.registry.sessions_of(recipient_id)]
        if not wanted:
            return 0
        # Acknowledged ones are gone from the database, so they are not pushed.
        return self._push_stored(self.service.undelivered_messages(wanted))

    def push_missed(self, after_id: int) -> int:
        """(The announcement listener's thread, listening again after a failure.) Push the
        undelivered messages above ``after_id`` of the recipients logged in here, at most
        MAX_CATCH_UP of them (the rest wait for a fetch); returns how many pushes."""
        online = self.registry.online_account_ids()
        if not online:
            return 0
        pushes = self._push_stored(self.service.undelivered_after(online, after_id, MAX_CATCH_UP))
        log.info("listening again for other servers' messages; pushed %d stored meanwhile",
                 pushes)
        return pushes

    def _push_stored(self, found: list[StoredMessage]) -> int:
        """Push each of these stored messages to its recipient's sessions here; how many
        pushes were written."""
        pushes = 0
        for message in found:
            frame = encode_event(Push(message=message_event(message)))
            for session in self.registry.sessions_of(message.recipient_id):
                if session.push_frame(frame):
                    pushes += 1
                    self.metrics.pushed.inc()
        return pushes

    def end_stale_sessions(self) -> tuple[int, int]:
        """Log out sessions whose account no longer exists (deleted by ``chat admin`` or by
        another server on the same database) or whose password was reset since they logged
        in (``chat admin reset-password``); return (deleted accounts, sessions ended by a
        reset)."""
        online = self.registry.online_account_ids()
        if not online:
            return 0, 0
        versions = self.service.password_versions(online)
        gone = [account_id for account_id in online if account_id not in versions]
        for account_id in gone:
            notice = encode_event(Notice(code="account_deleted", text="this account was deleted"))
            for session in self.registry.sessions_of(account_id):
                session.account_deleted(notice)
        reset = 0
        for account_id, version in versions.items():
            if not version:
                continue  # never reset: no session can be older than a reset
            notice = None
            for session in self.registry.sessions_of(account_id):
                if notice is None:
                    notice = encode_event(Notice(
                        code="password_reset",
                        text="the password of this account was reset; log in again"))
                if session.password_reset(version, notice):
                    reset += 1
                    log.info("password of account %d reset: ended the session of %s",
                             account_id, session.peer)
        return len(gone), reset

    # -- the loop -----------------------------------------------------------------------

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Run the I/O loop on this thread until ``stop()``. (``poll_interval`` is unused:
        kept for callers written for socketserver.)"""
        with self._lock:
            if self._stopped:
                return
            self._serving = True
        self.loop.register(self.socket, READ, self._on_acceptable)
        self.loop.call_soon(self._tick)
        try:
            self.loop.run()
        finally:
            if self.hold_sends:  # a turn cut short by an error: its held sends still commit
                self.service.writer.release_held()
            self._close_everything()
            self.loop.close()  # its selector and wake-up sockets
            self._loop_done.set()

    def _on_acceptable(self, _mask: int) -> None:
        for _ in range(ACCEPTS_PER_TURN):
            try:
                sock, address = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of file descriptors, most likely: pause accepting
                log.warning("cannot accept connections: %s", exc)
                self.loop.unregister(self.socket)
                self.loop.call_later(0.1, self._resume_accepting)
                return
            self._open(sock, address)

    def _resume_accepting(self) -> None:
        if not self._stopped:
            self.loop.register(self.socket, READ, self._on_acceptable)

    def _open(self, sock: socket.socket, address) -> None:
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:  # gone already
            sock.close()
            return
        connection = ChatConnection(self, sock, address)
        with self._lock:
            self._connections.add(connection)
        self.metrics.connections.inc()
        self.metrics.connections_total.inc()
        log.info("connect %s", connection.peer)
        connection.start()

    def _tick(self) -> None:
        """Heartbeats and handshake deadlines, a few times per heartbeat interval."""
        interval = self.config.heartbeat_interval
        now = time.monotonic()
        for connection in list(self._connections):
            if connection.closed or connection.finishing:
                continue
            if connection.handshaking:
                if now - connection.opened_at > tls.HANDSHAKE_TIMEOUT:
                    log.info("TLS handshake with %s failed: timed out", connection.peer)
                    connection.close()
                continue
            if interval and connection.output.stalled_for(now) >= interval:
                # The peer has taken none of its output for a heartbeat interval.
                log.info("%s reads nothing, closing", connection.peer)
                connection.close()
                continue
            if not interval or connection.busy or connection.replies.outstanding:
                continue  # the peer waits for us: its silence is no sign of trouble
            if connection.pinged_at is not None:
                if now - connection.pinged_at >= interval:
                    log.info("no heartbeat from %s, closing", connection.peer)
                    connection.close()
            elif now - connection.last_heard >= interval:
                # Silence for a heartbeat interval: ping; a second silent interval means the
                # peer is gone (half-open TCP) and the connection is closed.
                connection.ping()
        period = min(1.0, interval / 4) if interval else 1.0
        self.loop.call_later(max(0.05, period), self._tick)

    # -- stopping -----------------------------------------------------------------------

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, answer what was received, tell every session, close connections.
        Safe to call twice, from any thread."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            serving = self._serving
            if not self._connections:
                self._drained.set()
        if not serving:
            self.socket.close()
            self.workers.shutdown(wait=False)
            return
        deadline = time.monotonic() + timeout
        self.loop.call_soon(self._begin_stop)
        # Each connection finishes its received requests, sends the notice and flushes its
        # output; a peer that does not read is cut off after 2 x SHUTDOWN_FLUSH_SECONDS.
        self._drained.wait(max(0.0, deadline - time.monotonic()))
        self.loop.stop()
        self._loop_done.wait(max(0.1, deadline - time.monotonic()))
        self.workers.shutdown(wait=False)

    def _begin_stop(self) -> None:
        self.loop.unregister(self.socket)
        self.socket.close()
        for connection in list(self._connections):
            connection.begin_shutdown()

    def _close_everything(self) -> None:
        for connection in list(self._connections):
            connection.close()
        try:
            self.socket.close()
        except OSError:
            pass
