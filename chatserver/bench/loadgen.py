"""Load generator processes: raw non-blocking sockets, the sans-I/O codec, one selector loop.

The parent (``workloads.py``) starts each worker with multiprocessing's ``spawn`` context and
gives it a spec made of plain dicts: the server's address, and one entry per connection
saying how it logs in and what it does afterwards (its *role*). Talk over the control pipe:

    worker -> parent   ("ready", info)          every connection is set up (or failed)
    parent -> worker   ("go", start_ns, end_ns)  start at start_ns; time-bounded roles stop
                                                 issuing requests at end_ns
    parent -> worker   ("finish", expected)      receivers: done once this many pushes are in
                                                 (or after a grace period)
    parent -> worker   ("stop",)                 give up now (the results so far are sent)
    worker -> parent   ("done", result)          counts, latency histograms, CPU time
    worker -> parent   ("error", traceback)      the worker itself failed

Times are ``time.monotonic_ns()`` everywhere: on Linux that is CLOCK_MONOTONIC, one clock for
every process of the machine, so a timestamp written into a message body by a sender process
can be subtracted from the time a receiver process sees its push.

A request's latency is the time from writing its frame (the moment the loop decided to send
it) to decoding its reply. Replies come in request order on a connection, so each connection
keeps a FIFO of (tag, send time) for the requests in flight.
"""

from __future__ import annotations

import errno
import os
import resource
import selectors
import socket
import time
import traceback
from collections import deque

from chatserver.bench.histogram import Histogram
from chatserver.protocol import (
    AccountList,
    Ack,
    Acked,
    Connection,
    Error,
    Fetch,
    Hello,
    ListAccounts,
    LoggedIn,
    Login,
    Messages,
    Notice,
    Ping,
    Pong,
    Push,
    Register,
    Send,
    Sent,
    Welcome,
    encode_event,
    encode_send,
)

now_ns = time.monotonic_ns
RECV_BYTES = 256 * 1024
TIMESTAMP_DIGITS = 20  # a message body starts with the sender's monotonic_ns, zero-padded
SETUP_TIMEOUT_S = 600.0
FINISH_GRACE_NS = 3_000_000_000  # receivers wait this long for the last pushes


def raise_nofile_limit() -> int:
    """Raise this process's open-file soft limit to the hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= hard:
        return soft if soft != resource.RLIM_INFINITY else hard
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard
    except (ValueError, OSError):
        return soft


def body_for(timestamp_ns: int, size: int) -> str:
    """A message body of ``size`` bytes that starts with the send time."""
    head = f"{timestamp_ns:0{TIMESTAMP_DIGITS}d}"
    return head + "x" * max(0, size - len(head))


# ---------------------------------------------------------------------------------------
# Roles: what a connection does once it is logged in


class Role:
    """Base role: nothing to do (done at once)."""

    measured = True  # counts towards "ready" and "done"

    def __init__(self, conn: BenchConn, params: dict):
        self.conn = conn
        self.params = params
        self.worker = conn.worker
        self.done = False

    def start(self, now: int) -> None:
        self.done = True

    def on_reply(self, event, tag: str, sent_ns: int, now: int) -> None:
        pass

    def on_push(self, event: Push, now: int) -> None:
        pass

    def tick(self, now: int) -> None:
        pass

    def error(self, event: Error) -> None:
        errors = self.worker.errors
        errors[event.code] = errors.get(event.code, 0) + 1


class Sender(Role):
    """Closed loop: keep ``window`` sends in flight until end_ns or ``count`` sends."""

    def __init__(self, conn, params):
        super().__init__(conn, params)
        self.to = params["to"]
        self.window = params.get("window", 1)
        self.count = params.get("count") or (1 << 62)
        self.body_bytes = params.get("body_bytes", 64)
        self.timed = params.get("timed", True)
        self.sent = 0
        self.answered = 0
        # Unique per phase too: an account that sends again in a later phase (the accounts
        # workload logs the same senders in) must not repeat ids, or every send would be a
        # duplicate (nothing stored) and the figures would measure retries.
        self.prefix = f"{conn.index}-{os.getpid()}-{time.monotonic_ns()}-"

    def start(self, now: int) -> None:
        for _ in range(self.window):
            if not self._send(now):
                break
        self._check_done()

    def _send(self, now: int) -> bool:
        if self.sent >= self.count or (self.timed and now >= self.worker.end_ns):
            return False
        self.sent += 1
        conn = self.conn
        # encode_send: the frame of the Send event without building it (a generator that
        # costs less per request leaves more of the machine to the server it measures).
        conn.request_frame(encode_send(conn.next_id(), self.to, self.prefix + str(self.sent),
                                       body_for(now, self.body_bytes)), "send", now)
        return True

    def on_reply(self, event, tag, sent_ns, now):
        self._count_reply(event, sent_ns, now)
        self._send(now)
        self._check_done()

    def _count_reply(self, event, sent_ns, now) -> None:
        worker = self.worker
        self.answered += 1
        worker.hist.record(now - sent_ns)
        worker.last_ns = now
        if type(event) is Sent:
            worker.ops += 1
            if event.pushed:
                worker.pushed += 1
        else:
            self.error(event)
        worker.progress_ops += 1

    def _check_done(self) -> None:
        if self.answered >= self.sent and not self.conn.inflight:
            self.done = True


class RateSender(Sender):
    """Open loop: a send every 1/rate seconds from start_ns, whatever the replies."""

    def __init__(self, conn, params):
        super().__init__(conn, params)
        self.interval = 1e9 / params["rate"]
        self.next_due = 0

    def start(self, now: int) -> None:
        self.next_due = self.worker.start_ns
        self.tick(now)

    def tick(self, now: int) -> None:
        if self.done:
            return
        while self.next_due <= now and self._send(now):
            self.next_due = self.worker.start_ns + int(self.sent * self.interval)
        if self.sent >= self.count or now >= self.worker.end_ns:
            self._check_done()

    def next_deadline(self) -> int | None:
        if self.done or self.sent >= self.count:
            return None
        return self.next_due

    def on_reply(self, event, tag, sent_ns, now):
        self._count_reply(event, sent_ns, now)
        if self.sent >= self.count or now >= self.worker.end_ns:
            self._check_done()


class Receiver(Role):
    """An online recipient: records send-to-push latency from the timestamp in each body."""

    def start(self, now: int) -> None:
        pass  # done when the parent says how many pushes to expect

    def on_push(self, event: Push, now: int) -> None:
        worker = self.worker
        try:
            sent = int(event.message.body[:TIMESTAMP_DIGITS])
        except ValueError:
            return
        if sent < worker.start_ns:
            return
        worker.push_hist.record(now - sent)
        worker.pushes += 1
        worker.last_push_ns = now
        worker.progress_ops += 1
        if worker.expected_pushes is not None and worker.pushes >= worker.expected_pushes:
            self.done = True

    def tick(self, now: int) -> None:
        worker = self.worker
        if worker.finish_deadline is not None and now >= worker.finish_deadline:
            self.done = True


class Drainer(Role):
    """Fetch, then Ack what came together with the next Fetch, until nothing is left."""

    def __init__(self, conn, params):
        super().__init__(conn, params)
        self.batch = params.get("batch", 1000)
        self.empty = False

    def start(self, now: int) -> None:
        conn = self.conn
        conn.request(Fetch(request_id=conn.next_id(), limit=self.batch), "fetch", now)

    def on_reply(self, event, tag, sent_ns, now):
        worker = self.worker
        conn = self.conn
        if type(event) is Messages:
            worker.hist.record(now - sent_ns)
            worker.last_ns = now
            ids = tuple(m.id for m in event.messages)
            worker.items += len(ids)
            if ids:
                conn.request(Ack(request_id=conn.next_id(), message_ids=ids), "ack", now)
                conn.request(Fetch(request_id=conn.next_id(), limit=self.batch), "fetch", now)
            elif event.remaining:
                conn.request(Fetch(request_id=conn.next_id(), limit=self.batch), "fetch", now)
            else:
                self.empty = True
        elif type(event) is Acked:
            worker.ops += event.count
            worker.progress_ops += event.count
            worker.last_ns = now
        else:
            self.error(event)
            self.empty = True
        if self.empty and not conn.inflight:
            self.done = True


class Searcher(Role):
    """Closed loop of ListAccounts over a list of patterns, one in flight."""

    def __init__(self, conn, params):
        super().__init__(conn, params)
        self.patterns = params["patterns"]
        self.limit = params.get("limit", 0)
        self.count = params.get("count") or (1 << 62)
        self.sent = 0

    def start(self, now: int) -> None:
        self._next(now)

    def _next(self, now: int) -> None:
        if self.sent >= self.count or now >= self.worker.end_ns:
            self.done = True
            return
        pattern = self.patterns[self.sent % len(self.patterns)]
        self.sent += 1
        conn = self.conn
        conn.request(ListAccounts(request_id=conn.next_id(), pattern=pattern, limit=self.limit),
                     "search", now)

    def on_reply(self, event, tag, sent_ns, now):
        worker = self.worker
        worker.hist.record(now - sent_ns)
        worker.last_ns = now
        if type(event) is AccountList:
            worker.ops += 1
            worker.items += len(event.accounts)
        else:
            self.error(event)
        worker.progress_ops += 1
        self._next(now)


class Burst(Role):
    """Idle until start_ns, then one send; latency counted from start_ns (all send at once)."""

    def __init__(self, conn, params):
        super().__init__(conn, params)
        self.to = params["to"]

    def start(self, now: int) -> None:
        conn = self.conn
        conn.request(Send(request_id=conn.next_id(), to=self.to, client_msg_id="burst",
                          body=body_for(now, 64)), "send", now)

    def on_reply(self, event, tag, sent_ns, now):
        worker = self.worker
        worker.hist.record(now - worker.start_ns)
        worker.hist2.record(now - sent_ns)
        worker.last_ns = max(worker.last_ns, now)
        if type(event) is Sent:
            worker.ops += 1
        else:
            self.error(event)
        worker.progress_ops += 1
        self.done = True


ROLES = {
    "none": Role,
    "sender": Sender,
    "rate": RateSender,
    "receiver": Receiver,
    "drainer": Drainer,
    "searcher": Searcher,
    "burst": Burst,
}


# ---------------------------------------------------------------------------------------
# One connection


class BenchConn:
    """A non-blocking socket, its codec, its requests in flight and its role."""

    def __init__(self, worker: Worker, index: int, spec: dict):
        self.worker = worker
        self.index = index
        self.auth = spec.get("auth")  # ["register"|"login", name, password] or None
        self.role: Role = ROLES[spec.get("role", "none")](self, spec)
        self.codec = Connection(role="client")
        self.sock: socket.socket | None = None
        self.out = bytearray()
        self.want_write = False
        self.inflight: deque[tuple[str, int]] = deque()
        self.state = "new"  # new, connecting, handshake, ready, closed
        self.pending: int | None = None  # LoggedIn.pending
        self._ids = 0

    def next_id(self) -> int:
        self._ids = (self._ids + 1) & 0xFFFFFFFF or 1
        return self._ids

    # -- set-up -----------------------------------------------------------------------------

    def connect(self) -> None:
        self.sock = sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.state = "connecting"
        code = sock.connect_ex(self.worker.address)
        if code not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK):
            self.fail(f"connect: {os.strerror(code)}")
            return
        self.worker.selector.register(sock, selectors.EVENT_WRITE, self)
        self.want_write = True

    def _connected(self) -> None:
        code = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            self.fail(f"connect: {os.strerror(code)}")
            return
        self.state = "handshake"
        now = now_ns()
        self.request(Hello(request_id=self.next_id(), client="chat-bench/1"), "hello", now)
        if self.auth:
            kind, name, password = self.auth
            cls = Register if kind == "register" else Login
            self.request(cls(request_id=self.next_id(), name=name, password=password), "auth",
                         now)
        self.flush()

    def _handshake_reply(self, event, tag: str) -> None:
        if type(event) is Error:
            self.fail(f"{tag}: {event.code}")
        elif tag == "hello" and type(event) is Welcome:
            if not self.auth:
                self.state = "ready"
                self.worker.conn_ready(self)
        elif tag == "auth" and type(event) is LoggedIn:
            self.pending = event.pending
            self.state = "ready"
            self.worker.conn_ready(self)
        else:
            self.fail(f"{tag}: unexpected {type(event).__name__}")

    def fail(self, reason: str) -> None:
        if self.state in ("closed", "failed"):
            return
        was_ready = self.state == "ready"
        self.close()
        self.state = "failed"
        self.worker.conn_failed(self, reason, was_ready)

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.worker.selector.unregister(self.sock)
            except (KeyError, ValueError):
                pass
            self.sock.close()
            self.sock = None
        if self.state != "failed":
            self.state = "closed"

    # -- I/O --------------------------------------------------------------------------------

    def request(self, event, tag: str, now: int) -> None:
        """Queue a request frame (written by the next ``flush``) and remember its send time."""
        self.request_frame(encode_event(event), tag, now)

    def request_frame(self, frame: bytes, tag: str, now: int) -> None:
        """``request`` for a frame already encoded."""
        self.inflight.append((tag, now))
        self.worker.requests += 1
        self.out += frame
        self.worker.dirty.append(self)

    def flush(self) -> None:
        if not self.out or self.sock is None or self.state == "connecting":
            return
        try:
            n = self.sock.send(self.out)
        except BlockingIOError:
            n = 0
        except OSError as exc:
            self.fail(f"send: {exc.strerror or exc}")
            return
        del self.out[:n]
        want = bool(self.out)
        if want != self.want_write:
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if want else 0)
            self.worker.selector.modify(self.sock, events, self)
            self.want_write = want

    def on_io(self, mask: int) -> None:
        if self.state == "connecting":
            if mask & selectors.EVENT_WRITE:
                self.worker.selector.modify(self.sock, selectors.EVENT_READ, self)
                self.want_write = False
                self._connected()
            return
        if mask & selectors.EVENT_READ:
            self._readable()
        if mask & selectors.EVENT_WRITE and self.sock is not None:
            self.flush()

    def _readable(self) -> None:
        try:
            data = self.sock.recv(RECV_BYTES)
        except BlockingIOError:
            return
        except OSError as exc:
            self.fail(f"recv: {exc.strerror or exc}")
            return
        now = now_ns()
        codec = self.codec
        codec.receive_data(data)
        try:
            for event in codec.events():
                self._event(event, now)
                if self.sock is None:
                    return
        except Exception as exc:  # noqa: BLE001 - a protocol error: report it, do not crash
            self.fail(f"protocol: {exc}")
            return
        if not data:
            self.fail("closed by the server")
        elif self.out:
            self.flush()

    def _event(self, event, now: int) -> None:
        kind = type(event)
        if kind is Push:
            self.role.on_push(event, now)
            return
        if kind is Ping:
            self.out += encode_event(Pong(nonce=event.nonce))
            return
        if kind is Notice:
            if event.code == "shutting_down":
                self.fail("server shutting down")
            return
        if not self.inflight:
            self.fail(f"unexpected {kind.__name__}")
            return
        tag, sent = self.inflight.popleft()
        if self.state == "handshake":
            self._handshake_reply(event, tag)
        else:
            self.role.on_reply(event, tag, sent, now)


# ---------------------------------------------------------------------------------------
# The worker process


class Worker:
    """Every connection of one load generator process, and the loop that drives them."""

    def __init__(self, spec: dict, ctl, progress):
        self.spec = spec
        self.ctl = ctl
        self.progress = progress
        self.address = (spec["host"], spec["port"])
        self.selector = selectors.DefaultSelector()
        self.conns = [BenchConn(self, i, c) for i, c in enumerate(spec["conns"])]
        self.setup_concurrency = spec.get("setup_concurrency", 64)
        self.hard_timeout_ns = int(spec.get("hard_timeout", 600) * 1e9)
        self.dirty: list[BenchConn] = []
        self.start_ns = 0
        self.end_ns = 0
        self.ops = 0
        self.requests = 0  # request frames queued, set-up included
        self.items = 0
        self.pushed = 0
        self.pushes = 0
        self.progress_ops = 0
        self.last_ns = 0
        self.last_push_ns = 0
        self.errors: dict[str, int] = {}
        self.failures: dict[str, int] = {}
        self.hist = Histogram()
        self.hist2 = Histogram()
        self.push_hist = Histogram()
        self.expected_pushes: int | None = None
        self.finish_deadline: int | None = None
        self.stopped = False
        self.timed_out = False
        self.cpu_at_start = 0.0
        self._setting_up = 0
        self._ready = 0
        self._to_connect = deque(self.conns)

    # -- callbacks from connections --------------------------------------------------------

    def conn_ready(self, conn: BenchConn) -> None:
        self._setting_up -= 1
        self._ready += 1
        self.progress.value = self._ready
        if type(conn.role) is Role:
            conn.close()  # set-up only (an account to create): done

    def conn_failed(self, conn: BenchConn, reason: str, was_ready: bool) -> None:
        self.failures[reason] = self.failures.get(reason, 0) + 1
        if not was_ready and self.start_ns == 0:
            self._setting_up -= 1
        conn.role.done = True

    # -- the loop ---------------------------------------------------------------------------

    def _flush_dirty(self) -> None:
        dirty, self.dirty = self.dirty, []
        for conn in dirty:
            if conn.out:
                conn.flush()

    def _poll(self, timeout: float | None) -> None:
        for key, mask in self.selector.select(timeout):
            data = key.data
            if data is None:
                self._control(self.ctl.recv())
            else:
                data.on_io(mask)
        self._flush_dirty()

    def _control(self, msg) -> None:
        kind = msg[0]
        if kind == "go":
            self.start_ns, self.end_ns = msg[1], msg[2]
        elif kind == "finish":
            self.expected_pushes = msg[1]
            self.finish_deadline = now_ns() + FINISH_GRACE_NS
            for conn in self.conns:
                if isinstance(conn.role, Receiver) and self.pushes >= msg[1]:
                    conn.role.done = True
        elif kind == "stop":
            self.stopped = True

    def run(self) -> None:
        raise_nofile_limit()
        self.selector.register(self.ctl.fileno(), selectors.EVENT_READ, None)
        self._setup()
        ready = [c for c in self.conns if c.state == "ready"]
        self.ctl.send(("ready", {
            "ready": self._ready, "failures": self.failures,
            "pending": [c.pending for c in ready if c.pending is not None],
        }))
        while not self.start_ns and not self.stopped:
            self._poll(0.5)
        if not self.stopped:
            self._run_load(ready)
        self.ctl.send(("done", self._result()))
        for conn in self.conns:
            conn.close()

    def _setup(self) -> None:
        deadline = time.monotonic() + self.spec.get("setup_timeout", SETUP_TIMEOUT_S)
        while (self._to_connect or self._setting_up > 0) and not self.stopped:
            while self._to_connect and self._setting_up < self.setup_concurrency:
                conn = self._to_connect.popleft()
                self._setting_up += 1
                conn.connect()
            if time.monotonic() > deadline:
                for conn in self.conns:
                    if conn.state in ("connecting", "handshake"):
                        conn.fail("set-up timed out")
                break
            self._poll(0.2)

    def _run_load(self, ready: list[BenchConn]) -> None:
        # Sleep until the common start time, so that every process begins together.
        delay = self.start_ns - now_ns()
        if delay > 0:
            time.sleep(delay / 1e9)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        self.cpu_at_start = usage.ru_utime + usage.ru_stime
        now = now_ns()
        roles = [c.role for c in ready if c.state == "ready"]
        for role in roles:
            role.start(now)
        self._flush_dirty()
        rate_roles = [r for r in roles if isinstance(r, RateSender)]
        tick_roles = [r for r in roles if isinstance(r, (RateSender, Receiver))]
        hard_deadline = self.start_ns + self.hard_timeout_ns
        last_progress = 0
        while not self.stopped:
            if all(r.done for r in roles):
                break
            now = now_ns()
            if now >= hard_deadline:
                self.timed_out = True
                break
            timeout = 0.05
            for role in rate_roles:
                due = role.next_deadline()
                if due is not None:
                    timeout = min(timeout, max(0.0, (due - now) / 1e9))
            self._poll(timeout)
            if tick_roles:
                now = now_ns()
                for role in tick_roles:
                    role.tick(now)
                self._flush_dirty()
            if self.progress_ops - last_progress >= 64:
                self.progress.value = self.progress_ops
                last_progress = self.progress_ops
        self.progress.value = self.progress_ops

    def _result(self) -> dict:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "ops": self.ops, "requests": self.requests, "items": self.items, "pushed": self.pushed, "pushes": self.pushes,
            "errors": self.errors, "failures": self.failures, "last_ns": self.last_ns,
            "last_push_ns": self.last_push_ns, "timed_out": self.timed_out,
            "hist": self.hist.to_dict(), "hist2": self.hist2.to_dict(),
            "push_hist": self.push_hist.to_dict(),
            "cpu_s": usage.ru_utime + usage.ru_stime - self.cpu_at_start,
            "unanswered": sum(len(c.inflight) for c in self.conns if c.state == "ready"),
        }


def run_worker(spec: dict, ctl, progress) -> None:
    """Process entry point (spawn): run the worker, report any failure over the pipe."""
    try:
        Worker(spec, ctl, progress).run()
    except BaseException:  # noqa: BLE001 - reported to the parent, which decides
        try:
            ctl.send(("error", traceback.format_exc()))
        except OSError:
            pass
