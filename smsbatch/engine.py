"""The storage seam: which engine a database target names, and the errors every engine raises.

A target is an SQLite file path (the default: nothing to install) or a PostgreSQL URL
(`postgresql://...` or `postgres://...`, with `pip install 'smsbatch[postgres]'`).
`connect(target)` opens it with its engine module — smsbatch.engine_sqlite or
smsbatch.engine_pg — and returns a Database (`connect_pool` a pool of them, for the webhook:
smsbatch.engine_pg_pool). Nothing outside those modules imports a driver: the store (smsbatch.db and its mixins) runs its SQL through Database.conn and
asks the Database for the few things the engines do differently (transactions, locks,
the schema version, a handful of dialect words). Driver errors come out as the neutral
errors below, so the webhook, the processor and the commands need not know the engine.

A Database offers:
    conn                  execute(sql, params) with `?` placeholders -> cursor (fetchone,
                          fetchall, iteration, rowcount); rows by name and by index;
                          execute_all([(sql, params), ...]) -> their results, in one round
                          trip on PostgreSQL (where a statement may be a Named one,
                          prepared once per connection)
    prepares              True if execute_all takes Named statements (PostgreSQL)
    transaction()         context manager: one transaction (SQLite: BEGIN IMMEDIATE)
    durable_transaction() the same, committed so that it survives power loss
    lock_conversations(pairs)  the statements that serialise the writers of these
                          conversations ((phone, our_number) pairs) until the transaction
                          ends, in an order that cannot deadlock; none on SQLite (the write
                          lock already does)
    for_update, skip_locked  clauses appended to a SELECT that locks the rows it reads
    greatest(a, b), day(column), join_times(column)  dialect words
    now()                 the database's clock (epoch seconds)
    version(), migrate(), columns(table), write_blocked(seconds), check_writable(),
    copy_to(path), exists(), close()
"""

import importlib.util

from smsbatch.errors import SmsbatchError

POSTGRES_SCHEMES = ("postgresql://", "postgres://")
INSTALL_POSTGRES = "pip install 'smsbatch[postgres]'"


class StoreError(SmsbatchError):
    """The database refused or failed a statement (a driver error, translated)."""


class StoreBusy(StoreError):
    """Another writer held a lock too long (lock/statement timeout, SQLite busy, deadlock,
    serialization failure): trying again later may work."""


class StoreConflict(StoreError):
    """A statement broke a uniqueness or other integrity rule."""


class StoreUnavailable(StoreError):
    """The database cannot be reached or written now (server down, connection lost,
    read-only file): the same request may work once it is back."""


class Named:
    """A statement of a fixed shape that an engine able to (PostgreSQL: `Database.prepares`)
    prepares once per connection and runs by name: its parsing and planning are paid once,
    not at every group of texts. `types` are its parameters' ($1, $2, ...) SQL types; a
    Python list is given for an array type. Used as the sql of a (sql, parameters)
    statement in Connection.execute_all."""

    __slots__ = ("name", "types", "sql")

    def __init__(self, name, types, sql):
        self.name, self.types, self.sql = name, tuple(types), sql
        NAMED.add(name)


NAMED = set()  # every Named statement's name: what an engine may deallocate to prepare again


def is_postgres(target):
    """True if `target` is a PostgreSQL URL rather than an SQLite file path."""
    return str(target).lower().startswith(POSTGRES_SCHEMES)


def shown_target(target):
    """The target as it may be printed: a URL's password (in its user part, or a `password`
    or `sslpassword` parameter) is replaced by ***. Every URL libpq takes is shown: several
    hosts with their ports too (urllib's `port` raises on `h1:5432,h2:5432`)."""
    target = str(target)
    if not is_postgres(target):
        return target
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(target)
    netloc, query = parts.netloc, parts.query
    if parts.password is not None:
        userinfo, _, hosts = netloc.rpartition("@")
        netloc = f"{userinfo.partition(':')[0]}:***@{hosts}"
    if query:
        query = "&".join(f"{key}=***" if secret else f"{key}{eq}{value}" for key, eq, value, secret in _params(query))
    if (netloc, query) == (parts.netloc, parts.query):
        return target
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def hide_secrets(text, target):
    """`text` (a driver's words about `target`) without `target`'s passwords: libpq quotes a
    URL it cannot parse whole, or the part of it that holds the password."""
    text, target = str(text), str(target)
    if not is_postgres(target):
        return text
    from urllib.parse import unquote, urlsplit

    text = text.replace(target, shown_target(target))
    parts = urlsplit(target)
    secrets = [parts.password] + [value for _, _, value, secret in _params(parts.query) if secret]
    for secret in {form for secret in secrets if secret for form in (secret, unquote(secret))}:
        text = text.replace(secret, "***")
    return text


def _params(query):
    """(key, "=" or "", value, whether it is a secret) for each parameter of a URL's query."""
    from urllib.parse import unquote

    return [(key, eq, value, unquote(key) in ("password", "sslpassword"))
            for key, eq, value in (part.partition("=") for part in query.split("&"))]


def _engine_pg(target):
    """smsbatch.engine_pg, or the one-line error naming the extra (psycopg or psycopg_pool missing)."""
    try:
        from smsbatch import engine_pg
    except ImportError:
        engine_pg = None
    # psycopg_pool is imported only when a pool is made (the webhook), but checked here: an
    # install without it is not the extra, whichever command runs first
    if engine_pg is None or importlib.util.find_spec("psycopg_pool") is None:
        raise SmsbatchError(f"{shown_target(target)} is a PostgreSQL database: {INSTALL_POSTGRES}")
    return engine_pg


def connect(target, busy_timeout, durable=True):
    """Open the database `target` names with its engine. Raises: SmsbatchError."""
    if is_postgres(target):
        return _engine_pg(target).Database(str(target), busy_timeout, durable)
    from smsbatch import engine_sqlite

    return engine_sqlite.Database(str(target), busy_timeout, durable)


def connect_pool(target, size, busy_timeout):
    """A pool of `size` connections to the PostgreSQL database `target` for several threads
    (engine_pg_pool.Pool: `connection(deadline)` lends one as a Database; `connect(deadline)`
    the same, given back by its close(); `close()`). Raises: SmsbatchError."""
    _engine_pg(target)
    from smsbatch import engine_pg_pool

    return engine_pg_pool.Pool(str(target), size, busy_timeout)


class Row:
    """A result row addressable by column name and by position, like sqlite3.Row
    (`dict(row)`, `row["state"]`, `row[0]`, `tuple(row)`)."""

    __slots__ = ("_values", "_index")

    def __init__(self, values, index):
        self._values, self._index = values, index

    def __getitem__(self, key):
        if isinstance(key, str):
            return self._values[self._index[key]]
        return self._values[key]

    def keys(self):
        return list(self._index)

    def __iter__(self):
        return iter(self._values)

    def __len__(self):
        return len(self._values)

    def __eq__(self, other):
        return isinstance(other, Row) and self._values == other._values and self._index == other._index

    __hash__ = None

    def __repr__(self):
        return f"Row({dict(zip(self._index, self._values))!r})"
