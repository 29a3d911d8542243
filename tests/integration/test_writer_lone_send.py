"""A lone send committed inline (``GroupCommitWriter._commit_atomic``): its transaction is
begun and committed on the driver connection, without SQLAlchemy's transaction object
(unless a job went through SQLAlchemy, which then commits it), and without a savepoint:
a job that fails is rolled back with the whole transaction.

Every outcome is checked from another connection: committed before ``done`` ran, or not at
all. SQLAlchemy's own "commit" event tells which of the two commits was taken.
"""

from __future__ import annotations

import threading

import pytest

from chatserver.domain import SendOutcome
from chatserver.errors import NoSuchAccount, StorageUnavailable
from chatserver.service import ChatService
from chatserver.storage.writer import GroupCommitWriter
from tests.e2e.helpers import wait_until

from .conftest import (
    PASSWORD,
    add,
    break_commits,
    committed_bodies,
    committed_names,
    trace_statements,
)


class Done:
    """A send's ``on_done``: what it was told, on which thread, and what was committed."""

    def __init__(self, db):
        self.db = db
        self.calls: list[tuple] = []

    def __call__(self, outcome, error):
        self.calls.append((outcome, error, threading.get_ident(), committed_bodies(self.db)))

    @property
    def last(self):
        return self.calls[-1]


@pytest.fixture
def commits():
    """(batch size, seconds) per commit the writer reports."""
    return []


@pytest.fixture
def writer(db, commits):
    """conftest's writer, reporting its commits; conftest's ``service`` is built on it."""
    w = GroupCommitWriter(db.write_engine, on_commit=lambda n, s: commits.append((n, s)))
    yield w
    w.close()


class InTransaction:
    """A bulk job without a savepoint (as sends are) that tells whether it runs inside a
    transaction: a BEGIN left pending by an inline commit would make it run without one."""

    bulk_is_atomic = True

    @staticmethod
    def run_bulk(repo, jobs):
        return [repo.conn.connection.driver_connection.in_transaction for _ in jobs]


def send(service, sender, body, client_msg_id="", to="Bob", done=None):
    service.submit_send(sender, to, body, client_msg_id, on_done=done, inline_if_idle=True)


def test_a_lone_send_is_committed_on_the_driver_before_done_runs(
        db, service, writer, alice, bob, commits, sqlalchemy_commits):
    done = Done(db)
    commits.clear()
    send(service, alice, "hello", "c-1", done=done)
    outcome, error, thread, committed = done.last
    assert error is None and type(outcome) is SendOutcome and not outcome.duplicate
    assert thread == threading.get_ident()  # inline, before submit_send returned
    assert committed == ["hello"]
    assert sqlalchemy_commits == []  # SQLAlchemy's transaction object was not used
    assert [n for n, _ in commits] == [1] and commits[0][1] >= 0
    assert writer.idle


def test_a_lone_send_repeating_an_earlier_client_msg_id_is_stored_again_with_savepoints(
        db, service, writer, alice, bob, sqlalchemy_commits):
    """Inline, a lone send is stored without a savepoint. A client_msg_id of an earlier
    commit fails its receipt's insert (the cached path does not look receipts up): the
    transaction is rolled back, and the send stored again at once with savepoints, the
    careful way, through SQLAlchemy. A duplicate; nothing stored twice; two passes."""
    done = Done(db)
    send(service, alice, "first", "c-1", done=done)
    first = done.last[0]
    statements = trace_statements(writer)
    sqlalchemy_commits.clear()  # the tracing job's
    send(service, alice, "first again", "c-1", done=done)
    outcome, error, thread, committed = done.last
    assert error is None and outcome.duplicate and outcome.message_id == first.message_id
    assert thread == threading.get_ident()  # inline, both passes
    assert committed == ["first"]
    assert sqlalchemy_commits == [1]
    assert statements.count("BEGIN IMMEDIATE") == 2 and statements.count("ROLLBACK") == 1
    assert writer.idle
    # Nothing is left open: the next lone send commits inline on the driver again, and
    # the writer thread's own transactions still work.
    send(service, alice, "second", "c-2", done=done)
    assert done.last[1] is None and done.last[2] == threading.get_ident()
    assert done.last[3] == ["first", "second"]
    assert sqlalchemy_commits == [1]
    # (in a transaction of their own, BEGIN IMMEDIATE, not in autocommit mode)
    assert writer.submit(InTransaction()).result() is True
    writer.run(lambda repo: repo.add_account("Carol", "carol", "h", 1))
    send(service, alice, "third", to="Carol", done=done)
    assert done.last[1] is None and done.last[3] == ["first", "second", "third"]


class AddAccounts:
    """An all-or-nothing bulk job that writes through SQLAlchemy (``add_account`` is Core),
    which then owns the transaction ``try_begin_now`` opened; with ``fail``, it raises
    after writing."""

    bulk_is_atomic = True

    def __init__(self, name: str, fail: bool = False):
        self.name, self.fail = name, fail

    @staticmethod
    def run_bulk(repo, jobs):
        ids = [repo.add_account(job.name, job.name.casefold(), "h", 1).id for job in jobs]
        if any(job.fail for job in jobs):
            raise RuntimeError("the job broke after writing")
        return ids


class AddAccountsRaw(AddAccounts):
    """AddAccounts on the driver connection: SQLAlchemy never learns of the transaction."""

    @staticmethod
    def run_bulk(repo, jobs):
        raw = repo.conn.connection.driver_connection
        ids = [raw.execute("INSERT INTO accounts (name, name_key, password_hash, created_at,"
                           " last_login_at) VALUES (?, ?, 'h', 1, 1)",
                           (job.name, job.name.casefold())).lastrowid for job in jobs]
        if any(job.fail for job in jobs):
            raise RuntimeError("the job broke after writing")
        return ids


@pytest.mark.parametrize("job_type", [AddAccounts, AddAccountsRaw])
def test_an_inline_atomic_job_is_committed_whichever_way_it_wrote(
        db, writer, job_type, sqlalchemy_commits):
    answers = []
    writer.submit_callback(job_type("Carol"), lambda r, e: answers.append((r, e)),
                           inline_if_idle=True)
    assert len(answers) == 1 and answers[0][1] is None  # inline: answered already
    assert committed_names(db) == ["Carol"]
    assert sqlalchemy_commits == ([1] if job_type is AddAccounts else [])
    assert writer.idle


def submit_and_wait(writer, job, *, inline: bool):
    """Submit ``job`` as the loop does (inline when the writer is idle) or for the writer
    thread; its (result, error) once answered, and whether it was answered at once."""
    answers = []
    answered = threading.Event()

    def done(result, error):
        answers.append((result, error))
        answered.set()

    writer.submit_callback(job, done, inline_if_idle=inline)
    at_once = answered.is_set()
    assert answered.wait(30)
    wait_until(lambda: writer.idle, what="the writer idle")
    return answers[0], at_once


@pytest.mark.parametrize("inline", [True, False], ids=["inline", "writer-thread"])
@pytest.mark.parametrize("job_type", [AddAccounts, AddAccountsRaw])
def test_an_atomic_job_that_fails_after_writing_is_rolled_back(
        db, writer, job_type, inline, sqlalchemy_commits):
    """Its repository owns the transaction and took no savepoint: the rollback of the
    whole transaction undoes what it wrote. Its caller is told the failure."""
    writer.run(lambda repo: None)  # the connection opened, so no commit below is its
    sqlalchemy_commits.clear()
    (result, error), at_once = submit_and_wait(writer, job_type("Dave", fail=True),
                                               inline=inline)
    assert at_once == inline
    assert result is None and isinstance(error, RuntimeError)
    assert committed_names(db) == []
    assert sqlalchemy_commits == []
    # The connection is usable: the next job commits, on the same thread as before.
    (result, error), at_once = submit_and_wait(writer, job_type("Erin"), inline=inline)
    assert error is None and at_once == inline and committed_names(db) == ["Erin"]


def _lone_send(service, writer, alice):
    send(service, alice, "hello", "c-1")


def _failing_job_through_sqlalchemy(service, writer, alice):
    submit_and_wait(writer, AddAccounts("Dave", fail=True), inline=True)


def _failing_job_on_the_driver(service, writer, alice):
    submit_and_wait(writer, AddAccountsRaw("Dave", fail=True), inline=True)


def _spoiled_lone_send(service, writer, alice):
    send(service, alice, "hello", "c-1")
    send(service, alice, "hello again", "c-1")


def _writer_thread_sends(service, writer, alice):
    service.send(alice, "Bob", "hello", "c-1")


def _spoiled_writer_thread_sends(service, writer, alice):
    service.send(alice, "Bob", "hello", "c-1")
    service.send(alice, "Bob", "hello again", "c-1")


def _writer_thread_failing_job(service, writer, alice):
    submit_and_wait(writer, AddAccountsRaw("Dave", fail=True), inline=False)


@pytest.mark.parametrize("scenario", [
    _lone_send, _failing_job_through_sqlalchemy, _failing_job_on_the_driver,
    _spoiled_lone_send, _writer_thread_sends, _spoiled_writer_thread_sends,
    _writer_thread_failing_job])
def test_after_a_transaction_begun_on_the_driver_the_next_job_has_its_own(
        db, service, writer, alice, bob, scenario):
    """However a transaction ``begin_now`` opened ended (committed or rolled back, on the
    driver or through SQLAlchemy, inline or on the writer thread), nothing of it is left
    behind: the next plain job runs in a BEGIN IMMEDIATE ... COMMIT of its own (a stale
    "already begun" mark would make SQLAlchemy skip that BEGIN)."""
    statements = trace_statements(writer)
    scenario(service, writer, alice)
    start = len(statements)
    writer.run(add("Probe"))
    ran = [s for s in statements[start:] if not s.startswith("PRAGMA")]  # (its settings)
    assert ran[0] == "BEGIN IMMEDIATE" and ran[-1] == "COMMIT", ran
    assert "Probe" in committed_names(db)


def test_a_refused_lone_send_is_told_and_the_next_one_commits(db, service, alice, bob):
    done = Done(db)
    send(service, alice, "lost", to="Nobody", done=done)
    outcome, error, _, committed = done.last
    assert outcome is None and isinstance(error, NoSuchAccount) and committed == []
    send(service, alice, "found", done=done)
    assert done.last[1] is None and done.last[3] == ["found"]


def test_a_failed_commit_refuses_the_send_stores_nothing_and_the_next_one_commits(
        db, service, writer, alice, bob, monkeypatch, commits):
    """COMMIT itself fails (here: a deferred foreign key the send's transaction violated,
    checked only at COMMIT, as a full disk or an I/O error would fail it)."""
    mend = break_commits(monkeypatch)
    done = Done(db)
    commits.clear()
    send(service, alice, "doomed", "c-1", done=done)
    outcome, error, _, committed = done.last
    assert outcome is None and isinstance(error, StorageUnavailable)
    assert committed == []
    assert commits == []  # no commit was reported
    mend()
    # The connection was dropped with its open transaction: a new one serves the next send,
    # and the refused send's client_msg_id is free (nothing of it was kept).
    send(service, alice, "retried", "c-1", done=done)
    outcome, error, _, committed = done.last
    assert error is None and not outcome.duplicate and committed == ["retried"]
    assert writer.idle


def test_a_failing_on_commit_hook_still_answers_the_lone_send(db, hasher):
    def broken(_jobs, _seconds):
        raise RuntimeError("metrics broke")

    writer = GroupCommitWriter(db.write_engine, on_commit=broken)
    try:
        service = ChatService(db, writer, hasher)
        alice = service.register("Alice", PASSWORD)
        service.register("Bob", PASSWORD)
        done = Done(db)
        send(service, alice, "hello", "c-1", done=done)
        outcome, error, _, committed = done.last
        assert error is None and type(outcome) is SendOutcome and committed == ["hello"]
        assert writer.idle
    finally:
        writer.close()
