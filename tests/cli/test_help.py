"""Every ``chat`` command and subcommand has a summary and an example, and ``--help`` works."""

from __future__ import annotations

import click
import pytest
from chatserver_cli.main import cli
from click.testing import CliRunner


def walk(command: click.Command, path: tuple[str, ...] = ()):
    """(path, command) for ``command`` and everything below it, depth first."""
    yield path, command
    if isinstance(command, click.Group):
        for name in sorted(command.commands):
            yield from walk(command.commands[name], (*path, name))


COMMANDS = list(walk(cli))


def test_the_walk_finds_the_known_commands():
    paths = {" ".join(path) for path, _ in COMMANDS}
    assert {"", "serve", "client", "admin", "admin list-accounts"} <= paths


@pytest.mark.parametrize("path,command", COMMANDS,
                         ids=[" ".join(("chat", *p)) for p, _ in COMMANDS])
def test_command_has_summary_and_example(path, command):
    summary = command.get_short_help_str(limit=200).strip()
    assert summary, f"'chat {' '.join(path)}' has no help summary"
    assert (command.help or "").strip(), f"'chat {' '.join(path)}' has no help text"
    assert "Example" in command.help, f"'chat {' '.join(path)}' has no example in its help"


@pytest.mark.parametrize("path,command", COMMANDS,
                         ids=[" ".join(("chat", *p)) for p, _ in COMMANDS])
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_exits_zero(path, command, flag):
    result = CliRunner().invoke(cli, [*path, flag])
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    assert result.stdout.startswith("Usage: ")
    assert "Example" in result.stdout
    # The summary of every subcommand is listed in its group's help.
    if isinstance(command, click.Group):
        for name in command.commands:
            assert f"  {name}" in result.stdout
