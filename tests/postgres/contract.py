"""Run another module's storage tests on PostgreSQL: import them, with this directory's fixtures.

``adopt(module, namespace, sqlite_only)`` copies the module's tests and its own fixtures into
``namespace`` (a test module here), so pytest collects them a second time where the ``db``
fixture is a fresh PostgreSQL database. Nothing is copied: the two backends are held to the
one contract, and a test added there runs here too. The module's ``raw`` helper (SQL through
sqlite3) is swapped for :func:`tests.postgres.conftest.raw` while each of these tests runs.

A test that is about SQLite itself goes in ``sqlite_only`` with the reason; naming a test
that no longer exists there is an error, so the list cannot go stale silently.
"""

from __future__ import annotations

import types

import pytest

from tests.postgres import conftest as pg

# Fixtures this directory provides on PostgreSQL; a module bringing its own would silently
# put its tests back on SQLite.
_OURS = {"db", "db_path", "writer", "service", "clock", "hasher", "pg_url"}


def adopt(module: types.ModuleType, namespace: dict, sqlite_only: dict[str, str]) -> None:
    unknown = set(sqlite_only) - set(vars(module))
    if unknown:
        raise RuntimeError(f"{module.__name__} has no {sorted(unknown)}; update sqlite_only")
    for name, value in vars(module).items():
        if name.startswith("_") or name in namespace or isinstance(value, types.ModuleType):
            continue
        if name in sqlite_only or name == "raw":
            continue
        if name in _OURS:
            raise RuntimeError(f"{module.__name__} defines its own {name!r} fixture; "
                               "its tests would not run on PostgreSQL")
        namespace[name] = value

    @pytest.fixture(autouse=True)
    def _on_postgres(request, monkeypatch):
        if hasattr(module, "raw"):
            monkeypatch.setattr(module, "raw", pg.raw)
        if "db" in request.fixturenames:
            assert not request.getfixturevalue("db").is_sqlite

    namespace["_on_postgres"] = _on_postgres
