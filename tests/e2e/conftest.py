"""Fixtures of the end-to-end tests (the server fixtures are in tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from chatserver.client import ChatClient

from .helpers import E2E_SERVER_ARGS, PASSWORD
from .rawframes import RawClient


@pytest.fixture
def server_factory(server_factory):
    """The root ``server_factory``, with E2E_SERVER_ARGS before the test's own options."""

    def start(db_path=None, extra_args=None):
        return server_factory(db_path, [*E2E_SERVER_ARGS, *(extra_args or [])])

    return start


@pytest.fixture
def raw_connect(server) -> Iterator[Callable[..., RawClient]]:
    """Open raw-frame connections to ``server``; all closed at the end."""
    opened: list[RawClient] = []

    def open_raw() -> RawClient:
        client = RawClient(server.host, server.port)
        opened.append(client)
        return client

    yield open_raw
    for client in opened:
        client.close()


@pytest.fixture
def user(connect) -> Callable[..., ChatClient]:
    """``user(name, password=PASSWORD, register=True)``: a connected, logged-in client."""

    def make(name: str, password: str = PASSWORD, *, register: bool = True) -> ChatClient:
        client = connect()
        reply = client.register(name, password) if register else client.login(name, password)
        assert reply.name.casefold() == name.casefold()
        return client

    return make


@pytest.fixture(scope="session")
def server_process_class(pytestconfig):
    """``ServerProcess`` from tests/conftest.py, whatever name pytest imported it under."""
    for plugin in pytestconfig.pluginmanager.get_plugins():
        cls = getattr(plugin, "ServerProcess", None)
        if isinstance(cls, type):
            return cls
    raise RuntimeError("tests/conftest.py with ServerProcess is not loaded")


@pytest.fixture(scope="module")
def module_server(server_process_class, tmp_path_factory):
    """One server shared by a module's tests (each uses names of its own)."""
    server = server_process_class(tmp_path_factory.mktemp("shared") / "chat.db",
                                  E2E_SERVER_ARGS).start()
    yield server
    server.kill()


@pytest.fixture(scope="session")
def root_conftest(pytestconfig):
    """The tests/conftest.py module (for ``chat_command`` and ``FAST_HASH_ARGS``)."""
    for plugin in pytestconfig.pluginmanager.get_plugins():
        if callable(getattr(plugin, "chat_command", None)) and hasattr(plugin, "FAST_HASH_ARGS"):
            return plugin
    raise RuntimeError("tests/conftest.py is not loaded")
