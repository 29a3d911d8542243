"""Login throttling per account and per address, registration throttling per address.

The throttles take an injected clock: unit tests drive them directly, and an in-process
ChatServer built with ``clock=FakeClock()`` is driven over real sockets. No test sleeps.
"""

from __future__ import annotations

import pytest

from chatserver.client import ServerError
from chatserver.limits import RateLimiter
from chatserver.throttle import FailureThrottle

from .conftest import PASSWORD, FakeClock, instrument

WRONG = "not the password"


def refused(call) -> ServerError:
    with pytest.raises(ServerError) as info:
        call()
    return info.value


# -- FailureThrottle ----------------------------------------------------------------------------

def test_free_failures_then_lockouts_that_double():
    clock = FakeClock()
    throttle = FailureThrottle(free_failures=3, base_delay=1.0, max_delay=300.0, clock=clock)
    for _ in range(3):
        throttle.failure("alice")
        assert throttle.locked_for("alice") == 0.0
    delays = []
    for _ in range(5):
        throttle.failure("alice")
        delays.append(throttle.locked_for("alice"))
        clock.advance(delays[-1])  # wait the lockout out, then fail again
        assert throttle.locked_for("alice") == 0.0
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0]


def test_lockout_counts_down_with_the_clock():
    clock = FakeClock()
    throttle = FailureThrottle(free_failures=0, base_delay=10.0, clock=clock)
    throttle.failure("k")
    assert throttle.locked_for("k") == 10.0
    clock.advance(4)
    assert throttle.locked_for("k") == 6.0
    clock.advance(6)
    assert throttle.locked_for("k") == 0.0


def test_lockouts_are_capped():
    clock = FakeClock()
    throttle = FailureThrottle(free_failures=5, base_delay=1.0, max_delay=300.0, clock=clock)
    delays = []
    for _ in range(5 + 14):
        throttle.failure("alice")
        delays.append(throttle.locked_for("alice"))
        clock.advance(delays[-1])
    assert delays[5:] == [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300, 300, 300]


def test_failures_are_forgotten_after_forget_after():
    clock = FakeClock()
    throttle = FailureThrottle(free_failures=2, base_delay=1.0, forget_after=900.0, clock=clock)
    throttle.failure("alice")
    throttle.failure("alice")
    clock.advance(901)  # long after the last failure: a clean slate
    throttle.failure("alice")
    throttle.failure("alice")
    assert throttle.locked_for("alice") == 0.0  # two free failures again
    throttle.failure("alice")
    assert throttle.locked_for("alice") == 1.0  # and the first lockout is the short one


def test_success_clears_only_its_key():
    clock = FakeClock()
    throttle = FailureThrottle(free_failures=1, clock=clock)
    for key in ("alice", "bob"):
        throttle.failure(key)
        throttle.failure(key)
    throttle.success("alice")
    assert throttle.locked_for("alice") == 0.0
    assert throttle.locked_for("bob") == 1.0


def test_keys_are_independent_and_minus_one_disables():
    clock = FakeClock()
    throttle = FailureThrottle(free_failures=0, clock=clock)
    throttle.failure("alice")
    assert throttle.locked_for("alice") > 0 and throttle.locked_for("bob") == 0.0
    off = FailureThrottle(free_failures=-1, clock=clock)
    for _ in range(1000):
        off.failure("alice")
    assert off.locked_for("alice") == 0.0


# -- RateLimiter --------------------------------------------------------------------------------

def test_rate_limiter_burst_then_refill():
    clock = FakeClock()
    limiter = RateLimiter(rate=30 / 3600, burst=30, clock=clock)  # 30 an hour per key
    assert [limiter.acquire("10.0.0.1") for _ in range(30)] == [0.0] * 30
    wait = limiter.acquire("10.0.0.1")
    assert wait == pytest.approx(120.0)  # one token per 120 s
    assert limiter.acquire("10.0.0.2") == 0.0  # another address has its own bucket
    clock.advance(119)
    assert limiter.acquire("10.0.0.1") == pytest.approx(1.0)
    clock.advance(1)
    assert limiter.acquire("10.0.0.1") == 0.0
    assert limiter.acquire("10.0.0.1") > 0


def test_rate_limiter_zero_rate_disables():
    limiter = RateLimiter(rate=0, burst=1, clock=FakeClock())
    assert all(limiter.acquire("k") == 0.0 for _ in range(1000))


# -- the server, with a fake clock ----------------------------------------------------------------

def test_account_lockout_refuses_even_the_right_password_until_it_expires(inprocess):
    server = inprocess()
    server.client().register("alice", PASSWORD)
    attacker = server.client()
    for _ in range(6):  # five free failures, the sixth locks the name for 1 s
        assert refused(lambda: attacker.login("alice", WRONG)).code == "invalid_credentials"
    owner = server.client()  # another connection, the right password, another case
    error = refused(lambda: owner.login("ALICE", PASSWORD))
    assert (error.code, error.retry_after_ms) == ("rate_limited", 1000)
    server.clock.advance(1.0)
    assert owner.login("alice", PASSWORD).name == "alice"


def test_lockouts_grow_and_success_resets_the_account(inprocess):
    server = inprocess()
    server.client().register("alice", PASSWORD)
    attacker = server.client()
    for _ in range(6):
        refused(lambda: attacker.login("alice", WRONG))
    retry = []
    for _ in range(3):  # wait each lockout out, fail again: 2 s, 4 s, 8 s
        server.clock.advance(refused(lambda: attacker.login("alice", WRONG)).retry_after_ms
                             / 1000)
        assert refused(lambda: attacker.login("alice", WRONG)).code == "invalid_credentials"
        retry.append(refused(lambda: attacker.login("alice", PASSWORD)).retry_after_ms)
    assert retry == [2000, 4000, 8000]
    server.clock.advance(8)
    with server.client() as owner:
        owner.login("alice", PASSWORD)
    # after a success the name starts again with five free failures
    for _ in range(5):
        assert refused(lambda: attacker.login("alice", WRONG)).code == "invalid_credentials"
    assert attacker.login("alice", PASSWORD).name == "alice"


def test_locked_out_attempts_cost_no_password_hash(inprocess):
    server = inprocess()
    server.client().register("alice", PASSWORD)
    attacker = server.client()
    for _ in range(6):
        refused(lambda: attacker.login("alice", WRONG))
    counter = instrument(server.hasher)
    for _ in range(50):
        assert refused(lambda: attacker.login("alice", WRONG)).code == "rate_limited"
    assert counter.calls == {"hash": 0, "verify": 0}


def test_account_lockout_covers_every_spelling_of_the_name(inprocess):
    """Names are NFKC-normalised and case-folded: 'ａｌｉｃｅ' logs in to alice, so it must
    share alice's lockout (otherwise each spelling gets its own free guesses)."""
    server = inprocess()
    server.client().register("alice", PASSWORD)
    attacker = server.client()
    for _ in range(6):
        refused(lambda: attacker.login("alice", WRONG))
    for spelling in ("ALICE", "\uff41\uff4c\uff49\uff43\uff45", "\U0001d41a\U0001d425ice"):
        error = refused(lambda s=spelling: attacker.login(s, PASSWORD))
        assert error.code == "rate_limited", (spelling, error)


def test_address_lockout_after_failures_on_many_names(inprocess):
    """20 failures from one address (4 x the per-name allowance) lock the address for every
    name, and the address's own successful login does not reset that count."""
    server = inprocess()
    for name in ("mallory", "victim"):
        with server.client() as c:
            c.register(name, PASSWORD)
    attacker = server.client()
    for i in range(19):  # 4 guesses at each of five names: no name reaches its lockout
        assert refused(lambda i=i: attacker.login(f"user{i // 4}", WRONG)).code == \
            "invalid_credentials"
    assert attacker.login("mallory", PASSWORD).name == "mallory"  # own account: allowed
    attacker.logout()
    refused(lambda: attacker.login("user9", WRONG))  # the 20th: still free
    refused(lambda: attacker.login("user9", WRONG))  # the 21st locks the address
    error = refused(lambda: attacker.login("victim", PASSWORD))
    assert (error.code, error.retry_after_ms) == ("rate_limited", 1000)
    server.clock.advance(1)
    assert attacker.login("victim", PASSWORD).name == "victim"


def test_registrations_per_address_are_limited(inprocess):
    server = inprocess(registrations_per_hour=3)
    client = server.client()
    for i in range(3):
        client.register(f"new{i}", PASSWORD)
        client.logout()
    error = refused(lambda: client.register("new3", PASSWORD))
    assert (error.code, error.retry_after_ms) == ("rate_limited", 1_200_000)  # 3600 s / 3
    assert client.list_accounts("new3").accounts == ()  # nothing was created
    server.clock.advance(1200)
    assert client.register("new3", PASSWORD).name == "new3"
    client.logout()
    assert refused(lambda: client.register("new4", PASSWORD)).code == "rate_limited"


def test_throttles_can_be_disabled(inprocess):
    server = inprocess(login_free_failures=-1, registrations_per_hour=0)
    client = server.client()
    for i in range(40):
        client.register(f"many{i}", PASSWORD)
        client.logout()
    for _ in range(30):
        assert refused(lambda: client.login("many0", WRONG)).code == "invalid_credentials"
    assert client.login("many0", PASSWORD).name == "many0"


def test_max_lockout_is_configurable(inprocess):
    server = inprocess(login_free_failures=0, login_max_lockout=5.0)
    server.client().register("alice", PASSWORD)
    attacker = server.client()
    retry = []
    for _ in range(6):
        refused(lambda: attacker.login("alice", WRONG))
        retry.append(refused(lambda: attacker.login("alice", WRONG)).retry_after_ms)
        server.clock.advance(retry[-1] / 1000)
    assert retry == [1000, 2000, 4000, 5000, 5000, 5000]


# -- chat serve's options and defaults (real clock: only the counting is checked) -------------------

def test_serve_defaults_five_free_failures_and_thirty_registrations(server, connect):
    client = connect()
    for i in range(30):
        client.register(f"reg{i}", PASSWORD)
        client.logout()
    assert refused(lambda: client.register("reg30", PASSWORD)).code == "rate_limited"
    for _ in range(6):
        assert refused(lambda: client.login("reg0", WRONG)).code == "invalid_credentials"
    error = refused(lambda: client.login("reg0", PASSWORD))
    assert error.code == "rate_limited" and 0 < error.retry_after_ms <= 1000


def test_serve_options_configure_the_throttles(server_factory, tmp_path):
    server = server_factory(tmp_path / "t.db", ["--login-free-failures", "1",
                                                "--login-max-lockout", "2",
                                                "--registrations-per-hour", "1"])
    with server.client() as client:
        client.register("only", PASSWORD)
        client.logout()
        assert refused(lambda: client.register("second", PASSWORD)).code == "rate_limited"
        for _ in range(2):
            assert refused(lambda: client.login("only", WRONG)).code == "invalid_credentials"
        error = refused(lambda: client.login("only", PASSWORD))
        assert error.code == "rate_limited" and 0 < error.retry_after_ms <= 1000
