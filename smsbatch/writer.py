"""The webhook's write path: every text written on one shared SQLite connection.

Writer owns that connection. The server's accepting thread writes the requests that
arrived complete together as one burst, in one transaction (Writer.burst); requests
served by pool threads (slow clients, or a burst that failed) are committed in groups
(Writer.submit). Checkpointer keeps the WAL short from a background thread, so no
COMMIT pays for a checkpoint.
"""

import collections
import logging
import sqlite3
import threading
import time
from contextlib import contextmanager

from smsbatch.db import Store

log = logging.getLogger("smsbatch.web")
WEB_BUSY_TIMEOUT = 5.0  # Twilio gives up on a webhook after 15 s; answer 503 well before
MAX_GROUP = 64  # most queued texts one pool thread commits in one transaction
CHECKPOINT_EVERY = 0.2  # seconds between background WAL checkpoints while texts arrive
CHECKPOINT_IDLE_ROUNDS = 5  # the checkpoint thread ends after this many rounds with no new commit
WAL_CATCH_UP_FRAMES = 10_000  # WAL this long (~40 MB): the writer checkpoints it once itself


class WebStore(Store):
    """The webhook's Store: between begin_group() and end_group(), every `transaction()`
    joins the group's one transaction, so many texts share one BEGIN IMMEDIATE ... COMMIT."""

    _grouped = False

    @contextmanager
    def transaction(self):
        """Store.transaction, or inside the group's transaction between begin/end_group."""
        if self._grouped:
            yield self.conn
            return
        with super().transaction() as conn:
            yield conn

    def begin_group(self):
        """BEGIN IMMEDIATE; until end_group(), transaction() joins this one."""
        self.conn.execute("BEGIN IMMEDIATE")
        self._grouped = True

    def end_group(self, commit):
        """COMMIT (or ROLLBACK) what begin_group() began. Returns False if the COMMIT failed
        (it is then rolled back: nothing of the group is stored)."""
        self._grouped = False
        try:
            self.conn.execute("COMMIT" if commit else "ROLLBACK")
            return True
        except sqlite3.Error as exc:
            log.error("webhook: could not commit a burst of texts: %s", exc)
            if self.conn.in_transaction:
                try:
                    self.conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            return False


class Burst:
    """Writes inside one transaction (see Writer.burst). `failed` once anything in it
    failed: then nothing of it is committed. `error`: why it could not even begin."""

    __slots__ = ("thread", "store", "failed", "error")

    def __init__(self):
        self.thread, self.store, self.failed, self.error = threading.get_ident(), None, False, None

    def run(self, work):
        """work(store) inside this transaction. Raises: what work raised (the burst fails)."""
        if self.failed or self.store is None:
            raise sqlite3.OperationalError("this burst's transaction already failed")
        try:
            return work(self.store)
        except BaseException:
            self.failed = True
            raise


class _Job:
    """One pool thread's write, waiting for whoever holds the connection to run it."""

    __slots__ = ("work", "result", "error", "done")

    def __init__(self, work):
        self.work, self.result, self.error, self.done = work, None, None, False

    def finish(self, result=None, error=None):
        """Record the outcome; the submitting thread returns or raises it."""
        self.result, self.error, self.done = result, error, True


class Writer:
    """The webhook's writes, on one shared connection, many texts per transaction.

    The server's accepting thread writes the requests that arrived complete together
    as one burst (burst()). Pool threads (slow clients, failed bursts) queue their
    writes and take the connection lock; whoever gets it runs everything queued in one
    transaction, so the others usually find theirs done (group commit).

    Is grouping still worth it, now that bursts carry the load? In bench/run.py webhook
    every request arrives complete and none takes the pool. With every request forced
    onto the pool (2 cores, 16 connections, medians of 3 paired rounds), a plain lock
    and one transaction per request served 1,890-2,070 req/s; this grouping 2,310-2,490,
    as many as the rotating-leader group commit it replaced (2,040-2,480), at about the
    same p99 (13-21 ms for all three). So the grouping stays, in this simpler form.
    """

    def __init__(self, path, busy_timeout=WEB_BUSY_TIMEOUT):
        self.path, self.busy_timeout = path, busy_timeout
        self.checkpointer = Checkpointer(path, busy_timeout)
        self._lock = threading.Lock()  # held by whoever uses the connection
        self._waiting = collections.deque()  # thread-safe append/popleft: no lock of its own
        self._store = None
        self._burst = None

    def submit(self, work):
        """Run work(store) and return what it returns, once committed: inside the calling
        thread's burst if it is in one, else grouped with other threads' writes.

        Raises:
            sqlite3.Error, SmsbatchError: nothing of `work` was stored.
        """
        burst = self._burst
        if burst is not None and burst.thread == threading.get_ident():
            return burst.run(work)
        job = _Job(work)
        self._waiting.append(job)
        with self._lock:
            while not job.done:  # else an earlier holder of the lock ran it already
                group = [self._waiting.popleft() for _ in range(min(len(self._waiting), MAX_GROUP))]
                self._run(group)
                self._housekeeping()
        if job.error is not None:
            raise job.error
        return job.result

    @contextmanager
    def burst(self):
        """Until the block ends, every submit() of this thread runs at once inside one
        transaction, committed when the block ends. Yields a Burst; if its `failed` is
        set afterwards, nothing was committed and every answer given inside the block
        must be thrown away (and the requests run again one by one). Yields None when
        another thread is writing: submit() then works as usual.

        The caller must not let any answer out before the block has ended.
        """
        if not self._lock.acquire(blocking=False):
            yield None  # the caller hands its requests to the pool rather than wait here
            return
        try:
            with self._transaction() as burst:
                self._burst = burst
                try:
                    yield burst
                finally:
                    self._burst = None
        finally:
            self._housekeeping()
            self._lock.release()

    def _run(self, group):
        """Run the jobs in one transaction; if that fails, in one transaction each, so
        one bad job fails only itself. Every job is done afterwards."""
        try:
            if len(group) > 1:
                self._run_together(group)
            for job in group:
                if not job.done:
                    self._run_alone(job)
        finally:
            for job in group:
                if not job.done:  # only if this thread was stopped (KeyboardInterrupt and the like)
                    job.finish(error=RuntimeError("the writer stopped before storing this text"))

    def _run_together(self, group):
        with self._transaction() as burst:
            try:
                results = [burst.run(job.work) for job in group]
            except Exception:
                pass  # burst.failed is set: nothing of the group is committed
        if burst.error is not None:  # could not even begin: alone, each would wait as long again
            for job in group:
                job.finish(error=burst.error)
        elif not burst.failed:
            for job, result in zip(group, results):
                job.finish(result)

    def _run_alone(self, job):
        try:
            job.finish(job.work(self._open()))
        except Exception as exc:
            job.finish(error=exc)
            if isinstance(exc, sqlite3.Error):
                self._reset()

    @contextmanager
    def _transaction(self):
        """A Burst: one transaction, committed at the end unless it failed (then rolled back)."""
        burst = Burst()
        try:
            burst.store = self._open()
            burst.store.begin_group()
        except Exception as exc:
            burst.store, burst.failed, burst.error = None, True, exc
            self._reset()  # a connection that cannot even BEGIN may be broken: the next one is fresh
        try:
            yield burst
        except BaseException:
            burst.failed = True
            raise
        finally:
            if burst.store is not None and not burst.store.end_group(commit=not burst.failed):
                burst.failed = True
                self._reset()

    def _open(self):
        """The shared connection, opened on first use (and after a failure)."""
        if self._store is None:
            store = WebStore.open_ready(self.path, self.busy_timeout)
            store.conn.execute("PRAGMA wal_autocheckpoint = 0")  # see Checkpointer
            self._store = store
        return self._store

    def _reset(self):
        """Drop a connection that failed, so the next write opens a fresh one."""
        if self._store is not None:
            try:
                self._store.close()
            except sqlite3.Error:
                pass
            self._store = None

    def _housekeeping(self):
        """After each write, with the lock still held: keep the WAL short."""
        if self._store is None:
            return
        try:
            self.checkpointer.poke()
            if self.checkpointer.wal_long:
                self.checkpointer.wal_long = False
                self._store.conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except Exception:
            log.exception("webhook: housekeeping after a commit failed")


class Checkpointer:
    """Checkpoints the WAL from a background thread with its own connection.

    SQLite's automatic checkpoint runs inside the COMMIT that crosses 1,000 WAL pages,
    fsyncs included (about 10 ms here), and every request waiting on that group waits
    too. The webhook's connection turns it off and this thread checkpoints (PASSIVE:
    never blocks writers) every CHECKPOINT_EVERY seconds while texts arrive, then ends
    when idle. A PASSIVE checkpoint racing a busy writer rarely catches up completely,
    so the WAL cannot restart from its beginning; once it is WAL_CATCH_UP_FRAMES long
    the writer runs one checkpoint itself between groups (cheap: this thread already
    copied almost everything).
    """

    def __init__(self, path, busy_timeout=WEB_BUSY_TIMEOUT):
        self.path, self.busy_timeout = path, busy_timeout
        self.wal_long = False
        self._dirty = False
        self._thread = None
        self._lock = threading.Lock()

    def poke(self):
        """A commit happened: make sure the thread runs."""
        self._dirty = True
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="smsbatch-checkpoint", daemon=True)
                    self._thread.start()

    def _run(self):
        conn = None
        idle = 0
        try:
            conn = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None,
                                   check_same_thread=False)
            while True:
                time.sleep(CHECKPOINT_EVERY)
                with self._lock:
                    dirty, self._dirty = self._dirty, False
                    idle = 0 if dirty else idle + 1
                    if idle >= CHECKPOINT_IDLE_ROUNDS:
                        self._thread = None
                        return
                if dirty:
                    _, frames, _ = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                    self.wal_long = frames > WAL_CATCH_UP_FRAMES
        except sqlite3.Error as exc:
            log.warning("webhook: background checkpoint failed: %s", exc)
        finally:
            if conn is not None:
                conn.close()
            with self._lock:
                if self._thread is threading.current_thread():
                    self._thread = None

