"""The ``chat`` command: serve, client, admin."""

from __future__ import annotations

import click

from chatserver_cli.admin import admin
from chatserver_cli.bench import bench
from chatserver_cli.client import client
from chatserver_cli.serve import serve


@click.group(context_settings={"help_option_names": ["-h", "--help"], "auto_envvar_prefix": "CHAT"})
@click.version_option(package_name="chat")
def cli() -> None:
    """A persistent 1:1 chat server, its terminal client and its admin tool.

    \b
    Example:
      chat serve --db chat.db            # run the server on 127.0.0.1:2023
      chat client --port 2023            # chat through it
      chat admin list-accounts --db chat.db
    """


cli.add_command(serve)
cli.add_command(client)
cli.add_command(admin)
cli.add_command(bench)


def main() -> None:
    cli()
