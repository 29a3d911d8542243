"""EventLoop: socket readiness callbacks, call_soon from any thread, timers, stop, and
callbacks that raise; each with a loop that sleeps at once and one that polls first.
Then the busy polling itself: its adaptive window, and what turns it off.

The loop runs on a thread of its own, as in the server; what must happen on the loop's
thread (register, modify, unregister, call_later) is posted to it with ``on_loop``. Every
wait is bounded (``WAIT``) and only guards against a hang: no test asserts on a duration.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Iterator

import pytest

from chatserver.eventloop import READ, WRITE, EventLoop, PollWindow

WAIT = 10  # seconds; a bound on hangs, never an assertion about speed


class RunningLoop:
    """An EventLoop whose ``run()`` is going on a thread of its own."""

    def __init__(self, **options) -> None:
        self.loop = EventLoop(**options)
        self.thread = threading.Thread(target=self.loop.run, name="test-loop", daemon=True)
        self.thread.start()

    def on_loop(self, fn: Callable[[], object]) -> object:
        """Run ``fn`` on the loop's thread and return its result (or raise its exception)."""
        done = threading.Event()
        outcome: dict = {}

        def call() -> None:
            try:
                outcome["value"] = fn()
            except BaseException as exc:  # handed back to the test's thread
                outcome["error"] = exc
            finally:
                done.set()

        self.loop.call_soon(call)
        assert done.wait(WAIT), "the loop did not run a posted callback"
        if "error" in outcome:
            raise outcome["error"]
        return outcome.get("value")

    def sync(self) -> None:
        """Return once the loop has finished the turn under way (and started another)."""
        self.on_loop(lambda: None)

    def stop(self) -> None:
        if self.thread.is_alive():
            self.loop.stop()
            self.thread.join(WAIT)
        assert not self.thread.is_alive(), "run() did not return after stop()"


# A window of a whole second: once grown, nearly every wait of these tests is a poll.
LOOP_KINDS = {"sleeping": {}, "polling": {"busy_poll": 1.0}}


@pytest.fixture(params=sorted(LOOP_KINDS))
def running(request) -> Iterator[RunningLoop]:
    running = RunningLoop(**LOOP_KINDS[request.param])
    try:
        yield running
    finally:
        running.stop()
        running.loop.close()


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected pair: the loop watches ``ours``; the test writes to ``theirs``."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    try:
        yield ours, theirs
    finally:
        ours.close()
        theirs.close()


class Recorder:
    """A socket callback that records its masks (and reads what is readable)."""

    def __init__(self, sock: socket.socket | None = None):
        self.sock = sock
        self.masks: list[int] = []
        self.data = b""
        self.called = threading.Event()

    def __call__(self, mask: int) -> None:
        self.masks.append(mask)
        if self.sock is not None and mask & READ:
            try:
                self.data += self.sock.recv(4096)
            except BlockingIOError:
                pass
        self.called.set()


# -- sockets ------------------------------------------------------------------------------

def test_readable_socket_calls_its_callback_with_read(running, pair):
    """Data arriving on a registered socket calls its callback with READ on the loop thread."""
    ours, theirs = pair
    threads: list[int] = []
    recorder = Recorder(ours)

    def callback(mask: int) -> None:
        threads.append(threading.get_ident())
        recorder(mask)

    running.on_loop(lambda: running.loop.register(ours, READ, callback))
    theirs.sendall(b"hello")
    assert recorder.called.wait(WAIT)
    assert recorder.masks[0] == READ
    assert recorder.data == b"hello"
    assert set(threads) == {running.thread.ident}
    running.on_loop(lambda: running.loop.unregister(ours))


def test_modify_to_write_reports_writable(running, pair):
    """After modify() to WRITE with a new callback, that callback is told WRITE."""
    ours, _theirs = pair
    reading, writing = Recorder(ours), Recorder()
    running.on_loop(lambda: running.loop.register(ours, READ, reading))
    running.on_loop(lambda: running.loop.modify(ours, WRITE, writing))
    assert writing.called.wait(WAIT)
    running.on_loop(lambda: running.loop.unregister(ours))  # else it is called every turn
    assert set(writing.masks) == {WRITE}
    assert reading.masks == []


def test_modify_replaces_the_callback(running, pair):
    """Readiness after modify() goes to the new callback only."""
    ours, theirs = pair
    old, new = Recorder(ours), Recorder(ours)
    running.on_loop(lambda: running.loop.register(ours, READ, old))
    running.on_loop(lambda: running.loop.modify(ours, READ, new))
    theirs.sendall(b"x")
    assert new.called.wait(WAIT)
    running.on_loop(lambda: running.loop.unregister(ours))
    assert new.data == b"x"
    assert old.masks == []


def test_unregistered_socket_is_no_longer_watched(running, pair):
    """After unregister(), readiness of the socket calls nothing; other sockets still work.

    The dropped socket is made readable before the watched one, so a select that saw the
    watched one ready would have seen the dropped one too, in the same turn.
    """
    ours, theirs = pair
    other_ours, other_theirs = socket.socketpair()
    other_ours.setblocking(False)
    try:
        dropped, watched = Recorder(ours), Recorder(other_ours)
        running.on_loop(lambda: running.loop.register(ours, READ, dropped))
        running.on_loop(lambda: running.loop.unregister(ours))
        running.on_loop(lambda: running.loop.register(other_ours, READ, watched))
        theirs.sendall(b"ignored")
        other_theirs.sendall(b"seen")
        assert watched.called.wait(WAIT)
        running.sync()  # the rest of that turn
        assert watched.data == b"seen"
        assert dropped.masks == []
        assert ours.recv(100) == b"ignored"  # still there: nobody read it
    finally:
        running.on_loop(lambda: running.loop.unregister(other_ours))
        other_ours.close()
        other_theirs.close()


def test_unregister_of_an_unknown_socket_is_harmless(running, pair):
    """unregister() of a socket never registered (or twice) does not raise."""
    ours, _theirs = pair
    running.on_loop(lambda: running.loop.unregister(ours))
    running.on_loop(lambda: running.loop.register(ours, READ, Recorder(ours)))
    running.on_loop(lambda: running.loop.unregister(ours))
    running.on_loop(lambda: running.loop.unregister(ours))
    running.sync()
    assert running.thread.is_alive()


# -- call_soon ----------------------------------------------------------------------------

def test_call_soon_from_the_loop_thread_runs_in_order(running):
    """Callbacks posted by a loop callback run later on the loop thread, first posted first."""
    order: list[str] = []
    threads: set[int] = set()
    done = threading.Event()

    def later(name: str) -> Callable[[], None]:
        def run() -> None:
            threads.add(threading.get_ident())
            order.append(name)
            if name == "c":
                done.set()
        return run

    def first() -> None:
        for name in "abc":
            running.loop.call_soon(later(name))
        order.append("first returned")

    running.loop.call_soon(first)
    assert done.wait(WAIT)
    assert order == ["first returned", "a", "b", "c"]
    assert threads == {running.thread.ident}


def test_call_soon_from_many_threads_runs_everything_on_the_loop_thread(running):
    """Posts from several threads at once all run, on the loop thread, each thread's in the
    order it posted them.

    A ticking timer keeps the loop turning, so this is about the queue being thread-safe,
    not about wake-ups (see test_post_during_a_wakeup_drain_still_wakes_the_next_post).
    """
    threads, per_thread = 8, 200
    seen: dict[int, list[int]] = {t: [] for t in range(threads)}
    ran_on: set[int] = set()
    all_done = threading.Event()
    remaining = [threads * per_thread]
    barrier = threading.Barrier(threads)

    def tick() -> None:
        running.loop.call_later(0.01, tick)

    def record(t: int, i: int) -> None:
        ran_on.add(threading.get_ident())
        seen[t].append(i)
        remaining[0] -= 1  # only the loop thread touches it
        if remaining[0] == 0:
            all_done.set()

    def poster(t: int) -> None:
        barrier.wait(WAIT)
        for i in range(per_thread):
            running.loop.call_soon(lambda t=t, i=i: record(t, i))

    running.on_loop(tick)
    posters = [threading.Thread(target=poster, args=(t,)) for t in range(threads)]
    for thread in posters:
        thread.start()
    for thread in posters:
        thread.join(WAIT)
    assert all_done.wait(WAIT), f"{remaining[0]} posted callbacks never ran"
    assert seen == {t: list(range(per_thread)) for t in range(threads)}
    assert ran_on == {running.thread.ident}


def test_call_soon_wakes_a_loop_blocked_in_select():
    """A post from another thread wakes a loop waiting in select with no timeout, every time
    (the wake-up is re-armed after each one)."""
    loop = EventLoop()
    blocked = threading.Semaphore(0)
    real_select = loop._selector.select

    def select(timeout=None):
        if timeout is None:  # nothing to do: the loop would wait forever
            blocked.release()
        return real_select(timeout)

    loop._selector.select = select  # run() looks it up once, when it starts
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    try:
        for round_ in range(3):
            assert blocked.acquire(timeout=WAIT), "the loop never blocked in select"
            ran = threading.Event()
            loop.call_soon(ran.set)
            assert ran.wait(WAIT), f"post {round_} did not wake the loop"
    finally:
        loop.stop()
        thread.join(WAIT)
        loop.close()
    assert not thread.is_alive()


class _PostDuringRecv:
    """Stands in for the loop's wake-up socket: the first ``recv`` first lets another thread
    ``call_soon`` (and waits for it), which is what a poster racing the drain does."""

    def __init__(self, real: socket.socket, post: Callable[[], None]):
        self._real = real
        self._post = post
        self.posted = threading.Event()

    def recv(self, size: int) -> bytes:
        if not self.posted.is_set():
            poster = threading.Thread(target=self._post)
            poster.start()
            poster.join(WAIT)
            self.posted.set()
        return self._real.recv(size)

    def close(self) -> None:
        self._real.close()


def test_post_during_a_wakeup_drain_still_wakes_the_next_post():
    """A call_soon from another thread while the loop drains its wake-up socket must not
    leave the loop deaf: a later post from another thread still wakes it from select."""
    loop = EventLoop()
    blocked = threading.Semaphore(0)
    real_select = loop._selector.select

    def select(timeout=None):
        if timeout is None:
            blocked.release()
        return real_select(timeout)

    loop._selector.select = select
    racer_ran = threading.Event()
    loop._wake_recv = _PostDuringRecv(loop._wake_recv, lambda: loop.call_soon(racer_ran.set))
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    try:
        assert blocked.acquire(timeout=WAIT)
        first = threading.Event()
        loop.call_soon(first.set)  # wakes the loop; its drain lets the racer post
        assert first.wait(WAIT)
        assert racer_ran.wait(WAIT)
        assert blocked.acquire(timeout=WAIT), "the loop never went back to select"
        later = threading.Event()
        loop.call_soon(later.set)
        assert later.wait(5), "a post from another thread did not wake the loop"
    finally:
        loop.stop()
        try:  # wake it by hand in case the test just showed it cannot be woken
            loop._wake_send.send(b"\0")
        except OSError:
            pass
        thread.join(WAIT)
        loop.close()
    assert not thread.is_alive()


# -- timers -------------------------------------------------------------------------------

def test_call_later_runs_timers_in_order_of_their_time(running):
    """Timers fire on the loop thread, the earliest first, whatever order they were set in."""
    order: list[str] = []
    threads: set[int] = set()
    done = threading.Event()

    def fire(name: str) -> Callable[[], None]:
        def run() -> None:
            threads.add(threading.get_ident())
            order.append(name)
            if len(order) == 3:
                done.set()
        return run

    def schedule() -> None:
        running.loop.call_later(0.06, fire("third"))
        running.loop.call_later(0.0, fire("first"))
        running.loop.call_later(0.03, fire("second"))

    running.on_loop(schedule)
    assert done.wait(WAIT)
    assert order == ["first", "second", "third"]
    assert threads == {running.thread.ident}


def test_cancelled_timer_does_not_fire(running):
    """A cancelled timer is skipped; a later timer set at the same time still fires."""
    fired: list[str] = []
    later_fired = threading.Event()

    def schedule():
        cancelled = running.loop.call_later(0.01, lambda: fired.append("cancelled"))
        running.loop.call_later(0.03, lambda: (fired.append("kept"), later_fired.set()))
        cancelled.cancel()
        return cancelled

    timer = running.on_loop(schedule)
    assert later_fired.wait(WAIT)
    assert timer.cancelled
    assert fired == ["kept"]


def test_cancelling_the_only_timer_leaves_the_loop_serving(running):
    """With its only timer cancelled, the loop still serves posts (it does not wait for it)."""
    fired: list[str] = []
    timer = running.on_loop(lambda: running.loop.call_later(0.01, lambda: fired.append("x")))
    running.on_loop(timer.cancel)
    other = threading.Event()
    running.on_loop(lambda: running.loop.call_later(0.02, other.set))
    assert other.wait(WAIT)
    assert fired == []


# -- stop ---------------------------------------------------------------------------------

@pytest.mark.parametrize("busy_poll", [0.0, 1000.0], ids=["sleeping", "polling"])
def test_stop_from_another_thread_makes_run_return(busy_poll):
    """stop() from another thread ends run() even while the loop waits with nothing to do:
    sleeping, or polling in a window (125 s once grown) far longer than the test waits."""
    loop = EventLoop(busy_poll=busy_poll)
    started = threading.Event()
    returned = threading.Event()

    def run() -> None:
        loop.run()
        returned.set()

    loop.call_soon(started.set)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        assert started.wait(WAIT)
        for _ in range(3):  # short waits: a polling loop's window grows
            posted = threading.Event()
            loop.call_soon(posted.set)
            assert posted.wait(WAIT)
        assert (loop._poll is not None and loop._poll.current >= 125) is (busy_poll > 0)
        assert not returned.is_set()
        loop.stop()
        assert returned.wait(WAIT), "run() did not return after stop()"
    finally:
        if not returned.is_set():
            loop.stop()
        thread.join(WAIT)
        loop.close()


# -- failing callbacks --------------------------------------------------------------------

def test_a_raising_callback_is_logged_and_the_loop_goes_on(running, pair, caplog):
    """An exception from a posted callback, a timer or a socket callback is logged, and the
    loop keeps running the rest."""
    ours, theirs = pair
    caplog.set_level(logging.ERROR, logger="chatserver.eventloop")

    def boom(what: str) -> Callable:
        def raise_(*_args) -> None:
            raise RuntimeError(f"boom from {what}")
        return raise_

    after_post = threading.Event()
    running.on_loop(lambda: (running.loop.call_soon(boom("call_soon")),
                             running.loop.call_soon(after_post.set)))
    assert after_post.wait(WAIT)

    after_timer = threading.Event()
    running.on_loop(lambda: running.loop.call_later(0.0, boom("timer")))
    running.on_loop(lambda: running.loop.call_later(0.01, after_timer.set))
    assert after_timer.wait(WAIT)

    socket_calls = threading.Semaphore(0)

    def socket_callback(_mask: int) -> None:
        ours.recv(100)
        socket_calls.release()
        raise RuntimeError("boom from socket")

    running.on_loop(lambda: running.loop.register(ours, READ, socket_callback))
    theirs.sendall(b"x")
    assert socket_calls.acquire(timeout=WAIT)
    theirs.sendall(b"y")  # the socket is still served after its callback raised
    assert socket_calls.acquire(timeout=WAIT)
    running.on_loop(lambda: running.loop.unregister(ours))

    assert running.thread.is_alive()
    messages = [r for r in caplog.records if r.name == "chatserver.eventloop"]
    assert all("error in the I/O loop" in r.getMessage() for r in messages)
    logged = {str(r.exc_info[1]) for r in messages}
    assert {"boom from call_soon", "boom from timer", "boom from socket"} <= logged


# -- busy polling -------------------------------------------------------------------------

def test_poll_window_grows_while_waits_are_short_and_shrinks_to_none_when_long():
    window = PollWindow(0.0008)
    assert window.current == 0  # a new loop sleeps at once
    grown = []
    for _ in range(5):  # each wait longer than the window, up to the maximum
        window.observe(min(window.current + 0.00001, 0.0008))
        grown.append(window.current)
    assert grown == pytest.approx([0.0001, 0.0002, 0.0004, 0.0008, 0.0008])
    window.observe(0.0003)  # polling paid off: kept
    assert window.current == pytest.approx(0.0008)
    shrunk = []
    for _ in range(4):  # each wait longer than the maximum
        window.observe(0.5)
        shrunk.append(window.current)
    assert shrunk == pytest.approx([0.0004, 0.0002, 0.0001, 0.0])


def _echo_rounds(running: RunningLoop, pair, rounds: int) -> list[bytes]:
    """The loop echoes what it reads; the test sends the next byte as soon as the echo of
    the last one is back (a client waiting for each reply). Returns the echoes."""
    ours, theirs = pair

    def echo(_mask: int) -> None:
        ours.sendall(ours.recv(4096))

    running.on_loop(lambda: running.loop.register(ours, READ, echo))
    echoes = []
    theirs.settimeout(WAIT)
    for index in range(rounds):
        theirs.sendall(bytes([index]))
        echoes.append(theirs.recv(1))
    running.on_loop(lambda: running.loop.unregister(ours))
    return echoes


def test_a_loop_polls_for_a_peer_that_answers_within_the_window(pair):
    running = RunningLoop(busy_poll=1.0)
    try:
        assert _echo_rounds(running, pair, 20) == [bytes([i]) for i in range(20)]
        assert running.loop.polled_seconds > 0
    finally:
        running.stop()
        running.loop.close()


def test_a_loop_does_not_poll_while_may_poll_says_no(pair):
    asked = []

    def may_poll() -> bool:
        asked.append(True)
        return False

    running = RunningLoop(busy_poll=1.0, may_poll=may_poll)
    try:
        assert _echo_rounds(running, pair, 20) == [bytes([i]) for i in range(20)]
        assert asked  # the window grew, so the loop asked, and slept instead
        assert running.loop.polled_seconds == 0
    finally:
        running.stop()
        running.loop.close()


def test_a_loop_without_busy_poll_never_polls(pair):
    running = RunningLoop()
    try:
        assert _echo_rounds(running, pair, 20) == [bytes([i]) for i in range(20)]
        assert running.loop.polled_seconds == 0
    finally:
        running.stop()
        running.loop.close()


def test_a_timer_due_within_the_poll_window_fires_without_waiting_for_the_window(pair):
    """A window far longer than any wait here (125 s once grown): a timer due in 10 ms must
    end the poll at its time, not at the window's end."""
    running = RunningLoop(busy_poll=1000.0)
    try:
        _echo_rounds(running, pair, 3)  # short waits: the window has grown
        assert running.loop._poll.current >= 125
        fired = threading.Event()
        running.on_loop(lambda: running.loop.call_later(0.01, fired.set))
        assert fired.wait(WAIT), "the timer waited for the poll window"
    finally:
        running.stop()
        running.loop.close()


# -- at_turn_end ----------------------------------------------------------------------------

def test_turn_end_callbacks_run_after_the_turns_socket_and_posted_callbacks(running, pair):
    """What a turn's callbacks collect (the server's held sends) is there at its end."""
    ours, theirs = pair
    order: list[str] = []
    ended = threading.Event()

    def readable(_mask: int) -> None:
        ours.recv(4096)
        order.append("socket")
        running.loop.call_soon(lambda: order.append("posted"))

    def turn_end() -> None:
        if order and order[-1] != "end":
            order.append("end")
            ended.set()

    running.on_loop(lambda: running.loop.register(ours, READ, readable))
    running.on_loop(lambda: running.loop.at_turn_end(turn_end))
    theirs.send(b"x")
    assert ended.wait(WAIT)
    assert order == ["socket", "posted", "end"]


def test_a_raising_turn_end_callback_is_logged_and_runs_again_next_turn(running, caplog):
    calls: list[int] = []

    def broken() -> None:
        calls.append(1)
        raise RuntimeError("boom")

    running.on_loop(lambda: running.loop.at_turn_end(broken))
    running.sync()
    running.sync()
    assert len(calls) >= 2 and running.thread.is_alive()
    assert "boom" in caplog.text
