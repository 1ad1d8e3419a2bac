"""The webhook's write path on PostgreSQL: group commit, each group on a pooled connection.

Like the SQLite webhook (smsbatch.writer.Writer), with the same interface (burst, submit,
in_burst, trouble, close), so web.py need not know the engine: the server hands over the
writes of requests that arrived together (burst()), and one committer thread runs them,
with everything else that queued meanwhile, in ONE transaction on a connection of the
writer's engine_pg_pool.Pool: one BEGIN, one COMMIT (one WAL flush, synchronous_commit on) for
the lot. Each committer keeps the connection it borrowed for its next groups (given back
after a failure, or every KEEP_SECONDS); the pool opens the connections in the background
and replaces one the server dropped (/health's probe borrows one too). Each text still takes its conversation's advisory lock and is deduplicated
by MessageSid inside that transaction, so several hosts may write the same database.

A group of texts of conversations this writer wrote before (or never saw: guessed new) is
stored in ONE round trip, BEGIN to COMMIT, from what it remembers of them (intake.Memory,
Store.add_texts_guessed), every guess checked by the server in that transaction; a wrong
guess stores nothing and the group is stored the ordinary way (reads, then writes, then
COMMIT: three round trips). Measured (bench/run.py pg, 2 cores): one `serve` went from
0.61x to 0.87-0.89x the SQLite webhook's texts a second.

A group that fails (one text's write raised, the connection was lost, the deadline came)
stores nothing; then every burst in it is handed back to the server, which runs its
requests again on pool threads (submit()), and those are retried one transaction per text,
so one bad text cannot lose the others. Every 200 still comes only after its COMMIT.

Measured with bench/run.py pg (2 cores, shared): one transaction per text on a pool served
418 req/s against SQLite's 2,597; the figures with this writer are in docs/several-hosts.md.
"""

import logging
import collections
import threading
import time
from contextlib import contextmanager

from smsbatch.db import Store
from smsbatch.engine import StoreBusy, StoreError, connect_pool
from smsbatch.db_intake import GuessedWrong
from smsbatch.intake import Memory, Text
from smsbatch.writer import REQUEST_WAIT_LIMIT, TROUBLE_MEMORY, WAITING_TOO_LONG, Burst, Bursting, run_works

log = logging.getLogger("smsbatch.web")
PROBE_SECONDS = 1.0  # /health: how long a probe of the database may take once a write failed
MAX_GROUP = 256  # most texts in one transaction (more wait for the next COMMIT)
KEEP_SECONDS = 60.0  # a committer gives its connection back this often, so the pool can retire old ones
# Committer threads, each with a connection: the first takes every group; the others stand by
# and take what has waited STANDBY_SECONDS (the first is held up by a lock another host holds, or
# a slow server). Measured with one-round-trip groups (bench/run.py pg): two committers taking
# turns split the groups in smaller ones and stored about 10% fewer texts a second than one.
COMMITTERS = 2
STANDBY_SECONDS = 0.05
ANSWER_GRACE = 0.5  # a request alone is answered 503 this long after its deadline, whatever the committers do


class GroupStore(Store):
    """A Store whose `transaction()` joins the group's transaction between Database.begin()
    and end(). A write that raised inside it (even one its caller caught, such as a
    MessageSid found stored by another host meanwhile) marks the group `spoiled`: what it
    wrote before raising cannot be undone alone, so the group must not be committed."""

    _grouped = False
    spoiled = False

    @contextmanager
    def transaction(self):
        """Store.transaction, or inside the group's transaction while grouped."""
        if not self._grouped:
            with super().transaction() as conn:
                yield conn
            return
        try:
            yield self.conn
        except BaseException:
            self.spoiled = True
            raise

    def begin_group(self, deadline):
        """BEGIN; every statement ends before `deadline` (monotonic). Raises: StoreError."""
        self.db.begin(deadline - time.monotonic())
        self._grouped, self.spoiled = True, False

    def end_group(self, commit):
        """COMMIT (or ROLLBACK) the group. Raises: StoreError (nothing of it is stored)."""
        self._grouped = False
        self.db.end(commit and not self.spoiled)
        if commit and self.spoiled:
            raise StoreError("a write in the group failed")


class _Job:
    """A pool thread's write (a request run again after its burst failed)."""

    __slots__ = ("work", "deadline", "result", "error", "done")

    def __init__(self, work, deadline):
        self.work, self.deadline, self.result, self.error = work, deadline, None, None
        self.done = threading.Event()

    def finish(self, result=None, error=None):
        self.result, self.error = result, error
        self.done.set()


class PgWriter(Bursting):
    """The Writer interface web.Webhook uses, for PostgreSQL: see the module's docstring."""

    def __init__(self, url, busy_timeout):
        self.url, self.busy_timeout = url, busy_timeout
        self._queue = _Queue()  # Burst and _Job items for the committers
        self._committers = []
        self._committer_lock = threading.Lock()
        self._pool = None  # engine_pg_pool.Pool: the committers' connections and /health's probe's, opened at first use
        self._committed_at = 0.0  # monotonic time of the last COMMIT
        self._failed = (0.0, "")  # (monotonic time, why) of the last write that failed
        self._busy_since = {}  # {committer thread: monotonic time its current transaction began}
        self._memory = Memory()  # what the committers wrote last of each conversation (one round trip a group)
        self.guesses = collections.Counter()  # groups stored from a guess ("right"), or the ordinary way after one ("wrong")

    # -- what the webhook calls ------------------------------------------------------

    def _submit_alone(self, work, deadline, patient=False):
        """Bursting.submit outside a burst: a committer runs it with whatever else is queued."""
        job = _Job(work, deadline)
        self._hand_over(job)
        # A committer stuck on a server that vanished (until the kernel gives up, 10-15 s) must
        # not hold this request past its deadline: 503 then (server.LATE_GRACE, the same grace).
        # A late run is skipped (_commit: items past their deadline), or stores the text anyway.
        # A caller no client waits for (`patient`) waits for how it ended instead: given up on
        # while its COMMIT was under way, the rejection counts were written again, twice in all.
        grace = REQUEST_WAIT_LIMIT if patient else ANSWER_GRACE
        if not job.done.wait(max(0.0, deadline - time.monotonic()) + grace):
            raise StoreBusy("the database did not store the text before its deadline")
        if job.error is not None:
            raise job.error
        return job.result

    @contextmanager
    def burst(self, on_done):
        """Until the block ends, every submit() of this thread is kept, not run; then the
        committer runs them in one transaction and calls on_done(failed): False once they
        are committed, True if nothing of them is (the requests must be run again).
        The same contract as smsbatch.writer.Writer.burst."""
        with self._collect(on_done) as burst:
            yield burst
        if not burst.works:
            on_done(False)
            return
        self._hand_over(burst)

    def trouble(self):
        """Why a text cannot be stored now, or None: a transaction has run for
        WAITING_TOO_LONG, or the last write failed (within TROUBLE_MEMORY), none has been
        committed since and a probe finds the database still unable to take writes."""
        now = time.monotonic()
        since = min(tuple(self._busy_since.values()), default=None)  # a copy: committers change it
        if since is not None and now - since >= WAITING_TOO_LONG:
            return f"a text has waited {now - since:.1f} s for the database"
        at, why = self._failed
        if at > self._committed_at and now - at < TROUBLE_MEMORY:
            if self._reachable():
                # The database is back: a load balancer that took this host out on a 503 sends
                # it no text that could commit, so waiting for one would keep it out 30 s.
                self._committed_at = now
                return None
            return f"the last text could not be stored {now - at:.1f} s ago: {why}"
        return None

    def close(self, timeout=REQUEST_WAIT_LIMIT):
        """Let the committers finish what they were given (at most `timeout` seconds)."""
        with self._committer_lock:
            committers, self._committers = self._committers, []
            given, self._queue = self._queue, _Queue()  # a later write starts committers anew
        given.close()
        end = time.monotonic() + timeout
        for committer in committers:
            committer.join(max(0.0, end - time.monotonic()))
        with self._committer_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()

    def _connections(self):
        """The pool (opened now if not yet): a connection for each committer and one for the probe."""
        with self._committer_lock:
            if self._pool is None:
                self._pool = connect_pool(self.url, COMMITTERS + 1, self.busy_timeout)
            return self._pool

    # -- the committer thread ----------------------------------------------------------

    def _hand_over(self, item):
        with self._committer_lock:
            while len(self._committers) < COMMITTERS:
                patience = STANDBY_SECONDS if self._committers else 0.0  # the first takes at once
                committer = threading.Thread(target=self._commit_loop, args=(patience,), name="smsbatch-commit",
                                             daemon=True)
                committer.start()
                self._committers.append(committer)
        self._queue.put(item)

    def _commit_loop(self, patience):
        """One committer: what it may take from the queue (_Queue.take: items that waited
        `patience` seconds), one transaction at a time, on the connection it keeps
        (_Committer), until the queue is closed and empty (close())."""
        committer, given = _Committer(self._connections()), self._queue
        try:
            while (items := given.take(committer, MAX_GROUP, patience)) is not None:
                try:
                    self._commit(committer, items)
                except Exception:  # a bug (every failure of a write is handled inside): keep the committer, none replaces it
                    log.exception("webhook: a committer failed on a group; it goes on with the next")
        finally:
            given.done(committer)
            committer.close()

    def _commit(self, committer, items):
        """Run the items' writes in one transaction; on failure, hand bursts back to the
        server and run jobs one transaction each. Every item is answered afterwards."""
        now = time.monotonic()
        late = [i for i in items if i.deadline <= now]
        items = [i for i in items if i.deadline > now]
        for item in late:
            _fail(item, StoreBusy("the database did not store the text before its deadline"))
        if not items:
            return
        works = [w for item in items for w in (item.works if isinstance(item, Burst) else [item.work])]
        results = self._run_group(committer, works, min(i.deadline for i in items))
        if results is not None:
            results = iter(results)
            for item in items:
                if isinstance(item, Burst):
                    for _ in item.works:
                        next(results)
                    _answer(item, False)
                else:
                    item.finish(next(results))
            return
        for item in items:
            if isinstance(item, Burst):
                _answer(item, True)  # its requests come back through submit(), text by text
            else:
                self._run_alone(committer, item)

    def _run_group(self, committer, works, deadline):
        """works in one transaction; their results once committed, else None."""
        self._busy_since[committer] = time.monotonic()
        try:
            store = committer.open(deadline)
            store.last_intake = None
            results = self._run_guessed(store, works, deadline)
            if results is None:
                store.begin_group(deadline)
                try:
                    results = run_works(store, works)
                except BaseException:
                    store.end_group(commit=False)
                    raise
                store.end_group(commit=True)
        except Exception as exc:  # nothing of the group is stored: what was remembered of it may be wrong
            self._memory.forget([w for w in works if isinstance(w, Text)], time.monotonic())
            if isinstance(exc, StoreError):
                committer.release()  # the pool checks it, and replaces it if the server dropped it
                self._note_failure(exc)
            else:  # a text's own fault: each runs again alone, and fails alone
                log.debug("webhook: a group of %d writes failed; each runs again alone", len(works), exc_info=True)
            return None
        finally:
            self._busy_since.pop(committer, None)
        self._committed_at = time.monotonic()
        if store.last_intake is not None:  # committed: what the next groups may guess from
            try:
                self._memory.learn(*store.last_intake)
            except Exception:  # a bug here must not stop the committer: those texts are stored
                log.exception("webhook: remembering a group failed; its conversations are not guessed")
                self._memory.forget(store.last_intake[0], time.monotonic())
        return results

    def _run_guessed(self, store, works, deadline):
        """A group of texts only, stored in one round trip from what this writer remembers
        of their conversations (intake.Memory, Store.add_texts_guessed); None if it could not
        be guessed, or was guessed wrong (nothing stored: the group goes the ordinary way).
        Raises: StoreError (the group failed)."""
        if not all(isinstance(work, Text) for work in works):
            return None
        guess = self._memory.guess(works, time.monotonic())
        if guess is None:
            return None
        try:
            added = store.add_texts_guessed(works, *guess, deadline - time.monotonic())
        except GuessedWrong:
            self._count_guess("wrong")
            self._memory.forget(works, time.monotonic())
            return None
        self._count_guess("right")
        return added

    def _count_guess(self, outcome):
        with self._committer_lock:  # two committers count
            self.guesses[outcome] += 1

    def _run_alone(self, committer, job):
        """One job in a transaction of its own (Store's), within its deadline."""
        if job.deadline <= time.monotonic():
            return job.finish(error=StoreBusy("the database did not store the text before its deadline"))
        self._busy_since[committer] = time.monotonic()
        try:
            store = committer.open(job.deadline)
            store.db.deadline = job.deadline
            try:
                result = job.work(store)
            finally:
                store.db.deadline = None
        except Exception as exc:
            if isinstance(exc, StoreError):
                committer.release()
                self._note_failure(exc)
            return job.finish(error=exc)
        finally:
            self._busy_since.pop(committer, None)
        self._committed_at = time.monotonic()
        job.finish(result)

    def _note_failure(self, exc):
        self._failed = (time.monotonic(), str(exc))

    # -- /health's probe -----------------------------------------------------------------

    def _reachable(self):
        """True if the database takes a write now (the probe writes nothing), on a connection
        of the pool (it has one more than the committers)."""
        try:
            with self._connections().connection(time.monotonic() + PROBE_SECONDS) as database:
                return database.write_blocked(PROBE_SECONDS) is None
        except StoreError:
            return False


class _Queue:
    """The items (Burst, _Job) waiting for a committer, in arrival order. A committer takes
    those whose conversations no other committer of this process is writing now: the same
    conversation's lock would only make it wait for the other's COMMIT (measured with the
    bench's bursts of three texts a person: two committers sharing one queue blindly stored
    fewer texts a second than one). An item left behind keeps every later item of its
    conversations behind it, so one person's texts are stored in the order they came. A
    conversation another host holds still blocks only the committer that took it: a standby
    (take's `patience`) takes what has waited that long, and looks every `patience` seconds
    rather than at every text (waking it for each cost more CPU than it saved)."""

    def __init__(self):
        self._items = collections.deque()  # (monotonic time put, item)
        self._writing = {}  # committer: the conversations of the group it is writing
        lock = threading.Lock()
        self._changed = threading.Condition(lock)  # wakes the committers that take at once
        self._aged = threading.Condition(lock)  # the standby: it looks every STANDBY_SECONDS
        self._closed = False

    def put(self, item):
        with self._changed:
            self._items.append((time.monotonic(), item))
            self._changed.notify()  # not the standby: waking it for every text cost more than it saved

    def close(self):
        with self._changed:
            self._closed = True
            self._changed.notify_all()
            self._aged.notify_all()

    def done(self, committer):
        """`committer` wrote its group (or stopped): its conversations are free."""
        with self._changed:
            if self._writing.pop(committer, None):
                self._changed.notify_all()  # the standby looks again in its own time

    def take(self, committer, limit, patience=0.0):
        """The next group for `committer` (about `limit` texts at most), of items that have
        waited `patience` seconds at least, waiting for one; None once closed and empty."""
        self.done(committer)  # its last group is written
        with self._changed:
            while True:
                now, wait = time.monotonic(), 0.5
                taken, left, mine, busy, size = [], collections.deque(), set(), set(), 0
                for other in self._writing.values():
                    busy |= other
                for at, item in self._items:
                    conversations, young = _conversations(item), now - at < patience
                    if size < limit and not conversations & busy and not young:
                        taken.append(item)
                        mine |= conversations
                        size += _size(item)
                    else:
                        left.append((at, item))
                        busy |= conversations  # later texts of these wait behind it
                        if young:  # left only for its age: look again when it is old enough
                            wait = min(wait, max(at + patience - now, 0.001))
                        # (behind a busy conversation: done() wakes the first committer, the standby looks every `patience`)
                if taken:
                    self._items, self._writing[committer] = left, mine
                    return taken
                if self._closed and not self._items:
                    return None
                if patience:
                    self._aged.wait(min(wait, patience))
                else:
                    self._changed.wait(wait)


class _Committer:
    """A committer thread's connection: one of the pool's, borrowed at its first group and
    kept for the next ones (a loan per group cost about 0.1 ms of each group's few), given
    back by release() when a group failed on it, so that the pool checks it and replaces
    one the server dropped, and by close()."""

    def __init__(self, pool):
        self.pool, self.store, self.since = pool, None, 0.0

    def open(self, deadline):
        """A GroupStore on this committer's connection, borrowed from the pool (waiting
        for one until `deadline`) if it has none; statements on it end before `deadline`.
        Raises: StoreError."""
        if self.store is not None and time.monotonic() - self.since > KEEP_SECONDS:
            self.release()  # the pool may retire it (its max lifetime) and lend another
        if self.store is None:
            self.store, self.since = GroupStore.on(self.pool.connect(deadline)), time.monotonic()
        else:
            self.store.db.renew(deadline)
        return self.store

    def release(self):
        """Give the connection back (nothing if open() failed)."""
        store, self.store = self.store, None
        if store is not None:
            store.close()

    close = release


def _size(item):
    return len(item.works) if isinstance(item, Burst) else 1


def _conversations(item):
    """The conversations an item's texts write to (other writes, such as receipts, none)."""
    works = item.works if isinstance(item, Burst) else [item.work]
    return {work.conversation for work in works if isinstance(work, Text)}


def _fail(item, error):
    if isinstance(item, Burst):
        _answer(item, True)
    else:
        item.finish(error=error)


def _answer(burst, failed):
    burst.failed = failed
    try:
        burst.on_done(failed)
    except Exception:
        log.exception("webhook: answering a burst failed")
