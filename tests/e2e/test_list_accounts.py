"""ListAccounts: wildcards, case, literal % and _, sorting, pagination, limits, online flags."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from chatserver.client import ServerError

from .helpers import PASSWORD, wait_until

NAMES = ["alice", "Alicia", "ALBERT", "bob", "Bobby", "b0b", "carol", "a_b", "axb", "a.b",
         "a-b", "zed", "Zoe", "percent"]


def sorted_ci(names):
    return sorted(names, key=str.casefold)


@pytest.fixture(scope="module")
def populated_server(module_server):
    """One server for the read-only tests of this module, with NAMES registered (offline)."""
    with module_server.client() as registrar:
        for name in NAMES:
            registrar.register(name, PASSWORD)
            registrar.logout()
    return module_server


@pytest.fixture
def populated(populated_server):
    """An anonymous client of the populated server."""
    with populated_server.client() as client:
        yield client


def names(reply):
    return [entry.name for entry in reply.accounts]


@pytest.mark.parametrize("pattern, expected", [
    ("", NAMES),
    ("*", NAMES),
    ("ali*", ["alice", "Alicia"]),
    ("ALI*", ["alice", "Alicia"]),
    ("*ICE", ["alice"]),
    ("*o*", ["bob", "Bobby", "carol", "Zoe"]),
    ("b?b", ["bob", "b0b"]),
    ("?ob*", ["bob", "Bobby"]),
    ("bob", ["bob"]),
    ("BOB", ["bob"]),
    ("a?b", ["a_b", "axb", "a.b", "a-b"]),
    ("a_b", ["a_b"]),          # _ is literal, not "one character"
    ("A_B", ["a_b"]),
    ("%", []),                 # % is literal, not "any run"
    ("a%", []),
    ("%b", []),
    ("*%*", []),
    ("*_*", ["a_b"]),
    ("a.b", ["a.b"]),
    ("???", [n for n in NAMES if len(n) == 3]),
    ("????", []),
    ("*e*e*", ["percent"]),
    ("nobody*", []),
    ("z*", ["zed", "Zoe"]),
    ("\\*", []),
], ids=lambda v: repr(v) if isinstance(v, str) else None)
def test_pattern_matching(populated, pattern, expected):
    reply = populated.list_accounts(pattern, limit=500)
    assert names(reply) == sorted_ci(expected)
    assert reply.next_after == ""


def test_results_sorted_case_insensitively(populated):
    got = names(populated.list_accounts("", limit=500))
    assert got == sorted_ci(NAMES)
    assert got != sorted(NAMES)  # the case-sensitive order would differ


def test_pagination_with_next_after_until_empty(populated):
    for limit in (1, 2, 3, 5, 7, len(NAMES)):
        seen, after, pages = [], "", 0
        while True:
            reply = populated.list_accounts("", after=after, limit=limit)
            pages += 1
            page = names(reply)
            assert 1 <= len(page) <= limit, (limit, page)
            seen += page
            if not reply.next_after:
                break
            assert reply.next_after.casefold() == page[-1].casefold()
            after = reply.next_after
            assert pages <= len(NAMES), "pagination does not end"
        assert seen == sorted_ci(NAMES), limit
        assert pages == -(-len(NAMES) // limit), limit


def test_pagination_with_a_pattern(populated):
    expected = sorted_ci([n for n in NAMES if n.casefold().startswith("a")])
    seen, after = [], ""
    while True:
        reply = populated.list_accounts("a*", after=after, limit=2)
        seen += names(reply)
        if not reply.next_after:
            break
        after = reply.next_after
    assert seen == expected


def test_after_is_exclusive_and_case_insensitive(populated):
    assert names(populated.list_accounts("", after="BOB", limit=2)) == ["Bobby", "carol"]
    assert names(populated.list_accounts("", after="zz", limit=2)) == []


def test_default_and_clamped_limits(connect):
    """limit 0 means 50; a limit over 500 is clamped (not refused)."""
    def register_range(indexes):
        client = connect()
        for i in indexes:
            client.register(f"user{i:03d}", PASSWORD)
            client.logout()

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(register_range, [range(k, 60, 4) for k in range(4)]))
    everyone = [f"user{i:03d}" for i in range(60)]
    client = connect()

    first = client.list_accounts("", limit=0)
    assert names(first) == everyone[:50]
    assert first.next_after == "user049"
    rest = client.list_accounts("", after=first.next_after, limit=0)
    assert names(rest) == everyone[50:]
    assert rest.next_after == ""

    huge = client.list_accounts("user*", limit=0xFFFF)
    assert names(huge) == everyone
    assert huge.next_after == ""
    assert names(client.list_accounts("", limit=501)) == everyone


def test_online_flag_follows_live_sessions(connect):
    alice = connect()
    alice.register("alice", PASSWORD)
    bob = connect()
    bob.register("bob", PASSWORD)
    bob.logout()
    observer = connect()

    def online():
        return {e.name: e.online for e in observer.list_accounts("", limit=10).accounts}

    assert online() == {"alice": True, "bob": False}
    second = connect()
    second.login("alice", PASSWORD)
    alice.logout()
    assert online() == {"alice": True, "bob": False}  # one session is left
    second.logout()
    assert online() == {"alice": False, "bob": False}
    bob.login("bob", PASSWORD)
    assert online() == {"alice": False, "bob": True}
    # a session that just disconnects goes offline once the server notices the close
    bob.close()
    wait_until(lambda: online() == {"alice": False, "bob": False}, what="bob to go offline")


def test_anonymous_may_list_and_sees_itself_nowhere(connect):
    connect().register("someone", PASSWORD)
    anonymous = connect()
    reply = anonymous.list_accounts()
    assert [(e.name, e.online) for e in reply.accounts] == [("someone", True)]


def test_pattern_length_limit(connect):
    client = connect()
    client.register("x" * 32, PASSWORD)
    assert names(client.list_accounts("*" * 64)) == ["x" * 32]
    assert names(client.list_accounts("x" * 32 + "*" * 32)) == ["x" * 32]
    for pattern in ("*" * 65, "a" * 65, "x" * 32 + "?" * 33):
        with pytest.raises(ServerError) as info:
            client.list_accounts(pattern)
        assert info.value.code == "invalid_pattern"
    assert names(client.list_accounts("x*")) == ["x" * 32]  # connection still fine
