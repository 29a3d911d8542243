"""Passwords: Argon2id with stated parameters, rehash at login, bounded hashing work."""

from __future__ import annotations

import inspect
import re
import threading
from collections.abc import Iterator

import pytest

from chatserver.errors import InvalidCredentials
from chatserver.passwords import HashParameters, PasswordHasher
from chatserver.service import ChatService
from chatserver.storage.database import Database
from chatserver.storage.migrate import ensure_schema
from chatserver.storage.writer import GroupCommitWriter
from chatserver_cli.serve import serve

from .conftest import CHEAP_HASH, PASSWORD, WAIT, instrument

_PARAMS = re.compile(r"^\$argon2id\$v=19\$m=(\d+),t=(\d+),p=(\d+)\$[^$]+\$[^$]+$")


def parameters_of(password_hash: str) -> HashParameters:
    match = _PARAMS.match(password_hash)
    assert match, f"not an Argon2id hash: {password_hash!r}"
    memory, time_cost, parallelism = map(int, match.groups())
    return HashParameters(time_cost=time_cost, memory_kib=memory, parallelism=parallelism)


class Storage:
    """One database file and its writer; services with different hashers share it."""

    def __init__(self, path: str):
        self.db = Database(path)
        ensure_schema(self.db)
        self.writer = GroupCommitWriter(self.db.write_engine)

    def service(self, hasher: PasswordHasher) -> ChatService:
        return ChatService(self.db, self.writer, hasher)

    def stored_hash(self, name: str) -> str:
        found = self.db.read(lambda repo: repo.get_by_key(name.casefold()))
        assert found is not None, name
        return found[1]

    def close(self) -> None:
        self.writer.close()
        self.db.dispose()


@pytest.fixture
def storage(tmp_path) -> Iterator[Storage]:
    s = Storage(str(tmp_path / "chat.db"))
    yield s
    s.close()


def run_threads(n: int, target) -> None:
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            target(i)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT * 3)
    assert not errors, errors


# -- what is stored -----------------------------------------------------------------------------

def test_stored_hash_is_salted_argon2id_and_never_the_password(storage):
    service = storage.service(PasswordHasher(CHEAP_HASH))
    service.register("alice", PASSWORD)
    service.register("bob", PASSWORD)
    alice, bob = storage.stored_hash("alice"), storage.stored_hash("bob")
    for stored in (alice, bob):
        assert stored.startswith("$argon2id$")
        assert parameters_of(stored) == CHEAP_HASH
        assert PASSWORD not in stored
    assert alice != bob  # a random salt each: equal passwords are not visible as equal hashes


def test_default_parameters_are_the_stated_ones():
    """Argon2id t=3, m=64 MiB, p=4 (RFC 9106's second recommendation), at most 4 at once."""
    assert HashParameters() == HashParameters(time_cost=3, memory_kib=65_536, parallelism=4)
    assert inspect.signature(PasswordHasher).parameters["max_concurrent"].default == 4
    defaults = {p.name: p.default for p in serve.params}
    assert (defaults["argon2_time_cost"], defaults["argon2_memory_kib"]) == (3, 65_536)
    hasher = PasswordHasher()
    assert parameters_of(hasher.hash(PASSWORD)) == HashParameters()


# -- rehash at login ----------------------------------------------------------------------------

@pytest.mark.parametrize("new", [
    HashParameters(time_cost=2, memory_kib=64, parallelism=1),
    HashParameters(time_cost=1, memory_kib=128, parallelism=1),
    HashParameters(time_cost=1, memory_kib=64, parallelism=2),
], ids=["time_cost", "memory", "parallelism"])
def test_login_rehashes_when_the_parameters_change(storage, new):
    storage.service(PasswordHasher(CHEAP_HASH)).register("alice", PASSWORD)
    old_hash = storage.stored_hash("alice")
    assert parameters_of(old_hash) == CHEAP_HASH

    upgraded = storage.service(PasswordHasher(new))
    # a wrong password changes nothing
    with pytest.raises(InvalidCredentials):
        upgraded.login("alice", PASSWORD + "x")
    assert storage.stored_hash("alice") == old_hash
    # the right one is rehashed with the current parameters, and still works
    upgraded.login("alice", PASSWORD)
    new_hash = storage.stored_hash("alice")
    assert parameters_of(new_hash) == new
    assert PASSWORD not in new_hash
    upgraded.login("alice", PASSWORD)
    assert storage.stored_hash("alice") == new_hash  # current parameters: no rehash again


# -- bounded work -------------------------------------------------------------------------------

@pytest.mark.parametrize("cap", [1, 2])
def test_no_more_than_max_concurrent_hashes_run_at_once(cap):
    hasher = PasswordHasher(CHEAP_HASH, max_concurrent=cap)
    stored = hasher.hash(PASSWORD)
    counter = instrument(hasher, meet=cap)

    def work(i: int) -> None:
        if i % 2:
            assert hasher.verify(stored, PASSWORD)
        else:
            assert hasher.hash(PASSWORD).startswith("$argon2id$")

    run_threads(4 * cap, work)
    assert counter.max_active == cap
    assert counter.active == 0


def test_default_cap_is_four():
    hasher = PasswordHasher(CHEAP_HASH)
    counter = instrument(hasher, meet=4)
    run_threads(8, lambda i: hasher.hash(PASSWORD))
    assert counter.max_active == 4


def test_a_login_flood_never_runs_more_hashes_than_the_cap(storage):
    """Through the service: many threads logging in at once (right, wrong, unknown names)
    wait for a slot instead of each taking 64 MiB and a core."""
    hasher = PasswordHasher(CHEAP_HASH, max_concurrent=2)
    service = storage.service(hasher)
    service.register("alice", PASSWORD)
    counter = instrument(hasher, meet=2)

    def login(i: int) -> None:
        name, password = [("alice", PASSWORD), ("alice", "wrong password"),
                          ("nobody", PASSWORD), ("x" * 40, PASSWORD)][i % 4]
        try:
            service.login(name, password)
        except InvalidCredentials:
            assert (name, password) != ("alice", PASSWORD)

    run_threads(12, login)
    assert counter.max_active == 2
    assert counter.calls["verify"] == 12  # every attempt pays one verification, see below


@pytest.mark.parametrize("name", ["nobody", "not a valid name!", "x" * 40])
def test_unknown_names_cost_the_same_verification_as_a_wrong_password(storage, name):
    hasher = PasswordHasher(CHEAP_HASH)
    service = storage.service(hasher)
    service.register("alice", PASSWORD)
    counter = instrument(hasher)
    for who in ("alice", name):
        with pytest.raises(InvalidCredentials) as info:
            service.login(who, "wrong password")
        assert str(info.value) == "wrong name or password"
    assert counter.calls == {"hash": 0, "verify": 2}
