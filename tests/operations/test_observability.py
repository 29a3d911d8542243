"""Operating a running server: metrics, JSON logs, and admin work reaching live sessions."""

from __future__ import annotations

import json
import re
import subprocess
import urllib.request

import pytest

from chatserver.client import ServerError
from chatserver.protocol import Notice, Register, Send
from tests.conftest import chat_command
from tests.e2e.rawframes import RawClient

PASSWORD = "correct horse"


def scrape(url: str) -> dict[str, float]:
    """The samples of a Prometheus text page, by series name with labels."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, value = line.rsplit(" ", 1)
            samples[series] = float(value)
    return samples


def metrics_url(server) -> str:
    line = next(line for line in server.stdout_lines if "metrics on" in line)
    return re.search(r"(http://\S+)", line).group(1)


@pytest.fixture
def metered(server_factory):
    return server_factory(extra_args=["--metrics-port", "0"])


def test_metrics_count_what_happened(metered):
    alice, bob = metered.client(), metered.client()
    alice.register("alice", PASSWORD)
    bob.register("bob", PASSWORD)
    with pytest.raises(ServerError):
        metered.client().login("alice", "wrong password")
    sent = [alice.send("bob", f"m{i}").message_id for i in range(3)]
    with pytest.raises(ServerError):
        alice.send("nobody", "lost")
    for _ in sent:
        bob.pushes.get(timeout=10)
    assert bob.ack(sent[:2]) == 2
    samples = scrape(metrics_url(metered))
    assert samples["chat_open_connections"] == 3
    assert samples["chat_connections_total"] == 3
    assert samples['chat_logins_total{result="failed"}'] == 1
    assert samples["chat_messages_stored_total"] == 3
    assert samples["chat_messages_pushed_total"] == 3
    assert samples["chat_messages_acknowledged_total"] == 2
    assert samples['chat_messages_rejected_total{reason="no_such_account"}'] == 1
    assert samples["chat_undelivered_messages"] == 1
    assert samples["chat_commit_seconds_count"] >= 1
    assert samples['chat_commit_batch_jobs_bucket{le="+Inf"}'] == samples["chat_commit_batch_jobs_count"]


def test_json_logs_are_one_object_per_line(server_factory):
    server = server_factory(extra_args=["--log-format", "json"])
    client = server.client()
    client.register("alice", PASSWORD)
    client.close()
    assert server.stop() == 0
    entries = [json.loads(line) for line in server.log.splitlines() if line.strip()]
    assert entries, "no log lines"
    assert all(set(e) >= {"time", "level", "logger", "message"} for e in entries)
    messages = [e["message"] for e in entries]
    assert any(m.startswith("connect ") for m in messages)
    assert any(m.startswith("register alice from ") for m in messages)
    assert any(m.startswith("disconnect ") for m in messages)
    assert all(e["time"].endswith("Z") for e in entries)


def test_admin_delete_account_ends_live_sessions(server):
    alice, other_alice, bob = server.client(), server.client(), server.client()
    alice.register("alice", PASSWORD)
    other_alice.login("alice", PASSWORD)
    bob.register("bob", PASSWORD)
    bob.send("alice", "waiting for alice")
    result = subprocess.run(
        chat_command("admin", "delete-account", "alice", "--yes", "--db", str(server.db_path)),
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    for session in (alice, other_alice):
        event = session.pushes.get(timeout=15)
        while not isinstance(event, Notice):  # the push of bob's message may come first
            event = session.pushes.get(timeout=15)
        assert event.code == "account_deleted"
        with pytest.raises(ServerError) as refused:
            session.fetch()
        assert refused.value.code == "not_logged_in"
    with pytest.raises(ServerError) as gone:
        bob.send("alice", "too late")
    assert gone.value.code == "no_such_account"


def test_metrics_count_pipelined_sends(metered):
    """Sends that arrive in one write are answered in one pass: each stored one is counted
    once, a repeat and a refusal are not stored, a push is counted as one."""
    sink, live = metered.client(), metered.client()
    sink.register("sink", PASSWORD)
    sink.logout()  # offline
    live.register("live", PASSWORD)
    raw = RawClient(metered.host, metered.port)
    try:
        raw.hello()
        raw.send(Register(request_id=2, name="piper", password=PASSWORD))
        raw.reply()
        script = [("sink", "a"), ("sink", "b"), ("sink", "a"), ("nobody", "c"), ("live", "d"),
                  ("sink", "e")]
        raw.send(*[Send(request_id=10 + i, to=to, client_msg_id=cid, body=cid)
                   for i, (to, cid) in enumerate(script)])
        replies = [raw.reply() for _ in script]
    finally:
        raw.close()
    assert [type(r).__name__ for r in replies] == ["Sent"] * 3 + ["Error"] + ["Sent"] * 2
    live.pushes.get(timeout=10)
    samples = scrape(metrics_url(metered))
    assert samples["chat_messages_stored_total"] == 4
    assert samples["chat_messages_pushed_total"] == 1
    assert samples['chat_messages_rejected_total{reason="no_such_account"}'] == 1


@pytest.mark.parametrize(("busy_poll_us", "polls"), [("10000", True), ("0", False)])
def test_busy_polling_shows_in_the_metrics_and_can_be_turned_off(server_factory, busy_poll_us,
                                                                   polls):
    """A client waiting for each reply answers well within 10 ms, so the loop polls for its
    next request (the adaptive window grows after a few waits); ``--busy-poll-us 0`` never
    polls. Either way every send is answered."""
    server = server_factory(extra_args=["--metrics-port", "0", "--busy-poll-us", busy_poll_us])
    alice = server.client()
    alice.register("alice", PASSWORD)
    ids = [alice.send("alice", f"m{i}").message_id for i in range(30)]
    assert len(set(ids)) == 30
    polled = scrape(metrics_url(server))["chat_loop_polling_seconds_total"]
    assert (polled > 0) is polls
