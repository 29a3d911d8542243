"""Accounts, messages and the rules about them. Standard library only (no ORM, no sockets)."""

from __future__ import annotations

import functools
import re
import unicodedata
from dataclasses import dataclass

from chatserver.errors import (
    EmptyMessage,
    InvalidName,
    InvalidPassword,
    InvalidPattern,
    InvalidRequest,
    MessageTooLarge,
)

MAX_NAME_LENGTH = 32
MIN_PASSWORD_LENGTH = 8  # characters; short passwords are guessable by an online attacker
MAX_PASSWORD_BYTES = 1024  # bounds the hashing work one request can ask for
MAX_MESSAGE_BYTES = 65_536  # default; the server may lower or raise it (stated in Welcome)
MAX_PATTERN_LENGTH = 64
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
DEFAULT_FETCH_LIMIT = 100
MAX_FETCH_LIMIT = 1000
MAX_ACK_IDS = 1000
MAX_MESSAGE_ID = 2**63 - 1  # ids are signed 64-bit integers in every supported database
MAX_CLIENT_MSG_ID_BYTES = 64
# Per-account protections (defaults; `chat serve` options change them, 0 disables):
MAX_QUEUED_PER_ACCOUNT = 10_000  # undelivered messages one recipient may have waiting
SEND_RATE = 50.0  # messages per second one account may send on average...
SEND_BURST = 500  # ...with bursts of up to this many

_NAME_RE = re.compile(r"[A-Za-z0-9_.\-]{1,%d}" % MAX_NAME_LENGTH)
LIKE_ESCAPE = "\\"


@dataclass(frozen=True, slots=True)
class Account:
    """A registered account. ``name`` keeps the case it was registered with."""

    id: int
    name: str
    created_at: int  # ms since the Unix epoch
    last_login_at: int | None = None
    password_version: int = 0  # the password resets it had seen at login (see server)


@dataclass(slots=True)  # not frozen: built per message, and a frozen init costs 4x
class StoredMessage:
    """A message accepted by the server and not yet acknowledged by its recipient."""

    id: int
    sender: str
    recipient_id: int
    sent_at: int  # ms since the Unix epoch
    body: str


@dataclass(slots=True)  # not frozen: built per message, and a frozen init costs 4x
class NewMessage:
    """A message as submitted, before the server has accepted it."""

    sender: Account
    recipient_key: str  # the case-folded name it is addressed to
    recipient_name: str  # as the sender wrote it, for error texts
    body: str
    sent_at: int
    client_msg_id: str = ""


@dataclass(slots=True)  # not frozen: built per message, and a frozen init costs 4x
class SendOutcome:
    """What became of a send. ``message`` is None for a duplicate (the original may be gone)."""

    message_id: int
    recipient_id: int
    duplicate: bool
    message: StoredMessage | None


def shown(name: str, limit: int = MAX_NAME_LENGTH + 8) -> str:
    """A name as quoted in an error text: repr, cut short (the name may be 64 KiB of junk)."""
    return repr(name if len(name) <= limit else name[:limit] + "...")


def normalize_name(name: str) -> str:
    """Return the canonical form of an account name, or raise InvalidName.

    NFKC first, so look-alike compatibility forms (full-width letters) become the plain ASCII
    they stand for instead of being a second, confusable account.
    """
    normalized = unicodedata.normalize("NFKC", name)
    if not _NAME_RE.fullmatch(normalized):
        raise InvalidName(
            f"names are 1-{MAX_NAME_LENGTH} characters from letters, digits, '_', '-', '.'"
        )
    return normalized


@functools.lru_cache(maxsize=16384)  # every send looks up its recipient's key: NFKC is not free
def name_key(name: str) -> str:
    """The key that makes names unique without regard to case (``Alice`` == ``alice``)."""
    return normalize_name(name).casefold()


def validate_password(password: str) -> str:
    """Return the password if it is acceptable, else raise InvalidPassword."""
    if len(password) < MIN_PASSWORD_LENGTH:
        raise InvalidPassword(f"passwords need at least {MIN_PASSWORD_LENGTH} characters")
    if len(password.encode("utf-8")) > MAX_PASSWORD_BYTES:
        raise InvalidPassword(f"passwords are at most {MAX_PASSWORD_BYTES} bytes")
    return password


def validate_body(body: str, max_bytes: int = MAX_MESSAGE_BYTES) -> str:
    """Return the message body if its UTF-8 size is 1..max_bytes, else raise."""
    if not body:
        raise EmptyMessage("a message needs at least one character")
    size = len(body.encode("utf-8"))
    if size > max_bytes:
        raise MessageTooLarge(f"message is {size} bytes; the limit is {max_bytes}")
    return body


def validate_client_msg_id(client_msg_id: str) -> str:
    """Return the idempotency key if it fits, else raise InvalidRequest."""
    if len(client_msg_id.encode("utf-8")) > MAX_CLIENT_MSG_ID_BYTES:
        raise InvalidRequest(f"client_msg_id is at most {MAX_CLIENT_MSG_ID_BYTES} bytes")
    return client_msg_id


def clamp(value: int, default: int, maximum: int) -> int:
    """0 means the default; anything above the maximum is the maximum."""
    if value <= 0:
        return default
    return min(value, maximum)


@dataclass(frozen=True, slots=True)
class SearchPattern:
    """A user's wildcard pattern compiled for SQL LIKE, never a regex.

    ``like`` matches lower-cased name keys with ``\\`` as the escape character; ``prefix`` is
    the literal text before the first wildcard, which the repository turns into an index
    range so that prefix searches do not scan the table.
    """

    like: str
    prefix: str

    @classmethod
    def parse(cls, pattern: str) -> SearchPattern:
        """Compile ``*`` (any run) and ``?`` (one character); everything else is literal."""
        if len(pattern) > MAX_PATTERN_LENGTH:
            raise InvalidPattern(f"patterns are at most {MAX_PATTERN_LENGTH} characters")
        pattern = unicodedata.normalize("NFKC", pattern).casefold()
        like: list[str] = []
        prefix: list[str] = []
        in_prefix = True
        for ch in pattern:
            if ch == "*":
                like.append("%")
                in_prefix = False
            elif ch == "?":
                like.append("_")
                in_prefix = False
            else:
                if ch in ("%", "_", LIKE_ESCAPE):
                    like.append(LIKE_ESCAPE + ch)
                else:
                    like.append(ch)
                if in_prefix:
                    prefix.append(ch)
        if not pattern:
            like.append("%")
        return cls(like="".join(like), prefix="".join(prefix))
