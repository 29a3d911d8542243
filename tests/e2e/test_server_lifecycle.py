"""The server process: its address line, its log, connection limits, slow peers, heartbeats."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import threading
import urllib.request

import pytest

from chatserver.client import ChatClient, ServerError
from chatserver.protocol import (
    Error,
    Hello,
    ListAccounts,
    LoggedIn,
    Ping,
    Pong,
    Register,
    Welcome,
    encode_event,
)

from .helpers import PASSWORD, WAIT, fetch_all, fetch_everything, log_lines, wait_until
from .rawframes import Closed, RawClient


def peer_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"{host}:{port}"


# -- start-up ---------------------------------------------------------------------------------

def test_port_zero_prints_the_bound_address(root_conftest, tmp_path):
    args = root_conftest.chat_command("serve", "--db", str(tmp_path / "p.db"), "--port", "0",
                                      *root_conftest.FAST_HASH_ARGS)
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        line = proc.stdout.readline()
        match = re.fullmatch(r"chat server listening on (127\.0\.0\.1):(\d+) \(database (.+)\)\n",
                             line)
        assert match, line
        port = int(match.group(2))
        assert port != 0
        assert match.group(3) == str(tmp_path / "p.db")
        with ChatClient("127.0.0.1", port) as client:  # it really listens there
            assert client.welcome.version == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(WAIT * 3) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_port_in_use_is_a_clean_error(root_conftest, server, tmp_path):
    args = root_conftest.chat_command("serve", "--db", str(tmp_path / "other.db"),
                                      "--port", str(server.port), *root_conftest.FAST_HASH_ARGS)
    result = subprocess.run(args, capture_output=True, text=True, timeout=WAIT * 3, check=False)
    assert result.returncode == 1
    assert "cannot listen" in result.stderr
    assert "Traceback" not in result.stderr
    assert server.proc.poll() is None  # the running server is unaffected


# -- the log ----------------------------------------------------------------------------------

def test_log_has_one_line_per_connect_login_and_disconnect(server):
    with server.client() as registrar:
        registrar.register("alice", PASSWORD)
    sock = socket.create_connection((server.host, server.port))
    peer = peer_of(sock)
    client = ChatClient(server.host, server.port, sock=sock)
    try:
        with pytest.raises(ServerError):
            client.login("alice", "wrong password")
        client.login("alice", PASSWORD)
        client.logout()
    finally:
        client.close()
    p = re.escape(peer)
    wait_until(lambda: log_lines(server, rf"chatserver: disconnect {p}$"),
               what="the disconnect line")
    assert len(log_lines(server, rf"chatserver: connect {p}$")) == 1
    assert len(log_lines(server, rf"chatserver: login alice from {p}$")) == 1
    assert len(log_lines(server, rf"chatserver: failed login from {p}$")) == 1
    assert len(log_lines(server, rf"chatserver: disconnect {p}$")) == 1
    # lines of this peer come in order: connect first, disconnect last
    mine = log_lines(server, rf"{p}$")
    assert "connect" in mine[0] and "disconnect" not in mine[0]
    assert "disconnect" in mine[-1]
    # passwords never reach the log
    assert PASSWORD not in server.log
    assert "wrong password" not in server.log


# -- connection limit -------------------------------------------------------------------------

def test_max_connections(server_factory, tmp_path):
    server = server_factory(tmp_path / "full.db", ["--max-connections", "3"])
    clients = [server.client() for _ in range(3)]
    try:
        clients[0].register("alice", PASSWORD)
        # the 4th connection is refused without having to say anything
        extra = RawClient(server.host, server.port)
        events = extra.events_until_closed()
        extra.close()
        assert len(events) == 1, events
        assert isinstance(events[0], Error)
        assert (events[0].code, events[0].request_id) == ("server_full", 0)
        # and one that sends Hello first gets the same
        extra = RawClient(server.host, server.port)
        extra.send(Hello(request_id=1))
        codes = [getattr(e, "code", type(e).__name__) for e in extra.events_until_closed()]
        extra.close()
        assert codes == ["server_full"]
        # the admitted clients are unaffected
        assert [a.name for a in clients[1].list_accounts().accounts] == ["alice"]

        # a freed slot can be taken again once the server has seen the close
        clients[2].close()

        def admitted():
            probe = RawClient(server.host, server.port)
            try:
                reply = probe.hello()
                return isinstance(reply, Welcome)
            except Closed:
                return False
            finally:
                probe.close()

        wait_until(admitted, what="a slot to free up")
    finally:
        for client in clients:
            client.close()
    assert "Traceback" not in server.log


# -- slow readers -----------------------------------------------------------------------------

def test_slow_reader_does_not_block_others(server, user, connect):
    """A peer that never reads its pushes must not hold up anyone else."""
    slow = RawClient(server.host, server.port, rcvbuf=4096)
    try:
        slow.hello()
        slow.send(Register(request_id=2, name="slow", password=PASSWORD))
        assert isinstance(slow.reply(), LoggedIn)
        # from now on "slow" reads nothing

        fast = user("fast")
        third = user("third")
        body = "s" * 65_536
        flood_ids: list[int] = []
        flood_errors: list[BaseException] = []

        def flood():
            try:
                for _ in range(120):  # ~7.5 MiB of pushes for a peer that does not read
                    flood_ids.append(fast.send("slow", body).message_id)
            except BaseException as exc:  # noqa: BLE001 - reported below
                flood_errors.append(exc)

        flooder = threading.Thread(target=flood)
        flooder.start()
        third_ids = []
        try:
            for i in range(40):
                sent = third.send("fast", f"third {i}")
                assert sent.duplicate is False
                third_ids.append(sent.message_id)
                assert [a.name for a in third.list_accounts("t*").accounts] == ["third"]
                assert third.fetch(1).messages == ()
        finally:
            flooder.join(WAIT * 6)
        assert not flooder.is_alive()
        assert flood_errors == []
        assert len(flood_ids) == 120 and len(set(flood_ids)) == 120
        # still served after the flood, whatever became of the slow connection
        sent = third.send("fast", "after the flood")
        third_ids.append(sent.message_id)

        got = [m.id for m in fetch_all(fast)]
        assert got == third_ids

        # nothing was lost for the slow reader: every message waits for it
        again = connect()
        assert again.login("slow", PASSWORD).pending == 120
        seen = [m.id for m in fetch_everything(again, ack=True)]
        assert seen == flood_ids
    finally:
        slow.close()
    assert "Traceback" not in server.log


# -- heartbeats -------------------------------------------------------------------------------

def test_heartbeat_pings_and_drops_a_silent_peer(server_factory, tmp_path):
    server = server_factory(tmp_path / "hb.db", ["--heartbeat-interval", "1"])
    raw = RawClient(server.host, server.port)
    try:
        assert raw.hello().heartbeat_interval == 1
        first = raw.next_event()
        assert isinstance(first, Ping)
        raw.send(Pong(nonce=first.nonce))
        # answered: the connection lives on and is pinged again, with a new nonce
        second = raw.next_event()
        assert isinstance(second, Ping)
        assert second.nonce != first.nonce
        reply = raw.request(ListAccounts(request_id=2))
        assert reply.request_id == 2
        # now stay silent: the server gives up on us
        events = raw.events_until_closed()
        assert all(isinstance(e, Ping) for e in events), events
    finally:
        raw.close()
    wait_until(lambda: log_lines(server, r"no heartbeat from"), what="the heartbeat log line")


# -- observability ----------------------------------------------------------------------------

def test_json_log_format(server_factory, tmp_path):
    server = server_factory(tmp_path / "json.db", ["--log-format", "json"])
    sock = socket.create_connection((server.host, server.port))
    peer = peer_of(sock)
    with ChatClient(server.host, server.port, sock=sock) as client:
        client.register("alice", PASSWORD)
    assert server.stop() == 0
    entries = [json.loads(line) for line in server.log.splitlines() if line.strip()]
    assert entries, server.log
    for entry in entries:
        assert {"time", "level", "logger", "message"} <= set(entry)
    messages = [e["message"] for e in entries if e["logger"] == "chatserver"]
    assert f"connect {peer}" in messages
    assert f"register alice from {peer}" in messages
    assert f"disconnect {peer}" in messages
    assert PASSWORD not in server.log


def metric(text: str, name: str) -> float:
    """The value of an unlabelled sample ``name`` in a Prometheus text exposition."""
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not in metrics"
    return float(match.group(1))


def test_metrics_endpoint_counts_what_happened(server_factory, tmp_path):
    server = server_factory(tmp_path / "m.db", ["--metrics-port", "0"])
    line = server.stdout_lines[-1]  # the second line, after the listening one
    match = re.fullmatch(r"metrics on (http://127\.0\.0\.1:(\d+)/metrics)\n", line)
    assert match, line
    url = match.group(1)
    with server.client() as alice, server.client() as bob:
        alice.register("alice", PASSWORD)
        bob.register("bob", PASSWORD)
        ids = [alice.send("bob", f"m{i}").message_id for i in range(3)]
        with pytest.raises(ServerError):
            alice.send("nobody", "x")
        assert fetch_all(bob) and bob.ack(ids) == 3
        text = urllib.request.urlopen(url, timeout=WAIT).read().decode()
    assert metric(text, "chat_messages_stored_total") == 3
    assert metric(text, "chat_messages_pushed_total") == 3
    assert metric(text, "chat_messages_acknowledged_total") == 3
    assert metric(text, "chat_connections_total") == 2
    assert metric(text, "chat_open_connections") == 2
    assert 'chat_messages_rejected_total{reason="no_such_account"} 1.0' in text


# -- shutdown ---------------------------------------------------------------------------------

def test_shutdown_while_a_client_is_mid_frame_is_not_its_protocol_error(server):
    """The server stopping is not the client's fault: a partial frame gets no protocol_error,
    just the shutting_down notice and the close (PROTOCOL.md section 6)."""
    raw = RawClient(server.host, server.port)
    try:
        raw.hello()
        partial = encode_event(Register(request_id=3, name="slowtyper", password=PASSWORD))[:9]
        raw.send_bytes(encode_event(Ping(nonce=1)) + partial)
        assert raw.next_event() == Pong(nonce=1)  # the server has read up to the partial frame
        assert server.stop(signal.SIGTERM) == 0
        events = raw.events_until_closed()
    finally:
        raw.close()
    assert [(type(e).__name__, getattr(e, "code", None)) for e in events] == [
        ("Notice", "shutting_down")]
    assert "protocol error" not in server.log
