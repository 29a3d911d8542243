"""The installed `chat` command works from any directory: migrations ship in the package."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

CHAT = Path(sys.executable).with_name("chat")


def test_chat_serve_from_another_directory_creates_its_database(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.Popen(
        [str(CHAT), "serve", "--db", str(tmp_path / "x.db"), "--port", "0",
         "--argon2-time-cost", "1", "--argon2-memory-kib", "64"],
        cwd=elsewhere, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert re.match(r"chat server listening on 127\.0\.0\.1:\d+ ", line), proc.stderr.read()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (tmp_path / "x.db").stat().st_size > 0
    listing = subprocess.run([str(CHAT), "admin", "db-status", "--db", str(tmp_path / "x.db")],
                             cwd=elsewhere, capture_output=True, text=True, env=env, timeout=60)
    assert listing.returncode == 0, listing.stderr
    assert "0004" in listing.stdout
    assert list(elsewhere.iterdir()) == []  # nothing written where it was run from


def test_the_migrations_are_package_data():
    code = ("import chatserver_migrations, pathlib; "
            "d = pathlib.Path(chatserver_migrations.__file__).parent; "
            "print(sorted(p.name for p in (d / 'versions').glob('0*.py')))")
    out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['0001_baseline.py', '0002_last_login.py', '0003_password_version.py', '0004_fewer_pages_per_send.py']"
