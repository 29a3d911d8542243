"""Statements on the paths that grow with the data use an index, never a table scan.

Each test captures the SQL the repository really sends (SQLAlchemy's before_cursor_execute)
and asks SQLite for its query plan. A send receipt is kept long after its message is
delivered, so a scan of ``send_receipts`` made every retried send cost O(all receipts).
"""

from __future__ import annotations

import sqlite3

from sqlalchemy import event

from chatserver.domain import Account, NewMessage
from chatserver.storage.repository import Repository


def plans_of(db, work) -> list[tuple[str, list[str]]]:
    """Run ``work(repo)`` in a write transaction; (statement, plan details) of each
    statement it ran that reads or deletes send_receipts."""
    captured: list[tuple[str, tuple]] = []

    def capture(_conn, _cursor, statement, parameters, _context, executemany):
        if "send_receipts" in statement and not executemany \
                and statement.lstrip().upper().startswith(("SELECT", "DELETE")):
            captured.append((statement, tuple(parameters or ())))

    event.listen(db.write_engine, "before_cursor_execute", capture)
    try:
        with db.unit_of_work() as uow:
            work(uow.repo)
            uow.commit()
    finally:
        event.remove(db.write_engine, "before_cursor_execute", capture)
    conn = sqlite3.connect(db.path)
    try:
        return [(sql, [row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + sql, params)])
                for sql, params in captured]
    finally:
        conn.close()


def accounts(db, *names: str) -> list[Account]:
    with db.unit_of_work() as uow:
        made = [uow.repo.add_account(n, n.casefold(), "h", 1) for n in names]
        uow.commit()
    return made


def test_duplicate_check_of_a_send_searches_the_receipts_key(db):
    alice, bob = accounts(db, "alice", "bob")
    first = [NewMessage(alice, "bob", "bob", f"m{i}", 1, f"id-{i}") for i in range(3)]

    def store(repo: Repository):
        repo.store_messages(first)

    plans_of(db, store)

    def retry(repo: Repository):  # every id was used before: the careful path checks them
        outcomes = repo.store_messages(first + [
            NewMessage(alice, "bob", "bob", "new", 1, "id-new")])
        assert [o.duplicate for o in outcomes] == [True, True, True, False]
        assert repo._receipts({(alice.id, "id-0"), (bob.id, "nope")}) == {
            (alice.id, "id-0"): outcomes[0].message_id}

    plans = plans_of(db, retry)
    assert plans, "no receipt lookup was captured"
    for sql, plan in plans:
        assert not any(step.startswith("SCAN send_receipts") for step in plan), (sql, plan)
        assert any("send_receipts USING" in step for step in plan), (sql, plan)


def test_receipt_purge_deletes_by_the_key(db):
    alice, bob = accounts(db, "alice", "bob")

    def store(repo: Repository):
        repo.store_messages([NewMessage(s, "bob", "bob", "m", 1, f"{s.name}-{i}")
                             for s in (alice, bob) for i in range(4)])

    plans_of(db, store)
    results = []
    plans = plans_of(db, lambda repo: results.append(
        repo.delete_receipts_created_before(cutoff=10, after=None, limit=5)))
    assert results[0][0] == 5
    after = results[0][1]
    plans += plans_of(db, lambda repo: results.append(
        repo.delete_receipts_created_before(cutoff=10, after=after, limit=5)))
    assert results[1] == (3, None)  # the walk ended: fewer than 5 rows were left
    deletes = [(sql, plan) for sql, plan in plans if sql.lstrip().upper().startswith("DELETE")]
    assert deletes
    for sql, plan in deletes:
        assert not any(step.startswith("SCAN send_receipts") for step in plan), (sql, plan)
    # The walk resumes by searching the key, not by scanning up to where it stopped.
    resumed = [(sql, plan) for sql, plan in plans if "ORDER BY" in sql and ">" in sql]
    assert resumed
    for sql, plan in resumed:
        assert any(step.startswith("SEARCH send_receipts") for step in plan), (sql, plan)


def test_an_ack_deletes_by_key_whatever_its_length(db):
    alice, bob = accounts(db, "alice", "bob")
    with db.unit_of_work() as uow:
        ids = [uow.repo.add_message(alice, bob.id, "m", 1, "") for _ in range(300)]
        uow.commit()
    statements: list[tuple[str, tuple]] = []

    class Recording:  # the repository's raw cursor, recording what it runs
        def __init__(self, cursor):
            self.cursor = cursor

        def execute(self, sql, params=()):
            statements.append((sql, tuple(params)))
            return self.cursor.execute(sql, params)

        def __getattr__(self, name):
            return getattr(self.cursor, name)

    with db.unit_of_work() as uow:
        uow.repo._raw_cursor = Recording(uow.repo._cursor())
        assert uow.repo.delete_messages(bob.id, ids) == 300
        uow.commit()
    deletes = [(sql, params) for sql, params in statements if sql.startswith("DELETE")]
    assert [len(params) - 1 for _sql, params in deletes] == [128, 128, 32, 8, 4]
    conn = sqlite3.connect(db.path)
    try:
        for sql, params in deletes:
            plan = [row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + sql, params)]
            assert any(step.startswith("SEARCH messages") for step in plan), (sql, plan)
            assert not any(step.startswith("SCAN") for step in plan), (sql, plan)
    finally:
        conn.close()
