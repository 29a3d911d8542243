"""WAL checkpoints on a thread of their own, so that commits rarely pay for them.

SQLite copies its write-ahead log back into the database file at a *checkpoint*. By default
the commit that grows the WAL past a threshold (~4 MiB, SQLite's 1,000 pages of 4 KiB; ~64 MiB
at --sync normal: ``database.AUTOCHECKPOINT_BYTES``) runs one itself: it writes every page the WAL
holds into the database file and syncs both files, a few milliseconds during which that
commit and every send queued behind it wait. That was the p99 of a send at ``--sync normal``
(3 ms, against 0.3 ms for the other commits).

Here a thread runs a passive checkpoint (one that never waits for a lock and never blocks the
writer: SQLite runs it without holding the GIL) after commits, at most once per ``interval``,
and the commit that crosses the threshold is left with the frames written since: a few pages.
The writer keeps SQLite's automatic checkpoint: a passive checkpoint alone never catches up
with a writer that never pauses (the WAL restarts from its beginning only once *every* frame
is copied), so that commit still copies the last frames, and the WAL stays bounded.
"""

from __future__ import annotations

import logging
import threading

from sqlalchemy import Engine

log = logging.getLogger(__name__)

CHECKPOINT_INTERVAL = 0.02  # seconds: at most 50 checkpoints a second, each a few hundred pages


class Checkpointer:
    """A thread that runs ``PRAGMA wal_checkpoint(PASSIVE)`` on a SQLite database after
    :meth:`poke` (at most once per ``interval``); idle while nothing is written."""

    def __init__(self, engine: Engine, *, interval: float = CHECKPOINT_INTERVAL):
        self._engine = engine
        self._interval = interval
        self._poked = threading.Event()
        self._stopping = threading.Event()
        self.checkpoints = 0  # completed, for tests and curiosity
        self._thread = threading.Thread(target=self._run, name="wal-checkpointer", daemon=True)
        self._thread.start()

    def poke(self) -> None:
        """Something was committed (any thread; cheap when already poked)."""
        if not self._poked.is_set():
            self._poked.set()

    def close(self, timeout: float | None = 10.0) -> None:
        """Stop the thread (a checkpoint under way finishes first). Safe to call twice."""
        self._stopping.set()
        self._poked.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        raw = None
        try:
            while True:
                self._poked.wait()
                if self._stopping.is_set():
                    return
                self._poked.clear()
                raw = self._checkpoint(raw)
                if self._stopping.wait(self._interval):
                    return
        finally:
            if raw is not None:
                raw.close()

    def _checkpoint(self, raw):
        """One passive checkpoint; returns the connection to use next time (None if broken)."""
        try:
            if raw is None:
                raw = self._engine.raw_connection()
            raw.driver_connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            self.checkpoints += 1
            return raw
        except Exception as exc:  # noqa: BLE001 - disk full, file unreadable: try again later
            log.warning("WAL checkpoint failed: %s", exc)
            if raw is not None:
                try:
                    raw.invalidate()
                except Exception:  # noqa: BLE001, S110 - a broken connection: just drop it
                    pass
            return None
