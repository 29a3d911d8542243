"""New messages announced to the other servers on one PostgreSQL database (LISTEN/NOTIFY).

Each server pushes what it stores to the sessions it holds. With several servers on one
database, the server that stores a message also announces it on a channel
(``pg_notify`` inside the send's transaction, so an announcement goes out with the commit
and never for a message that was not committed); every other server listens and pushes
the announced messages to the recipients it holds. An announcement names
(recipient id, message id) pairs, so a listener reads from the database only the messages
of recipients it holds, and only those not acknowledged in the meantime.

The channel is per schema (NOTIFY is per database, and two deployments may share one
database in different schemas); a server ignores its own announcements by their origin.
Delivery stays at least once. Announcements made while a listener is reconnecting are lost
to it, so once it listens again it catches up: the server pushes the undelivered messages of
the recipients it holds whose ids are above the highest id it had heard of (announced, or in
the table when it began listening); a catch-up that fails (the database still failing) is
tried again every second until it works. A message stored meanwhile by this server itself may
then be pushed twice (clients drop repeats by id); one stored elsewhere with an id below
one already heard of, whose announcement was lost, reaches its recipient by fetch.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable

from sqlalchemy import Engine, text

from chatserver.storage.repository import Repository

log = logging.getLogger(__name__)

CHANNEL_PREFIX = "chat_new_messages_"
MAX_PAYLOAD = 7900  # bytes; PostgreSQL refuses a NOTIFY payload of 8000 or more
RECONNECT_DELAY = 1.0  # seconds between attempts to listen again after a failure
_POLL = 0.5  # seconds: how often the listener checks whether it must stop
APPLICATION_NAME = "chat announcement listener"  # of its connection, in pg_stat_activity


def channel_for(engine: Engine) -> str:
    """The channel of the schema this engine's connections use."""
    with engine.connect() as conn:
        schema = conn.execute(text("SELECT current_schema()")).scalar_one()
    return CHANNEL_PREFIX + hashlib.sha256(schema.encode()).hexdigest()[:16]


def new_origin() -> str:
    """An id for this server process, to recognise its own announcements."""
    return uuid.uuid4().hex[:16]


def encode_announcements(origin: str, items: Iterable[tuple[int, int]]) -> list[str]:
    """Payloads ``"ORIGIN RECIPIENT:MESSAGE,..."`` for (recipient id, message id) pairs,
    each under MAX_PAYLOAD bytes."""
    payloads, parts, size = [], [], len(origin) + 1
    for recipient_id, message_id in items:
        part = f"{recipient_id}:{message_id}"
        if parts and size + len(part) + 1 > MAX_PAYLOAD:
            payloads.append(origin + " " + ",".join(parts))
            parts, size = [], len(origin) + 1
        parts.append(part)
        size += len(part) + 1
    if parts:
        payloads.append(origin + " " + ",".join(parts))
    return payloads


def decode_announcement(payload: str) -> tuple[str, list[tuple[int, int]]]:
    """(origin, [(recipient id, message id), ...]); ValueError if malformed."""
    origin, _, rest = payload.partition(" ")
    items = []
    for part in rest.split(","):
        recipient, _, message = part.partition(":")
        items.append((int(recipient), int(message)))
    return origin, items


class Announcer:
    """What a server's sends need to announce their messages: the channel and its origin."""

    def __init__(self, channel: str, origin: str):
        self.channel = channel
        self.origin = origin

    def announce(self, repo: Repository, items: list[tuple[int, int]]) -> None:
        """In the sending transaction: delivered to the listeners at its commit."""
        for payload in encode_announcements(self.origin, items):
            repo.notify(self.channel, payload)


class Listener:
    """A thread that LISTENs on the channel and calls ``on_items(pairs)`` for every other
    server's announcement (on this thread). Reconnects after a failure, then calls
    ``on_resumed(after_id)`` (again, until it returns without raising): announcements of
    messages with ids above ``after_id`` may have been missed meanwhile."""

    def __init__(self, engine: Engine, announcer: Announcer,
                 on_items: Callable[[list[tuple[int, int]]], None],
                 on_resumed: Callable[[int], None] | None = None):
        self._engine = engine
        self._announcer = announcer
        self._on_items = on_items
        self._on_resumed = on_resumed
        # The highest message id heard of: announced (by any server), or the table's
        # highest when listening began. None until the first LISTEN.
        self.heard_up_to: int | None = None
        self._catch_up_from: int | None = None  # a catch-up to do (or retry) from this id
        self._next_catch_up = 0.0  # monotonic time of the next attempt
        self._stopping = threading.Event()
        self.listening = threading.Event()  # set while LISTEN is in effect (for tests)
        self._thread = threading.Thread(target=self._run, name="announcement-listener",
                                        daemon=True)
        self._thread.start()

    def close(self, timeout: float | None = 10.0) -> None:
        self._stopping.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._listen()
            except Exception as exc:  # noqa: BLE001 - the database went away: listen again
                self.listening.clear()
                log.warning("listening for other servers' messages failed: %s", exc)
                self._stopping.wait(RECONNECT_DELAY)

    def _listen(self) -> None:
        raw = self._engine.raw_connection()
        conn = raw.driver_connection
        raw.detach()  # ours for good: a LISTENing connection must not go back to the pool
        try:
            conn.autocommit = True
            # Named, so that an operator (or a test) can tell it apart in pg_stat_activity.
            conn.execute(f"SET application_name = '{APPLICATION_NAME}'")
            conn.execute(f'LISTEN "{self._announcer.channel}"')  # a hex name of ours
            # Read after LISTEN: anything committed later is announced to this connection.
            highest = conn.execute("SELECT coalesce(max(id), 0) FROM messages").fetchone()[0]
            if self.heard_up_to is not None and self._on_resumed is not None \
                    and self._catch_up_from is None:  # else one that failed is still to do
                self._catch_up_from = self.heard_up_to
            self.heard_up_to = max(self.heard_up_to or 0, highest)
            self.listening.set()
            origin = self._announcer.origin
            while not self._stopping.is_set():
                if self._catch_up_from is not None:
                    self._catch_up()
                for notify in conn.notifies(timeout=_POLL):
                    try:
                        sender, items = decode_announcement(notify.payload)
                    except ValueError:
                        log.warning("ignored a malformed announcement on %s", notify.channel)
                        continue
                    self.heard_up_to = max(self.heard_up_to, max(m for _, m in items))
                    if sender != origin:
                        try:
                            self._on_items(items)
                        except Exception:  # one failed push must not stop the listening
                            log.exception("pushing announced messages failed")
                    if self._stopping.is_set():
                        break
        finally:
            self.listening.clear()
            conn.close()

    def _catch_up(self) -> None:
        """Push what may have been missed while not listening; on failure it is tried again
        (after ``RECONNECT_DELAY``, between polls) until it works."""
        now = time.monotonic()
        if now < self._next_catch_up:
            return
        try:
            self._on_resumed(self._catch_up_from)
        except Exception:  # the database may still be failing: try again shortly
            log.exception("pushing the messages stored while not listening failed; "
                          "trying again in %.0f s", RECONNECT_DELAY)
            self._next_catch_up = now + RECONNECT_DELAY
            return
        self._catch_up_from = None
