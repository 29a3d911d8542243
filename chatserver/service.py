"""Use cases: register, login, search, send, fetch, ack, delete account.

Plain methods over the database (reads) and the group-commit writer (writes); they raise
the named errors of ``chatserver.errors`` and know nothing of sockets or the wire format.
Password hashing runs on the caller's thread, never on the writer, so a slow hash cannot
hold up other users' sends.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass

from chatserver import domain
from chatserver.domain import Account, NewMessage, SearchPattern, SendOutcome, StoredMessage
from chatserver.errors import (
    ChatError,
    InvalidCredentials,
    InvalidName,
    InvalidRequest,
    NameTaken,
    NoSuchAccount,
    RateLimited,
)
from chatserver.limits import RateLimiter
from chatserver.passwords import PasswordHasher
from chatserver.storage.announce import Announcer
from chatserver.storage.database import Database
from chatserver.storage.repository import Repository
from chatserver.storage.writer import GroupCommitWriter


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(slots=True)  # not frozen: one per send, and a frozen init costs 4x
class _SendJob:
    """A send for the group-commit writer, stored in bulk with the sends around it."""

    message: NewMessage
    cap: int
    announcer: Announcer | None = None  # PostgreSQL: tell the other servers (announce.py)

    bulk_is_atomic = True  # store_messages stores all of a batch or nothing: no savepoint
    bulk_group = "send"  # stored together with the _SendBatch jobs around it
    # About how many existing pages a send changes: its receipt's and a share of the message
    # table's and its index's (the row itself goes on new pages); for the writer's
    # sub-journal (``writer._small_journal``).
    journal_pages = 2


class _SendBatch:
    """Several sends of one connection's received chunk as one writer job (one queue entry,
    one completion), stored in bulk with the sends and batches around it. Its result is a
    list with each send's outcome, or the ChatError that refused it."""

    __slots__ = ("jobs",)
    bulk_is_atomic = True
    bulk_group = "send"

    def __init__(self, jobs: list[_SendJob]):
        self.jobs = jobs

    @property
    def journal_pages(self) -> int:
        return _SendJob.journal_pages * len(self.jobs)


def _store_sends(repo: Repository, jobs: list[_SendJob | _SendBatch]) -> list:
    """``run_bulk`` of both send jobs: one ``store_messages`` for the whole group (all or
    nothing); a _SendJob's result is its outcome, a _SendBatch's the list of its sends'."""
    if _SendBatch not in map(type, jobs):  # (all _SendJob: the common case)
        sends = jobs
    else:
        sends = []
        for job in jobs:
            if type(job) is _SendJob:
                sends.append(job)
            else:
                sends.extend(job.jobs)
    outcomes = repo.store_messages([send.message for send in sends], sends[0].cap)
    announcer = sends[0].announcer
    if announcer is not None:
        stored = [(o.recipient_id, o.message_id) for o in outcomes
                  if type(o) is SendOutcome and o.message is not None]
        if stored:
            announcer.announce(repo, stored)
    if sends is jobs:
        return outcomes
    results = []
    start = 0
    for job in jobs:
        if type(job) is _SendJob:
            results.append(outcomes[start])
            start += 1
        else:
            results.append(outcomes[start:start + len(job.jobs)])
            start += len(job.jobs)
    return results


_SendJob.run_bulk = _SendBatch.run_bulk = staticmethod(_store_sends)


@dataclass(slots=True)
class _RetryOverRateJob:
    """A send over its account's rate that carries a ``client_msg_id``: if an earlier send
    with that id was stored, this is a retry (its reply was lost) and gets that send's reply
    as a duplicate; otherwise the rate refusal stands. Checked by the writer, in order after
    every send queued before it, so an original still being committed is seen."""

    sender_id: int
    client_msg_id: str
    refusal: RateLimited

    def __call__(self, repo: Repository) -> SendOutcome:
        earlier = repo.receipt(self.sender_id, self.client_msg_id)
        if earlier is None:
            raise self.refusal
        return SendOutcome(earlier, 0, True, None)  # a duplicate: nothing stored or pushed


def _one_of(index: int, on_done):
    """A single send's completion, told as ``submit_sends`` tells a batch's."""
    def done(result, error):
        if error is None:
            on_done([index], [result], None)
        elif isinstance(error, ChatError):
            on_done([index], [error], None)
        else:
            on_done([index], None, error)
    return done


class ChatService:
    """The chat's use cases over one database."""

    def __init__(self, db: Database, writer: GroupCommitWriter, hasher: PasswordHasher, *,
                 clock: Callable[[], int] = wall_clock_ms,
                 max_message_bytes: int = domain.MAX_MESSAGE_BYTES,
                 max_queued_per_account: int = domain.MAX_QUEUED_PER_ACCOUNT,
                 send_limiter: RateLimiter | None = None, announcer: Announcer | None = None):
        """``announcer``: PostgreSQL with other servers on the database; stored messages are
        announced to them (storage/announce.py)."""
        self.db = db
        self.announcer = announcer
        self.writer = writer
        self.hasher = hasher
        self.clock = clock
        self.max_message_bytes = max_message_bytes
        self.max_queued_per_account = max_queued_per_account
        self.send_limiter = send_limiter or RateLimiter(domain.SEND_RATE, domain.SEND_BURST)

    # -- accounts ---------------------------------------------------------------------------

    def register(self, name: str, password: str) -> Account:
        """Create an account (name unique without regard to case)."""
        name = domain.normalize_name(name)
        domain.validate_password(password)
        key = name.casefold()
        # Fail fast on a taken name before paying for a hash; the insert checks again.
        if self.db.read(lambda repo: repo.account_id_by_key(key)) is not None:
            raise NameTaken(f"the name {name!r} is taken")
        password_hash = self.hasher.hash(password)
        now = self.clock()
        return self.writer.run(lambda repo: repo.add_account(name, key, password_hash, now))

    def login(self, name: str, password: str) -> tuple[Account, int]:
        """Check the password; return the account and how many messages wait for it."""
        try:
            key = domain.name_key(name)
        except InvalidName:
            key = None
        found = self.db.read(lambda repo: repo.get_by_key(key)) if key else None
        account, stored_hash = found if found else (None, None)
        # Verify even for an unknown name (against a dummy hash): same time, same error.
        if not self.hasher.verify(stored_hash, password) or account is None:
            raise InvalidCredentials("wrong name or password")
        new_hash = self.hasher.hash(password) if self.hasher.needs_rehash(stored_hash) else None
        now = self.clock()

        def record(repo: Repository) -> int:
            repo.record_login(account.id, now)
            if new_hash is not None:
                repo.set_password_hash(account.id, new_hash)
            return repo.count_undelivered(account.id)

        pending = self.writer.run(record)
        return Account(account.id, account.name, account.created_at, now,
                       account.password_version), pending

    def delete_account(self, account: Account, password: str) -> int:
        """Delete the account after checking its password; return the discarded messages."""
        stored_hash = self.db.read(lambda repo: repo.password_hash(account.id))
        if not self.hasher.verify(stored_hash, password):
            raise InvalidCredentials("wrong password")
        return self.writer.run(lambda repo: repo.delete_account(account.id))

    def search(self, pattern: str, after: str, limit: int) -> tuple[list[Account], str]:
        """One page of accounts matching ``pattern``, and the ``after`` of the next page."""
        compiled = SearchPattern.parse(pattern)
        limit = domain.clamp(limit, domain.DEFAULT_PAGE_SIZE, domain.MAX_PAGE_SIZE)
        found = self.db.read(lambda repo: repo.search(compiled, after, limit + 1))
        if len(found) > limit:
            return found[:limit], found[limit - 1].name
        return found, ""

    def password_versions(self, account_ids: list[int]) -> dict[int, int]:
        """The ``password_version`` of each of these accounts that still exists (a missing
        id was deleted)."""
        return self.db.read(lambda repo: repo.password_versions(account_ids))

    def undelivered_messages(self, message_ids: list[int]) -> list[StoredMessage]:
        """These messages, those not acknowledged yet."""
        return self.db.read(lambda repo: repo.messages_by_ids(message_ids))

    def undelivered_after(self, recipient_ids: list[int], after_id: int, limit: int
                          ) -> list[StoredMessage]:
        """Undelivered messages of these recipients with ids above ``after_id`` (lowest
        first, at most ``limit``)."""
        return self.db.read(lambda repo: repo.undelivered_after(recipient_ids, after_id, limit))

    def undelivered_total(self) -> int:
        return self.db.read(lambda repo: repo.count_all_undelivered())

    def pending(self, account_id: int) -> int:
        return self.db.read(lambda repo: repo.count_undelivered(account_id))

    # -- messages ---------------------------------------------------------------------------

    def send(self, sender: Account, to: str, body: str, client_msg_id: str = "") -> SendOutcome:
        """Store a message for ``to``; returns once it is committed."""
        return self.submit_send(sender, to, body, client_msg_id).result()

    def submit_send(self, sender: Account, to: str, body: str, client_msg_id: str = "",
                    on_done: Callable[[SendOutcome | None, BaseException | None], None]
                    | None = None, inline_if_idle: bool = False, hold: bool = False
                    ) -> Future[SendOutcome] | None:
        """Check a send and queue it for the writer; the future resolves after its commit.

        Refusals that need no database (size, rate) raise at once; the others (unknown
        recipient, full queue) come through the future, and so does the rate refusal of a
        send with a ``client_msg_id`` (unless it turns out to be a retry: a duplicate). With ``on_done`` there is no future:
        ``on_done(outcome, None)`` or ``on_done(None, error)`` is called after the commit,
        on the writer's thread (or on this one: ``GroupCommitWriter.submit_callback``, whose
        ``inline_if_idle`` and ``hold`` these are).
        """
        job = self._send_job(sender, to, body, client_msg_id)
        if on_done is not None:
            self.writer.submit_callback(job, on_done, inline_if_idle=inline_if_idle, hold=hold)
            return None
        return self.writer.submit(job)

    def submit_sends(self, sender: Account, sends: list[tuple[str, str, str]],
                     on_done: Callable[[list[int], list | None, BaseException | None], None]
                     ) -> list[Exception | None]:
        """Several sends of one sender, in order, as few writer jobs as their checks allow.

        ``sends``: (to, body, client_msg_id) each. Returns, per send, the refusal that
        needed no database (a ChatError; or another exception, a bug, confined to that
        send: the caller answers it at once) or None. The others are queued:
        ``on_done(indexes, results, None)`` follows each commit, on the writer's thread,
        with the indexes (into ``sends``) it completes and, for each, its SendOutcome or the
        ChatError that refused it; or ``on_done(indexes, None, error)`` if the whole job
        failed.
        """
        refusals: list[Exception | None] = [None] * len(sends)
        batch: list[_SendJob] = []
        indexes: list[int] = []
        for i, (to, body, client_msg_id) in enumerate(sends):
            try:
                job = self._send_job(sender, to, body, client_msg_id)
            except Exception as exc:  # a refusal, or a bug: either way this send's alone
                refusals[i] = exc
                continue
            if type(job) is _SendJob:
                batch.append(job)
                indexes.append(i)
                continue
            # Another kind of job (a retry over the rate) must come after the sends before
            # it, and its own completion says which send it is.
            if batch:
                self._submit_batch(batch, indexes, on_done, refusals)
                batch, indexes = [], []
            try:
                self.writer.submit_callback(job, _one_of(i, on_done))
            except ChatError as exc:  # shutting down
                refusals[i] = exc
        if batch:
            self._submit_batch(batch, indexes, on_done, refusals)
        return refusals

    def _submit_batch(self, batch: list[_SendJob], indexes: list[int], on_done,
                      refusals: list) -> None:
        if len(batch) == 1:
            job, done = batch[0], _one_of(indexes[0], on_done)
        else:
            job = _SendBatch(batch)

            def done(results, error):
                on_done(indexes, results, error)
        try:
            self.writer.submit_callback(job, done)
        except ChatError as exc:  # shutting down: nothing of it was queued
            for i in indexes:
                refusals[i] = exc

    def _send_job(self, sender: Account, to: str, body: str, client_msg_id: str):
        """The writer job of a send, after the checks that need no database (which raise)."""
        domain.validate_body(body, self.max_message_bytes)
        domain.validate_client_msg_id(client_msg_id)
        try:
            key = domain.name_key(to)
        except InvalidName:
            raise NoSuchAccount(f"there is no account named {domain.shown(to)}") from None
        wait = self.send_limiter.acquire(sender.id)
        if wait:
            refusal = RateLimited("too many messages; slow down",
                                  retry_after_ms=max(1, math.ceil(wait * 1000)))
            if not client_msg_id:
                raise refusal
            # A retry must get its original reply, not a refusal it would retry again.
            return _RetryOverRateJob(sender.id, client_msg_id, refusal)
        message = NewMessage(sender, key, to, body, self.clock(), client_msg_id)
        return _SendJob(message, self.max_queued_per_account, self.announcer)

    def fetch(self, account: Account, limit: int) -> tuple[list[StoredMessage], int]:
        """The oldest undelivered messages and how many more wait after them."""
        limit = domain.clamp(limit, domain.DEFAULT_FETCH_LIMIT, domain.MAX_FETCH_LIMIT)

        def read(repo: Repository):
            found = repo.undelivered(account.id, limit)
            if len(found) < limit:  # the whole queue of this snapshot: no need to count it
                return found, 0
            return found, repo.count_undelivered(account.id) - len(found)

        return self.db.read(read)

    def ack(self, account: Account, message_ids: Iterable[int]) -> int:
        """Delete these acknowledged messages of the account; return how many were removed."""
        ids = list(dict.fromkeys(message_ids))
        if len(ids) > domain.MAX_ACK_IDS:
            raise InvalidRequest(f"at most {domain.MAX_ACK_IDS} ids per acknowledgement")
        # Ids are signed 64-bit in the database; larger ones (valid u64 on the wire) name no
        # message and would overflow the statement's parameters.
        ids = [i for i in ids if 0 < i <= domain.MAX_MESSAGE_ID]
        if not ids:
            return 0
        return self.writer.run(lambda repo: repo.delete_messages(account.id, ids))

