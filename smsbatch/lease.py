"""Heartbeat leases: the batches a processor holds stay its own only while it is alive.

A claim lasts HEARTBEAT_LEASE_SECONDS (4 s). While a processor works on a batch, a
heartbeat thread renews all of its claims every HEARTBEAT_SECONDS (1 s) in one small
UPDATE, so a slow AI answer keeps its batch, and a batch whose processor died is free
for another processor about 4 s later; on the same machine sooner, since a processor
there can see that the holder's process id is gone (free_dead).

A frozen process (SIGSTOP, a VM pause, swap) freezes its heartbeat too, and when it
wakes it may not know it lost its batches. So before a send the processor proves it
still holds the lease with its own monotonic clock: the last renewal that succeeded,
plus the lease, must be more than FENCE_MARGIN_SECONDS away. The Twilio connection asks
again right before it writes the request (see deadline.before_write).
"""

import logging
import os
import threading
import time
from dataclasses import dataclass

from smsbatch.config import FENCE_MARGIN_SECONDS, HEARTBEAT_LEASE_SECONDS, HEARTBEAT_SECONDS
from smsbatch.db import Store

log = logging.getLogger("smsbatch.lease")
HEARTBEAT_BUSY_TIMEOUT = 0.5  # a renewal that cannot get the database soon is retried at the next beat


def holder_name():
    """Who holds a claim, as `status` shows it: host:pid."""
    return f"{os.uname().nodename}:{os.getpid()}"  # the host name, without importing socket


def node_id():
    """Which process-id space this process lives in: the kernel's boot id and the pid
    namespace. Only a holder with the same node id can be judged dead by its pid; any
    other host (or container) is judged by its heartbeat alone."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        return f"{boot}/{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return None  # not Linux: heartbeats only


def pid_alive(pid):
    """False only when no process has this pid (a zombie or a reused pid counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


class DatabaseClock:
    """Wall time by the database's clock: this host's time plus its offset from the
    database server's, measured at the start of a run and again at claims and heartbeats
    (at most every RECALIBRATE_SECONDS). Leases are written and judged by every processor
    in this time, so hosts whose clocks differ neither steal live leases nor keep dead ones.
    With SQLite the database's clock is this host's: the offset stays 0 and nothing is asked."""

    RECALIBRATE_SECONDS = 10.0

    def __init__(self, host_time=time.time):
        self.host_time = host_time  # this host's wall clock (a test gives a skewed one)
        self.offset = 0.0
        self._measured = None  # monotonic time of the last measurement

    def __call__(self):
        return self.host_time() + self.offset

    def calibrate(self, store, force=False):
        """Measure the offset again (cheap: one query on PostgreSQL, none on SQLite)."""
        if getattr(store.db, "engine", "") != "postgres":
            return
        now = time.monotonic()
        if not force and self._measured is not None and now - self._measured < self.RECALIBRATE_SECONDS:
            return
        before = self.host_time()
        theirs = store.db_now()
        self.offset = theirs - (before + self.host_time()) / 2  # the server read its clock about midway
        self._measured = now


def calibrate(clock, store, force=False):
    """Bring a DatabaseClock back in line with the database (other clocks are left alone)."""
    if isinstance(clock, DatabaseClock):
        clock.calibrate(store, force)


@dataclass
class Held:
    """One claim this processor holds: when (monotonic) its lease was last confirmed."""

    batch_id: str
    confirmed: float  # monotonic time just before the claim or renewal that succeeded
    taken: float  # monotonic time of the claim: renewals stop `hold_limit` after it
    lost: bool = False


class Leases:
    """The claims one processor holds, renewed by a heartbeat thread while `running()`."""

    def __init__(self, db_path, clock, hold_limit, lease=HEARTBEAT_LEASE_SECONDS, interval=HEARTBEAT_SECONDS,
                 margin=FENCE_MARGIN_SECONDS, monotonic=time.monotonic):
        self.db_path, self.clock, self.hold_limit = db_path, clock, hold_limit
        self.lease, self.interval, self.margin, self.monotonic = lease, interval, margin, monotonic
        self.holder = holder_name()
        self.node = node_id()
        self._held = {}
        self._lock = threading.Lock()
        self._store = None

    def add(self, rows, confirmed):
        """Track freshly claimed rows; `confirmed` is monotonic time taken before the claim began."""
        with self._lock:
            for row in rows:
                self._held[row["claim"], row["id"]] = Held(row["id"], confirmed, confirmed)

    def drop(self, batch):
        """The processor is done with this claimed batch (finished, released or lost)."""
        with self._lock:
            self._held.pop((batch["claim"], batch["id"]), None)

    def holds(self, batch):
        """True if this processor can prove, by its own monotonic clock, that its lease on
        this claimed batch runs for more than the margin (FENCE_MARGIN_SECONDS) yet."""
        with self._lock:
            held = self._held.get((batch["claim"], batch["id"]))
            if held is None or held.lost:
                return False
            return self.monotonic() + self.margin < held.confirmed + self.lease

    def renew(self):
        """Renew every claim still worth holding, in one UPDATE; claims the database no
        longer gives us are marked lost (another processor took the batch over)."""
        with self._lock:
            started = self.monotonic()
            keys = [k for k, h in self._held.items() if not h.lost and started - h.taken < self.hold_limit]
        if not keys:
            return
        calibrate(self.clock, self._db())
        now = self.clock()
        renewed = self._db().renew_claims(sorted({claim for claim, _ in keys}), now + self.lease, now)
        with self._lock:
            for key in keys:
                held = self._held.get(key)
                if held is None:
                    continue
                if key in renewed:
                    held.confirmed = started
                else:
                    held.lost = True

    def free_dead(self, store, now):
        """Free now, rather than at their lease's end, batches in *processing* whose holder
        was a process of this machine that no longer exists (killed, crashed). Batches in
        *sending* wait for their lease: a request written just before the death must have
        reached Twilio's log before anyone looks for it."""
        if self.node is None:
            return 0
        return store.free_dead_holders(now, self.node, lambda holder: pid_alive(int(holder.rsplit(":", 1)[1])))

    def _db(self):
        if self._store is None:
            self._store = Store(self.db_path, busy_timeout=HEARTBEAT_BUSY_TIMEOUT, durable=False)  # renewals
        return self._store

    def _beat(self, stop):
        failing_since, warned = None, False
        while not stop.wait(self.interval):
            try:
                self.renew()
                failing_since, warned = None, False
            except Exception as exc:
                # A missed beat is harmless (the lease outlasts several): a busy database under
                # load must not fill cron mail. Say so once, when the lease itself is at risk.
                now = self.monotonic()
                failing_since = now if failing_since is None else failing_since
                if not warned and now - failing_since >= self.lease / 2:
                    log.warning("lease renewals failing for %.1f s (%s): another processor may take these "
                                "batches over; the fence keeps this one from sending them", now - failing_since, exc)
                    warned = True

    def running(self):
        """A context manager: the heartbeat thread runs inside it."""
        return _Running(self)


class _Running:
    def __init__(self, leases):
        self.leases = leases
        self.stop = threading.Event()
        self.thread = threading.Thread(target=leases._beat, args=(self.stop,), name="smsbatch-heartbeat",
                                       daemon=True)

    def __enter__(self):
        self.thread.start()
        return self.leases

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        if self.leases._store is not None:
            self.leases._store.close()
            self.leases._store = None
