"""A client that survives a lost connection: it reconnects, logs in again and retries.

Every send carries a client-chosen ``client_msg_id`` (a random UUID unless given), so a
send retried after a lost reply or a reconnect returns the original message id and the
server stores nothing new: a retried send is never duplicated.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable

from chatserver.client import ChatClient, ConnectionLost, ServerError
from chatserver.protocol import LoggedIn, Sent

RETRY_DELAYS = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 2.0, 2.0)  # seconds; about 8 s in all


class ResilientClient:
    """Wraps ``connect() -> ChatClient``; requests are retried across reconnects."""

    def __init__(self, connect: Callable[[], ChatClient], *,
                 retry_delays: Iterable[float] = RETRY_DELAYS,
                 sleep: Callable[[float], None] = time.sleep,
                 on_reconnect: Callable[[ChatClient], None] | None = None):
        self._connect = connect
        self._retry_delays = tuple(retry_delays)
        self._sleep = sleep
        self._on_reconnect = on_reconnect
        self._credentials: tuple[str, str] | None = None
        self.client = connect()
        self.reconnects = 0

    def register(self, name: str, password: str) -> LoggedIn:
        reply = self.client.register(name, password)
        self._credentials = (name, password)
        return reply

    def login(self, name: str, password: str) -> LoggedIn:
        reply = self.client.login(name, password)
        self._credentials = (name, password)
        return reply

    def logout(self) -> None:
        self._credentials = None
        self.client.logout()

    def send(self, to: str, body: str, client_msg_id: str | None = None) -> Sent:
        """Send, retrying with the same client_msg_id until the server confirms it."""
        key = client_msg_id or uuid.uuid4().hex
        return self.retrying(lambda client: client.send(to, body, key))

    def retrying(self, request: Callable[[ChatClient], object]):
        """Run ``request(client)``; on a lost connection reconnect, log in again and repeat.

        Only for requests that are safe to repeat (sends with a client_msg_id, fetch, ack).
        """
        delays = iter(self._retry_delays)
        while True:
            try:
                return request(self.client)
            except ConnectionLost:
                delay = next(delays, None)
                if delay is None:
                    raise
                self._sleep(delay)
                self._reconnect()

    def _reconnect(self) -> None:
        self.client.close()
        try:
            client = self._connect()
        except (OSError, ConnectionLost):  # down, or refusing (server_full, shutting_down)
            return  # the next retry tries again
        try:
            if self._credentials is not None:
                client.login(*self._credentials)
        except (ConnectionLost, ServerError):
            client.close()
            return
        self.client = client
        self.reconnects += 1
        if self._on_reconnect is not None:
            self._on_reconnect(client)

    def close(self) -> None:
        self.client.close()
