"""The PostgreSQL engine: psycopg 3, for several hosts on one database.

With engine_pg_pool (the webhook's connections), the only modules that import psycopg. Connections are in autocommit mode and every
transaction is an explicit `transaction()` block (READ COMMITTED, PostgreSQL's default):
rows a decision rests on are read `FOR UPDATE`, claims `FOR UPDATE SKIP LOCKED`, and the
writers of one conversation are serialised by a transaction-scoped advisory lock. The
store's SQL is written with `?` placeholders; this module turns them into psycopg's `%s`.
Driver errors come out as smsbatch.engine's neutral errors, and a connection that was
lost (server restart, failover) is opened again at the next transaction.
"""

import functools
import logging
import math
import time
import weakref
from contextlib import contextmanager
from importlib import resources

import psycopg
import psycopg.errors as pgerrors
from psycopg.conninfo import conninfo_to_dict
from psycopg.pq import Escaping
from psycopg.rows import tuple_row

from smsbatch import migrations
from smsbatch.engine import (NAMED as _NAMED, Named, Row, StoreBusy, StoreConflict, StoreError, StoreUnavailable,
                             hide_secrets, shown_target)
from smsbatch.errors import SmsbatchError

log = logging.getLogger("smsbatch.engine_pg")
MIGRATE_LOCK = 0x736D7362  # "smsb": pg_advisory_xact_lock key that serialises `migrate` across hosts
CONNECT_TIMEOUT = 4  # seconds to reach the server: a text's 503 still comes within its deadline
IDLE_IN_TRANSACTION = "60s"  # a frozen process cannot hold row locks longer than this
# A server that vanishes without closing its connections (its host lost in a failover, a cut
# network) leaves a statement waiting forever: statement_timeout is the server's, and the
# kernel's defaults notice after 2 h of keepalive silence, or some 15 min of retransmitting.
# So the kernel gives up on a connection whose server has not acknowledged what was sent
# for 10 s, or answered 3 probes 2 s apart after 5 s of silence: the statement raises
# StoreUnavailable and the next one reconnects. A live server's kernel answers the probes,
# so a long statement is not cut; but a live server that reads nothing for 10 s while more is
# sent than the sockets' buffers hold (a pipelined executemany of many MB behind a lock wait)
# is given up too (Linux applies tcp_user_timeout to zero-window probes). A URL that sets one
# of these keeps its own; a pg_service.conf does not (these are given explicitly).
NETWORK_TIMEOUTS = {"keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2, "keepalives_count": 3,
                    "tcp_user_timeout": 10_000}
BUSY = (pgerrors.LockNotAvailable, pgerrors.QueryCanceled, pgerrors.SerializationFailure,
        pgerrors.DeadlockDetected)
UNAVAILABLE = (pgerrors.AdminShutdown, pgerrors.CannotConnectNow, pgerrors.ReadOnlySqlTransaction,
               pgerrors.IdleInTransactionSessionTimeout)


def translate(exc):
    """The neutral error for a psycopg error (the original stays as its __cause__)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, BUSY):
        return StoreBusy(text)
    if isinstance(exc, (pgerrors.IntegrityError, pgerrors.DivisionByZero)):  # the latter: a check (1 / 0) failed
        return StoreConflict(text)
    if isinstance(exc, UNAVAILABLE + (psycopg.OperationalError, psycopg.InterfaceError)):
        return StoreUnavailable(text)
    return StoreError(text)


@functools.lru_cache(maxsize=1024)
def _split(sql):
    """The store's SQL cut at its `?` placeholders (nothing inside quotes is one)."""
    parts, quote, start = [], None, 0
    for i, ch in enumerate(sql):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "?":
            parts.append(sql[start:i])
            start = i + 1
    parts.append(sql[start:])
    return tuple(parts)


@functools.lru_cache(maxsize=1024)
def to_psycopg(sql):
    """The store's SQL with `?` placeholders as psycopg's `%s` (a literal % doubled)."""
    return "%s".join(part.replace("%", "%%") for part in _split(sql))


@functools.lru_cache(maxsize=1024)
def _split_bytes(sql):
    return tuple(part.encode() for part in _split(sql))


def _inline(raw, statements, begin=None):
    """One query (bytes) of `statements` with their values written in as literals: strings
    quoted by libpq (PQescapeLiteral, which knows the connection's encoding and settings),
    numbers as Python writes them (negative ones in parentheses: `a - -1` must not become a
    comment), None as NULL. Psycopg's own client-side binding parses the query again in
    Python: measured, that cost more than the round trip it saves."""
    escape, encoding = Escaping(raw.pgconn).escape_literal, raw.info.encoding
    out = [begin.encode(), b"; "] if begin else []
    for n, (sql, values) in enumerate(statements):
        parts = _split_bytes(sql)
        if len(parts) != len(values) + 1:
            raise StoreError(f"{len(values)} values for {len(parts) - 1} placeholders")
        if n:
            out.append(b"; ")
        out.append(parts[0])
        for value, part in zip(values, parts[1:]):
            out.append(_literal(value, escape, encoding))
            out.append(part)
    return b"".join(out)


def _literal(value, escape, encoding):
    kind = type(value)  # by type, most frequent first: this runs for every value of every text
    if kind is str:
        if "\x00" in value:  # libpq would cut the string there: refuse it, as PostgreSQL refuses NUL in text
            raise StoreError("PostgreSQL text cannot contain NUL (0x00) characters")
        return escape(value.encode(encoding))
    if value is None:
        return b"NULL"
    if kind is bool:
        return b"TRUE" if value else b"FALSE"
    if kind is float and not math.isfinite(value):
        return f"'{value!r}'::float8".replace("inf", "Infinity").replace("nan", "NaN").encode()
    if kind is float or kind is int or isinstance(value, (int, float)):
        text = repr(value).encode()
        return b"(" + text + b")" if text.startswith(b"-") else text  # -0.0 too: `a - -0.0`
    if kind is list:  # a Named statement's array parameter (its type is cast in _execute_sql)
        return b"ARRAY[" + b", ".join([_literal(v, escape, encoding) for v in value]) + b"]"
    if isinstance(value, str):
        return _literal(str(value), escape, encoding)
    raise TypeError(f"cannot write {kind.__name__} into SQL")


# The Named statements prepared on each connection: {psycopg connection: set of names}, or
# _RESYNC where that is not known: a round trip that prepared some failed (PREPARE is not undone
# by a rollback), or one of them went stale (_STALE_CODES). Then those of ours the server has
# (pg_prepared_statements) are deallocated and prepared again at the next use.
_PREPARED = weakref.WeakKeyDictionary()
_RESYNC = "resync"
# Errors of an EXECUTE after which the connection's prepared statements are not what
# _PREPARED says: dropped by something else (26000: a DEALLOCATE, a pooler's DISCARD ALL), or
# planned for a column type a schema change replaced (0A000: "cached plan must not change
# result type", until it is deallocated). Its Named statements are deallocated and prepared again.
_STALE_CODES = ("26000", "0A000")


@functools.lru_cache(maxsize=64)
def _execute_sql(named):
    """`EXECUTE name(?::type, ...)` for a Named statement (each value cast: an empty array has no type of its own)."""
    return f"EXECUTE {named.name}(" + ", ".join(f"?::{t}" for t in named.types) + ")"


# Named statements run with their generic plan (planned once): left to itself (`auto`),
# PostgreSQL keeps planning each run anew when the generic plan's estimate (10 rows an array)
# exceeds that of a group of fewer texts. Their shapes make every row an index search.
_COMMIT = ("COMMIT", ())
_GENERIC, _AUTO = ("SET LOCAL plan_cache_mode = force_generic_plan", ()), ("SET LOCAL plan_cache_mode = DEFAULT", ())


def _by_name(raw, statements, commit=False):
    """(what to send, how many leading statements give no result wanted, names prepared):
    statements with each Named one as its EXECUTE, preceded by the PREPAREs this
    connection lacks, and run with generic plans; then the COMMIT if `commit`."""
    if not any(isinstance(sql, Named) for sql, _ in statements):
        return statements + [_COMMIT] if commit else statements, 0, ()
    have = _prepared(raw)
    prepares, out = {}, []
    for sql, values in statements:
        if isinstance(sql, Named):
            if sql.name not in have and sql.name not in prepares:
                prepares[sql.name] = (f"PREPARE {sql.name}({', '.join(sql.types)}) AS {sql.sql}", ())
            sql = _execute_sql(sql)
        out.append((sql, values))
    lead = [_GENERIC, *prepares.values()]
    return lead + out + [_COMMIT if commit else _AUTO], len(lead), set(prepares)


def _prepared(raw):
    """The names prepared on `raw` (none of ours after _RESYNC: those it has are deallocated)."""
    if raw not in _PREPARED:
        _PREPARED[raw] = set()
    elif _PREPARED[raw] == _RESYNC:
        for row in raw.execute("SELECT name FROM pg_prepared_statements").fetchall():
            if row[0] in _NAMED:
                raw.execute(f"DEALLOCATE {row[0]}")
        _PREPARED[raw] = set()
    return _PREPARED[raw]


def _rolled_back(raw):
    """True if a ROLLBACK of `raw`'s transaction went through."""
    try:
        raw.execute("ROLLBACK")
        return True
    except psycopg.Error:
        return False


def _rows(cursor):
    """psycopg row factory: rows addressable by name and by index, like sqlite3.Row."""
    if cursor.description is None:
        return tuple
    index = {column.name: i for i, column in enumerate(cursor.description)}
    return lambda values: Row(values, index)


class Result:
    """A statement's result, read whole at once, so the one cursor a Database reuses can run
    the next statement (a new psycopg cursor per statement costs about a third of its CPU):
    fetchone, fetchall, fetchmany, iteration and rowcount, rows as engine.Row."""

    __slots__ = ("_rows", "_index", "_at", "rowcount")

    def __init__(self, cursor, sql):
        self.rowcount, self._at = cursor.rowcount, 0
        if cursor.pgresult is None or cursor.pgresult.nfields == 0:
            self._rows, self._index = (), None
        else:
            self._rows, self._index = cursor.fetchall(), _index(sql, cursor)

    def fetchmany(self, size):
        rows = self._rows[self._at:self._at + size]
        self._at += len(rows)
        return [Row(values, self._index) for values in rows]

    def fetchone(self):
        rows = self.fetchmany(1)
        return rows[0] if rows else None

    def fetchall(self):
        return self.fetchmany(len(self._rows))

    def __iter__(self):
        return iter(self.fetchall())


_INDEXES = {}  # (sql, number of columns): {column name: position}


def _index(sql, cursor):
    """The column index of a result of `sql` (the same for every run of the statement)."""
    key = (sql, cursor.pgresult.nfields)
    index = _INDEXES.get(key)
    if index is None:
        if len(_INDEXES) > 4096:  # statements built with values in them: keep the cache small
            _INDEXES.clear()
        index = _INDEXES[key] = {column.name: i for i, column in enumerate(cursor.description)}
    return index


class Connection:
    """What the store calls `conn`: execute(sql, params) with `?` placeholders -> a cursor
    (fetchone, fetchall, iteration, rowcount), raising smsbatch.engine's errors."""

    def __init__(self, database):
        self._database = database

    def execute(self, sql, parameters=()):
        database = self._database
        if database.pending_begin is not None:
            database.send_begin()
        raw = database.raw()
        try:
            return Result(database.cursor(raw).execute(to_psycopg(sql), tuple(parameters)), sql)
        except psycopg.Error as exc:
            if not database.may_retry(raw, sql):
                raise translate(exc) from exc
        # a read on a connection the server dropped: once more, on a new one
        raw = database.raw()
        try:
            return Result(database.cursor(raw).execute(to_psycopg(sql), tuple(parameters)), sql)
        except psycopg.Error as exc:  # dropped again: the database is away, said as StoreUnavailable
            raise translate(exc) from exc

    def execute_all(self, statements, commit=False):
        """[(sql, parameters), ...] sent to the server together, in ONE round trip (one
        simple-protocol query, the values written in as literals, strings quoted by libpq),
        inside the current transaction; their results, in order. Each statement still takes
        its own snapshot (READ COMMITTED), after the one before it ended: a read after a lock
        sees what the lock's holder committed. A failing statement raises, and the rest do
        not run. A BEGIN that Database.begin() left pending goes first, in the same round trip.
        `commit`: the transaction's COMMIT goes last, in the same round trip; when anything
        fails, the transaction is rolled back before this raises. A round trip with a BEGIN
        whose connection was lost is sent once more on a new connection; with `commit` its
        COMMIT may have run, so its statements must fail if run twice (add_texts_guessed's
        INSERTs of MessageSids and batch ids, its compare-and-sets)."""
        if not statements:
            return []
        try:
            return self._execute_all(list(statements), commit)
        except BaseException:  # a StoreError, or a value that cannot be written (before anything was sent)
            if commit:  # the transaction is over whatever failed: none left open, no BEGIN left pending
                raw, self._database.pending_begin = self._database._raw, None
                if raw is not None and not raw.broken:
                    _rolled_back(raw)  # a failed statement left the transaction aborted, not ended
                self._database.in_transaction = False
            raise

    def _execute_all(self, statements, commit):
        database = self._database
        begin = database.pending_begin
        for attempt in (1, 2):
            raw, prepared, lead = database.raw(), (), 0
            try:
                sent, lead, prepared = _by_name(raw, statements, commit)
                query = _inline(raw, sent, begin)
                database.client_cursor(raw).execute(query)
                break
            except psycopg.Error as exc:
                if begin and attempt == 1 and raw.broken:
                    # The server dropped the connection: nothing of it was committed, unless its
                    # COMMIT went with it (`commit`) and ran before the answer was lost; once more
                    # on a new connection (see execute_all: such a second run must refuse itself).
                    continue
                stale = lead and exc.sqlstate in _STALE_CODES
                if stale or prepared:  # stale, or some PREPAREs may have run before the failure
                    _PREPARED[raw] = _RESYNC
                if stale and begin and attempt == 1 and _rolled_back(raw):
                    continue  # only this round trip ran in its transaction: once more, prepared anew
                database.pending_begin = None
                raise translate(exc) from exc
        if prepared:
            _PREPARED[raw] |= prepared
        cursor = database.client_cursor(raw)
        for _ in range((begin.count(";") + 1 if begin else 0) + lead):  # BEGIN, settings, PREPAREs
            cursor.nextset()
        if begin:
            database.pending_begin, database.in_transaction = None, True
        try:
            results = [Result(cursor, statements[0][0])]
            for query, _ in statements[1:]:
                cursor.nextset()
                results.append(Result(cursor, query))
        except psycopg.Error as exc:
            raise translate(exc) from exc
        if commit:
            database.in_transaction = False
        return results

    def executemany(self, sql, seq):
        if self._database.pending_begin is not None:
            self._database.send_begin()
        raw = self._database.raw()
        try:
            with raw.cursor() as cursor:
                cursor.executemany(to_psycopg(sql), [tuple(p) for p in seq])
        except psycopg.Error as exc:
            raise translate(exc) from exc


def _open(url, durable, busy_timeout):
    """A new autocommit connection set up for smsbatch. Raises: StoreUnavailable, SmsbatchError."""
    raw = None
    try:
        raw = psycopg.connect(url, **connect_kwargs(url))
        # The server may drop the new connection before it is set up (a restart, a failover,
        # pg_terminate_backend): that is the database being away too, not a bug.
        configure(raw, durable, busy_timeout)
    except psycopg.Error as exc:
        if raw is not None:
            raw.close()
        raise StoreUnavailable(f"cannot connect to {shown_target(url)}: {hide_secrets(translate(exc), url)}") from None
    return raw


def connect_kwargs(url):
    """psycopg.connect's keyword arguments for `url` (the pool's too). A URL libpq cannot
    parse is given them all: connecting says what is wrong with it, where that is handled
    (raising here, Pool() would raise psycopg's error, the password in its text)."""
    try:
        given = conninfo_to_dict(url)
    except psycopg.Error:
        given = {}
    timeouts = {key: value for key, value in NETWORK_TIMEOUTS.items() if key not in given}
    return {"autocommit": True, "connect_timeout": CONNECT_TIMEOUT, "row_factory": _rows, **timeouts}


def configure(raw, durable, busy_timeout):
    """Session settings: how long to wait for a row lock (like SQLite's busy timeout),
    commits durable or not (a processor's: see Database.durable_transaction), no transaction
    left open by a frozen process for long."""
    raw.row_factory = _rows
    raw.execute("SELECT set_config('lock_timeout', %s, false), set_config('synchronous_commit', %s, false),"
                " set_config('idle_in_transaction_session_timeout', %s, false)",
                (f"{int(busy_timeout * 1000)}ms", "on" if durable else "off", IDLE_IN_TRANSACTION))


_LOCK_CONVERSATIONS = Named(
    "smsbatch_lock_conversations", ("text[]", "text[]"),
    "SELECT pg_advisory_xact_lock(a, b) FROM (SELECT hashtext(p) a, hashtext(n) b"
    " FROM unnest($1, $2) v(p, n)) k GROUP BY a, b ORDER BY a, b")


class Database:
    """One PostgreSQL connection and what smsbatch needs of it. Not thread-safe."""

    engine = "postgres"
    prepares = True  # Connection.execute_all takes engine.Named statements
    for_update = " FOR UPDATE"
    skip_locked = " FOR UPDATE SKIP LOCKED"

    def __init__(self, url, busy_timeout, durable=True):
        self._setup(url, busy_timeout, durable, _open(url, durable, busy_timeout))

    def _setup(self, url, busy_timeout, durable, raw):
        self.path, self.busy_timeout, self.durable = url, busy_timeout, durable
        self._raw = raw
        self.conn = Connection(self)
        self.deadline = None  # monotonic time; set by the webhook: every statement ends before it
        self.in_transaction = False  # a transaction is open on the server
        self.pending_begin = None  # a BEGIN begin() has not sent yet (sent with the next statement)
        self._cursor = None
        self._client_cursor = None

    def raw(self):
        """The psycopg connection, opened again if it was lost while no transaction ran."""
        if self._raw.broken or self._raw.closed:
            if not self.in_transaction:  # never in the middle of a transaction: it is lost, and says so
                log.info("reconnecting to %s", shown_target(self.path))
                self._raw = _open(self.path, self.durable, self.busy_timeout)
        return self._raw

    def cursor(self, raw):
        """The cursor every statement on `raw` runs on (Result reads each result whole)."""
        if self._cursor is None or self._cursor.connection is not raw:
            self._cursor = raw.cursor(row_factory=tuple_row)
        return self._cursor

    def client_cursor(self, raw):
        """The cursor for Connection.execute_all (several statements, one round trip)."""
        if self._client_cursor is None or self._client_cursor.connection is not raw:
            self._client_cursor = psycopg.ClientCursor(raw, row_factory=tuple_row)
        return self._client_cursor

    def may_retry(self, raw, sql):
        """True if a statement that failed may run again on a new connection: a read, outside
        any transaction, on a connection the server dropped (a restart, a failover)."""
        return raw.broken and not self.in_transaction and sql.lstrip()[:6].upper() == "SELECT"

    def exists(self):
        return True

    def close(self):
        self._raw.close()

    # -- dialect ------------------------------------------------------------------

    @staticmethod
    def greatest(a, b):
        return f"GREATEST({a}, {b})"

    @staticmethod
    def day(column):
        """The UTC day (YYYY-MM-DD) of an epoch-seconds column."""
        return f"to_char(to_timestamp({column}) AT TIME ZONE 'UTC', 'YYYY-MM-DD')"

    @staticmethod
    def join_times(column):
        """The column's times (epoch seconds) joined by commas, each exact (a double
        precision as text is the shortest exact form, extra_float_digits being 1 by default)."""
        return f"string_agg(CAST({column} AS text), ',')"

    @staticmethod
    def lock_conversations(conversations):
        """The statements that serialise the writers of these conversations ((phone, our
        number) pairs) until the transaction ends: one advisory lock each, all in one
        statement, taken in the order of their keys (a volatile function in the select list
        runs after the ORDER BY), so that two transactions locking several conversations
        never wait for each other in a circle."""
        return [(_LOCK_CONVERSATIONS, [[c[0] for c in conversations], [c[1] for c in conversations]])]

    def now(self):
        """The database server's clock (epoch seconds): the one clock every host shares."""
        return self.conn.execute("SELECT extract(epoch FROM clock_timestamp())::double precision").fetchone()[0]

    # -- transactions ---------------------------------------------------------------

    @contextmanager
    def transaction(self, begin="BEGIN"):
        """One transaction (READ COMMITTED). Within the webhook's deadline when one is set:
        its statement and lock timeouts go with the BEGIN, in the same round trip."""
        if self.deadline is not None:
            left = max(1, int((self.deadline - time.monotonic()) * 1000))
            begin += f"; SET LOCAL statement_timeout = {left}; SET LOCAL lock_timeout = {left}"
        raw = self._begin(begin)
        self.in_transaction = True
        try:
            yield self.conn
        except BaseException:
            self._end(raw, "ROLLBACK")
            raise
        else:
            self._end(raw, "COMMIT")

    def _begin(self, begin):
        """Send BEGIN (and what goes with it). If it finds that the server dropped the
        connection, nothing has run yet: once more on a new one."""
        raw = self.raw()
        try:
            raw.execute(begin)
            return raw
        except psycopg.Error as exc:
            if not raw.broken:
                self._abandon(raw)
                raise translate(exc) from exc
        raw = self.raw()
        try:
            raw.execute(begin)
        except psycopg.Error as exc:
            self._abandon(raw)
            raise translate(exc) from exc
        return raw

    @staticmethod
    def _abandon(raw):
        """Roll back what a failed BEGIN left open: its BEGIN may have run and a setting sent
        with it failed, and an aborted transaction would refuse every later statement."""
        if not raw.broken:
            try:
                raw.execute("ROLLBACK")
            except psycopg.Error:
                pass  # nothing more to do: the connection is lost, and reopened at the next use

    def _end(self, raw, how):
        """COMMIT or ROLLBACK. Raises: StoreError (COMMIT only: a lost connection's
        transaction is rolled back by the server, so a failed ROLLBACK is no news)."""
        try:
            raw.execute(how)
        except psycopg.Error as exc:
            if how == "COMMIT":
                raise translate(exc) from exc
        finally:
            self.in_transaction = False

    # the webhook's group commit (smsbatch.writer_pool): many texts in one transaction
    def begin(self, seconds):
        """BEGIN a transaction that end() ends; every statement in it (lock waits included)
        gives up after `seconds`. Nothing is sent yet: BEGIN and its settings go with the
        first statement (Connection.execute_all: in the same round trip), which raises
        StoreError if it cannot begin."""
        ms = max(1, int(seconds * 1000))
        self.pending_begin = f"BEGIN; SET LOCAL statement_timeout = {ms}; SET LOCAL lock_timeout = {ms}"

    def send_begin(self):
        """Send a BEGIN begin() left pending (a statement is about to run alone)."""
        sql, self.pending_begin = self.pending_begin, None
        self._begin(sql)
        self.in_transaction = True

    def end(self, commit):
        """COMMIT (or ROLLBACK) what begin() began. Raises: StoreError if it was not committed
        (a COMMIT that the server turned into a ROLLBACK, a statement having failed, too)."""
        if self.pending_begin is not None:  # nothing was sent: nothing to end
            self.pending_begin = None
            return
        try:
            status = self._raw.execute("COMMIT" if commit else "ROLLBACK").statusmessage
        except psycopg.Error as exc:
            raise translate(exc) from exc
        finally:
            self.in_transaction = False
        if commit and status != "COMMIT":
            raise StoreError("the transaction was rolled back")

    @contextmanager
    def durable_transaction(self):
        """transaction(), committed with synchronous_commit on whatever the connection's
        setting: once it returns, what it committed survives the server's crash."""
        with self.transaction("BEGIN" if self.durable else "BEGIN; SET LOCAL synchronous_commit = on") as conn:
            yield conn

    @contextmanager
    def snapshot(self):
        """A read-only transaction: every read inside sees one moment; nothing is written."""
        raw = self._begin("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        self.in_transaction = True
        try:
            yield self.conn
        finally:
            self._end(raw, "ROLLBACK")

    def make_throwaway(self):
        raise SmsbatchError("a throwaway database must be an SQLite file")

    def write_blocked(self, seconds):
        """Why a write could not be made now (the server is a read-only replica, or does not
        answer within `seconds`), or None. Writes nothing."""
        try:
            with self.transaction() as conn:
                conn.execute("SELECT set_config('statement_timeout', ?, true)", (f"{max(1, int(seconds * 1000))}ms",))
                row = conn.execute("SELECT pg_is_in_recovery(), current_setting('transaction_read_only')").fetchone()
        except StoreError as exc:
            return f"the database does not answer: {exc}"
        if row[0] or row[1] == "on":
            return "the database server is read-only (a standby?): texts cannot be stored"
        return None

    def check_writable(self):
        """Raises StoreUnavailable if this server cannot take writes now."""
        why = self.write_blocked(self.busy_timeout)
        if why:
            raise StoreUnavailable(why)

    def missing_rights(self):
        """The rights on smsbatch's tables this user lacks, e.g. ['UPDATE on batches']."""
        missing = []
        for table in sorted(self.tables()):
            for right in ("SELECT", "INSERT", "UPDATE", "DELETE"):
                if not self.conn.execute("SELECT has_table_privilege(?, ?)", (table, right)).fetchone()[0]:
                    missing.append(f"{right} on {table}")
        return missing

    # -- schema ---------------------------------------------------------------------

    def version(self):
        if self.conn.execute("SELECT to_regclass('schema_version')").fetchone()[0] is None:
            return 0
        row = self.conn.execute("SELECT version FROM schema_version").fetchone()
        return 0 if row is None else row[0]

    def columns(self, table):
        return {r[0] for r in self.conn.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_schema = current_schema()"
            " AND table_name = ?", (table,))}

    def tables(self):
        """{table: [column names]} of smsbatch's tables (schema_version aside)."""
        names = [r[0] for r in self.conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()"
            " AND table_type = 'BASE TABLE' AND table_name != 'schema_version'")]
        return {name: sorted(self.columns(name)) for name in names}

    def migrate(self, latest):
        """Create or upgrade the schema to `latest`; returns the version before. Two hosts
        migrating at once take turns (an advisory lock): the second finds it done.

        Raises:
            SmsbatchError: the database is newer than this smsbatch.
        """
        with self.transaction() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(?)", (MIGRATE_LOCK,)).fetchall()
            before = self.version()
            if before > latest:
                raise SmsbatchError(f"database schema version {before} is newer than this smsbatch ({latest})")
            current = before
            if before == 0:
                script = resources.files("smsbatch").joinpath("schema_pg.sql").read_text()
                self._raw.execute(script)  # no parameters: the whole script in one go
                conn.execute("INSERT INTO schema_version (version) VALUES (?)", (migrations.PG_BASELINE,))
                current = migrations.PG_BASELINE
            for version in range(current + 1, latest + 1):
                for statement in migrations.postgres_step(version):
                    conn.execute(statement)
            conn.execute("UPDATE schema_version SET version = ?", (latest,))
        return before

    def space(self):
        """How big smsbatch's tables are (indexes and TOAST included): {"bytes", "free_bytes"}.
        Free space inside them is reused by PostgreSQL itself (autovacuum) and not measured
        without an extension: free_bytes is 0, so nothing asks to rewrite the tables."""
        size = self.conn.execute(
            "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0)::bigint FROM pg_class c JOIN pg_namespace n"
            " ON n.oid = c.relnamespace WHERE n.nspname = current_schema() AND c.relkind = 'r'").fetchone()[0]
        return {"bytes": size, "free_bytes": 0}

    def reclaim_space(self):
        """VACUUM smsbatch's tables now (marks the space a prune freed reusable; never VACUUM
        FULL, which would lock the tables). Returns space() after."""
        for table in sorted(self.tables()):
            self.conn.execute(f"VACUUM {table}")
        return self.space()

    def copy_to(self, path):
        raise SmsbatchError("backup copies an SQLite file; for PostgreSQL use pg_dump "
                            "(e.g. pg_dump -Fc -f smsbatch.dump DBNAME)")
