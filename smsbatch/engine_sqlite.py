"""The SQLite engine: one file, one writer at a time (BEGIN IMMEDIATE), WAL, PRAGMA user_version.

The only module (with the webhook's SQLite group commit, smsbatch.writer) that imports
sqlite3. Its connection translates sqlite3's errors into smsbatch.engine's neutral ones
as they happen, so callers catch StoreBusy / StoreConflict / StoreUnavailable / StoreError.
"""

import os
import sqlite3
import time
from contextlib import contextmanager
from importlib import resources

from smsbatch import migrations
from smsbatch.engine import StoreBusy, StoreConflict, StoreError, StoreUnavailable
from smsbatch.errors import SmsbatchError


def translate(exc):
    """The neutral error for a sqlite3 error (the original stays as its __cause__)."""
    text = str(exc)
    if isinstance(exc, sqlite3.IntegrityError):
        return StoreConflict(text)
    if isinstance(exc, sqlite3.OperationalError):
        if "locked" in text or "busy" in text:
            return StoreBusy(text)
        if "readonly" in text or "unable to open" in text or "disk" in text:
            return StoreUnavailable(text)
    return StoreError(text)


class Connection(sqlite3.Connection):
    """sqlite3's connection, raising smsbatch.engine's errors instead of sqlite3's."""

    def execute(self, sql, parameters=()):
        try:
            return super().execute(sql, parameters)
        except sqlite3.Error as exc:
            raise translate(exc) from exc

    def executemany(self, sql, parameters):
        try:
            return super().executemany(sql, parameters)
        except sqlite3.Error as exc:
            raise translate(exc) from exc

    def execute_all(self, statements):
        """[(sql, parameters), ...] run in turn; their results (read whole), in order. (On
        PostgreSQL one round trip for them all; here every statement is a function call.)"""
        return [_Result(self.execute(sql, parameters)) for sql, parameters in statements]


class _Result:
    """A statement's rows read at once, so the next statement may run before they are used."""

    __slots__ = ("rowcount", "_rows")

    def __init__(self, cursor):
        self._rows = cursor.fetchall()
        self.rowcount = cursor.rowcount

    def fetchall(self):
        return self._rows


class Database:
    """One SQLite connection and what smsbatch needs of it. Not thread-safe."""

    engine = "sqlite"
    prepares = False  # in-process statements: VALUES lists cost nothing to send (sqlite3 caches what it parsed)
    for_update = ""  # BEGIN IMMEDIATE: a transaction that writes holds the whole file
    skip_locked = ""

    def __init__(self, path, busy_timeout, durable=True):
        self.path, self.busy_timeout = path, busy_timeout
        _create_private(path)
        self.conn = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None, check_same_thread=False,
                                    factory=Connection)
        self.conn.row_factory = sqlite3.Row
        self.conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
        try:
            self.conn.execute("PRAGMA journal_mode = WAL")
        except StoreError as exc:
            if "not a database" not in str(exc):
                raise
            raise SmsbatchError(f"{path} is not an SQLite database") from None
        # FULL: in WAL mode every COMMIT fsyncs the WAL, so a text answered 200 and a batch
        # marked sending survive power loss (NORMAL may roll them back). The webhook commits
        # in groups, so it pays one fsync per burst, not per text (bench/run.py webhook-vs-flask).
        # The processor's connections are not `durable`: a claim or a *sent* mark lost to power
        # loss is made good by the lease and by reconcile; the one move whose loss would send a
        # reply twice, *sending*, commits through durable_transaction(). A FULL commit in WAL
        # mode syncs every frame before it, so nothing committed earlier is left behind.
        self.synchronous = "FULL" if durable else "NORMAL"
        self.conn.execute(f"PRAGMA synchronous = {self.synchronous}")
        self.conn.execute("PRAGMA foreign_keys = ON")

    def exists(self):
        return self.path == ":memory:" or os.path.exists(self.path)

    def close(self):
        self.conn.close()

    # -- dialect ------------------------------------------------------------------

    @staticmethod
    def greatest(a, b):
        return f"max({a}, {b})"

    @staticmethod
    def day(column):
        """The UTC day (YYYY-MM-DD) of an epoch-seconds column."""
        return f"date({column}, 'unixepoch')"

    @staticmethod
    def join_times(column):
        """The column's times (epoch seconds) joined by commas, each exact (17 digits:
        group_concat alone would keep 15, about a microsecond off)."""
        return f"group_concat(printf('%.17g', {column}))"

    @staticmethod
    def lock_conversations(conversations):
        """No statements: inside transaction() this connection holds the file's write lock,
        which serialises every writer, those of these conversations among them."""
        return []

    def now(self):
        """The database's clock: with SQLite every process shares this host's."""
        return time.time()

    # -- transactions ---------------------------------------------------------------

    @contextmanager
    def transaction(self):
        """BEGIN IMMEDIATE ... COMMIT: one writer at a time, waiting its turn (busy timeout)."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    @contextmanager
    def durable_transaction(self):
        """transaction(), committed with synchronous = FULL whatever this connection's setting
        (a throwaway database stays as it is): what it commits survives power loss."""
        upgrade = self.synchronous == "NORMAL"
        if upgrade:
            self.conn.execute("PRAGMA synchronous = FULL")
        try:
            with self.transaction() as conn:
                yield conn
        finally:
            if upgrade:
                self.conn.execute("PRAGMA synchronous = NORMAL")

    @contextmanager
    def snapshot(self):
        """A read-only transaction: every read inside sees one moment; nothing is written."""
        self.conn.execute("BEGIN")
        try:
            yield self.conn
        finally:
            self.conn.execute("ROLLBACK")

    def make_throwaway(self):
        """Make a scratch database (simulate's) fast: it need not survive a crash nor be
        shared. The journal stays, in memory, so a rolled-back transaction still rolls back."""
        for pragma in ("locking_mode = EXCLUSIVE", "journal_mode = MEMORY", "synchronous = OFF"):
            self.conn.execute(f"PRAGMA {pragma}").fetchall()
        self.synchronous = "OFF"

    def wait_at_most(self, seconds):
        """Wait at most this long for another writer's lock (SQLite's busy timeout)."""
        self.conn.execute(f"PRAGMA busy_timeout = {max(0, int(seconds * 1000))}")

    # the webhook's group commit (smsbatch.writer): many texts in one transaction
    def begin(self):
        self.conn.execute("BEGIN IMMEDIATE")

    def end(self, commit):
        """COMMIT (or ROLLBACK); a failed COMMIT is rolled back. Raises: StoreError."""
        try:
            self.conn.execute("COMMIT" if commit else "ROLLBACK")
        except StoreError:
            if self.conn.in_transaction:
                try:
                    self.conn.execute("ROLLBACK")
                except StoreError:
                    pass
            raise

    def checkpoint(self, autocheckpoint=None):
        """Checkpoint the WAL now (PASSIVE: never blocks writers); returns the WAL's length in
        frames. `autocheckpoint=0` turns SQLite's own checkpoint-inside-COMMIT off instead."""
        if autocheckpoint is not None:
            self.conn.execute(f"PRAGMA wal_autocheckpoint = {int(autocheckpoint)}")
            return None
        return self.conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1]

    def write_blocked(self, seconds):
        """Why a write could not start within `seconds` (another connection holds the write
        lock), or None. Takes the lock for an instant and writes nothing."""
        self.wait_at_most(seconds)
        try:
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.execute("ROLLBACK")
            return None
        except StoreBusy:
            return f"another process holds the database's write lock (waited {seconds:g} s)"
        finally:
            self.wait_at_most(self.busy_timeout)

    def check_writable(self):
        """Take the write lock and let it go, writing nothing. Raises: StoreError."""
        with self.transaction():
            pass

    # -- schema ---------------------------------------------------------------------

    def version(self):
        return self.conn.execute("PRAGMA user_version").fetchone()[0]

    def columns(self, table):
        """The column names of a table (another version may lack some)."""
        return {r[1] for r in self.conn.execute(f"PRAGMA table_info({table})")}

    def tables(self):
        """{table: [column names]} of every table (the contract suite compares engines)."""
        names = [r[0] for r in self.conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")]
        return {name: sorted(self.columns(name)) for name in names}

    def migrate(self, latest):
        """Create or upgrade the schema to `latest`; returns the version before.

        Raises:
            SmsbatchError: the database is newer than this smsbatch, or a step left a broken reference.
        """
        # A step may rebuild a table that others reference: foreign keys are off while it
        # runs (SQLite ignores this pragma inside a transaction) and checked before COMMIT.
        self.conn.execute("PRAGMA foreign_keys = OFF")
        try:
            with self.transaction() as conn:
                before = conn.execute("PRAGMA user_version").fetchone()[0]
                if before > latest:
                    raise SmsbatchError(f"database schema version {before} is newer than this smsbatch ({latest})")
                if before == 0:
                    for statement in statements(resources.files("smsbatch").joinpath("schema.sql").read_text()):
                        conn.execute(statement)
                else:
                    for version in range(before + 1, latest + 1):
                        for statement in migrations.sqlite_step(version):
                            conn.execute(statement)
                broken = conn.execute("PRAGMA foreign_key_check").fetchone()
                if broken:
                    raise SmsbatchError(f"upgrade stopped: table {broken[0]} has a row whose {broken[2]} is missing")
                conn.execute(f"PRAGMA user_version = {latest}")
        finally:
            self.conn.execute("PRAGMA foreign_keys = ON")
        return before

    # -- space (prune reclaims it) ----------------------------------------------------

    def space(self):
        """How big the database is and how much of it is free (pages a prune emptied, which
        new rows reuse but the file keeps): {"bytes", "free_bytes"}."""
        size = self.conn.execute("PRAGMA page_size").fetchone()[0]
        pages = self.conn.execute("PRAGMA page_count").fetchone()[0]
        free = self.conn.execute("PRAGMA freelist_count").fetchone()[0]
        return {"bytes": pages * size, "free_bytes": free * size}

    def reclaim_space(self):
        """Give the free pages back to the file system (VACUUM, then a WAL checkpoint that
        truncates it). Holds the write lock while it runs. Returns space() after."""
        self.conn.execute("VACUUM")
        self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        return self.space()

    # -- backup -----------------------------------------------------------------------

    def copy_to(self, path):
        """Copy the whole database, WAL included, into the empty file at `path` with SQLite's
        backup API: one consistent snapshot, taken in one step so writers are not blocked (WAL)
        and the copy never mixes two moments. The copy is one self-contained file (no -wal).
        Returns counts of what it holds.

        Raises:
            SmsbatchError: the copy fails its integrity check.
        """
        target = sqlite3.connect(path, isolation_level=None)
        try:
            self.conn.backup(target, pages=-1)
            target.execute("PRAGMA journal_mode = DELETE").fetchall()
            verdict = target.execute("PRAGMA quick_check").fetchone()[0]
            if verdict != "ok":
                raise SmsbatchError(f"the copy at {path} failed its integrity check: {verdict}")
            return {"version": target.execute("PRAGMA user_version").fetchone()[0],
                    "texts": target.execute("SELECT count(*) FROM messages").fetchone()[0],
                    "batches": target.execute("SELECT count(*) FROM batches").fetchone()[0]}
        except sqlite3.Error as exc:
            raise translate(exc) from exc
        finally:
            target.close()


def plain_connection(path, timeout):
    """A bare connection to an existing file (the WAL checkpoint thread's), raising neutral errors."""
    try:
        return sqlite3.connect(path, timeout=timeout, isolation_level=None, check_same_thread=False,
                               factory=Connection)
    except sqlite3.Error as exc:
        raise translate(exc) from exc


def statements(script):
    """Split a schema script into statements (sqlite3.complete_statement knows where they end)."""
    statement = ""
    for line in script.splitlines(keepends=True):
        statement += line
        if sqlite3.complete_statement(statement):
            if statement.strip():
                yield statement.strip()
            statement = ""


def _create_private(path):
    """Create the database file readable by its owner only, before SQLite opens it."""
    if path == ":memory:" or os.path.exists(path):
        return
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise SmsbatchError(f"cannot create database {path}: folder {directory} does not exist")
    try:
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    except OSError as exc:
        raise SmsbatchError(f"cannot create database {path}: {exc.strerror}") from None
