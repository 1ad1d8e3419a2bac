"""The PostgreSQL engine's connection pool, for the webhook's committers and /health's probe.

psycopg_pool keeps the connections (opened and set up with engine_pg's settings in the
background, replaced when the server dropped one or after POOL_MAX_LIFETIME); Pool lends one
as an engine_pg.Database within a deadline. With engine_pg, the only module that imports
psycopg; the only one that imports psycopg_pool.
"""

import logging
import threading
import time
from contextlib import contextmanager

import psycopg

from smsbatch.engine import StoreBusy, StoreUnavailable, shown_target
from smsbatch.engine_pg import Database, connect_kwargs, configure

log = logging.getLogger("smsbatch.engine_pg")
POOL_MAX_LIFETIME = 30 * 60.0  # a pooled connection is replaced after this (server-side memory; a moved DNS name)
POOL_RECONNECT_TIMEOUT = 10.0  # the pool retries a failed connect (backoff 1, 2, 4 s...) this long, then on demand


class Pool:
    """Connections to one database for several threads (the webhook's committers and its
    /health probe), kept by psycopg_pool: `size` of them opened and set up (configure())
    in the background; one the server dropped is discarded when given back and another
    opened, with a backoff while the server is down (1, 2, 4 s... for POOL_RECONNECT_TIMEOUT,
    then again at the next request); each replaced after POOL_MAX_LIFETIME. Every connect
    is bounded by CONNECT_TIMEOUT, every wait for a connection by the caller's deadline.
    `connection(deadline)` lends one as a Database until the block ends. Thread-safe."""

    def __init__(self, url, size, busy_timeout, durable=True):
        self.url, self.size, self.busy_timeout, self.durable = url, size, busy_timeout, durable
        self._lent = 0  # connections lent now: a PoolTimeout with all of them lent means busy, not down
        self._lock = threading.Lock()
        import psycopg_pool  # only the webhook has a pool: `process` from cron does not load it

        self._lib = psycopg_pool
        self._pool = psycopg_pool.ConnectionPool(
            url, kwargs=connect_kwargs(url), min_size=size, max_size=size, open=False, name="smsbatch",
            configure=lambda raw: configure(raw, durable, busy_timeout), max_lifetime=POOL_MAX_LIFETIME,
            reconnect_timeout=POOL_RECONNECT_TIMEOUT, num_workers=2)
        self._pool.open(wait=False)  # connects in the background: a server down now is not an error yet

    @contextmanager
    def connection(self, deadline):
        """A Database on a pooled connection until the block ends (then given back), waiting
        for one until `deadline` (monotonic). No check per loan (it would cost a round trip):
        a connection found dropped is swapped for a working one (PooledDatabase.raw).
        Raises: StoreBusy (every connection in use until the deadline), StoreUnavailable."""
        database = self.connect(deadline)
        try:
            yield database
        finally:
            database.close()

    def connect(self, deadline):
        """connection() without the block: the Database's close() gives the connection back."""
        return PooledDatabase(self, self.getconn(deadline), deadline)

    def getconn(self, deadline):
        """A connection of the pool (give it back with putconn). Raises: StoreBusy, StoreUnavailable."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise StoreBusy("the deadline passed before a connection to the database was free")
        try:
            raw = self._pool.getconn(left)
        except self._lib.PoolTimeout:
            if self._lent >= self.size:
                raise StoreBusy(f"every connection to the database was in use for {left:.1f} s") from None
            raise StoreUnavailable(f"cannot connect to {shown_target(self.url)} (none within {left:.1f} s)") from None
        except self._lib.PoolClosed:
            raise StoreUnavailable("the connection pool is closed") from None
        with self._lock:
            self._lent += 1
        return raw

    def putconn(self, raw):
        """Give a connection back: the pool keeps it, or discards a broken one and opens another."""
        with self._lock:
            self._lent -= 1
        self._pool.putconn(raw)

    def working(self, deadline):
        """A connection that answers (an empty query), for one the server dropped: the others
        idle in the pool were likely dropped too (a restart): each found dead is given back,
        until one answers or the deadline. Raises: StoreBusy, StoreUnavailable."""
        while True:
            raw = self.getconn(deadline)
            try:
                self._pool.check_connection(raw)
                return raw
            except psycopg.Error:
                self.putconn(raw)

    def close(self, timeout=5.0):
        """Close every connection (one still lent is closed when given back)."""
        self._pool.close(timeout)


class PooledDatabase(Database):
    """A Database on a connection a Pool lent (Pool.connection): a connection the server
    dropped is swapped for a working one of the pool's while no transaction runs, within
    the loan's deadline; close() gives it back."""

    def __init__(self, pool, raw, deadline):
        self._pool, self._deadline = pool, deadline
        self._setup(pool.url, pool.busy_timeout, pool.durable, raw)

    def raw(self):
        raw = self._raw
        if (raw is None or raw.broken or raw.closed) and not self.in_transaction:
            if raw is not None:
                self._raw = None
                self._pool.putconn(raw)  # the pool discards it and opens another
                log.info("replacing a dropped connection to %s", shown_target(self.path))
            self._raw = self._pool.working(self._deadline)
        return self._raw

    def renew(self, deadline):
        """Keep the loan for another use: a dropped connection is swapped until `deadline`."""
        self._deadline = deadline

    def close(self):
        raw, self._raw = self._raw, None
        if raw is not None:
            self._pool.putconn(raw)
