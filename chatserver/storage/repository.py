"""The repository: accounts and messages as collections, over one SQLAlchemy Connection.

It knows nothing of sockets or sessions. Statements are Core statements with bound
parameters, except the hot path on SQLite (store, fetch, ack), which issues fixed SQL text
with bound parameters through the DBAPI cursor of the same connection: building and
compiling Core statements per batch cost more than running them. The caller owns the
transaction (a unit of work or the group-commit writer).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

from sqlalchemy import Connection, and_, delete, func, insert, literal, select, tuple_, update
from sqlalchemy.exc import IntegrityError

from chatserver.domain import (
    LIKE_ESCAPE,
    Account,
    NewMessage,
    SearchPattern,
    SendOutcome,
    StoredMessage,
    shown,
)
from chatserver.errors import (
    ChatError,
    InvalidCredentials,
    NameTaken,
    NoSuchAccount,
    QueueFull,
    StorageUnavailable,
)
from chatserver.storage.tables import accounts, messages, send_receipts

_ACCOUNT_COLUMNS = (accounts.c.id, accounts.c.name, accounts.c.created_at, accounts.c.last_login_at)
_MESSAGE_COLUMNS = (
    messages.c.id,
    messages.c.sender_name,
    messages.c.recipient_id,
    messages.c.sent_at,
    messages.c.body,
)


def _account(row) -> Account:
    return Account(id=row[0], name=row[1], created_at=row[2], last_login_at=row[3])


def _message(row) -> StoredMessage:
    return StoredMessage(id=row[0], sender=row[1], recipient_id=row[2], sent_at=row[3], body=row[4])


def _chunks(items, size: int = 500):
    """Lists of at most ``size`` items: bounds the bound parameters of one IN (...)."""
    items = list(items)
    for start in range(0, len(items), size):
        yield items[start:start + size]


@contextmanager
def _sqlite_savepoint(cur, name: str) -> Iterator[None]:
    """A raw SQLite savepoint (microseconds, unlike SQLAlchemy's nested transaction):
    released if the block succeeds, rolled back and released if it raises."""
    cur.execute(f"SAVEPOINT {name}")
    try:
        yield
    except BaseException:
        try:
            cur.execute(f"ROLLBACK TO {name}")
            cur.execute(f"RELEASE {name}")
        except sqlite3.Error:  # SQLite already rolled the whole transaction back
            pass
        raise
    cur.execute(f"RELEASE {name}")


def _by_sender(keys) -> dict[int, list[str]]:
    """(sender id, client_msg_id) pairs grouped by sender id."""
    grouped: dict[int, list[str]] = {}
    for sender_id, client_msg_id in keys:
        grouped.setdefault(sender_id, []).append(client_msg_id)
    return grouped


def _prefix_upper_bound(prefix: str) -> str | None:
    """The smallest string greater than every string starting with ``prefix``, if any.

    The last character is incremented; surrogates are skipped (they cannot be encoded), and
    a last character of U+10FFFF is dropped and the one before it incremented instead.
    """
    while prefix:
        code_point = ord(prefix[-1]) + 1
        if code_point == 0xD800:
            code_point = 0xE000
        if code_point <= 0x10FFFF:
            return prefix[:-1] + chr(code_point)
        prefix = prefix[:-1]
    return None


# The hot path's SQL for SQLite: fixed text (sqlite3 keeps it prepared), bound parameters only.
_SQLITE_ID_BY_KEY = "SELECT id FROM accounts WHERE name_key = ?"
_SQLITE_ACCOUNT_EXISTS = "SELECT 1 FROM accounts WHERE id = ?"
_SQLITE_COUNT_QUEUED = "SELECT count(*) FROM messages WHERE recipient_id = ?"
_SQLITE_RECEIPT = "SELECT message_id FROM send_receipts WHERE sender_id = ? AND client_msg_id = ?"
_SQLITE_INSERT_MESSAGES = ("INSERT INTO messages (recipient_id, sender_id, sender_name, sent_at,"
                           " body)")
_SQLITE_INSERT_RECEIPTS = ("INSERT INTO send_receipts (sender_id, client_msg_id, message_id,"
                           " created_at)")
# Rows per multi-row INSERT (and ids per DELETE ... IN). sqlite3 releases the GIL around
# every step of a statement, so executemany over n rows hands the GIL to a busy I/O thread
# n times and may wait for it back each time (measured: 15x slower under load). One
# statement of many rows steps once. Chunks are powers of two up to this, so a handful of
# distinct statements stay prepared, and 128 rows x 5 columns stays under the 999
# parameters that older SQLite builds allow.
_SQLITE_ROWS_PER_INSERT = 128
_multi_row_sql: dict[tuple[str, int, int], str] = {}

_SQLITE_UNDELIVERED = ("SELECT id, sender_name, recipient_id, sent_at, body FROM messages"
                       " WHERE recipient_id = ? ORDER BY id LIMIT ?")
_SQLITE_DELETE_MESSAGES = "DELETE FROM messages WHERE recipient_id = ? AND id IN "


def _power_of_two_chunks(count: int) -> Iterator[tuple[int, int]]:
    """(start, size) of consecutive chunks covering ``count`` items: powers of two up to
    _SQLITE_ROWS_PER_INSERT, so that a few statement sizes serve every batch."""
    start = 0
    while start < count:
        size = min(_SQLITE_ROWS_PER_INSERT, 1 << ((count - start).bit_length() - 1))
        yield start, size
        start += size


def _sized_sql(head: str, width: int, rows: int) -> str:
    """``head`` then ``rows`` groups of ``width`` placeholders, ``(?, ?), (?, ?)``; cached."""
    key = (head, width, rows)
    sql = _multi_row_sql.get(key)
    if sql is None:
        group = "(" + ", ".join("?" * width) + ")"
        sql = _multi_row_sql[key] = head + ", ".join([group] * rows)
    return sql


def _insert_rows(cur, insert: str, rows: Sequence[tuple]) -> None:
    """Insert ``rows`` (tuples of equal length) in a few multi-row statements, in order."""
    head = insert + " VALUES "
    width = len(rows[0])
    if len(rows) == 1:  # a lone send's: no chunks to cut, no values to flatten
        cur.execute(_sized_sql(head, width, 1), rows[0])
        return
    for start, size in _power_of_two_chunks(len(rows)):
        cur.execute(_sized_sql(head, width, size),
                    [value for row in rows[start:start + size] for value in row])


def _delete_messages(cur, recipient_id: int, ids: Sequence[int]) -> int:
    """Delete these ids of the recipient in a few ``IN`` statements (same chunking and for
    the same reason as ``_insert_rows``); return how many rows went."""
    deleted = 0
    for start, size in _power_of_two_chunks(len(ids)):
        cur.execute(_sized_sql(_SQLITE_DELETE_MESSAGES, size, 1),
                    [recipient_id, *ids[start:start + size]])
        deleted += cur.rowcount
    return deleted


class WriteCache:
    """What the writer learned in earlier transactions, so a send batch need not ask again.

    ``account_ids`` (name key -> id) and ``live_ids`` (accounts known to exist) only hold
    what was found (an unknown name is looked up every time: another process may create
    it); ``queued`` holds each recipient's exact undelivered count. It is valid only while
    the writer's own transactions are the only writes: ``Repository`` drops it when SQLite's
    ``data_version`` says another connection committed, the writer drops it when a batch or
    a job is rolled back, and ``delete_account`` drops it. Should something stale slip
    through anyway, the foreign keys of ``messages`` refuse the insert and the batch is done
    again the careful way.
    """

    MAX_ENTRIES = 100_000  # per map; beyond, it starts over rather than grow without bound

    __slots__ = ("account_ids", "data_version", "live_ids", "queued")

    def __init__(self):
        self.account_ids: dict[str, int] = {}
        self.live_ids: set[int] = set()
        self.queued: dict[int, int] = {}
        self.data_version: int | None = None

    def clear(self) -> None:
        self.account_ids.clear()
        self.live_ids.clear()
        self.queued.clear()

    def trim(self) -> None:
        if len(self.account_ids) > self.MAX_ENTRIES:
            self.account_ids.clear()
        if len(self.live_ids) > self.MAX_ENTRIES:
            self.live_ids.clear()
        if len(self.queued) > self.MAX_ENTRIES:
            self.queued.clear()


def sqlite_storage_error(exc: sqlite3.Error) -> Exception:
    """A raw sqlite3 error as the writer and units of work expect them from SQLAlchemy."""
    if isinstance(exc, sqlite3.OperationalError):
        return StorageUnavailable(f"the database is unavailable: {exc}")
    return exc


class TransactionSpoiled(Exception):
    """A repository that owns its transaction wrote part of a batch, then met a key
    violation that the careful path would turn into refusals (a ``client_msg_id`` of an
    earlier transaction, a stale cache). Without a savepoint that part cannot be undone
    alone: roll the whole transaction back and store the batch again in a transaction with
    savepoints (a ``Repository`` that does not own it). Nothing is stored twice."""


class Repository:
    """Accounts and undelivered messages, read and written through ``conn``.

    ``cache`` is given by the group-commit writer only: the repository of one of its
    transactions may then trust what earlier transactions learned (see ``WriteCache``).
    ``owns_transaction``: see ``TransactionSpoiled``.
    """

    def __init__(self, conn: Connection, cache: WriteCache | None = None, *,
                 owns_transaction: bool = False, cursor=None):
        self.conn = conn
        self._sqlite = conn.dialect.name == "sqlite"
        self._cache = cache if self._sqlite else None
        self._cache_checked = False
        self._raw_cursor = cursor  # a DBAPI cursor of conn, if the caller keeps one
        # The caller rolls the whole transaction back if a write of this repository fails,
        # and nothing but this repository's writes is in it: a batch then needs no
        # savepoint to be all or nothing (see TransactionSpoiled).
        self._owns_transaction = owns_transaction

    def _cursor(self):
        """A DBAPI cursor on this connection, inside the caller's transaction."""
        if self._raw_cursor is None:
            self._raw_cursor = self.conn.connection.driver_connection.cursor()
        return self._raw_cursor

    def _valid_cache(self) -> WriteCache | None:
        """The writer's cache, emptied first if another connection committed since last time.

        ``PRAGMA data_version`` changes when any other connection (``chat admin``, another
        server, a unit of work) commits; checked once per transaction, inside it, when this
        writer holds the write lock, so nothing else can commit before this one ends.
        """
        cache = self._cache
        if cache is not None and not self._cache_checked:
            try:
                version = self._cursor().execute("PRAGMA data_version").fetchone()[0]
            except sqlite3.Error as exc:
                raise sqlite_storage_error(exc) from exc
            if version != cache.data_version:
                cache.clear()
                cache.data_version = version
            cache.trim()
            self._cache_checked = True
        return cache

    def forget_cached(self) -> None:
        """Drop what the writer cached (after a write that bypassed the repository)."""
        if self._cache is not None:
            self._cache.clear()

    # -- accounts ---------------------------------------------------------------------------

    def add_account(self, name: str, key: str, password_hash: str, now: int) -> Account:
        """Insert an account; raise NameTaken if ``key`` is in use (by any process)."""
        if self.account_id_by_key(key) is not None:
            raise NameTaken(f"the name {name!r} is taken")
        try:
            with self.conn.begin_nested():
                new_id = self.conn.execute(
                    insert(accounts).values(
                        name=name, name_key=key, password_hash=password_hash,
                        created_at=now, last_login_at=now,
                    )
                ).inserted_primary_key[0]
        except IntegrityError:  # another process registered it between check and insert
            raise NameTaken(f"the name {name!r} is taken") from None
        return Account(id=new_id, name=name, created_at=now, last_login_at=now)

    def account_id_by_key(self, key: str) -> int | None:
        return self.conn.execute(select(accounts.c.id).where(accounts.c.name_key == key)).scalar()

    def get_by_key(self, key: str) -> tuple[Account, str] | None:
        """The account with this name key (with its ``password_version``) and its password
        hash, or None. Both from one statement: a login sees the hash and the version of
        the same moment."""
        row = self.conn.execute(
            select(*_ACCOUNT_COLUMNS, accounts.c.password_hash, accounts.c.password_version)
            .where(accounts.c.name_key == key)
        ).first()
        if row is None:
            return None
        return Account(row[0], row[1], row[2], row[3], password_version=row[5]), row[4]

    def get(self, account_id: int) -> Account | None:
        row = self.conn.execute(select(*_ACCOUNT_COLUMNS).where(accounts.c.id == account_id)).first()
        return None if row is None else _account(row)

    def password_hash(self, account_id: int) -> str | None:
        return self.conn.execute(
            select(accounts.c.password_hash).where(accounts.c.id == account_id)
        ).scalar()

    def set_password_hash(self, account_id: int, password_hash: str) -> None:
        self.conn.execute(
            update(accounts).where(accounts.c.id == account_id).values(password_hash=password_hash)
        )

    def reset_password_hash(self, account_id: int, password_hash: str) -> None:
        """An administrator's new password: the hash, and one more reset for the account,
        which ends the sessions that logged in before it (``password_versions``).
        (``set_password_hash`` is the same password re-hashed: sessions stay.)"""
        self.conn.execute(
            update(accounts).where(accounts.c.id == account_id).values(
                password_hash=password_hash, password_version=accounts.c.password_version + 1)
        )

    def password_versions(self, account_ids: Iterable[int]) -> dict[int, int]:
        """``password_version`` of each of these accounts that still exists."""
        found: dict[int, int] = {}
        for chunk in _chunks(account_ids):
            rows = self.conn.execute(select(accounts.c.id, accounts.c.password_version)
                                     .where(accounts.c.id.in_(chunk)))
            found.update((r[0], r[1]) for r in rows)
        return found

    def record_login(self, account_id: int, now: int) -> None:
        self.conn.execute(
            update(accounts).where(accounts.c.id == account_id).values(last_login_at=now)
        )

    def search(self, pattern: SearchPattern, after: str, limit: int) -> list[Account]:
        """Accounts whose name key matches, ordered by key, strictly after ``after``.

        The literal prefix becomes a key range so the unique index on ``name_key`` serves
        prefix searches on any backend; LIKE then filters within the range.
        """
        key = accounts.c.name_key
        # No name key holds U+0000, and PostgreSQL cannot bind it in text: a pattern with it
        # matches nothing, and an ``after`` cut at it marks the same place in key order.
        if "\x00" in pattern.like:
            return []
        after = after.split("\x00", 1)[0]
        conditions = [key.like(pattern.like, escape=LIKE_ESCAPE)]
        if pattern.prefix:
            conditions.append(key >= pattern.prefix)
            upper = _prefix_upper_bound(pattern.prefix)
            if upper is not None:
                conditions.append(key < upper)
        if after:
            conditions.append(key > after.casefold())
        rows = self.conn.execute(
            select(*_ACCOUNT_COLUMNS).where(and_(*conditions)).order_by(key).limit(limit)
        )
        return [_account(r) for r in rows]

    def delete_account(self, account_id: int) -> int:
        """Delete the account and its undelivered incoming messages; return how many."""
        discarded = self.count_undelivered(account_id)
        # Explicit deletes rather than relying on ON DELETE CASCADE alone, so the outcome does
        # not depend on the foreign_keys pragma of whoever opened the file.
        self.conn.execute(delete(messages).where(messages.c.recipient_id == account_id))
        self.conn.execute(delete(send_receipts).where(send_receipts.c.sender_id == account_id))
        # The messages it sent stay as they are (sender_id is a record, not a reference).
        self.conn.execute(delete(accounts).where(accounts.c.id == account_id))
        self.forget_cached()  # rare: simpler to start over than to find every trace of it
        return discarded

    # -- messages ---------------------------------------------------------------------------

    def add_message(
        self, sender: Account, recipient_id: int, body: str, now: int, client_msg_id: str = ""
    ) -> int:
        """Store a message and, with a client_msg_id, its receipt; return the new id."""
        if self._cache is not None:
            self._cache.queued.pop(recipient_id, None)
        message_id = self.conn.execute(
            insert(messages).values(
                recipient_id=recipient_id, sender_id=sender.id, sender_name=sender.name,
                sent_at=now, body=body,
            )
        ).inserted_primary_key[0]
        if client_msg_id:
            self.conn.execute(
                insert(send_receipts).values(
                    sender_id=sender.id, client_msg_id=client_msg_id,
                    message_id=message_id, created_at=now,
                )
            )
        return message_id

    def store_messages(self, batch: Sequence[NewMessage], cap: int = 0
                       ) -> list[SendOutcome | ChatError]:
        """Store a batch of sends: each gets its outcome or its refusal, in order.

        Refusals, checked in this order: unknown recipient, sender deleted meanwhile, a
        duplicate ``client_msg_id`` (the earlier message id is returned and nothing is
        stored), recipient's queue at ``cap`` (0 = no cap). All or nothing: on an exception
        nothing of the batch is stored, so the writer needs no savepoint around it (with
        ``owns_transaction``, once the caller has rolled back, as it must).

        In the writer's transactions on SQLite, the cheap path (``_store_cached``) is tried
        first. On PostgreSQL another process (a second server, ``chat admin``) can commit
        between the checks and the inserts: the same sender's client_msg_id (a retry through
        another server) or the deletion of a recipient. The insert then violates a key; the
        batch is undone to a savepoint and checked again once, now seeing that commit, so
        the retry becomes a duplicate and the deleted recipient an unknown one instead of
        one failure for every send of the batch.
        """
        if self._sqlite:
            return self._store_messages_sqlite(batch, cap)
        try:
            with self.conn.begin_nested():
                return self._store_messages_once(batch, cap)
        except IntegrityError:
            with self.conn.begin_nested():
                return self._store_messages_once(batch, cap)

    def _store_messages_sqlite(self, batch: Sequence[NewMessage], cap: int
                               ) -> list[SendOutcome | ChatError]:
        """SQLite: the writer holds the write lock, so nothing changes between checks and inserts.

        A raw savepoint (a few microseconds, unlike SQLAlchemy's) makes the batch all or
        nothing. If the cached path meets a key violation (a client_msg_id used in an
        earlier batch, or a cached account that no longer exists) its work is undone, the
        cache dropped, and the batch checked the careful way. A repository that owns its
        transaction takes no savepoint: its caller rolls back on failure, and the key
        violation is TransactionSpoiled.
        """
        cache = self._valid_cache()
        cur = self._cursor()
        try:
            if cache is not None and self._owns_transaction:
                # No savepoint (two of a lone send's seven statements): on any failure the
                # caller rolls back the transaction, which holds this batch alone.
                try:
                    return self._store_cached(cur, cache, batch, cap)
                except sqlite3.IntegrityError as exc:
                    raise TransactionSpoiled(
                        "a key violation in a batch stored without a savepoint") from exc
            with _sqlite_savepoint(cur, "store_messages"):
                if cache is None:
                    return self._store_messages_once(batch, cap)
                try:
                    return self._store_cached(cur, cache, batch, cap)
                except sqlite3.IntegrityError:
                    cur.execute("ROLLBACK TO store_messages")
                    cache.clear()
                    return self._store_messages_once(batch, cap)
        except BaseException as exc:
            if cache is not None:
                cache.clear()  # it may hold what was just undone
            if isinstance(exc, sqlite3.Error):
                raise sqlite_storage_error(exc) from exc
            raise

    def _store_cached(self, cur, cache: WriteCache, batch: Sequence[NewMessage], cap: int
                      ) -> list[SendOutcome | ChatError]:
        """The batch with what the cache knows, one lookup per thing it does not.

        Receipts are not looked up: a client_msg_id used in an earlier batch makes the
        receipt insert fail (primary key), and the caller redoes the batch carefully. Only a
        send about to be refused for a full queue looks its receipt up, since a duplicate
        comes before the cap.
        """
        account_ids = cache.account_ids
        live_ids = cache.live_ids
        queued = cache.queued
        outcomes: list = []
        rows: list[tuple] = []
        row_of: list[int] = []  # index in outcomes of each row
        pending: dict[tuple[int, str], int] = {}  # receipts first used in this batch -> row
        recounted: set[int] = set()  # recipients counted exactly in this batch
        for m in batch:
            recipient_id = account_ids.get(m.recipient_key)
            if recipient_id is None:
                found = cur.execute(_SQLITE_ID_BY_KEY, (m.recipient_key,)).fetchone()
                if found is None:
                    outcomes.append(
                        NoSuchAccount(f"there is no account named {shown(m.recipient_name)}"))
                    continue
                recipient_id = account_ids[m.recipient_key] = found[0]
            sender = m.sender
            sender_id = sender.id
            if sender_id not in live_ids:
                if cur.execute(_SQLITE_ACCOUNT_EXISTS, (sender_id,)).fetchone() is None:
                    outcomes.append(InvalidCredentials("this account no longer exists"))
                    continue
                live_ids.add(sender_id)
            client_msg_id = m.client_msg_id
            if client_msg_id:
                receipt_key = (sender_id, client_msg_id)
                first = pending.get(receipt_key)
                if first is not None:
                    outcomes.append(first)  # resolved below to a duplicate of that row
                    continue
            if cap:
                count = queued.get(recipient_id)
                if count is None:  # (then none of this batch's rows is for it yet)
                    count = cur.execute(_SQLITE_COUNT_QUEUED, (recipient_id,)).fetchone()[0]
                elif count >= cap and recipient_id not in recounted:
                    # Refusing: count exactly first, the stored ones plus this batch's.
                    recounted.add(recipient_id)
                    count = cur.execute(_SQLITE_COUNT_QUEUED, (recipient_id,)).fetchone()[0]
                    count += sum(1 for row in rows if row[0] == recipient_id)
                if count >= cap:
                    queued[recipient_id] = count
                    earlier = client_msg_id and cur.execute(
                        _SQLITE_RECEIPT, (sender_id, client_msg_id)).fetchone()
                    if earlier:
                        outcomes.append(SendOutcome(earlier[0], recipient_id, True, None))
                    else:
                        outcomes.append(QueueFull(f"{shown(m.recipient_name)} has {cap} "
                                                  "undelivered messages waiting; try again later"))
                    continue
                queued[recipient_id] = count + 1
            if client_msg_id:
                pending[receipt_key] = len(rows)
            row_of.append(len(outcomes))
            outcomes.append(None)
            rows.append((recipient_id, sender_id, sender.name, m.sent_at, m.body))
        if not rows:
            return outcomes
        _insert_rows(cur, _SQLITE_INSERT_MESSAGES, rows)
        # The writer holds the write lock and ids are AUTOINCREMENT: these statements' rows
        # got consecutive ids, in order, ending at the last one inserted.
        last_id = cur.lastrowid
        first_id = last_id - len(rows) + 1
        for offset, (index, row) in enumerate(zip(row_of, rows)):
            message_id = first_id + offset
            outcomes[index] = SendOutcome(message_id, row[0], False, StoredMessage(
                message_id, row[2], row[0], row[3], row[4]))
        if len(row_of) < len(outcomes):
            for i, outcome in enumerate(outcomes):
                if type(outcome) is int:  # a repeat, within this batch, of a row's client id
                    outcomes[i] = SendOutcome(first_id + outcome, rows[outcome][0], True, None)
        if pending:
            _insert_rows(cur, _SQLITE_INSERT_RECEIPTS, [
                (sender_id, client_msg_id, first_id + row, rows[row][3])
                for (sender_id, client_msg_id), row in pending.items()])
        return outcomes

    def _store_messages_once(self, batch: Sequence[NewMessage], cap: int = 0
                             ) -> list[SendOutcome | ChatError]:
        """Accept a batch of sends with a handful of Core statements, checking everything.

        Every check happens before the insert, so refusals need no savepoints.
        """
        recipients = self._ids_by_key({m.recipient_key for m in batch})
        live_senders = self.existing_ids({m.sender.id for m in batch})
        receipts = self._receipts({(m.sender.id, m.client_msg_id) for m in batch
                                   if m.client_msg_id})
        queued = self._undelivered_counts(set(recipients.values())) if cap else {}
        outcomes: list[SendOutcome | ChatError | None] = []
        rows: list[dict] = []
        row_of: list[int] = []  # index in outcomes of each row
        pending_receipts: dict[tuple[int, str], int] = {}  # receipts first used in this batch
        for m in batch:
            recipient_id = recipients.get(m.recipient_key)
            if recipient_id is None:
                outcomes.append(NoSuchAccount(f"there is no account named {shown(m.recipient_name)}"))
                continue
            if m.sender.id not in live_senders:
                outcomes.append(InvalidCredentials("this account no longer exists"))
                continue
            receipt_key = (m.sender.id, m.client_msg_id)
            if m.client_msg_id and receipt_key in receipts:
                outcomes.append(SendOutcome(receipts[receipt_key], recipient_id, True, None))
                continue
            if m.client_msg_id and receipt_key in pending_receipts:
                outcomes.append(pending_receipts[receipt_key])  # resolved below to a duplicate
                continue
            if cap:
                if queued.get(recipient_id, 0) >= cap:
                    outcomes.append(QueueFull(f"{shown(m.recipient_name)} has {cap} undelivered "
                                              "messages waiting; try again later"))
                    continue
                queued[recipient_id] = queued.get(recipient_id, 0) + 1
            if m.client_msg_id:
                pending_receipts[receipt_key] = len(rows)
            row_of.append(len(outcomes))
            outcomes.append(None)
            rows.append({"recipient_id": recipient_id, "sender_id": m.sender.id,
                         "sender_name": m.sender.name, "sent_at": m.sent_at, "body": m.body})
        if not rows:
            return outcomes
        ids = self.conn.execute(
            insert(messages).returning(messages.c.id, sort_by_parameter_order=True), rows
        ).scalars().all()
        for index, row, message_id in zip(row_of, rows, ids):
            m = batch[index]
            outcomes[index] = SendOutcome(message_id, row["recipient_id"], False, StoredMessage(
                message_id, m.sender.name, row["recipient_id"], m.sent_at, m.body))
        for i, outcome in enumerate(outcomes):
            if isinstance(outcome, int):  # a repeat, within this batch, of a row's client id
                first = outcomes[row_of[outcome]]
                outcomes[i] = SendOutcome(first.message_id, first.recipient_id, True, None)
        if pending_receipts:
            self.conn.execute(insert(send_receipts), [
                {"sender_id": sender_id, "client_msg_id": client_msg_id,
                 "message_id": ids[row], "created_at": rows[row]["sent_at"]}
                for (sender_id, client_msg_id), row in pending_receipts.items()])
        return outcomes

    def _ids_by_key(self, keys: set[str]) -> dict[str, int]:
        found: dict[str, int] = {}
        for chunk in _chunks(keys):
            rows = self.conn.execute(
                select(accounts.c.name_key, accounts.c.id).where(accounts.c.name_key.in_(chunk)))
            found.update((r[0], r[1]) for r in rows)
        return found

    def _receipts(self, keys: set[tuple[int, str]]) -> dict[tuple[int, str], int]:
        """The message ids of these (sender id, client_msg_id) receipts that exist.

        One query per sender, ``sender_id = ? AND client_msg_id IN (...)``: a search of the
        primary key. (A row-value ``(sender_id, client_msg_id) IN (...)`` made SQLite scan
        the whole table: every retried send cost O(all receipts ever kept).)
        """
        found: dict[tuple[int, str], int] = {}
        for sender_id, ids in _by_sender(keys).items():
            for chunk in _chunks(ids):
                rows = self.conn.execute(
                    select(send_receipts.c.client_msg_id, send_receipts.c.message_id).where(
                        send_receipts.c.sender_id == sender_id,
                        send_receipts.c.client_msg_id.in_(chunk)))
                found.update(((sender_id, r[0]), r[1]) for r in rows)
        return found

    def _undelivered_counts(self, recipient_ids: set[int]) -> dict[int, int]:
        counts: dict[int, int] = {}
        for chunk in _chunks(recipient_ids):
            rows = self.conn.execute(
                select(messages.c.recipient_id, func.count())
                .where(messages.c.recipient_id.in_(chunk)).group_by(messages.c.recipient_id))
            counts.update((r[0], r[1]) for r in rows)
        return counts

    def receipt(self, sender_id: int, client_msg_id: str) -> int | None:
        """The message id an earlier send with this client_msg_id got, or None."""
        return self.conn.execute(
            select(send_receipts.c.message_id).where(
                send_receipts.c.sender_id == sender_id,
                send_receipts.c.client_msg_id == client_msg_id,
            )
        ).scalar()

    def undelivered(self, recipient_id: int, limit: int) -> list[StoredMessage]:
        """The recipient's unacknowledged messages, oldest first."""
        if self._sqlite:
            try:
                rows = self._cursor().execute(_SQLITE_UNDELIVERED, (recipient_id, limit)).fetchall()
            except sqlite3.Error as exc:
                raise sqlite_storage_error(exc) from exc
            return [StoredMessage(*row) for row in rows]
        rows = self.conn.execute(
            select(*_MESSAGE_COLUMNS)
            .where(messages.c.recipient_id == recipient_id)
            .order_by(messages.c.id)
            .limit(limit)
        )
        return [_message(r) for r in rows]

    def count_all_undelivered(self) -> int:
        """Messages stored and not yet acknowledged, for every account."""
        return self.conn.execute(select(func.count()).select_from(messages)).scalar_one()

    def existing_ids(self, account_ids: Iterable[int]) -> set[int]:
        """Which of these account ids still exist."""
        ids = list(account_ids)
        if not ids:
            return set()
        rows = self.conn.execute(select(accounts.c.id).where(accounts.c.id.in_(ids)))
        return {r[0] for r in rows}

    def messages_by_ids(self, message_ids: Iterable[int]) -> list[StoredMessage]:
        """These messages, those still undelivered, by id."""
        found: list[StoredMessage] = []
        for chunk in _chunks(sorted(message_ids)):
            rows = self.conn.execute(
                select(*_MESSAGE_COLUMNS).where(messages.c.id.in_(chunk)).order_by(messages.c.id))
            found += [_message(r) for r in rows]
        return found

    def undelivered_after(self, recipient_ids: Iterable[int], after_id: int, limit: int
                          ) -> list[StoredMessage]:
        """The undelivered messages of these recipients with ids above ``after_id``, lowest
        id first, at most ``limit``."""
        found: list[StoredMessage] = []
        for chunk in _chunks(sorted(set(recipient_ids))):
            rows = self.conn.execute(
                select(*_MESSAGE_COLUMNS)
                .where(messages.c.recipient_id.in_(chunk), messages.c.id > after_id)
                .order_by(messages.c.id).limit(limit))
            found += [_message(r) for r in rows]
        found.sort(key=lambda m: m.id)
        return found[:limit]

    def notify(self, channel: str, payload: str) -> None:
        """PostgreSQL: NOTIFY ``channel`` at this transaction's commit (storage/announce.py)."""
        self.conn.execute(select(func.pg_notify(channel, payload)))

    def count_undelivered(self, recipient_id: int) -> int:
        if self._sqlite:
            try:
                return self._cursor().execute(_SQLITE_COUNT_QUEUED, (recipient_id,)).fetchone()[0]
            except sqlite3.Error as exc:
                raise sqlite_storage_error(exc) from exc
        return self.conn.execute(
            select(func.count()).select_from(messages).where(messages.c.recipient_id == recipient_id)
        ).scalar_one()

    def delete_messages(self, recipient_id: int, ids: Iterable[int]) -> int:
        """Delete the listed messages of this recipient (acknowledged); return how many.

        Always by explicit id: a message stored after the client's fetch stays queued.
        """
        ids = list(ids)
        if not ids:
            return 0
        if self._sqlite:
            cache = self._valid_cache()
            cur = self._cursor()
            try:
                # A statement that fails undoes only itself; the savepoint makes it all or none.
                with _sqlite_savepoint(cur, "delete_messages"):
                    deleted = _delete_messages(cur, recipient_id, ids)
            except sqlite3.Error as exc:
                raise sqlite_storage_error(exc) from exc
            if cache is not None and recipient_id in cache.queued:
                cache.queued[recipient_id] -= deleted
            return deleted
        result = self.conn.execute(
            delete(messages).where(messages.c.recipient_id == recipient_id, messages.c.id.in_(ids))
        )
        return result.rowcount

    # -- administration ---------------------------------------------------------------------

    def account_summaries(
        self, pattern: SearchPattern, limit: int | None = None
    ) -> Sequence[tuple[Account, int]]:
        """Accounts matching ``pattern`` with their undelivered counts, ordered by name key."""
        counts = (
            select(messages.c.recipient_id, func.count().label("n"))
            .group_by(messages.c.recipient_id)
            .subquery()
        )
        stmt = (
            select(*_ACCOUNT_COLUMNS, func.coalesce(counts.c.n, 0))
            .select_from(accounts.outerjoin(counts, counts.c.recipient_id == accounts.c.id))
            .where(accounts.c.name_key.like(pattern.like, escape=LIKE_ESCAPE))
            .order_by(accounts.c.name_key)
        )
        if limit is not None:
            stmt = stmt.limit(limit)
        return [(_account(r), r[4]) for r in self.conn.execute(stmt)]

    # -- administration: statistics and retention (``chat admin``) -------------------------

    def count_accounts(self) -> int:
        return self.conn.execute(select(func.count()).select_from(accounts)).scalar_one()

    def undelivered_totals(self) -> tuple[int, int | None]:
        """How many messages wait in all, and when the oldest of them was sent (or None)."""
        row = self.conn.execute(
            select(func.count(), func.min(messages.c.sent_at)).select_from(messages)
        ).one()
        return row[0], row[1]

    def oldest_undelivered_at(self, recipient_id: int) -> int | None:
        """When the recipient's oldest waiting message was sent, or None."""
        return self.conn.execute(
            select(func.min(messages.c.sent_at)).where(messages.c.recipient_id == recipient_id)
        ).scalar()

    def count_messages_sent_before(self, cutoff: int) -> tuple[int, int]:
        """Waiting messages sent before ``cutoff`` (ms) and how many recipients they have."""
        row = self.conn.execute(
            select(func.count(), func.count(messages.c.recipient_id.distinct()))
            .where(messages.c.sent_at < cutoff)
        ).one()
        return row[0], row[1]

    def message_ids_sent_before(self, cutoff: int, after_id: int, limit: int) -> list[int]:
        """Ids above ``after_id`` of messages sent before ``cutoff``, ascending, at most ``limit``.

        Walking by id (the primary key) makes a batched purge one pass over the table.
        """
        return list(self.conn.execute(
            select(messages.c.id)
            .where(messages.c.id > after_id, messages.c.sent_at < cutoff)
            .order_by(messages.c.id)
            .limit(limit)
        ).scalars())

    def delete_messages_sent_before(self, cutoff: int, ids: Iterable[int]) -> int:
        """Delete the listed messages (of any recipient) if still sent before ``cutoff``."""
        ids = list(ids)
        if not ids:
            return 0
        self.forget_cached()
        return self.conn.execute(
            delete(messages).where(messages.c.id.in_(ids), messages.c.sent_at < cutoff)
        ).rowcount

    def count_receipts_created_before(self, cutoff: int) -> int:
        return self.conn.execute(
            select(func.count()).select_from(send_receipts)
            .where(send_receipts.c.created_at < cutoff)
        ).scalar_one()

    def delete_receipts_created_before(self, cutoff: int, after: tuple[int, str] | None,
                                       limit: int) -> tuple[int, tuple[int, str] | None]:
        """Look at the next ``limit`` send receipts in key order after the key ``after``
        (None: from the start) and delete those created before ``cutoff``. Returns how many
        were deleted and the key to go on after (None once the walk is done).

        A walk of the primary key, ``limit`` rows per call, whatever their age: there is no
        index on ``created_at`` (every send would pay for it), and each call then holds the
        write lock for a bounded time.
        """
        key = (send_receipts.c.sender_id, send_receipts.c.client_msg_id)
        query = select(*key, send_receipts.c.created_at).order_by(*key).limit(limit)
        if after is not None:
            # Typed binds: on PostgreSQL client_msg_id is stored as bytes (NulSafeString).
            query = query.where(tuple_(*key) > tuple_(*(literal(v, c.type) for v, c in zip(after, key))))
        rows = self.conn.execute(query).all()
        if not rows:
            return 0, None
        old = [(r[0], r[1]) for r in rows if r[2] < cutoff]
        deleted = 0
        for sender_id, ids in _by_sender(old).items():  # primary-key searches, no scan
            for chunk in _chunks(ids):
                deleted += self.conn.execute(
                    delete(send_receipts).where(send_receipts.c.sender_id == sender_id,
                                                send_receipts.c.client_msg_id.in_(chunk))
                ).rowcount
        return deleted, (rows[-1][0], rows[-1][1]) if len(rows) == limit else None
