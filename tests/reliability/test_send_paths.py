"""Which way the server takes a send, seen from the service's side (``ChatConnection.
_submit_send``): a lone send is committed at once on the loop thread when the writer is idle,
at both sync levels; sends of several connections ready in the same loop turn are held for
the turn's end at ``--sync normal`` (one commit for them all) and go to the writer thread at
``--sync full``. Whatever the way, every send is stored and answered, in order."""

from __future__ import annotations

import select
import threading

import pytest

from chatserver.app import ChatApp
from chatserver.protocol import Send, Sent
from chatserver.server import ServerConfig

from .helpers import CHEAP, WAIT, logged_in_peer, wait_until


@pytest.fixture(params=["normal", "full"])
def app(request, tmp_path):
    app = ChatApp(str(tmp_path / "p.db"), ServerConfig(port=0, registrations_per_hour=0),
                  sync=request.param, hash_params=CHEAP)
    app.start()
    yield app
    app.stop()


@pytest.fixture
def ways(app, monkeypatch) -> list[tuple[bool, bool]]:
    """(inline_if_idle, hold) of each send the server submits alone, in order."""
    seen: list[tuple[bool, bool]] = []
    real = app.service.submit_send

    def submit_send(*args, inline_if_idle=False, hold=False, **kwargs):
        seen.append((inline_if_idle, hold))
        return real(*args, inline_if_idle=inline_if_idle, hold=hold, **kwargs)

    monkeypatch.setattr(app.service, "submit_send", submit_send)
    return seen


def commits(app) -> tuple[int, int]:
    """How many commits the server reported, and how many jobs they held together."""
    (family,) = app.metrics.commit_batch.collect()
    count = next(s.value for s in family.samples
                 if s.name.endswith("_bucket") and s.labels["le"] == "+Inf")
    jobs = next(s.value for s in family.samples if s.name.endswith("_sum"))
    return int(count), int(jobs)


def test_a_lone_send_is_committed_at_once_when_the_writer_is_idle(app, ways):
    with logged_in_peer(app, "alice") as alice:
        for request_id in (3, 4, 5):
            reply = alice.request(Send(request_id=request_id, to="alice", body="hi"))
            assert isinstance(reply, Sent) and reply.request_id == request_id
    assert ways == [(True, False)] * 3  # inline if the writer is idle, never held


def test_sends_of_connections_ready_in_one_turn_are_held_only_at_sync_normal(app, ways):
    normal = app.service.db.sync == "normal"
    with logged_in_peer(app, "alice") as alice, logged_in_peer(app, "bob") as bob:
        # Keep the loop busy until both sends are in its sockets, so one turn sees both.
        entered, gate = threading.Event(), threading.Event()

        def hold_the_loop():
            entered.set()
            gate.wait(WAIT)

        app.server.loop.call_soon(hold_the_loop)
        assert entered.wait(WAIT)
        alice.send(Send(request_id=3, to="bob", body="from alice"))
        bob.send(Send(request_id=3, to="alice", body="from bob"))
        sockets = [c.sock for c in app.server._connections]
        assert len(sockets) == 2
        readable, _, _ = select.select(sockets, [], [], WAIT)
        while len(readable) < 2:  # the second may land a moment after the first
            readable, _, _ = select.select(sockets, [], [], WAIT)
        commits_before, jobs_before = commits(app)
        gate.set()
        replies = [alice.reply(), bob.reply()]
    assert all(isinstance(r, Sent) for r in replies)
    if normal:  # held for the turn's end: one commit for both
        assert sorted(ways) == [(False, True), (False, True)]
        # (A commit is reported just after its replies are written.)
        wait_until(lambda: commits(app) != (commits_before, jobs_before), what="the report")
        assert commits(app) == (commits_before + 1, jobs_before + 2)
    else:  # not alone in its turn: the writer thread's
        assert sorted(ways) == [(False, False), (False, False)]
