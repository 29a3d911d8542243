"""The announcement listener (storage/announce.py) on a real PostgreSQL: losing its
connection, listening again, and the catch-up that follows."""

from __future__ import annotations

import threading

from sqlalchemy import text

from chatserver.storage.announce import (
    APPLICATION_NAME,
    Announcer,
    Listener,
    channel_for,
    new_origin,
)

WAIT = 10.0


def end_listening_connection(engine) -> None:
    with engine.connect() as conn:
        pids = [r[0] for r in conn.execute(text(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name = :name"), {"name": APPLICATION_NAME})]
        assert len(pids) == 1
        conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pids[0]})


def test_a_failed_catch_up_is_tried_again_until_it_works(db):
    """The catch-up after listening again reads the database, which may still be failing:
    a failure is logged and the same catch-up (from the same id) is tried again."""
    calls: list[int] = []
    caught_up = threading.Event()

    def on_resumed(after_id: int) -> None:
        calls.append(after_id)
        if len(calls) == 1:
            raise RuntimeError("the database is still failing")
        caught_up.set()

    engine = db.write_engine
    listener = Listener(engine, Announcer(channel_for(engine), new_origin()),
                        lambda items: None, on_resumed)
    try:
        assert listener.listening.wait(WAIT)
        assert calls == []  # the first LISTEN has nothing to catch up on
        mark = listener.heard_up_to
        assert mark == 0  # no message yet
        end_listening_connection(engine)
        assert caught_up.wait(WAIT), calls
        assert calls == [mark, mark]
    finally:
        listener.close()
