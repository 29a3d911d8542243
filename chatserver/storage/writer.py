"""The single writer thread: every write of the server goes through it, batched.

Why one writer: SQLite allows one writer at a time, and a commit (an fsync with
synchronous=FULL) costs far more than the statements in it. Jobs that arrive while a commit
is under way are run together in the next transaction and share its one commit (group
commit). Each job runs in its own savepoint, so one refused job does not undo the others,
except bulk jobs that undo their own work (a group of sends); a batch that is nothing but
one group of sends needs no savepoint at all (a failure rolls back the transaction, which
holds nothing else: ``_commit_atomic``). A job's future is resolved
only after the commit that contains it, so whoever waits on it knows its write is durable.

A send submitted while nothing else is being written (``submit_callback`` with the writer
idle) is committed on the submitting thread instead, under the same lock: one client
waiting for each reply then pays no hand-off to the writer thread and back. Jobs submitted
meanwhile queue for the thread as usual. If another process holds SQLite's write lock at
that moment, the job goes to the writer thread (which waits for the lock) instead of
making the submitting thread wait. A thread may also hold jobs (``hold=True``) and release
them together (``release_held``): the I/O loop does so with a turn's lone sends where a
commit is cheap, one transaction for the turn instead of a hand-off each.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import AbstractContextManager, nullcontext
from typing import Any, TypeVar

from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError

from chatserver.errors import ChatError, ShuttingDown, StorageUnavailable
from chatserver.storage.database import (
    begin_now,
    commit_begun,
    journal_in_memory,
    rollback_begun,
    storage_errors,
    try_begin_now,
    wait_for_locks,
)
from chatserver.storage.repository import Repository, TransactionSpoiled, WriteCache

T = TypeVar("T")
log = logging.getLogger(__name__)

MAX_BATCH = 1024  # jobs per transaction; bounds the time a commit holds the write lock
# Pages a transaction's sub-journal may keep in memory (4 MiB of 1 KiB pages, 16 MiB of
# 4 KiB); see ``_small_journal``.
MEMORY_JOURNAL_PAGES = 4096
_STOP = object()


class GroupCommitWriter:
    """Runs write jobs ``job(repo) -> result`` on one thread, many jobs per commit."""

    def __init__(self, engine: Engine, *, max_batch: int = MAX_BATCH,
                 on_commit: Callable[[int, float], None] | None = None,
                 results_context: Callable[[], AbstractContextManager] = nullcontext):
        """``results_context``: entered around resolving a committed batch's futures (the
        server holds the replies their callbacks write, to send them together)."""
        self.results_context = results_context
        self._engine = engine
        self._max_batch = max_batch
        self._on_commit = on_commit
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._cache = WriteCache()  # kept across batches; see WriteCache
        self._closed = False
        self._lock = threading.Lock()  # guards _closed, _in_flight and queueing
        self._in_flight = 0  # jobs submitted and not yet resolved
        # Jobs submitted with hold=True, waiting for release_held() from the thread that
        # holds them (only that thread touches the list); they count as in flight.
        self._held: list = []
        self._holder: int | None = None
        self._db_lock = threading.Lock()  # held by whichever thread writes (see module doc)
        self._conn = None
        self._cursor = None  # a DBAPI cursor of _conn (SQLite), kept for the hot path
        self._inline_capable = engine.dialect.name == "sqlite"
        # Whether _conn waits out other processes' locks: yes on the writer thread, no for
        # an inline commit. Switched only when the other kind of commit comes, so that a
        # run of inline commits pays no statement for it.
        self._conn_waits = True
        # Whether _conn's transactions keep their sub-journal in memory (``_small_journal``).
        self._conn_memory_journal = False
        self._thread = threading.Thread(target=self._run, name="db-writer", daemon=True)
        self._thread.start()

    def submit(self, job: Callable[[Repository], T]) -> Future[T]:
        """Queue a job; its future resolves after the commit that contains it."""
        future: Future[T] = Future()
        self._release_own_held()
        with self._lock:
            if self._closed:
                raise ShuttingDown("the server is shutting down")
            self._in_flight += 1
            self._queue.put((job, future))
        return future

    def submit_callback(self, job: Callable[[Repository], T],
                        done: Callable[[T | None, BaseException | None], None],
                        *, inline_if_idle: bool = False, hold: bool = False) -> None:
        """Queue a job; after the commit that contains it, ``done(result, None)`` or
        ``done(None, exception)`` is called. Lighter than a Future (no lock or condition per
        job): the server's path for sends. With ``inline_if_idle`` and the writer idle, the
        job is committed on this thread and ``done`` called before this returns (the caller
        has nothing else to do meanwhile); else it is the writer thread's. With ``hold``,
        the job waits for this thread's ``release_held()``, which commits every job held
        until then together (the I/O loop holds a turn's sends: see ``release_held``)."""
        item = (job, _Completion(done))
        if hold:
            with self._lock:
                if self._closed:
                    raise ShuttingDown("the server is shutting down")
                self._in_flight += 1
            self._holder = threading.get_ident()
            self._held.append(item)
            return
        self._release_own_held()
        with self._lock:
            if self._closed:
                raise ShuttingDown("the server is shutting down")
            self._in_flight += 1
            # Nothing else in flight, so nobody holds _db_lock; taking it here, under _lock,
            # means no job submitted after this one is written before it. (Unless another
            # process holds SQLite's write lock: the job is then requeued, and a job another
            # thread submitted meanwhile may be queued first; this thread's cannot.)
            inline = (inline_if_idle and self._in_flight == 1
                      and self._db_lock.acquire(blocking=False))
            if not inline:
                self._queue.put(item)
        if inline:
            self._commit_inline([item])

    def release_held(self) -> None:
        """Commit the jobs this thread held (``submit_callback(hold=True)``), in order: all
        in one transaction on this thread if nothing else is in flight (their callbacks run
        before this returns); else queued for the writer thread behind what is queued, as
        are more than ``max_batch`` of them and jobs that find SQLite's write lock taken by
        another process. After ``close()`` they are refused with ShuttingDown.

        For a caller that collects jobs in a burst and then has nothing better to do than
        commit them: the I/O loop at the end of a turn, when a commit is cheap (``--sync
        normal``). It then pays no hand-off to the writer thread and back for them."""
        held = self._held
        if not held:
            return
        self._held = []
        with self._lock:
            if self._closed:  # its stop mark is queued: refuse them as _requeue does
                self._in_flight -= len(held)
                refused = True
            else:
                refused = False
                # Nothing else in flight, so nobody holds _db_lock (see submit_callback).
                inline = (self._in_flight == len(held) and len(held) <= self._max_batch
                          and self._db_lock.acquire(blocking=False))
                if not inline:
                    for item in held:
                        self._queue.put(item)
        if refused:
            for _job, completion in held:
                completion.set_exception(ShuttingDown("the server is shutting down"))
        elif inline:
            self._commit_inline(held)

    def _release_own_held(self) -> None:
        """A job submitted by a thread that holds jobs goes after them: release them first."""
        if self._held and self._holder == threading.get_ident():
            self.release_held()

    def _commit_inline(self, batch) -> None:
        """Commit ``batch`` on this thread (``_db_lock`` taken by the caller and released
        here), or queue it for the writer thread if the write lock is another process's."""
        try:
            done = self._execute_inline(batch)
        except Exception as exc:  # a bug: answer what is unanswered, or its client waits forever
            log.exception("inline commit failed")
            with self._lock:
                self._in_flight -= len(batch)
            for _job, completion in batch:
                if not completion.done():
                    completion.set_exception(exc)
            return
        finally:
            self._db_lock.release()
        if done:
            with self._lock:
                self._in_flight -= len(batch)
        else:  # another process holds the write lock: the writer thread waits for it
            self._requeue(batch)

    def _requeue(self, batch) -> None:
        """Queue inline jobs that could not begin. If ``close()`` came meanwhile, its stop
        mark is queued already and the thread would never run them: refuse them instead,
        as every submit after ``close()`` is (their callbacks are told)."""
        with self._lock:
            if not self._closed:
                for item in batch:
                    self._queue.put(item)
                return
            self._in_flight -= len(batch)
        for item in batch:
            item[1].set_exception(ShuttingDown("the server is shutting down"))

    @property
    def idle(self) -> bool:
        """Whether no job is queued or being written (a hint: read without the lock)."""
        return self._in_flight == 0

    def run(self, job: Callable[[Repository], T]) -> T:
        """Submit a job and wait for its committed result (or its exception)."""
        return self.submit(job).result()

    def close(self, timeout: float | None = 10.0) -> None:
        """Finish the queued jobs, then stop the thread. Safe to call twice."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(_STOP)
        self._thread.join(timeout)

    def _run(self) -> None:
        stopping = False
        while not stopping:
            batch = [self._queue.get()]
            while len(batch) < self._max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if batch[-1] is _STOP or _STOP in batch:
                stopping = True
                batch = [item for item in batch if item is not _STOP]
            if not batch:
                continue
            try:
                with self._db_lock:
                    self._execute(batch)
            finally:
                with self._lock:
                    self._in_flight -= len(batch)
        with self._db_lock:
            self._close_connection(broken=False)

    def _execute_inline(self, batch) -> bool:
        """Commit jobs on the calling thread (``_db_lock`` held) if the database's write
        lock is free now; False if it is not: nothing done, they are the writer thread's.
        A group of sends spoiled without savepoints (TransactionSpoiled) is stored again
        with them. SQLite only: elsewhere the lock cannot be tried without waiting."""
        if not self._inline_capable:
            return False
        started = time.perf_counter()
        if not self._begin_inline(batch):
            return False
        if _one_atomic_group(batch):
            if self._commit_atomic(batch, corked=len(batch) > 1, started=started):
                return True
            # Spoiled and rolled back: stored again here, with savepoints (the writer
            # thread would first try without them again), unless another process took
            # the lock meanwhile.
            if not self._begin_inline(batch):
                return False
        self._execute(batch, begun=True)
        return True

    def _begin_inline(self, batch) -> bool:
        """BEGIN IMMEDIATE on the writer's connection, set up for an inline commit of
        ``batch`` (no wait for another process's lock); False if that cannot be done now.
        Any failure is left for the writer thread to meet and report."""
        try:
            conn = self._connection(waits=False, memory_journal=_small_journal(batch))
            return try_begin_now(conn, self._cursor)
        except Exception:  # noqa: BLE001 - the writer thread reports it
            return False

    def _commit_atomic(self, batch, *, corked: bool, started: float) -> bool:
        """Commit jobs of one all-or-nothing bulk group (sends: a lone one, a turn's held
        ones, or a writer thread's batch of them) in the transaction ``begin_now`` opened,
        without SQLAlchemy's transaction object: its events, context managers and
        bookkeeping cost a lone send more than its two INSERTs do (58 -> 45 us a send
        in-process; BENCHMARKS.md). The group is the whole transaction, so its repository
        owns it: no savepoint, and a failed group is rolled back rather than committed.

        Errors as in ``_commit_batch``: a job's own refusal is its result, the group's
        failure (a ChatError it raised) every job's, and a failed database fails them all
        and drops the connection. False (nothing done) if the group must be stored again
        with savepoints (TransactionSpoiled).

        ``started``: when the commit began, for its reported duration (before the BEGIN and
        its wait for the lock, as ``_commit_batch`` reports it). ``corked``: the results are
        resolved inside ``results_context``, as ``_commit_batch`` does, so that their
        replies and pushes go out together (a lone send's, inline, need not wait)."""
        conn = self._conn
        jobs = [job for job, _completion in batch]
        cursor = self._cursor
        repo = Repository(conn, self._cache, owns_transaction=True, cursor=cursor)
        try:
            try:
                ok, value = _atomic(type(jobs[0]).run_bulk, repo, jobs)
            except TransactionSpoiled:
                rollback_begun(conn, cursor)
                return False
            if ok:
                commit_begun(conn, cursor)
            else:
                rollback_begun(conn, cursor)  # what the group wrote before it failed
        except Exception as exc:
            self._failed(batch, exc)
            return True
        seconds = time.perf_counter() - started
        if not ok:
            self._cache.clear()  # as _commit_batch: it may have cached what was undone
            value = [value] * len(batch)
        # Replies go out before the commit is reported (metrics, checkpointer), which their
        # clients need not wait for.
        if corked:
            with self.results_context():
                _resolve(batch, value)
        else:  # (a lone send's reply goes out first, with no context to enter)
            _resolve(batch, value)
        if ok:
            self._report_commit(len(batch), seconds)
        return True

    def _report_commit(self, jobs: int, seconds: float) -> None:
        """Tell ``on_commit`` (metrics) of a commit that took ``seconds``. Its failure is
        logged, never raised: the jobs are committed, and their callbacks must be told so."""
        if self._on_commit is not None:
            try:
                self._on_commit(jobs, seconds)
            except Exception:
                log.exception("on_commit failed")

    def _connection(self, *, waits: bool, memory_journal: bool):
        """The writer's connection (opened if need be), set up for the next transaction:
        waiting for other processes' locks or not (``wait_for_locks``), its sub-journal in
        memory or not (``journal_in_memory``). SQLite only; each setting costs a statement
        only when it changes."""
        if self._conn is None:
            self._conn = self._engine.connect()
            if self._inline_capable:
                self._cursor = self._conn.connection.driver_connection.cursor()
            self._conn_waits = True
            self._conn_memory_journal = False
        if self._inline_capable:
            self._set_up(self._conn, waits=waits, memory_journal=memory_journal)
        return self._conn

    def _set_up(self, conn, *, waits: bool, memory_journal: bool) -> None:
        """Change the connection's settings that differ (SQLite); a statement per change."""
        if self._conn_waits != waits:
            wait_for_locks(conn, waits)
            self._conn_waits = waits
        if self._conn_memory_journal != memory_journal:
            journal_in_memory(conn, memory_journal)
            self._conn_memory_journal = memory_journal

    def _execute(self, batch, *, begun: bool = False) -> None:
        """Commit a batch and resolve its jobs (with ``_db_lock`` held); ``begun``: its
        transaction is already open (an inline commit). A batch that is one all-or-nothing
        group (sends) is committed as an inline one is (``_commit_atomic``, SQLite), unless
        that is spoiled: then with savepoints, as any other batch."""
        running = False
        try:
            if begun:
                conn = self._conn
            else:
                conn = self._connection(waits=True, memory_journal=_small_journal(batch))
                if self._inline_capable and _one_atomic_group(batch):
                    batch = _running(batch)
                    running = True
                    if not batch:
                        return
                    started = time.perf_counter()
                    begin_now(conn, self._cursor)
                    if self._commit_atomic(batch, corked=True, started=started):
                        return
            self._commit_batch(conn, batch, running=running)
        except Exception as exc:  # the database failed: every job of the batch is refused
            self._failed(batch, exc)

    def _failed(self, batch, exc: Exception) -> None:
        """The database failed a batch: refuse its unresolved jobs, drop the connection."""
        log.error("write batch of %d failed: %s", len(batch), exc)
        error = exc if isinstance(exc, StorageUnavailable) else StorageUnavailable(
            "the database could not store this; nothing was changed")
        self._cache = WriteCache()  # what it cached may have been rolled back
        for _job, future in batch:
            if not future.done():
                future.set_exception(error)
        self._close_connection(broken=True)

    def _close_connection(self, *, broken: bool) -> None:
        """Give the connection back to the pool set up as every connection is (waiting for
        locks, temporary files on disk), or discard it: a broken one, or one whose settings
        could not be put back (whoever took it next would fail where they should wait)."""
        conn, self._conn = self._conn, None
        self._cursor = None
        if conn is None:
            return
        try:
            if not broken:
                try:  # every connection's defaults
                    self._set_up(conn, waits=True, memory_journal=False)
                except Exception:  # noqa: BLE001 - then it must not be reused
                    broken = True
            if broken:
                _roll_back_driver(conn)
                conn.invalidate()
            conn.close()
        except Exception:  # noqa: BLE001, S110 - a broken connection may fail to close; drop it
            pass

    def _commit_batch(self, conn, batch, *, running: bool = False) -> None:
        """Commit a batch in SQLAlchemy's transaction, each job or bulk group in a savepoint
        unless it undoes its own work; ``running``: its cancelled futures are gone already
        (``_running``)."""
        started = time.perf_counter()
        if not running:
            batch = _running(batch)
        futures: list[Future] = []
        results: list = []  # per future: its result, or _Failed(exception)
        with storage_errors():
            with conn.begin():
                repo = Repository(conn, self._cache, cursor=self._cursor)
                for group in _groups(batch):
                    first = group[0][0]
                    bulk = getattr(type(first), "run_bulk", None)
                    if bulk is None:
                        ok, value = _in_savepoint(conn, lambda job=first: [job(repo)])
                    else:
                        jobs = [job for job, _future in group]
                        run = lambda bulk=bulk, jobs=jobs: bulk(repo, jobs)
                        if getattr(type(first), "bulk_is_atomic", False):
                            # All or nothing by itself (store_messages): no savepoint to pay for.
                            ok, value = _atomic(run)
                        else:
                            ok, value = _in_savepoint(conn, run)
                    futures.extend(future for _job, future in group)
                    if ok:
                        results.extend(
                            _Failed(r) if isinstance(r, Exception) else r for r in value)
                    else:
                        self._cache.clear()  # it may have cached what was just undone
                        results.extend(_Failed(value) for _ in group)
        self._report_commit(len(batch), time.perf_counter() - started)
        with self.results_context():
            for future, result in zip(futures, results):
                if type(result) is _Failed:
                    future.set_exception(result.exception)
                else:
                    future.set_result(result)


class _Completion:
    """What the writer needs of a Future, for a plain callback (see ``submit_callback``)."""

    __slots__ = ("_done", "_called")

    def __init__(self, done):
        self._done = done
        self._called = False

    def set_running_or_notify_cancel(self) -> bool:
        return True

    def done(self) -> bool:
        return self._called

    def set_result(self, result) -> None:
        self._called = True
        self._call(result, None)

    def set_exception(self, exception: BaseException) -> None:
        self._called = True
        self._call(None, exception)

    def _call(self, result, exception) -> None:
        try:
            self._done(result, exception)
        except Exception:  # like a Future's callbacks: one failure must not stop the rest
            log.exception("a write job's callback failed")


class _Failed:
    """A job's exception, told apart from a result (a job may return an exception object)."""

    __slots__ = ("exception",)

    def __init__(self, exception: Exception):
        self.exception = exception


def _groups(batch):
    """Consecutive bulk jobs of one kind form one group; any other job is a group of its own.

    A bulk job's class has ``run_bulk(repo, jobs) -> list`` (a result or an exception per
    job): a hundred sends cost a handful of statements instead of a hundred rounds. Its
    kind is its class, or its ``bulk_group`` if it has one (classes that share a
    ``run_bulk``, like a send and a batch of sends). With ``bulk_is_atomic = True`` it also
    promises that an exception leaves nothing of the group written, so it runs without a
    savepoint.
    """
    group: list = []
    group_kind = None
    for item in batch:
        kind = _bulk_kind(type(item[0]))
        if group and kind is not None and kind == group_kind:
            group.append(item)
            continue
        if group:
            yield group
        group = [item]
        group_kind = kind
    if group:
        yield group


def _bulk_kind(job_type):
    """The group a bulk job's class belongs to (see ``_groups``); None if not a bulk job."""
    return getattr(job_type, "bulk_group", job_type) if hasattr(job_type, "run_bulk") else None


def _roll_back_driver(conn) -> None:
    """Roll back whatever transaction a connection about to be discarded has open, on the
    driver. Closing alone is not enough for SQLite: a statement that failed (SQLITE_FULL
    halfway through an INSERT) stays alive as long as its exception's traceback does, and
    ``sqlite3_close_v2`` leaves the connection open, write lock and all, until it is
    finalized. A transaction begun on the driver (``begin_now``) has no SQLAlchemy
    transaction to roll it back."""
    try:
        conn.connection.driver_connection.rollback()
    except Exception:  # noqa: BLE001, S110 - already broken: closing is all that is left
        pass


def _running(batch) -> list:
    """The jobs of ``batch`` whose futures were not cancelled, now marked running."""
    return [item for item in batch if item[1].set_running_or_notify_cancel()]


def _one_atomic_group(batch) -> bool:
    """Whether ``_groups`` would make ``batch`` one group of all-or-nothing bulk jobs."""
    first = type(batch[0][0])
    if not getattr(first, "bulk_is_atomic", False):
        return False
    if len(batch) == 1:
        return True
    kind = _bulk_kind(first)
    return all(_bulk_kind(type(job)) == kind for job, _completion in batch)


def _small_journal(batch) -> bool:
    """Whether a batch's sub-journal may stay in memory: every job says about how many
    existing pages it changes (``journal_pages``: sends do; a deletion, whose pages grow
    with the data it removes, does not) and together they stay under MEMORY_JOURNAL_PAGES.

    In a file, past 64 KiB, the sub-journal of a batch of sends cost an open, ~80 writes
    and an unlink per commit, a third of the time it took to store the batch."""
    pages = 0
    for job, _completion in batch:
        bound = getattr(job, "journal_pages", None)
        if bound is None:
            return False
        pages += bound
    return pages <= MEMORY_JOURNAL_PAGES


def _resolve(batch, results) -> None:
    """Complete each job of ``batch`` with its result, or its refusal (an exception)."""
    for (_job, completion), result in zip(batch, results):
        if isinstance(result, Exception):  # the job's refusal
            completion.set_exception(result)
        else:
            completion.set_result(result)


def _atomic(run, *args) -> tuple[bool, Any]:
    """``run(*args)``, like ``_in_savepoint`` without the savepoint, for a job that undoes
    its own work (or whose transaction is rolled back if it fails: ``_commit_atomic``)."""
    try:
        return True, run(*args)
    except Exception as exc:
        if _is_storage_failure(exc) or isinstance(exc, TransactionSpoiled):
            raise
        if not isinstance(exc, ChatError):
            log.exception("write job failed", exc_info=exc)
        return False, exc


def _in_savepoint(conn, run) -> tuple[bool, Any]:
    """Run in a savepoint: (True, result), or (False, exception) with its work undone.

    A storage failure is raised instead: it fails the whole batch. The job's own exception
    is kept, not a later one from rolling back its savepoint (on disk full SQLite has
    already rolled back the whole transaction).
    """
    failure: Exception | None = None
    try:
        with conn.begin_nested():
            try:
                return True, run()
            except Exception as exc:
                failure = exc
                raise
    except Exception as exc:
        exc = failure or exc
        if _is_storage_failure(exc):
            raise exc from None
        if not isinstance(exc, ChatError):
            log.exception("write job failed", exc_info=exc)
        return False, exc


def _is_storage_failure(exc: Exception) -> bool:
    return isinstance(exc, (OperationalError, StorageUnavailable))
