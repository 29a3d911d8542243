"""``chat serve``: run the server until SIGINT or SIGTERM."""

from __future__ import annotations

import gc
import logging
import signal
import ssl
import sys
import threading

import click

from chatserver import tls
from chatserver.app import ChatApp
from chatserver.logs import configure_logging
from chatserver.passwords import HashParameters
from chatserver.server import ListenError, ServerConfig
from chatserver.storage.database import UnsuitableDatabase
from chatserver.storage.migrate import SchemaError
from chatserver_cli.options import db_option, host_option, port_option


def tune_garbage_collector() -> None:
    """Fewer, cheaper cyclic collections: a busy server allocates a few short-lived objects
    per message (events, rows, outcomes), none of them in cycles worth chasing, and with the
    default threshold (700) a collection ran every few hundred messages, scanning every
    long-lived object each time it reached the older generations. What exists at start-up
    (modules, SQLAlchemy's metadata) is frozen out of collections altogether."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)


@click.command()
@db_option
@host_option
@port_option
@click.option("--sync", type=click.Choice(["full", "normal"]), default="full", show_default=True,
              show_envvar=True,
              help="SQLite synchronous level: full survives power loss, normal a process crash.")
@click.option("--max-connections", type=click.IntRange(1), default=1000, show_default=True,
              show_envvar=True, help="Connections beyond this get a server_full error.")
@click.option("--heartbeat-interval", type=click.IntRange(0, 3600), default=30, show_default=True,
              show_envvar=True,
              help="Seconds of silence before the server pings a client; a client silent for two "
                   "intervals is disconnected. 0 disables.")
@click.option("--max-message-bytes", type=click.IntRange(1, 262_144), default=65_536,
              show_default=True, show_envvar=True, help="Largest message body accepted.")
@click.option("--max-queued-per-account", type=click.IntRange(0), default=10_000,
              show_default=True, show_envvar=True,
              help="Undelivered messages one account may have waiting; beyond it senders get "
                   "queue_full. 0: no limit.")
@click.option("--send-rate", type=click.FloatRange(0), default=50.0, show_default=True,
              show_envvar=True,
              help="Messages per second one account may send on average (rate_limited beyond). "
                   "0: no limit.")
@click.option("--send-burst", type=click.IntRange(1), default=500, show_default=True,
              show_envvar=True, help="Messages one account may send in a burst above the rate.")
@click.option("--login-free-failures", type=click.IntRange(-1), default=5, show_default=True,
              show_envvar=True,
              help="Failed logins allowed per account name (four times as many per client "
                   "address) before lockouts that double from 1 s. -1 disables.")
@click.option("--login-max-lockout", type=click.FloatRange(1), default=300.0, show_default=True,
              show_envvar=True, help="Longest login lockout, in seconds.")
@click.option("--registrations-per-hour", type=click.IntRange(0), default=30, show_default=True,
              show_envvar=True, help="Accounts one client address may register per hour. 0: no "
                                     "limit.")
@click.option("--busy-poll-us", type=click.IntRange(0, 10_000), default=100, show_default=True,
              show_envvar=True,
              help="Longest time, in microseconds, the I/O loop polls for the next request "
                   "before it sleeps; polling adapts, so it happens only while clients answer "
                   "that fast (saves a wake-up per request). 0: never poll (for a server "
                   "sharing its cores with other busy processes).")
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False), default=None,
              show_envvar=True, help="Serve TLS (1.2 or later) with this certificate chain (PEM).")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False), default=None,
              show_envvar=True, help="The private key of --tls-cert (PEM).")
@click.option("--no-migrate", is_flag=True, show_envvar=True,
              help="Refuse to start on a database behind this version instead of upgrading it.")
@click.option("--argon2-time-cost", type=click.IntRange(1), default=3, show_default=True,
              show_envvar=True, help="Argon2id passes per password hash.")
@click.option("--argon2-memory-kib", type=click.IntRange(8), default=65_536, show_default=True,
              show_envvar=True, help="Argon2id memory per password hash, in KiB.")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=None, show_envvar=True,
              help="Expose Prometheus metrics on 127.0.0.1:PORT/metrics (0: any free port).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
              default="info", show_default=True, show_envvar=True, help="Least severe log level.")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text",
              show_default=True, show_envvar=True, help="Log lines as text or one JSON object each.")
def serve(db, host, port, sync, max_connections, heartbeat_interval, max_message_bytes,
          max_queued_per_account, send_rate, send_burst, login_free_failures, login_max_lockout,
          registrations_per_hour, busy_poll_us, tls_cert, tls_key, no_migrate, argon2_time_cost, argon2_memory_kib, metrics_port, log_level,
          log_format) -> None:
    """Run the chat server on a database (created and migrated as needed).

    Every option can also be set by the environment variable shown with it.

    \b
    Example:
      chat serve --db chat.db --port 2023
      CHAT_SERVE_PORT=0 chat serve      # any free port; the address is printed
    """
    configure_logging(log_level, log_format)
    config = ServerConfig(host=host, port=port, max_connections=max_connections,
                          heartbeat_interval=heartbeat_interval,
                          max_message_bytes=max_message_bytes,
                          max_queued_per_account=max_queued_per_account,
                          send_rate=send_rate, send_burst=send_burst,
                          login_free_failures=login_free_failures,
                          login_max_lockout=login_max_lockout,
                          registrations_per_hour=registrations_per_hour,
                          busy_poll_us=busy_poll_us)
    if bool(tls_cert) != bool(tls_key):
        raise click.UsageError("--tls-cert and --tls-key go together")
    ssl_context = None
    if tls_cert:
        try:
            ssl_context = tls.server_context(tls_cert, tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise click.ClickException(f"cannot use the TLS certificate or key: {exc}") from None
    params = HashParameters(time_cost=argon2_time_cost, memory_kib=argon2_memory_kib)
    try:
        app = ChatApp(db, config, sync=sync, hash_params=params, migrate=not no_migrate,
                      metrics_port=metrics_port, ssl_context=ssl_context)
    except (SchemaError, UnsuitableDatabase) as exc:
        raise click.ClickException(str(exc)) from None
    except ListenError as exc:
        raise click.ClickException(f"cannot listen on {exc.address}: {exc.strerror}") from None
    except OSError as exc:  # the database file, most likely (its directory, permissions)
        raise click.ClickException(f"cannot start: {exc}") from None

    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    tune_garbage_collector()
    app.start()
    bound_host, bound_port = app.address
    click.echo(f"chat server listening on {bound_host}:{bound_port} (database "
               f"{app.db.display_name}{', TLS' if ssl_context else ''})")
    if app.metrics_port is not None:
        click.echo(f"metrics on http://127.0.0.1:{app.metrics_port}/metrics")
    sys.stdout.flush()
    while not stop.wait(0.5):
        pass
    logging.getLogger("chatserver").info("stopping")
    app.stop()
