"""The SQLite webhook's write path: every text written on one shared SQLite connection.

Part of the SQLite engine (smsbatch.engine_sqlite): PostgreSQL has its own group commit,
on several connections (smsbatch.writer_pool.PgWriter).

Writer owns that connection. The writes of requests that arrived whole together (a
burst) are committed by a committer thread in one transaction, while the server's
accepting thread goes on reading (Writer.burst); writes run again by pool threads
(a burst that failed) are committed in groups (Writer.submit). Every write waits for
the database lock until its deadline, never longer. Checkpointer keeps the WAL short from a background thread, so no
COMMIT pays for a checkpoint.
"""

import collections
import logging
import queue
import threading
import time
from contextlib import contextmanager

from smsbatch.db import Store
from smsbatch.engine import StoreBusy, StoreError
from smsbatch.engine_sqlite import plain_connection
from smsbatch.intake import Text

log = logging.getLogger("smsbatch.web")
WEB_BUSY_TIMEOUT = 4.0  # longest a text waits for the lock: its 503 comes well inside Twilio's 15 s
REQUEST_WAIT_LIMIT = 10.0  # close(): longest to wait for the committer's last bursts
MAX_GROUP = 64  # most queued texts one pool thread commits in one transaction
TROUBLE_MEMORY = 30.0  # seconds a failed write (with none committed since) counts as "cannot store"
WAITING_TOO_LONG = 1.0  # a write waiting this long for the lock means "cannot store now"
CHECKPOINT_EVERY = 0.2  # seconds between background WAL checkpoints while texts arrive
CHECKPOINT_IDLE_ROUNDS = 5  # the checkpoint thread ends after this many rounds with no new commit
LOCK_SLACK = 0.05  # seconds: SQLite's busy handler sleeps in steps; a deadline this close has come
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

    def wait_at_most(self, seconds):
        """Wait at most this long for another writer's lock (SQLite's busy timeout)."""
        self.db.wait_at_most(seconds)

    def begin_group(self, wait):
        """BEGIN IMMEDIATE, waiting at most `wait` seconds for the lock; until end_group(),
        transaction() joins this one. Raises: StoreError (nothing begun)."""
        self.wait_at_most(wait)
        self.db.begin()
        self._grouped = True

    def end_group(self, commit):
        """COMMIT (or ROLLBACK) what begin_group() began. Returns False if the COMMIT failed
        (it is then rolled back: nothing of the group is stored)."""
        self._grouped = False
        try:
            self.db.end(commit)
            return True
        except StoreError as exc:
            log.error("webhook: could not commit a burst of texts: %s", exc)
            return False


def run_works(store, works):
    """Run writes inside one transaction; their results, in the order of `works`. The texts
    among them are stored together, first (Store.add_texts: a few statements for all of them,
    every conversation's lock taken in one statement, in an order that cannot deadlock with
    another host's group); the other writes (delivery receipts) touch no text and come after."""
    texts = [work for work in works if isinstance(work, Text)]
    stored = iter(store.add_texts(texts) if texts else ())
    others = {i: work(store) for i, work in enumerate(works) if not isinstance(work, Text)}
    return [others[i] if i in others else next(stored) for i in range(len(works))]


class Burst:
    """The writes of requests that arrived together (see Writer.burst): kept until the
    block ends, then run and committed in one transaction by the committer thread.
    `writes`: how many were given; `deadline`: the earliest of theirs; `failed` once
    the commit failed (nothing of it is stored)."""

    __slots__ = ("thread", "works", "writes", "deadline", "failed", "on_done")

    def __init__(self, on_done):
        self.thread, self.works, self.writes = threading.get_ident(), [], 0
        self.deadline, self.failed, self.on_done = float("inf"), False, on_done

    def run(self, work, deadline):
        """Keep work(store) for the commit; returns None (the result is not known yet)."""
        self.writes += 1
        self.works.append(work)
        self.deadline = min(self.deadline, deadline)


class Bursting:
    """What both webhook writers (Writer here, writer_pool.PgWriter) share: the writes a
    thread submits inside its burst() block are collected, not run."""

    _burst = None

    def submit(self, work, deadline=None, patient=False):
        """Run work(store) and return what it returns, once committed: inside the calling
        thread's burst if it is in one (returns None at once, see burst()), else on its own
        (the writer's _submit_alone), within `deadline` (monotonic; default busy_timeout from now).
        `patient`: no client waits for the answer (the rejection counts' thread): a PgWriter
        waits for how the write ended (REQUEST_WAIT_LIMIT past the deadline at most), not only
        its ANSWER_GRACE, so that a write still being committed is not written again by its
        caller (an added count, counted twice).

        Raises:
            SmsbatchError (StoreError among them): nothing of `work` was stored.
        """
        if deadline is None:
            deadline = time.monotonic() + self.busy_timeout
        if self.in_burst():
            return self._burst.run(work, deadline)
        return self._submit_alone(work, deadline, patient)

    def in_burst(self):
        """True inside this thread's burst(): a write that fails there is run again."""
        return self.current_burst() is not None

    def current_burst(self):
        """This thread's Burst while in its burst() block, else None."""
        burst = self._burst
        return burst if burst is not None and burst.thread == threading.get_ident() else None

    @contextmanager
    def _collect(self, on_done):
        """The burst of this thread's writes until the block ends."""
        burst = Burst(on_done)
        self._burst = burst
        try:
            yield burst
        finally:
            self._burst = None


class _Job:
    """One pool thread's write, waiting for whoever holds the connection to run it."""

    __slots__ = ("work", "deadline", "result", "error", "done")

    def __init__(self, work, deadline):
        self.work, self.deadline, self.result, self.error, self.done = work, deadline, None, None, False

    def finish(self, result=None, error=None):
        """Record the outcome; the submitting thread returns or raises it."""
        self.result, self.error, self.done = result, error, True


class Writer(Bursting):
    """The webhook's writes, on one shared connection, many texts per transaction.

    The server's accepting thread hands over the writes of the requests that arrived
    whole together as one burst (burst()); a committer thread commits them, with any
    other bursts that queued meanwhile, in one transaction. Pool threads (the writes of
    a burst that failed) queue their writes and take the connection lock;
    whoever gets it runs everything queued in one transaction, so the others usually
    find theirs done (group commit). Every write has a deadline: it waits for the
    database lock until then, never longer, however many wait before it.

    Is grouping still worth it, now that bursts carry the load? With every request
    forced onto the pool (2 cores, 16 connections, medians of 3 paired rounds), a plain
    lock and one transaction per request served 1,890-2,070 req/s; this grouping
    2,310-2,490, at about the same p99 (13-21 ms). So the grouping stays.
    """

    def __init__(self, path, busy_timeout=WEB_BUSY_TIMEOUT):
        self.path, self.busy_timeout = path, busy_timeout
        self.checkpointer = Checkpointer(path, busy_timeout)
        self._lock = threading.Lock()  # held by whoever uses the connection
        self._waiting = collections.deque()  # thread-safe append/popleft: no lock of its own
        self._store = None
        self._commits = queue.SimpleQueue()  # bursts for the committer thread
        self._committer = None
        self._committer_lock = threading.Lock()
        self._committed_at = 0.0  # monotonic time of the last COMMIT
        self._failed = (0.0, "")  # (monotonic time, why) of the last write that failed
        self._lock_wait_since = None  # a write is waiting for the database lock since then

    def _submit_alone(self, work, deadline, patient=False):
        """Bursting.submit outside a burst: grouped with other threads' writes, waiting for
        the database lock until `deadline` (whoever runs a job finishes it by then: `patient`
        changes nothing here)."""
        job = _Job(work, deadline)
        self._waiting.append(job)
        # The committer may hold the connection while it waits for the database lock: wait
        # for it only until this write's own deadline (a holder running this job finishes
        # by then too, so a little slack), else the 503 would come late.
        if not self._lock.acquire(timeout=max(0.0, deadline - time.monotonic()) + LOCK_SLACK):
            if not job.done:  # still queued: whoever runs it next drops it (past its deadline)
                raise StoreBusy("database is locked (waited until the deadline)")
        else:
            try:
                while not job.done:  # else an earlier holder of the lock ran it already
                    group = [self._waiting.popleft() for _ in range(min(len(self._waiting), MAX_GROUP))]
                    self._run(group)
                    self._housekeeping()
            finally:
                self._lock.release()
        if job.error is not None:
            raise job.error
        return job.result

    @contextmanager
    def burst(self, on_done):
        """Until the block ends, every submit() of this thread is kept, not run, and
        returns None; then the committer thread runs them all in one transaction,
        waiting for the database lock until the earliest of their deadlines, and calls
        on_done(failed) once they are committed (failed False) or nothing of them is
        (failed True: each answer given inside the block must be thrown away and the
        request run again). The thread that opened the burst never waits for the
        database, and goes on reading requests while the COMMIT (an fsync) runs:
        bursts that queue meanwhile share the next transaction.

        The caller must not let an answer of a request that wrote out before on_done.
        """
        with self._collect(on_done) as burst:
            yield burst
        if not burst.works:
            on_done(False)
            return
        with self._committer_lock:
            if self._committer is None:
                self._committer = threading.Thread(target=self._commit_loop, name="smsbatch-commit", daemon=True)
                self._committer.start()
        self._commits.put(burst)

    def close(self, timeout=REQUEST_WAIT_LIMIT):
        """Let the committer finish the bursts it was given (at most `timeout` seconds)."""
        with self._committer_lock:
            committer, self._committer = self._committer, None
        if committer is not None:
            self._commits.put(None)
            committer.join(timeout)

    def _commit_loop(self):
        while True:
            bursts = [self._commits.get()]
            while bursts[-1] is not None:  # everything that queued during the last COMMIT
                try:
                    bursts.append(self._commits.get_nowait())
                except queue.Empty:
                    break
            stop = bursts[-1] is None
            bursts = [b for b in bursts if b is not None]
            if bursts:
                self._commit(bursts)
            if stop:
                return

    def _commit(self, bursts):
        """Run the bursts' writes in one transaction and tell each burst how it went.

        If the database lock cannot be had by the earliest deadline, only the bursts whose
        deadline has come are failed then (their requests get their 503 in time); the others
        try again until theirs, so no burst waits past its own deadline."""
        while bursts:
            committed = False
            with self._lock:
                try:
                    committed = self._run_works([w for b in bursts for w in b.works],
                                                min(b.deadline for b in bursts))
                finally:
                    self._housekeeping()
            due = time.monotonic() + LOCK_SLACK
            expired = [b for b in bursts if b.deadline <= due]
            if committed or not expired:  # done, or failed before any deadline: not the lock
                self._done(bursts, failed=not committed)
                return
            self._done(expired, failed=True)
            bursts = [b for b in bursts if b.deadline > due]

    @staticmethod
    def _done(bursts, failed):
        for burst in bursts:
            burst.failed = failed
            try:
                burst.on_done(failed)
            except Exception:
                log.exception("webhook: answering a burst failed")

    def _run_works(self, works, deadline):
        """works in one transaction, waiting for the lock until `deadline`; True if committed."""
        store = self._open()
        self._lock_wait_since = time.monotonic()
        try:
            store.begin_group(deadline - time.monotonic())
        except StoreError as exc:
            self._note_failure(str(exc))
            self._reset()  # a connection that cannot even BEGIN may be broken: the next one is fresh
            return False
        finally:
            self._lock_wait_since = None
        try:
            run_works(store, works)
        except Exception:
            store.end_group(commit=False)  # one of them failed: each runs again alone
            return False
        if not store.end_group(commit=True):
            self._note_failure("the COMMIT failed")
            self._reset()
            return False
        self._committed_at = time.monotonic()
        return True

    def trouble(self):
        """Why a text cannot be stored now, or None: a write has waited for the lock for
        WAITING_TOO_LONG, or the last write failed (within TROUBLE_MEMORY) and none has
        been committed since. Never touches the database or the lock."""
        now = time.monotonic()
        since = self._lock_wait_since
        if since is not None and now - since >= WAITING_TOO_LONG:
            return f"a text has waited {now - since:.1f} s for the database lock"
        at, why = self._failed
        if at > self._committed_at and now - at < TROUBLE_MEMORY:
            return f"the last text could not be stored {now - at:.1f} s ago: {why}"
        return None

    def _note_failure(self, why):
        self._failed = (time.monotonic(), why)

    def _run(self, group):
        """Run the jobs in one transaction; if that fails, in one transaction each, so
        one bad job fails only itself. Jobs past their deadline fail at once. Every job
        is done afterwards."""
        try:
            now = time.monotonic()
            for job in group:
                if job.deadline <= now:
                    job.finish(error=StoreBusy("database is locked (waited until the deadline)"))
            group = [job for job in group if not job.done]
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
        store = self._open()
        self._lock_wait_since = time.monotonic()
        try:
            store.begin_group(min(job.deadline for job in group) - time.monotonic())
        except StoreError as exc:  # could not even begin: alone, each would wait as long again
            self._note_failure(str(exc))
            self._reset()
            for job in group:
                job.finish(error=exc)
            return
        finally:
            self._lock_wait_since = None
        try:
            results = run_works(store, [job.work for job in group])
        except Exception:
            store.end_group(commit=False)  # one of them failed: they run alone next
            return
        if store.end_group(commit=True):
            self._committed_at = time.monotonic()
            for job, result in zip(group, results):
                job.finish(result)
        else:
            self._note_failure("the COMMIT failed")
            self._reset()

    def _run_alone(self, job):
        try:
            store = self._open()
            store.wait_at_most(job.deadline - time.monotonic())
            self._lock_wait_since = time.monotonic()
            try:
                result = job.work(store)
            finally:
                self._lock_wait_since = None
            self._committed_at = time.monotonic()
            job.finish(result)
        except Exception as exc:
            job.finish(error=exc)
            if isinstance(exc, StoreError):
                self._note_failure(str(exc))
                self._reset()

    def _open(self):
        """The shared connection, opened on first use (and after a failure)."""
        if self._store is None:
            store = WebStore.open_ready(self.path, self.busy_timeout)
            store.db.checkpoint(autocheckpoint=0)  # see Checkpointer
            self._store = store
        return self._store

    def _reset(self):
        """Drop a connection that failed, so the next write opens a fresh one."""
        if self._store is not None:
            try:
                self._store.close()
            except StoreError:
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
                self._store.db.checkpoint()
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
            conn = plain_connection(self.path, self.busy_timeout)
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
        except StoreError as exc:
            log.warning("webhook: background checkpoint failed: %s", exc)
        finally:
            if conn is not None:
                conn.close()
            with self._lock:
                if self._thread is threading.current_thread():
                    self._thread = None

