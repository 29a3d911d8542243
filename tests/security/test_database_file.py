"""The database file holds password hashes and message text: owner-only, whatever the umask.

What tests/cli already proves (a new file is 0600 from ``chat admin migrate`` and from
``chat serve`` with its -wal and -shm; admin commands warn about a world-readable file) is
not repeated here; this adds the case of a permissive umask, where a file created with the
process's default mode would be readable by everyone.
"""

from __future__ import annotations

import os
import stat
import subprocess
from contextlib import contextmanager

from tests.conftest import ServerProcess, chat_command

from .conftest import PASSWORD


@contextmanager
def umask(mask: int):
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def modes(directory, prefix: str) -> dict[str, int]:
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in directory.iterdir()
            if p.name.startswith(prefix)}


def test_admin_migrate_creates_an_owner_only_file_even_with_umask_000(tmp_path):
    path = tmp_path / "new.db"
    with umask(0):
        result = subprocess.run(chat_command("admin", "migrate", "--db", str(path)),
                                capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert modes(tmp_path, "new.db") == {"new.db": 0o600}


def test_serve_creates_owner_only_files_even_with_umask_000(tmp_path):
    server = ServerProcess(tmp_path / "served.db")
    with umask(0):
        server.start()
    try:
        with server.client() as client:
            client.register("alice", PASSWORD)
            client.send("alice", "a message, so that the WAL has content")
        found = modes(tmp_path, "served.db")
        assert {"served.db", "served.db-wal", "served.db-shm"} <= set(found), found
        assert all(mode & 0o077 == 0 for mode in found.values()), {
            name: oct(mode) for name, mode in found.items()}
    finally:
        server.stop()
