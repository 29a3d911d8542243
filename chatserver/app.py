"""Wiring: a database, its writer, the service and the TCP server, started and stopped as one."""

from __future__ import annotations

import logging
import ssl
import threading

from chatserver.errors import ChatError
from chatserver.limits import RateLimiter
from chatserver.metrics import Metrics, serve_metrics
from chatserver.passwords import HashParameters, PasswordHasher
from chatserver.server import ChatServer, ListenError, ServerConfig
from chatserver.service import ChatService
from chatserver.sessions import corked
from chatserver.storage.announce import Announcer, Listener, channel_for, new_origin
from chatserver.storage.checkpointer import Checkpointer
from chatserver.storage.database import NEW_DATABASE_PAGE_SIZE, Database, create_private_file
from chatserver.storage.migrate import ensure_schema
from chatserver.storage.writer import GroupCommitWriter

log = logging.getLogger("chatserver")

# How often the server checks that logged-in accounts still exist, so an account deleted by
# `chat admin delete-account` (another process) has its sessions ended within seconds.
ACCOUNT_CHECK_INTERVAL = 2.0
LISTEN_TIMEOUT = 10.0  # seconds a PostgreSQL server waits at start to hear other servers


class ChatApp:
    """A running chat server over one database. ``stop()`` is safe to call twice."""

    def __init__(self, db_path: str, config: ServerConfig, *, sync: str = "full",
                 hash_params: HashParameters = HashParameters(), migrate: bool = True,
                 metrics_port: int | None = None, ssl_context: ssl.SSLContext | None = None):
        self.db = Database(db_path, sync=sync)
        if self.db.is_sqlite and create_private_file(self.db.path):
            log.info("created database %s (readable by its owner only)", self.db.path)
        self.metrics = Metrics()
        self.metrics_port: int | None = None
        self.checkpointer: Checkpointer | None = None
        self.listener: Listener | None = None
        try:
            ensure_schema(self.db, allow_upgrade=migrate)
            self.db.enable_wal()
            page_size = self.db.page_size() if self.db.is_sqlite else NEW_DATABASE_PAGE_SIZE
            if page_size != NEW_DATABASE_PAGE_SIZE:
                log.info("%s has pages of %d bytes (new databases get %d, for faster commits); "
                         "with the server stopped, chat admin vacuum converts it",
                         self.db.path, page_size, NEW_DATABASE_PAGE_SIZE)
            # SQLite: checkpoints off the commit path (see storage/checkpointer.py).
            self.checkpointer = Checkpointer(self.db.write_engine) if self.db.is_sqlite else None
            self.writer = GroupCommitWriter(self.db.write_engine, on_commit=self._committed,
                                            results_context=corked)
            # PostgreSQL: other servers may share the database; tell them what we store.
            announcer = (None if self.db.is_sqlite
                         else Announcer(channel_for(self.db.write_engine), new_origin()))
            self.service = ChatService(
                self.db, self.writer, PasswordHasher(hash_params),
                max_message_bytes=config.max_message_bytes,
                max_queued_per_account=config.max_queued_per_account,
                send_limiter=RateLimiter(config.send_rate, config.send_burst),
                announcer=announcer)
            self.server = ChatServer(config, self.service, self.metrics, ssl_context=ssl_context)
            if announcer is not None:
                self.listener = Listener(self.db.write_engine, announcer,
                                         self.server.push_announced, self.server.push_missed)
                # Listening before serving: a message stored elsewhere once we answer reaches us.
                if not self.listener.listening.wait(LISTEN_TIMEOUT):
                    log.warning("not listening for other servers' messages yet; their "
                                "messages reach sessions here by fetch until then")
            self.metrics.track_undelivered(self.service.undelivered_total)
            if metrics_port is not None:
                try:
                    self.metrics_port = serve_metrics(self.metrics, metrics_port)
                except OSError as exc:
                    raise ListenError(exc, f"127.0.0.1:{metrics_port} (metrics)") from exc
        except BaseException:
            if self.listener is not None:
                self.listener.close()
            if self.checkpointer is not None:
                self.checkpointer.close()
            self.db.dispose()
            raise
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._stop_lock = threading.Lock()
        self._stopped = False

    def _committed(self, jobs: int, seconds: float) -> None:
        """(The committing thread.) Count the commit; let the checkpointer copy it."""
        self.metrics.observe_commit(jobs, seconds)
        if self.checkpointer is not None:
            self.checkpointer.poke()

    @property
    def address(self) -> tuple[str, int]:
        return self.server.address

    def start(self) -> None:
        """Serve on background threads."""
        self._threads = [
            threading.Thread(target=self.server.serve_forever, name="io-loop",
                             kwargs={"poll_interval": 0.2}, daemon=True),
            threading.Thread(target=self._watch_accounts, name="account-watcher", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def _watch_accounts(self) -> None:
        while not self._stopping.wait(ACCOUNT_CHECK_INTERVAL):
            try:
                self.server.end_stale_sessions()
            except ChatError as exc:  # the database is busy or gone for a moment: next round
                log.warning("account check skipped: %s", exc.message)
            except Exception:
                log.exception("account check failed")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, notify sessions, finish writes, close the database."""
        with self._stop_lock:
            if self._stopped:
                return
            self._stopped = True
        self._stopping.set()
        self.server.stop(timeout)
        self.writer.close(timeout)
        if self.listener is not None:
            self.listener.close(timeout)
        if self.checkpointer is not None:
            self.checkpointer.close(timeout)
        self.db.dispose()
        log.info("stopped")
