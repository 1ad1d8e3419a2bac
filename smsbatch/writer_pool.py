"""The webhook's write path on PostgreSQL: each text in its own durable transaction on a
pooled connection, so requests on several threads (and several hosts) write at once.

The SQLite webhook groups texts into shared transactions instead (smsbatch.writer): one
file has one writer at a time. Here every request borrows a connection, runs its write in
one transaction within its deadline (statement and lock timeouts set from it), and is
answered 200 only once that transaction committed (synchronous_commit on).
"""

import time

from smsbatch.db import Store
from smsbatch.engine import StoreError, open_pool

TROUBLE_MEMORY = 30.0  # seconds a failed write (with none committed since) counts as "cannot store"
PROBE_SECONDS = 1.0  # /health: how long a probe of the database may take once a write failed


class PoolWriter:
    """The Writer interface web.Webhook uses (submit, in_burst, trouble, close), on a pool."""

    def __init__(self, url, busy_timeout):
        self.url, self.busy_timeout = url, busy_timeout
        self.pool = open_pool(url, busy_timeout)
        self._committed_at = 0.0
        self._failed = (0.0, "")

    def submit(self, work, deadline=None):
        """Run work(store) in its own transaction and return what it returns once committed,
        giving up at `deadline` (monotonic; default busy_timeout from now).

        Raises:
            SmsbatchError (StoreError among them): nothing of `work` was stored.
        """
        if deadline is None:
            deadline = time.monotonic() + self.busy_timeout
        try:
            result = self.pool.run(lambda database: work(Store.on(database)), deadline)
        except StoreError as exc:
            self._failed = (time.monotonic(), str(exc))
            raise
        self._committed_at = time.monotonic()
        return result

    def in_burst(self):
        return False  # no bursts: each request writes on its own connection

    def trouble(self):
        """Why a text cannot be stored now, or None: the last write failed (within
        TROUBLE_MEMORY) and none has been committed since."""
        now = time.monotonic()
        at, why = self._failed
        if at > self._committed_at and now - at < TROUBLE_MEMORY:
            if self._reachable():
                # The database is back: a load balancer that took this host out on a 503 sends
                # it no text that could commit, so waiting for one would keep it out 30 s.
                self._committed_at = now
                return None
            return f"the last text could not be stored {now - at:.1f} s ago: {why}"
        return None

    def _reachable(self):
        """True if a pooled connection takes a write now (the probe writes nothing)."""
        try:
            return self.pool.run(lambda database: database.write_blocked(PROBE_SECONDS),
                                 time.monotonic() + PROBE_SECONDS) is None
        except StoreError:
            return False

    def close(self):
        self.pool.close()
