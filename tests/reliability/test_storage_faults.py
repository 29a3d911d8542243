"""Storage trouble: with its disk full, the server answers storage_unavailable, loses nothing
stored before, stays up, and recovers when space is freed.

The database lives on a small tmpfs mounted for the test (root only; skipped otherwise) and
the free space is eaten by a filler file. The writer's own recovery is also unit-tested in
tests/integration/test_writer.py; here it is the whole server over the wire.

A read-only database cannot be simulated the same way: Linux refuses to remount a tmpfs
read-only while the server holds files open for writing, and root ignores file permissions.
test_read_only.py has SQLite itself refuse the writes instead.
"""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest

from chatserver.client import ServerError
from chatserver.storage.database import SYNC_LEVELS

from .helpers import PASSWORD, error_code, fetch_everything, integrity_check


@pytest.fixture
def small_disk(tmp_path) -> Path:
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_point)],
                            check=False, capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to simulate a full disk (needs root): "
                    f"{result.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False, capture_output=True)


def fill(directory: Path) -> Path:
    """Write a file until the filesystem is full; return it."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (65536, 4096, 512, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
    finally:
        os.close(fd)
    return filler


# At both sync levels: at normal the loop commits the sends itself (ChatServer.hold_sends).
@pytest.mark.parametrize("sync", SYNC_LEVELS)
def test_disk_full_refuses_sends_keeps_everything_and_recovers(start_server, small_disk, sync):
    db = small_disk / "chat.db"
    server = start_server("--send-rate", "0", "--sync", sync, db=db)
    with server.client() as alice, server.client() as bob:
        alice.register("alice", PASSWORD)
        bob.register("bob", PASSWORD)
        confirmed = [alice.send("bob", f"before {i}", client_msg_id=f"b{i}").message_id
                     for i in range(20)]

        filler = fill(small_disk)
        refused: list[str] = []
        for i in range(500):  # the WAL may still have a little room; soon there is none
            body = f"while full {i} " + "f" * 2000
            try:
                confirmed.append(alice.send("bob", body, client_msg_id=f"f{i}").message_id)
            except ServerError as exc:
                assert exc.code == "storage_unavailable", exc
                refused.append(body)
                if len(refused) == 3:
                    break
        assert len(refused) == 3, "the disk never filled up"
        # the server is up; what was stored before is all there (reads need no space)
        assert server.proc.poll() is None
        # A login records its time, so it needs the disk too: refused just as explicitly, and
        # the refusal leaves the connection usable and anonymous. Unless its one small page
        # fits where the WAL file already has room (the refused sends' frames extended it,
        # and a checkpoint may have restarted it): whether it does is SQLite's and the
        # checkpointer's timing, so either outcome is accepted, as for the ack below.
        with server.client() as carol:
            try:
                carol.login("alice", PASSWORD)
            except ServerError as exc:
                assert exc.code == "storage_unavailable", exc
                assert [a.name for a in carol.list_accounts().accounts] == ["alice", "bob"]
                assert error_code(lambda: carol.send("bob", "x")) == "not_logged_in"
        stored = fetch_everything(bob, ack=False)
        assert [m.id for m in stored] == confirmed
        # an acknowledgement is a write too: refused just as explicitly, nothing removed
        try:
            bob.ack(confirmed[:1])
        except ServerError as exc:
            assert exc.code == "storage_unavailable"
        else:
            confirmed.pop(0)  # (there was room for this one)
        assert [m.id for m in fetch_everything(bob, ack=False)] == confirmed

        os.remove(filler)  # the fault clears
        after = alice.send("bob", "after the fault", client_msg_id="after")
        assert after.duplicate is False
        confirmed.append(after.message_id)
        # a refused send stored nothing: its retry now is a new message, not a duplicate
        retried = alice.send("bob", refused[0], client_msg_id="f-retry")
        confirmed.append(retried.message_id)
        got = fetch_everything(bob, ack=False)
        assert [m.id for m in got] == confirmed
        assert [m.body for m in got].count(refused[0]) == 1
        assert bob.ack(confirmed) == len(confirmed)

    assert server.kill() == -9
    assert integrity_check(db) == "ok"
    again = start_server(db=db)
    with again.client() as bob:
        assert bob.login("bob", PASSWORD).pending == 0
    assert "Traceback" not in server.log
