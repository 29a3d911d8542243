"""SQLite files as tests look at them: plain ``sqlite3``, no package code in between."""

from __future__ import annotations

import sqlite3
from pathlib import Path


def query(path: Path | str, sql: str, params: tuple = ()) -> list[tuple]:
    """The rows of ``sql`` on the file at ``path``."""
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def with_pages_of(path: Path | str, size: int) -> Path | str:
    """A file that already has pages of ``size`` bytes (so they stay), and no tables."""
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA page_size = {size}")
    conn.execute("CREATE TABLE placeholder (x)")  # gives the file its first pages
    conn.execute("DROP TABLE placeholder")
    conn.commit()
    conn.close()
    return path
