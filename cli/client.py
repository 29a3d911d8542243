"""``chat client``: chat from a terminal, or from a script through a pipe.

Commands are read line by line from standard input; replies and pushed messages are printed
as they arrive. Every message shown is acknowledged, and a message id is never shown twice.
"""

from __future__ import annotations

import re
import ssl
import sys
import threading
import time

import click

from chatserver import tls
from chatserver.client import ChatClient, ConnectionLost, ServerError
from chatserver.protocol import Error, LocalProtocolError, Message, Notice, Push
from chatserver.resilient import ResilientClient
from chatserver_cli.options import host_option, port_option

HELP = """\
commands:
  /register NAME PASSWORD   create an account and log in
  /login NAME PASSWORD      log in
  /logout                   log out
  /users [PATTERN]          list accounts (* any run, ? one character)
  /msg NAME TEXT            send TEXT to NAME
  /inbox [N]                show up to N waiting messages (default 100)
  /delete-account PASSWORD  delete your account and its waiting messages
  /help                     this list
  bye, quit, /quit          leave"""

# Control characters (C0 except tab/newline, DEL, C1) could move the cursor or recolour the
# terminal if printed as they are; show them as escapes instead.
_UNSAFE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def safe(text: str) -> str:
    """Text from another user, made harmless for a terminal."""
    return _UNSAFE.sub(lambda m: "\\x%02x" % ord(m.group()), text)


class Terminal:
    """The client's state: the connection, what was shown, where output goes."""

    def __init__(self, out=sys.stdout):
        self.out = out
        self._print_lock = threading.Lock()
        self._seen: set[int] = set()
        self._seen_lock = threading.Lock()
        self.session: ResilientClient | None = None
        self._acks: list = []

    @property
    def chat(self) -> ChatClient:
        """The current connection (a new one after a reconnect)."""
        return self.session.client

    def wait_for_acks(self, timeout: float = 5.0) -> None:
        """Let the acknowledgements of pushed messages reach the server before leaving."""
        deadline = time.monotonic() + timeout
        for future in self._acks:
            try:
                future.result(max(0.0, deadline - time.monotonic()))
            except Exception:  # lost connection or timeout: those messages are offered again
                break
        self._acks.clear()

    def say(self, line: str) -> None:
        with self._print_lock:
            self.out.write(line + "\n")
            self.out.flush()

    def show_messages(self, messages: list[Message]) -> int:
        """Print the messages not shown before; return how many were printed."""
        shown = 0
        for message in messages:
            with self._seen_lock:
                if message.id in self._seen:
                    continue
                self._seen.add(message.id)
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(message.sent_at / 1000))
            # Continuation lines are indented, so a body cannot forge a line from someone else.
            body = safe(message.body).replace("\n", "\n    ")
            self.say(f"[{stamp}] {safe(message.sender)}: {body}")
            shown += 1
        return shown

    def on_push(self, event) -> None:
        """Called on the reader thread for pushes, notices and connection errors."""
        if isinstance(event, Push):
            # Acknowledge before printing, without waiting (this is the thread replies arrive
            # on); the client waits for outstanding acks before it closes.
            try:
                self._acks.append(self.chat.ack_nowait([event.message.id]))
            except ConnectionLost:
                pass
            self.show_messages([event.message])
        elif isinstance(event, Notice):
            self.say(f"* {event.code}: {safe(event.text)}")
        elif isinstance(event, Error):
            self.say(f"error: {event.code}: {safe(event.text)}")

    def run_command(self, line: str) -> bool:
        """Run one input line; False when the user leaves."""
        line = line.strip()
        if not line:
            return True
        if line in ("bye", "quit", "/quit"):
            return False
        command, _, rest = line.partition(" ")
        handler = COMMANDS.get(command)
        if handler is None:
            self.say(f"unknown command {command!r}; /help lists the commands")
            return True
        try:
            handler(self, rest.strip())
        except ServerError as exc:
            self.say(f"error: {exc.code}: {exc.text}")
        except UsageError as exc:
            self.say(f"usage: {exc}")
        except LocalProtocolError as exc:  # e.g. a text too long for the wire format
            self.say(f"error: cannot send that: {exc}")
        return True

    # -- commands ---------------------------------------------------------------------------

    def cmd_register(self, args: str) -> None:
        name, password = _two(args, "/register NAME PASSWORD")
        reply = self.session.register(name, password)
        self.say(f"registered and logged in as {reply.name}")

    def cmd_login(self, args: str) -> None:
        name, password = _two(args, "/login NAME PASSWORD")
        reply = self.session.login(name, password)
        waiting = f"{reply.pending} message(s) waiting; /inbox shows them" if reply.pending \
            else "no messages waiting"
        self.say(f"logged in as {reply.name} ({waiting})")

    def cmd_logout(self, args: str) -> None:
        self.session.logout()
        self.say("logged out")

    def cmd_users(self, args: str) -> None:
        after, shown = "", 0
        while True:
            page = self.session.retrying(lambda c: c.list_accounts(args, after, 500))
            for entry in page.accounts:
                self.say(f"{entry.name}{'  (online)' if entry.online else ''}")
            shown += len(page.accounts)
            after = page.next_after
            if not after:
                break
        self.say(f"{shown} account(s)")

    def cmd_msg(self, args: str) -> None:
        name, _, text = args.partition(" ")
        if not name or not text:
            raise UsageError("/msg NAME TEXT")
        reply = self.session.send(name, text)  # retried with one client_msg_id: never twice
        how = "delivered live" if reply.pushed else "queued until they fetch it"
        self.say(f"sent to {name} (#{reply.message_id}, {how})")

    def cmd_inbox(self, args: str) -> None:
        try:
            limit = int(args) if args else 0
        except ValueError:
            limit = -1
        if not 0 <= limit <= 65535:
            raise UsageError("/inbox [N]")
        reply = self.session.retrying(lambda c: c.fetch(limit))
        messages = list(reply.messages)
        if messages:
            self.session.retrying(lambda c: c.ack([m.id for m in messages]))
        if not self.show_messages(messages):
            self.say("no messages waiting")
        if reply.remaining:
            self.say(f"{reply.remaining} more waiting; /inbox shows them")

    def cmd_delete_account(self, args: str) -> None:
        if not args:
            raise UsageError("/delete-account PASSWORD")
        discarded = self.chat.delete_account(args)
        self.say(f"account deleted ({discarded} undelivered message(s) discarded)")

    def cmd_help(self, args: str) -> None:
        self.say(HELP)


class UsageError(Exception):
    pass


def _two(args: str, usage: str) -> tuple[str, str]:
    parts = args.split(" ", 1)
    if len(parts) != 2 or not parts[0] or not parts[1]:
        raise UsageError(usage)
    return parts[0], parts[1]


COMMANDS = {
    "/register": Terminal.cmd_register,
    "/login": Terminal.cmd_login,
    "/logout": Terminal.cmd_logout,
    "/users": Terminal.cmd_users,
    "/msg": Terminal.cmd_msg,
    "/inbox": Terminal.cmd_inbox,
    "/delete-account": Terminal.cmd_delete_account,
    "/help": Terminal.cmd_help,
}


@click.command()
@host_option
@port_option
@click.option("--timeout", type=click.FloatRange(0.1), default=30.0, show_default=True,
              show_envvar=True, help="Seconds to wait for the server to answer a request.")
@click.option("--tls", "use_tls", is_flag=True, show_envvar=True,
              help="Connect with TLS, verifying the server's certificate and host name.")
@click.option("--cafile", type=click.Path(exists=True, dir_okay=False), default=None,
              show_envvar=True, help="Trust the CA certificates in this PEM file (with --tls).")
@click.option("--insecure", is_flag=True, show_envvar=True,
              help="With --tls, do not verify the certificate (anyone in between can read "
                   "and change everything).")
def client(host, port, timeout, use_tls, cafile, insecure) -> None:
    """Chat from the terminal: commands on standard input, messages as they arrive.

    Works in a pipe too (scripted mode): each line is run after the previous one was answered.
    Type /help for the commands.

    \b
    Example:
      chat client --port 2023
      printf '/login alice s3cret-pw\\n/msg bob hi\\n' | chat client
    """
    context = None
    if use_tls or cafile or insecure:
        if insecure:
            click.echo("warning: --insecure: the server's identity is not checked; anyone "
                       "between you and it can read and change what you send", err=True)
        context = tls.client_context(cafile, insecure)
    terminal = Terminal()

    def connect() -> ChatClient:
        return ChatClient(host, port, timeout=timeout, on_push=terminal.on_push,
                          tls_context=context)

    def reconnected(_client: ChatClient) -> None:
        terminal.say("* reconnected")

    try:
        terminal.session = ResilientClient(connect, on_reconnect=reconnected)
    except ssl.SSLError as exc:
        raise click.ClickException(
            f"TLS with {host}:{port} failed ({exc.reason or exc}); is it a TLS port, and is its "
            "certificate trusted (--cafile)?") from None
    except (OSError, ConnectionLost) as exc:
        raise click.ClickException(f"could not connect to {host}:{port}: {exc}") from None
    click.echo(f"connected to {host}:{port} ({terminal.chat.welcome.server}); /help lists the "
               "commands",
               err=True)
    # Undecodable input becomes U+FFFD rather than a crash (or text the wire cannot carry).
    sys.stdin.reconfigure(errors="replace")
    try:
        for line in sys.stdin:
            if not terminal.run_command(line):
                break
    except ConnectionLost as exc:
        raise click.ClickException(f"connection lost: {exc}") from None
    except KeyboardInterrupt:
        pass
    finally:
        terminal.wait_for_acks()
        terminal.session.close()
