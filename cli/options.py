"""Options shared by several commands."""

from __future__ import annotations

import click

db_option = click.option(
    "--db", "db", default="chat.db", show_default=True, show_envvar=True,
    help="SQLite file, or a SQLAlchemy URL such as postgresql+psycopg://user@host/chat.",
)

host_option = click.option(
    "--host", default="127.0.0.1", show_default=True, show_envvar=True,
    help="Address to use. 127.0.0.1 is this machine only; 0.0.0.0 listens on every interface.",
)

port_option = click.option(
    "--port", type=click.IntRange(0, 65535), default=2023, show_default=True, show_envvar=True,
    help="TCP port (for serve, 0 picks any free port and prints it).",
)
