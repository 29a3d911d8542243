"""A bug in the server's own code while serving a Send (an unexpected exception, not a
refusal) costs that request an ``internal_error`` reply, never the connection: the replies
after it still come, in order. (A Send reserves its reply's place before it is queued; a
place left empty would hold back every later reply of the connection.)"""

from __future__ import annotations

import pytest

from chatserver import domain
from chatserver.app import ChatApp
from chatserver.protocol import Error, LoggedIn, Ping, Pong, Register, Send, Sent
from chatserver.server import ServerConfig

from .helpers import CHEAP, PASSWORD, RawPeer


@pytest.mark.parametrize("together", [True, False], ids=["one-write", "one-by-one"])
def test_an_unexpected_error_in_a_send_is_an_internal_error_reply_and_nothing_more(
        tmp_path, monkeypatch, together):
    app = ChatApp(str(tmp_path / "c.db"), ServerConfig(port=0, registrations_per_hour=0),
                  hash_params=CHEAP)
    app.start()
    try:
        host, port = app.address
        with RawPeer(host, port) as peer:
            peer.hello()
            assert isinstance(peer.request(Register(request_id=2, name="alice",
                                                    password=PASSWORD)), LoggedIn)
            real_validate = domain.validate_body
            calls = []

            def broken(*args, **kwargs):  # a bug in checking the first send only
                calls.append(args)
                if len(calls) == 1:
                    raise RuntimeError("a bug")
                return real_validate(*args, **kwargs)

            monkeypatch.setattr(domain, "validate_body", broken)
            if together:
                # One write: the server handles both sends as one chunk, and the bug in one
                # must not take the other down with it.
                peer.send(Send(request_id=3, to="alice", body="first"),
                          Send(request_id=4, to="alice", body="second"),
                          Ping(nonce=5))
                first, second, pong = peer.reply(), peer.reply(), peer.reply()  # (no pushes)
            else:  # each send alone: the path of a client waiting for each reply
                first = peer.request(Send(request_id=3, to="alice", body="first"))
                second = peer.request(Send(request_id=4, to="alice", body="second"))
                pong = peer.request(Ping(nonce=5))
        assert isinstance(first, Error) and (first.request_id, first.code) == (3, "internal_error")
        assert isinstance(second, Sent) and second.request_id == 4
        assert pong == Pong(nonce=5)
    finally:
        app.stop()
