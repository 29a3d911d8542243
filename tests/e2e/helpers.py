"""Helpers shared by the end-to-end tests."""

from __future__ import annotations

import queue
import re
import time
from collections.abc import Callable

from chatserver.client import ChatClient, ServerError
from chatserver.protocol import Notice, Push

PASSWORD = "correct horse battery"  # >= 8 characters, as the server requires
# Options for every server these tests start (tests may override them, the last one wins):
# the suite registers hundreds of accounts from 127.0.0.1, far over the default per-address
# registration limit, which has tests of its own (test_limits.py).
E2E_SERVER_ARGS = ["--registrations-per-hour", "0"]
WAIT = 10.0  # upper bound for anything asynchronous; a guard against hangs, never asserted on


def next_push(client: ChatClient, timeout: float = WAIT) -> Push:
    """The next Push queued by ``client`` (Notices in between are an error)."""
    event = client.pushes.get(timeout=timeout)
    assert isinstance(event, Push), f"expected a Push, got {event!r}"
    return event


def next_notice(client: ChatClient, timeout: float = WAIT) -> Notice:
    event = client.pushes.get(timeout=timeout)
    assert isinstance(event, Notice), f"expected a Notice, got {event!r}"
    return event


def drain(client: ChatClient) -> list:
    """Everything queued on ``client.pushes`` right now."""
    out = []
    while True:
        try:
            out.append(client.pushes.get_nowait())
        except queue.Empty:
            return out


def pushes_until(client: ChatClient, message_id: int, timeout: float = WAIT) -> list[Push]:
    """Pushes received up to and including the one carrying ``message_id`` (a barrier).

    Pushes for one connection come in order, so once the barrier message has arrived every
    push the server wrote before it has arrived too.
    """
    out = []
    while True:
        event = client.pushes.get(timeout=timeout)
        out.append(event)
        if isinstance(event, Push) and event.message.id == message_id:
            return out


def fetch_all(client: ChatClient) -> list:
    """Every undelivered message of the account (without acknowledging anything)."""
    reply = client.fetch(1000)
    assert reply.remaining == 0, "fetch_all expects at most one page"
    return list(reply.messages)


def wait_until(predicate: Callable[[], object], timeout: float = WAIT, what: str = "condition",
               interval: float = 0.02):
    """Poll ``predicate`` until it is truthy and return its value; only for effects the
    protocol does not report (a disconnect noticed by the server, a log line, a checkpoint).
    Fails after ``timeout``: a guard against hangs, never a timing assertion."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


def fetch_everything(client: ChatClient, *, ack: bool) -> list:
    """Every undelivered message of the account, page by page (acknowledging each page when
    ``ack``; without it, only one page can be read, so at most 1,000 messages)."""
    out = []
    while True:
        page = client.fetch(1000)
        out.extend(page.messages)
        if ack and page.messages:
            assert client.ack([m.id for m in page.messages]) == len(page.messages)
        if page.remaining == 0 or not ack:
            assert page.remaining == 0, "more than one page without acknowledging"
            return out


def log_lines(server, pattern: str) -> list[str]:
    """Lines of the server's log matching the regular expression ``pattern``."""
    rx = re.compile(pattern)
    return [line for line in server.log.splitlines() if rx.search(line)]


def error_code(call: Callable[[], object]) -> str:
    """The code of the ServerError that ``call`` raises (fails if it succeeds)."""
    try:
        result = call()
    except ServerError as exc:
        return exc.code
    raise AssertionError(f"expected an error reply, got {result!r}")
