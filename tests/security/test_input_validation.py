"""Input validation at the boundary: names, UTF-8, every length limit at N and N+1, and what
the terminal client prints of other people's text."""

from __future__ import annotations

import io
import itertools
import re
import struct

import pytest

from chatserver import domain
from chatserver.client import ServerError
from chatserver.protocol import Error, Hello, Message, Notice, Welcome
from chatserver_cli.client import Terminal
from tests.conftest import ServerProcess

from .conftest import PASSWORD, WAIT, RawConnection

_ids = itertools.count(1)


def unique(prefix: str) -> str:
    return f"{prefix}{next(_ids)}"


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    server = ServerProcess(tmp_path_factory.mktemp("input") / "chat.db",
                           ["--registrations-per-hour", "0", "--login-free-failures", "-1"])
    yield server.start()
    server.kill()


@pytest.fixture
def open_client(shared):
    opened = []

    def make():
        client = shared.client(timeout=WAIT)
        opened.append(client)
        return client

    yield make
    for client in opened:
        client.close()


def code_of(call) -> str:
    with pytest.raises(ServerError) as info:
        call()
    return info.value.code


# -- names ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spelling", [
    "\uff21\uff4c\uff49\uff43\uff45",  # full-width "Ａｌｉｃｅ"
    "\U0001d400lice",  # MATHEMATICAL BOLD CAPITAL A
    "A\u2113ice",  # SCRIPT SMALL L
    "\u24b6lice",  # CIRCLED LATIN CAPITAL LETTER A
], ids=["fullwidth", "math-bold", "script-l", "circled"])
def test_compatibility_spellings_are_the_plain_name(open_client, spelling):
    """NFKC: look-alike compatibility forms are the ASCII name, never a second account."""
    plain = "Alice" + str(next(_ids))
    first = open_client()
    assert first.register(spelling + plain[5:], PASSWORD).name == plain
    for variant in (plain, plain.lower(), plain.upper(), spelling + plain[5:]):
        assert code_of(lambda v=variant: open_client().register(v, PASSWORD)) == "name_taken"
    assert open_client().login(plain.lower(), PASSWORD).name == plain
    assert open_client().login(spelling + plain[5:], PASSWORD).name == plain


@pytest.mark.parametrize("name", [
    "esc\x1b[31m", "bell\x07", "nul\x00", "del\x7f", "csi\x9b", "nel\x85", "cr\rx", "nl\nx",
    "tab\tx", "sp ace", "zero\u200bwidth", "rlo\u202eevil", "line\u2028sep", "bom\ufeff",
    "\u0430lice",  # CYRILLIC SMALL LETTER A: a homoglyph of "alice"
    "caf\u00e9", "\u00e5", "emoji\U0001f600", "",
], ids=lambda n: repr(n)[1:-1] or "empty")
def test_control_space_and_non_ascii_characters_are_refused_in_names(open_client, name):
    client = open_client()
    assert code_of(lambda: client.register(name, PASSWORD)) == "invalid_name"
    # and such a name never logs in either (the same answer as a wrong password)
    assert code_of(lambda: client.login(name, PASSWORD)) == "invalid_credentials"


def test_names_in_the_database_are_the_normalised_form(shared, open_client):
    name = unique("Norm")
    open_client().register("\uff2e" + name[1:], PASSWORD)  # full-width N
    [entry] = open_client().list_accounts(name).accounts
    assert entry.name == name


# -- invalid UTF-8 anywhere in a frame ------------------------------------------------------------

def _str(raw: bytes) -> bytes:
    return struct.pack(">H", len(raw)) + raw


@pytest.mark.parametrize("bad", [b"\xc0\x80", b"\xed\xb0\x80", b"\xf4\x90\x80\x80", b"\xfe"],
                         ids=["overlong-nul", "lone-surrogate", "above-10ffff", "fe"])
def test_invalid_utf8_in_a_password_is_a_protocol_error(shared, bad):
    raw = RawConnection(shared.host, shared.port)
    try:
        raw.send(Hello(request_id=1, version=1, client="raw"))
        assert isinstance(raw.next_event(), Welcome)
        payload = struct.pack(">I", 2) + _str(b"somebody") + _str(b"password" + bad)
        raw.send_bytes(struct.pack(">IB", 1 + len(payload), 0x03) + payload)  # Login
        events = raw.events_until_closed()
    finally:
        raw.close()
    assert [(e.code, e.request_id) for e in events if isinstance(e, Error)] == [
        ("protocol_error", 0)]
    assert "Traceback" not in shared.log


# -- every length limit at N and N+1 ----------------------------------------------------------------

class Reg:
    """Register a name of ``length`` characters (made unique, ending in ``tail``)."""

    def __init__(self, length: int, password: str = PASSWORD, tail: str = ""):
        self.length, self.password, self.tail = length, password, tail

    def __call__(self, client):
        head = unique("b")
        name = (head + "x" * self.length)[:self.length - len(self.tail)] + self.tail
        return client.register(name, self.password)


def _send(body: str = "x", client_msg_id: str = ""):
    def run(c):
        me = unique("sender")
        c.register(me, PASSWORD)
        return c.send(me, body, client_msg_id)
    return run


def _ack(count: int):
    def run(c):
        c.register(unique("acker"), PASSWORD)
        return c.ack(range(1, count + 1))
    return run


MAX_BODY = domain.MAX_MESSAGE_BYTES
LIMITS = [
    # (limit, accepted at N, refused at N+1, code)
    ("name 32 characters", Reg(32), Reg(33), "invalid_name"),
    # U+FF2D (Ｍ) is one letter after NFKC, U+3392 (㎒) three: 32 and 34 characters
    ("name 32 after NFKC", Reg(32, tail="\uff2d"), Reg(32, tail="\u3392"), "invalid_name"),
    ("password 8 characters", Reg(10, "12345678"), Reg(10, "1234567"), "invalid_password"),
    ("password 8 characters, not bytes", Reg(10, "\u00e9" * 8), Reg(10, "\u00e9" * 7),
     "invalid_password"),
    ("password 1024 bytes", Reg(10, "\u00e9" * 512), Reg(10, "\u00e9" * 512 + "x"),
     "invalid_password"),
    ("body 1 byte", _send("x"), _send(""), "empty_message"),
    ("body max_message_bytes", _send("\u00e9" * (MAX_BODY // 2)),
     _send("\u00e9" * (MAX_BODY // 2) + "x"), "message_too_large"),
    ("client_msg_id 64 bytes", _send(client_msg_id="\u00e9" * 32),
     _send(client_msg_id="\u00e9" * 32 + "x"), "invalid_request"),
    ("pattern 64 characters", lambda c: c.list_accounts("\u00e9" * 64),
     lambda c: c.list_accounts("\u00e9" * 65), "invalid_pattern"),
    ("ack 1000 ids", _ack(1000), _ack(1001), "invalid_request"),
]


@pytest.mark.parametrize("limit, at_n, over_n, code", LIMITS, ids=[row[0] for row in LIMITS])
def test_length_limit_at_n_and_n_plus_one(open_client, limit, at_n, over_n, code):
    at_n(open_client())
    client = open_client()
    assert code_of(lambda: over_n(client)) == code
    # the refusal left the connection usable
    client.list_accounts("nobody-at-all")


# -- what the terminal client prints of other people's text ----------------------------------------

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def test_no_control_character_from_others_reaches_the_terminal():
    """Every C0 control but tab and newline, DEL and every C1 control, in a body, a notice and
    a connection error: none reaches the terminal raw, and a newline in a body never starts a
    line that looks like another message."""
    controls = "".join(chr(c) for c in [*range(0x20), *range(0x7f, 0xa0)])
    out = io.StringIO()
    terminal = Terminal(out)
    terminal.show_messages([Message(id=1, sender="mallory", sent_at=1_750_000_000_000,
                                     body="start" + controls + "\n[2026-01-01] bob: hi")])
    body_lines = out.getvalue().split("\n")[:-1]
    terminal.on_push(Notice(code="account_deleted", text=controls))
    terminal.on_push(Error(request_id=0, code="server_full", text=controls))
    shown = out.getvalue()
    assert not _CONTROL.search(shown), repr(shown)
    assert "\r" not in shown
    assert body_lines[0].startswith("[") and "] mallory: start" in body_lines[0]
    assert len(body_lines) == 3  # the body's two newlines
    assert all(line.startswith("    ") for line in body_lines[1:]), body_lines
