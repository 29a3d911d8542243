"""Logs and error replies: no password and no message text in the server's log (text and
JSON, at debug level); no stack trace and no SQL in any error reply."""

from __future__ import annotations

import json
import re
import sqlite3
import struct

import pytest

from chatserver.client import ServerError
from chatserver.protocol import Error, Hello, Welcome

from .conftest import PASSWORD, RawConnection

# Distinctive strings: if any of them is in a log, it was logged.
ALICE_PW = "alice-Pw-7Q2xKf9"
BOB_PW = "bob-Pw-Z81mWq4"
WRONG_PW = "wrong-Guess-4Hn0pE"
SHORT_PW = "Sh0rt7x"
DELETE_WRONG_PW = "delete-Guess-Vb6tR1"
BODIES = [
    "body-one-Kx93Lw",
    "multi\nline-body-Qp72Za\nthird",
    "unicode-body-\u00dc\u00f1\u00ee\u00e7\u00f8d\u00e9-\u03b2-Rt55",
    "idempotent-body-Mn40Vs",
    "max-size-body-Jh28Ue" + "z" * 65_000,
]
PASSWORDS = [ALICE_PW, BOB_PW, WRONG_PW, SHORT_PW, DELETE_WRONG_PW]
LEAKS = re.compile(r"Traceback|File \"|\bSELECT\b|\bINSERT\b|\bUPDATE\b|\bDELETE FROM\b|"
                   r"\[SQL|sqlalchemy|sqlite3|\.py\b", re.IGNORECASE)


def code_of(call) -> str:
    with pytest.raises(ServerError) as info:
        call()
    return info.value.code


def full_session(server) -> None:
    """Everything a user can do, with failures on the way."""
    with server.client() as alice, server.client() as bob, server.client() as other:
        alice.register("alice", ALICE_PW)
        bob.register("bob", BOB_PW)
        assert code_of(lambda: other.register("carol", SHORT_PW)) == "invalid_password"
        for _ in range(3):
            assert code_of(lambda: other.login("alice", WRONG_PW)) == "invalid_credentials"
        assert code_of(lambda: other.login("nobody", WRONG_PW)) == "invalid_credentials"
        other.login("alice", ALICE_PW)
        other.logout()
        sent = [alice.send("bob", body) for body in BODIES[:3]]
        alice.send("bob", BODIES[3], client_msg_id="key-1")
        alice.send("bob", BODIES[3], client_msg_id="key-1")  # a retry: a duplicate
        alice.send("bob", BODIES[4])
        messages = bob.fetch().messages
        assert [m.body for m in messages] == BODIES
        bob.ack([m.id for m in messages[:2]])
        assert sent[0].message_id == messages[0].id
        assert code_of(lambda: bob.delete_account(DELETE_WRONG_PW)) == "invalid_credentials"
        bob.delete_account(BOB_PW)
        assert code_of(lambda: alice.send("bob", "body-to-nobody-Ty6Wq")) == "no_such_account"
        alice.logout()


def assert_log_is_clean(log: str) -> None:
    for secret in PASSWORDS:
        assert secret not in log, f"a password is in the log: {secret!r}"
    for body in [*BODIES, "body-to-nobody-Ty6Wq"]:
        for piece in re.split(r"\n", body):
            if len(piece) > 6:
                assert piece[:20] not in log, f"message text is in the log: {piece[:20]!r}"
    assert "$argon2id$" not in log  # nor a password hash


@pytest.mark.parametrize("log_args", [
    ["--log-level", "debug"],
    ["--log-level", "debug", "--log-format", "json"],
], ids=["text", "json"])
def test_server_log_of_a_full_session_has_no_password_and_no_message_text(server_factory,
                                                                          tmp_path, log_args):
    server = server_factory(tmp_path / "log.db", log_args)
    full_session(server)
    assert server.stop() == 0
    log = server.log
    assert "login alice from" in log and "failed login from" in log  # it did log the session
    assert_log_is_clean(log)
    if "json" in log_args:
        entries = []
        for line in log.splitlines():
            if line.strip():
                try:
                    entries.append(json.loads(line))
                except ValueError:
                    raise AssertionError(f"not a JSON log line: {line!r}\n{log}") from None
        assert_log_is_clean("\n".join(str(entry) for entry in entries))  # decoded too


# -- error replies --------------------------------------------------------------------------------

def raw_error(server, data: bytes, hello: bool) -> Error:
    raw = RawConnection(server.host, server.port)
    try:
        if hello:
            raw.send(Hello(request_id=1, version=1, client="raw"))
            assert isinstance(raw.next_event(), Welcome)
        raw.send_bytes(data)
        events = raw.events_until_closed()
    finally:
        raw.close()
    [error] = [e for e in events if isinstance(e, Error)]
    return error


def test_no_error_reply_contains_a_stack_trace_or_sql(server_factory, tmp_path):
    server = server_factory(tmp_path / "errors.db", [
        "--max-queued-per-account", "2", "--send-burst", "6", "--send-rate", "0.001",
        "--login-free-failures", "0", "--registrations-per-hour", "0", "--max-connections", "8"])
    errors: dict[str, str] = {}

    def expect(code: str, call) -> None:
        with pytest.raises(ServerError) as info:
            call()
        assert info.value.code == code
        errors[code] = info.value.text

    def frame(type_byte: int, payload: bytes) -> bytes:
        return struct.pack(">IB", 1 + len(payload), type_byte) + payload

    errors["protocol_error"] = raw_error(server, frame(0x07, b"\x00\x00\x00\x01\x00\x00"),
                                         hello=False).text
    errors["protocol_error (utf-8)"] = raw_error(
        server, frame(0x03, b"\x00\x00\x00\x02\x00\x01\xff\x00\x01a"), hello=True).text
    errors["unsupported_version"] = raw_error(
        server, frame(0x01, b"\x00\x00\x00\x01\x00\x02\x00\x00"), hello=False).text

    with server.client() as a, server.client() as b, server.client() as c:
        expect("not_logged_in", lambda: a.fetch())
        expect("invalid_name", lambda: a.register("bad name", PASSWORD))
        expect("invalid_password", lambda: a.register("erra", "short"))
        a.register("erra", PASSWORD)
        b.register("errb", PASSWORD)
        expect("already_logged_in", lambda: b.register("errc", PASSWORD))
        expect("name_taken", lambda: c.register("ERRA", PASSWORD))
        expect("invalid_pattern", lambda: c.list_accounts("x" * 65))
        expect("no_such_account", lambda: a.send("nobody", "hi"))
        expect("empty_message", lambda: a.send("errb", ""))
        expect("message_too_large", lambda: a.send("errb", "x" * 65_537))
        expect("invalid_request", lambda: a.ack(range(1, 1002)))
        a.send("errb", "one")
        a.send("errb", "two")
        expect("queue_full", lambda: a.send("errb", "three"))
        for _ in range(2):
            expect("no_such_account", lambda: a.send("nobody", "hi"))
        expect("rate_limited", lambda: a.send("errb", "four"))
        errors["rate_limited (send)"] = errors.pop("rate_limited")
        expect("invalid_credentials", lambda: c.login("erra", "wrong password"))
        expect("rate_limited", lambda: c.login("erra", PASSWORD))

        # server_full: fill the server up with raw connections
        extra = []
        try:
            for _ in range(10):
                raw = RawConnection(server.host, server.port)
                extra.append(raw)
                raw.send(Hello(request_id=1, version=1, client="filler"))
                event = raw.next_event()
                if isinstance(event, Error):
                    assert event.code == "server_full"
                    errors["server_full"] = event.text
                    break
        finally:
            for raw in extra:
                raw.close()
    assert len(errors) == 18 and "server_full" in errors, sorted(errors)
    for code, text in errors.items():
        assert not LEAKS.search(text), (code, text)
        assert PASSWORD not in text
    assert "Traceback" not in server.log


def sabotage(db_path, *statements: str) -> None:
    """Change the running server's database behind its back (another SQLite connection)."""
    conn = sqlite3.connect(db_path, isolation_level=None)
    try:
        for statement in statements:
            conn.execute(statement)
    finally:
        conn.close()


def test_database_failures_reply_without_sql_and_log_no_message_text(server_factory, tmp_path):
    """Unexpected database errors: the client gets internal_error or storage_unavailable with
    a plain sentence, and the log, which records the failure for the operator, holds neither
    the message text nor the statement's parameters."""
    db = tmp_path / "sabotaged.db"
    server = server_factory(db)
    secret_body = "secret-body-Wd83Nc-that-must-not-be-logged"
    with server.client() as alice, server.client() as bob:
        alice.register("alice", ALICE_PW)
        bob.register("bob", BOB_PW)
        # a constraint the schema does not know: the insert fails with an IntegrityError
        sabotage(db, "CREATE TRIGGER sabotage BEFORE INSERT ON messages "
                     "BEGIN SELECT RAISE(ABORT, 'sabotaged'); END")
        with pytest.raises(ServerError) as info:
            alice.send("bob", secret_body)
        internal = info.value
        # a table that is gone: every read fails with an OperationalError
        sabotage(db, "DROP TRIGGER sabotage", "ALTER TABLE messages RENAME TO gone")
        with pytest.raises(ServerError) as info:
            bob.fetch()
        unavailable = info.value
    assert internal.code in ("internal_error", "storage_unavailable")
    assert unavailable.code == "storage_unavailable"
    for error in (internal, unavailable):
        assert not LEAKS.search(error.text), error.text
    assert server.stop() == 0
    assert secret_body not in server.log, "message text in the log:\n" + "\n".join(
        line for line in server.log.splitlines() if secret_body in line)
