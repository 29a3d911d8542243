"""Fixtures of the reliability tests (the server fixtures are in tests/conftest.py)."""

from __future__ import annotations

import pytest

from .helpers import BASE_ARGS


@pytest.fixture
def start_server(server_factory, tmp_path):
    """``start_server(*options, db=None)``: a ``chat serve`` process with BASE_ARGS first."""

    def start(*options: str, db=None):
        return server_factory(db or tmp_path / "chat.db", [*BASE_ARGS, *options])

    return start
