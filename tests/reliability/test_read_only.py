"""A database that refuses writes (SQLite's SQLITE_READONLY, as a file or filesystem made
read-only under a running server gives): a send is refused with storage_unavailable, what
was stored stays, the server and the connection stay up, and sends are stored again once
writes are allowed.

Simulated in-process with ``PRAGMA query_only`` on the writer's connection before it stores
(test_storage_faults.py says why the filesystem itself cannot be made read-only here).
"""

from __future__ import annotations

import pytest

from chatserver.app import ChatApp
from chatserver.protocol import Error, Fetch, Messages, Ping, Pong, Send, Sent
from chatserver.server import ServerConfig
from chatserver.storage.database import SYNC_LEVELS
from chatserver.storage.repository import Repository

from .helpers import CHEAP, logged_in_peer


@pytest.mark.parametrize("sync", SYNC_LEVELS)
def test_a_read_only_database_refuses_sends_keeps_what_was_stored_and_recovers(
        tmp_path, monkeypatch, sync):
    app = ChatApp(str(tmp_path / "ro.db"), ServerConfig(port=0, registrations_per_hour=0),
                  sync=sync, hash_params=CHEAP)
    app.start()
    try:
        with logged_in_peer(app, "alice") as alice:
            assert isinstance(alice.request(Send(request_id=3, to="alice", body="before")),
                              Sent)

            store = Repository.store_messages

            def store_read_only(repo, batch, cap=0):
                repo.conn.connection.driver_connection.execute("PRAGMA query_only = ON")
                return store(repo, batch, cap)

            monkeypatch.setattr(Repository, "store_messages", store_read_only)
            refused = alice.request(Send(request_id=4, to="alice", body="while read-only"))
            assert isinstance(refused, Error), refused
            assert (refused.request_id, refused.code) == (4, "storage_unavailable")
            assert "readonly" in refused.text  # SQLite's refusal, not another failure
            assert alice.request(Ping(nonce=5)) == Pong(nonce=5)

            monkeypatch.setattr(Repository, "store_messages", store)  # writable again
            assert isinstance(alice.request(Send(request_id=6, to="alice", body="after")),
                              Sent)
            fetched = alice.request(Fetch(request_id=7, limit=10))
        assert isinstance(fetched, Messages)
        assert [m.body for m in fetched.messages] == ["before", "after"]
    finally:
        app.stop()
