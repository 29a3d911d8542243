"""Wiring: a database, its writer, the service and the TCP server, started and stopped as one."""

from __future__ import annotations

import logging
import threading

from chatserver.passwords import HashParameters, PasswordHasher
from chatserver.server import ChatServer, ServerConfig
from chatserver.service import ChatService
from chatserver.storage.database import Database
from chatserver.storage.migrate import ensure_schema
from chatserver.storage.writer import GroupCommitWriter

log = logging.getLogger("chatserver")


class ChatApp:
    """A running chat server over one database. ``stop()`` is safe to call twice."""

    def __init__(self, db_path: str, config: ServerConfig, *, sync: str = "full",
                 hash_params: HashParameters = HashParameters(), migrate: bool = True):
        self.db = Database(db_path, sync=sync)
        try:
            ensure_schema(self.db, allow_upgrade=migrate)
            self.db.enable_wal()
            self.writer = GroupCommitWriter(self.db.write_engine)
            self.service = ChatService(self.db, self.writer, PasswordHasher(hash_params),
                                       max_message_bytes=config.max_message_bytes)
            self.server = ChatServer(config, self.service)
        except BaseException:
            self.db.dispose()
            raise
        self._thread: threading.Thread | None = None
        self._stop_lock = threading.Lock()
        self._stopped = False

    @property
    def address(self) -> tuple[str, int]:
        return self.server.address

    def start(self) -> None:
        """Serve on a background thread."""
        self._thread = threading.Thread(target=self.server.serve_forever, name="acceptor",
                                        kwargs={"poll_interval": 0.2}, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, notify sessions, finish writes, close the database."""
        with self._stop_lock:
            if self._stopped:
                return
            self._stopped = True
        self.server.stop(timeout)
        self.writer.close(timeout)
        self.db.dispose()
        log.info("stopped")
