"""``chat client`` in a pipe against a real server, and the Terminal's display rules in-process."""

from __future__ import annotations

import errno
import io
import os
import queue
import re
import socket
import subprocess
import threading
import time

import pytest
from chatserver.resilient import ResilientClient
from chatserver_cli.client import HELP, Terminal, safe
from tests.conftest import ServerProcess, chat_command  # tests/conftest.py

from chatserver.client import ServerError
from chatserver.domain import StoredMessage
from chatserver.protocol import Error, Message, Messages, Notice, Push
from chatserver.storage.database import Database

MESSAGE_LINE = re.compile(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] (\S+): (.*)$")


def run_client(server: ServerProcess, script: str | bytes) -> subprocess.CompletedProcess:
    """One scripted ``chat client`` session; ``script`` is its whole standard input."""
    return subprocess.run(chat_command("client", "--port", str(server.port)), input=script,
                          capture_output=True, text=isinstance(script, str), timeout=60)


def stdout_lines(result: subprocess.CompletedProcess) -> list[str]:
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def stamp(ms: int) -> str:
    """How the client shows a message's time: local time, to the second."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000))


def waiting_for(server: ServerProcess, name: str) -> list[StoredMessage]:
    """The messages stored for ``name`` and not yet acknowledged, read from the database file."""
    db = Database(str(server.db_path))
    try:
        def read(repo):
            account, _ = repo.get_by_key(name.casefold())
            return repo.undelivered(account.id, 1000)
        return db.read(read)
    finally:
        db.dispose()


def register(server: ServerProcess, name: str, password: str) -> None:
    with server.client() as chat:
        chat.register(name, password)


# -- a whole scripted session --------------------------------------------------------------------

def test_scripted_session(server, connect):
    register(server, "bob", "bob-password")  # offline from now on
    carol = connect()
    carol.register("carol", "carol-password")  # online for the whole session
    script = "\n".join([
        "/help",
        "/register alice alice-password",
        "/users",
        "/users c*",
        "/msg bob are you there?",
        "/msg carol hi carol",
        "/msg nobody hello",
        "/register alice2 other-password",
        "/logout",
        "/msg bob hello again",
        "/inbox",
        "/register b@d bad-name-password",
        "/register dave short",
        "/register alice alice-password",
        "/login alice wrong-password",
        "/login ALICE alice-password",
        "/inbox",
        "/delete-account wrong-password",
        "/delete-account alice-password",
        "/users",
        "/login alice alice-password",
        "bye",
        "/help",  # never run: the session ended
    ]) + "\n"
    result = run_client(server, script)
    assert stdout_lines(result) == [
        *HELP.splitlines(),
        "registered and logged in as alice",
        "alice  (online)",
        "bob",
        "carol  (online)",
        "3 account(s)",
        "carol  (online)",
        "1 account(s)",
        "sent to bob (#1, queued until they fetch it)",
        "sent to carol (#2, delivered live)",
        "error: no_such_account: there is no account named 'nobody'",
        "error: already_logged_in: already logged in as alice; log out first",
        "logged out",
        "error: not_logged_in: log in first",
        "error: not_logged_in: log in first",
        "error: invalid_name: names are 1-32 characters from letters, digits, '_', '-', '.'",
        "error: invalid_password: passwords need at least 8 characters",
        "error: name_taken: the name 'alice' is taken",
        "error: invalid_credentials: wrong name or password",
        "logged in as alice (no messages waiting)",
        "no messages waiting",
        "error: invalid_credentials: wrong password",
        "account deleted (0 undelivered message(s) discarded)",
        "bob",
        "carol  (online)",
        "2 account(s)",
        "error: invalid_credentials: wrong name or password",
    ]
    assert re.fullmatch(rf"connected to 127\.0\.0\.1:{server.port} \(\S+\); "
                        r"/help lists the commands\n", result.stderr)
    # carol got her message live; bob's waits for him (alice's deletion leaves it deliverable).
    push = carol.pushes.get(timeout=60)
    assert (push.message.id, push.message.sender, push.message.body) == (2, "alice", "hi carol")
    assert [(m.id, m.sender, m.body) for m in waiting_for(server, "bob")] == [
        (1, "alice", "are you there?")]


def test_help_command_is_the_same_logged_in_or_not(server):
    result = run_client(server, "/help\n/register alice alice-password\n/help\n")
    assert stdout_lines(result) == [
        *HELP.splitlines(), "registered and logged in as alice", *HELP.splitlines()]
    for command in ("/register", "/login", "/logout", "/users", "/msg", "/inbox",
                    "/delete-account", "/help", "bye", "quit", "/quit"):
        assert command in HELP


def test_usage_errors_and_unknown_commands(server):
    script = "\n".join([
        "/register",
        "/register alice",
        "/login",
        "/login alice",
        "/msg",
        "/msg bob",
        "/inbox many",
        "/inbox 1.5",
        "/delete-account",
        "/frobnicate now",
        "hello there",
        "",
        "   ",
        "   /users   ",
    ]) + "\n"
    assert stdout_lines(run_client(server, script)) == [
        "usage: /register NAME PASSWORD",
        "usage: /register NAME PASSWORD",
        "usage: /login NAME PASSWORD",
        "usage: /login NAME PASSWORD",
        "usage: /msg NAME TEXT",
        "usage: /msg NAME TEXT",
        "usage: /inbox [N]",
        "usage: /inbox [N]",
        "usage: /delete-account PASSWORD",
        "unknown command '/frobnicate'; /help lists the commands",
        "unknown command 'hello'; /help lists the commands",
        "0 account(s)",
    ]


# -- inbox, pending count and acknowledgement ---------------------------------------------------

def test_login_counts_and_inbox_shows_and_acknowledges(server, connect):
    register(server, "bob", "bob-password")
    alice = connect()
    alice.register("alice", "alice-password")
    alice.send("bob", "hello")
    alice.send("bob", "how are you?  (tabs\tand unicode ✓ stay)")
    stored = waiting_for(server, "bob")
    assert len(stored) == 2

    result = run_client(server, "/login bob bob-password\n/inbox\n/inbox\nquit\n")
    lines = stdout_lines(result)
    assert lines == [
        "logged in as bob (2 message(s) waiting; /inbox shows them)",
        f"[{stamp(stored[0].sent_at)}] alice: hello",
        f"[{stamp(stored[1].sent_at)}] alice: how are you?  (tabs\tand unicode ✓ stay)",
        "no messages waiting",
    ]
    assert re.fullmatch(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] alice: hello$", lines[1])

    # Shown means acknowledged: gone from the database and from a new session.
    assert waiting_for(server, "bob") == []
    assert stdout_lines(run_client(server, "/login bob bob-password\n/inbox\n")) == [
        "logged in as bob (no messages waiting)",
        "no messages waiting",
    ]


def test_inbox_limit_and_remaining(server, connect):
    register(server, "bob", "bob-password")
    alice = connect()
    alice.register("alice", "alice-password")
    for text in ("one", "two", "three"):
        alice.send("bob", text)
    stored = waiting_for(server, "bob")

    result = run_client(server, "/login bob bob-password\n/inbox 2\n/inbox 2\n/inbox 2\n")
    assert stdout_lines(result) == [
        "logged in as bob (3 message(s) waiting; /inbox shows them)",
        f"[{stamp(stored[0].sent_at)}] alice: one",
        f"[{stamp(stored[1].sent_at)}] alice: two",
        "1 more waiting; /inbox shows them",
        f"[{stamp(stored[2].sent_at)}] alice: three",
        "no messages waiting",
    ]
    assert waiting_for(server, "bob") == []


def test_messages_from_a_deleted_account_are_still_shown(server):
    register(server, "bob", "bob-password")
    with server.client() as alice:
        alice.register("alice", "alice-password")
        alice.send("bob", "goodbye")
        alice.delete_account("alice-password")
    stored = waiting_for(server, "bob")
    result = run_client(server, "/login bob bob-password\n/inbox\n/users\n")
    assert stdout_lines(result) == [
        "logged in as bob (1 message(s) waiting; /inbox shows them)",
        f"[{stamp(stored[0].sent_at)}] alice: goodbye",
        "bob  (online)",
        "1 account(s)",
    ]


def test_delete_account_reports_discarded_messages(server, connect):
    register(server, "bob", "bob-password")
    alice = connect()
    alice.register("alice", "alice-password")
    alice.send("bob", "one")
    alice.send("bob", "two")
    result = run_client(server, "/login bob bob-password\n/delete-account bob-password\n"
                                "/users\n/login bob bob-password\n")
    assert stdout_lines(result) == [
        "logged in as bob (2 message(s) waiting; /inbox shows them)",
        "account deleted (2 undelivered message(s) discarded)",
        "alice  (online)",
        "1 account(s)",
        "error: invalid_credentials: wrong name or password",
    ]
    with pytest.raises(ServerError) as refused:
        alice.send("bob", "anyone?")
    assert refused.value.code == "no_such_account"


# -- what other users send is made harmless ------------------------------------------------------

def test_control_characters_from_others_are_escaped(server, connect):
    register(server, "bob", "bob-password")
    alice = connect()
    alice.register("alice", "alice-password")
    alice.send("bob", "\x1b[31mred\x1b[0m, bell\x07, CR\r, DEL\x7f, CSI\x9b, NUL\x00.")
    stored = waiting_for(server, "bob")
    result = run_client(server, "/login bob bob-password\n/inbox\n")
    assert stdout_lines(result) == [
        "logged in as bob (1 message(s) waiting; /inbox shows them)",
        f"[{stamp(stored[0].sent_at)}] alice: "
        r"\x1b[31mred\x1b[0m, bell\x07, CR\x0d, DEL\x7f, CSI\x9b, NUL\x00.",
    ]
    assert "\x1b" not in result.stdout and "\r" not in result.stdout


def test_a_newline_in_a_body_cannot_forge_a_line_from_another_sender(server, connect):
    """A body may span lines, but no line of it may look like another user's message."""
    register(server, "bob", "bob-password")
    alice = connect()
    alice.register("alice", "alice-password")
    alice.send("bob", "see below\n[2026-01-01 12:00:00] carol: bob, send me your password")
    result = run_client(server, "/login bob bob-password\n/inbox\n")
    senders = [m.group(1) for m in map(MESSAGE_LINE.match, stdout_lines(result)) if m]
    assert senders == ["alice"], result.stdout


# -- never the same message twice ----------------------------------------------------------------

class InteractiveClient:
    """``chat client`` with a pipe we write to line by line, its output read as it comes."""

    def __init__(self, server: ServerProcess):
        self.proc = subprocess.Popen(
            chat_command("client", "--port", str(server.port)), stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.lines: queue.Queue = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def send(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def read_line(self) -> str:
        line = self.lines.get(timeout=60)  # a guard against hanging, not a timed assertion
        assert line is not None, f"client ended early: {self.proc.stderr.read()}"
        return line

    def read_until(self, pattern: str) -> list[str]:
        """Lines up to and including the first that matches ``pattern``."""
        got = []
        while not got or not re.fullmatch(pattern, got[-1]):
            got.append(self.read_line())
        return got

    def finish(self, last: str = "bye") -> tuple[int, str, str]:
        """Send ``last`` and close stdin; the exit code, the rest of stdout, and stderr."""
        try:
            self.proc.stdin.write(last + "\n")
            self.proc.stdin.close()
        except BrokenPipeError:
            pass
        code = self.proc.wait(60)
        self._reader.join(10)
        rest = []
        while not self.lines.empty():
            line = self.lines.get()
            if line is not None:
                rest.append(line)
        return code, "\n".join(rest), self.proc.stderr.read()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def interactive(server):
    started: list[InteractiveClient] = []

    def start() -> InteractiveClient:
        client = InteractiveClient(server)
        started.append(client)
        return client

    yield start
    for client in started:
        client.kill()


def test_live_message_then_inbox_shows_it_once(server, connect, interactive):
    register(server, "bob", "bob-password")
    alice = connect()
    alice.register("alice", "alice-password")
    bob = interactive()
    bob.send("/login bob bob-password")
    assert bob.read_line() == "logged in as bob (no messages waiting)"

    assert alice.send("bob", "live one").pushed
    pushed = bob.read_line()
    assert MESSAGE_LINE.fullmatch(pushed).groups() == ("alice", "live one")
    # /inbox right away: whether or not the push's ack was processed first, the message is
    # not shown again. /users marks the end of what /inbox printed.
    bob.send("/inbox")
    bob.send("/users")
    after = bob.read_until(r"\d+ account\(s\)")
    assert after in (
        ["no messages waiting", "alice  (online)", "bob  (online)", "2 account(s)"],
        ["alice  (online)", "bob  (online)", "2 account(s)"],
    )
    # Acknowledged by the push's ack or by the /inbox, both answered before /users was.
    assert waiting_for(server, "bob") == []
    # Later pushes are still shown: only ids already seen are held back.
    assert alice.send("bob", "live two").pushed
    assert MESSAGE_LINE.fullmatch(bob.read_line()).groups() == ("alice", "live two")
    bob.send("/users")
    assert bob.read_until(r"\d+ account\(s\)") == ["alice  (online)", "bob  (online)",
                                                    "2 account(s)"]
    code, rest, stderr = bob.finish("/quit")
    assert (code, rest) == (0, "")
    assert "Traceback" not in stderr


def test_message_shown_just_before_leaving_is_acknowledged(server, connect, interactive):
    """A pushed message is printed, then acknowledged without waiting; leaving right after
    must not drop that acknowledgement (the message would be shown again next session).
    The window is small, so the push-then-leave cycle is repeated."""
    register(server, "bob", "bob-password")
    alice = connect()
    alice.register("alice", "alice-password")
    shown_but_kept = []
    for i in range(10):
        bob = interactive()
        bob.send("/login bob bob-password")
        assert bob.read_line() == "logged in as bob (no messages waiting)"
        assert alice.send("bob", f"number {i}").pushed
        assert MESSAGE_LINE.fullmatch(bob.read_line()).groups() == ("alice", f"number {i}")
        code, rest, stderr = bob.finish("bye")
        assert (code, rest) == (0, ""), stderr
        kept = waiting_for(server, "bob")
        shown_but_kept += [m.body for m in kept]
        if kept:  # acknowledge it here, so the next session starts with nothing waiting
            with server.client() as chat:
                chat.login("bob", "bob-password")
                chat.ack(m.id for m in kept)
    assert shown_but_kept == []


def test_connection_lost_mid_session(server, interactive):
    register(server, "bob", "bob-password")
    bob = interactive()
    bob.send("/login bob bob-password")
    assert bob.read_line() == "logged in as bob (no messages waiting)"
    assert server.stop() == 0
    assert bob.read_line() == "* shutting_down: the server is stopping"
    code, rest, stderr = bob.finish("/users")
    assert (code, rest) == (1, "")
    assert "Traceback" not in stderr
    last = stderr.splitlines()[-1]
    assert last.startswith("Error: connection lost: "), stderr


class FakeChat:
    """What Terminal needs of a ChatClient: a fixed inbox, and a record of what it acked."""

    def __init__(self, inbox: list[Message]):
        self.inbox = inbox
        self.acked: list[list[int]] = []

    def fetch(self, limit: int) -> Messages:
        return Messages(request_id=1, messages=tuple(self.inbox))

    def ack(self, ids) -> int:
        self.acked.append(list(ids))
        return len(self.acked[-1])

    def ack_nowait(self, ids) -> None:
        self.acked.append(list(ids))

    def close(self) -> None:
        pass


def message(id: int, body: str, sender: str = "alice") -> Message:
    return Message(id=id, sender=sender, sent_at=1_750_000_000_000 + id, body=body)


def line(m: Message) -> str:
    return f"[{stamp(m.sent_at)}] {m.sender}: {m.body}"


def test_show_messages_never_shows_an_id_twice():
    out = io.StringIO()
    terminal = Terminal(out)
    m1, m2, m3 = message(1, "one"), message(2, "two"), message(3, "three")
    assert terminal.show_messages([m1, m2]) == 2
    assert terminal.show_messages([m2, m1, m3]) == 1
    assert terminal.show_messages([m3, m3]) == 0
    assert out.getvalue().splitlines() == [line(m1), line(m2), line(m3)]


def test_pushed_then_fetched_is_shown_once_and_acked_both_times():
    out = io.StringIO()
    terminal = Terminal(out)
    m1, m2 = message(7, "pushed first"), message(8, "only fetched")
    # the fetch happens before the push's ack is processed
    terminal.session = ResilientClient(lambda: FakeChat([m1, m2]))
    terminal.on_push(Push(message=m1))
    assert terminal.run_command("/inbox")
    assert out.getvalue().splitlines() == [line(m1), line(m2)]
    assert terminal.chat.acked == [[7], [7, 8]]


def test_pushes_notices_and_errors_are_escaped():
    out = io.StringIO()
    terminal = Terminal(out)
    terminal.session = ResilientClient(lambda: FakeChat([]))
    terminal.on_push(Push(message=message(1, "\x1b]0;pwned\x07", sender="mallory")))
    terminal.on_push(Notice(code="account_deleted", text="gone\x1b[2J"))
    terminal.on_push(Error(request_id=0, code="server_full", text="try later\x08\x08"))
    assert out.getvalue().splitlines() == [
        f"[{stamp(1_750_000_000_001)}] mallory: \\x1b]0;pwned\\x07",
        "* account_deleted: gone\\x1b[2J",
        "error: server_full: try later\\x08\\x08",
    ]


@pytest.mark.parametrize("raw,shown", [
    ("\x1b[31m", "\\x1b[31m"),
    ("plain text", "plain text"),
    ("tab\tkept", "tab\tkept"),
    ("\x00\x01\x1f", "\\x00\\x01\\x1f"),
    ("\x7f\x80\x9f", "\\x7f\\x80\\x9f"),
    ("\xa0é✓", "\xa0é✓"),
])
def test_safe(raw, shown):
    assert safe(raw) == shown


# -- ending a session ----------------------------------------------------------------------------

@pytest.mark.parametrize("word", ["bye", "quit", "/quit", "  bye  "])
def test_leaving_ends_the_session(server, word):
    result = run_client(server, f"/users\n{word}\n/register zed zed-password\n")
    assert stdout_lines(result) == ["0 account(s)"]
    # The line after the leave word was never run.
    assert run_client(server, "/users\n").stdout == "0 account(s)\n"


def test_end_of_input_ends_the_session(server):
    result = run_client(server, "/register alice alice-password")  # no final newline
    assert stdout_lines(result) == ["registered and logged in as alice"]


def test_could_not_connect():
    with socket.socket() as reserved:  # bound but not listening: connections are refused
        reserved.bind(("127.0.0.1", 0))
        port = reserved.getsockname()[1]
        result = subprocess.run(chat_command("client", "--port", str(port)), input="/users\n",
                                capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert result.stdout == ""
    assert result.stderr == (f"Error: could not connect to 127.0.0.1:{port}: "
                             f"[Errno {errno.ECONNREFUSED}] {os.strerror(errno.ECONNREFUSED)}\n")


# -- input the client cannot encode must not crash it ---------------------------------------------

@pytest.mark.parametrize("command", ["/inbox -1", "/inbox 70000"])
def test_inbox_count_out_of_range_is_a_usage_error(server, command):
    result = run_client(server, f"/register alice alice-password\n{command}\n/users\n")
    assert "Traceback" not in result.stderr, result.stderr
    assert (result.returncode, result.stdout.splitlines()) == (0, [
        "registered and logged in as alice",
        "usage: /inbox [N]",
        "alice  (online)",
        "1 account(s)",
    ])


def test_input_that_is_not_utf8_does_not_crash_the_client(server):
    register(server, "bob", "bob-password")
    script = b"/register alice alice-password\n/msg bob caf\xe9 \xff\n/users\n"
    result = run_client(server, script)
    stderr = result.stderr.decode("utf-8", "replace")
    assert "Traceback" not in stderr, stderr
    lines = result.stdout.decode("utf-8").splitlines()
    assert result.returncode == 0
    assert lines[0] == "registered and logged in as alice"
    assert lines[-3:] == ["alice  (online)", "bob", "2 account(s)"]
    assert len(lines) == 5  # one line (an error, or the message sent) for the /msg
