"""Move a deployment: copy an SQLite database into an empty PostgreSQL one (`smsbatch copy-to`).

Every table the SQLite database has is copied row for row, in one PostgreSQL transaction,
from one snapshot of the SQLite file: texts, batches and their history, conversations,
replies, opt-outs, holds and their log, the backfill's progress, provider health,
rejections, processors — whatever the schema holds, found in the catalogs rather than
listed here, so a table a later schema step adds is copied too. Before that transaction
commits, the row count of every table is compared with the source's, and every opt-out
and every hold is looked up in the target (a person who said STOP must stay opted out on
the new database): any difference rolls the whole copy back. The identity sequences are
moved past the copied keys so that new rows do not collide with them.

The target must be empty (migrated or not): copy-to never merges into a database in use.
This is a store module: the few statements it runs are here, on the engines' connections
(no driver imported). Those on the target are PostgreSQL's (the catalogs, setval), since
a target is always PostgreSQL.
"""

import re

from smsbatch.db import SCHEMA_VERSION, Store
from smsbatch.engine import is_postgres, shown_target
from smsbatch.errors import SmsbatchError

CHUNK = 1000  # rows read from SQLite and sent to PostgreSQL at a time
NAME = re.compile(r"^[a-z_][a-z0-9_]*$")  # table and column names are interpolated: only plain ones
CHECKED_IN_FULL = {"opt_outs": ("phone", "scope"), "holds": ("phone",)}  # above all: every one arrived

# PostgreSQL's catalogs: the foreign keys and identity columns of the tables in the current schema.
FOREIGN_KEYS = (
    "SELECT t.relname, a.attname, r.relname FROM pg_constraint c"
    " JOIN pg_class t ON t.oid = c.conrelid JOIN pg_class r ON r.oid = c.confrelid"
    " JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = ANY (c.conkey)"
    " WHERE c.contype = 'f' AND t.relnamespace = current_schema()::regnamespace")
PRIMARY_KEYS = (
    "SELECT t.relname, a.attname FROM pg_constraint c JOIN pg_class t ON t.oid = c.conrelid"
    " JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = ANY (c.conkey)"
    " WHERE c.contype = 'p' AND t.relnamespace = current_schema()::regnamespace")
IDENTITY_COLUMNS = (
    "SELECT table_name, column_name FROM information_schema.columns"
    " WHERE table_schema = current_schema() AND is_identity = 'YES'")


def check_targets(source, target):
    """Raises SmsbatchError unless `source` is an SQLite file and `target` a PostgreSQL URL."""
    if is_postgres(source):
        raise SmsbatchError(f"copy-to copies an SQLite database, and --db {shown_target(source)} is PostgreSQL: "
                            "to copy PostgreSQL use pg_dump and pg_restore")
    if not is_postgres(target):
        raise SmsbatchError(f"copy-to fills a PostgreSQL database (postgresql://...), not {target}: "
                            "to copy an SQLite database into a file use `smsbatch backup FILE`")


def copy_to(source_path, target_url):
    """Copy the SQLite database at `source_path` into the empty PostgreSQL database at
    `target_url` (migrated first if it has no schema) and verify it. Returns
    {"tables": {table: rows}, "migrated": bool, "version": int}.

    Raises:
        SmsbatchError: a source or target of the wrong kind, a source not migrated, a target
            that is not empty, or a copy that does not match its source (nothing is kept).
    """
    check_targets(source_path, target_url)
    source = Store.open_ready(source_path)
    try:
        target = Store(target_url)
        try:
            migrated = prepare_target(target)
            tables = copy_all(source, target)
        finally:
            target.close()
    finally:
        source.close()
    return {"tables": tables, "migrated": migrated, "version": SCHEMA_VERSION}


def prepare_target(target):
    """Refuse a target with rows in it; create or upgrade its schema. Returns True if migrated.

    Raises:
        SmsbatchError: the target holds rows, or its schema is newer than this smsbatch.
    """
    if target.version() > 0:
        for table in sorted(target.db.tables()):
            if target.conn.execute(f"SELECT 1 FROM {_name(table)} LIMIT 1").fetchone():
                raise SmsbatchError(f"{target.shown} is not empty (table {table} has rows): "
                                    "copy-to only fills an empty database")
    before, after = target.migrate()
    return before != after


def copy_all(source, target):
    """Copy every table in one target transaction, from one source snapshot; verify before
    committing. Returns {table: rows}.

    Raises:
        SmsbatchError: a source table the target lacks, or a difference after copying.
    """
    columns = {t: sorted(c) for t, c in source.db.tables().items()}
    with source.db.snapshot(), target.transaction() as conn:
        present = target.db.tables()
        for table, names in columns.items():
            missing = [c for c in names if c not in present.get(table, ())]
            if missing:
                raise SmsbatchError(f"{target.shown} has no {table}({', '.join(missing)}): "
                                    "is it the same smsbatch version?")
        references, keys = _foreign_keys(conn), _primary_keys(conn)
        counts = {}
        for table in _in_dependency_order(columns, references):
            later = [c for c, ref in references.get(table, []) if ref == table]
            counts[table] = _copy_table(source, conn, table, columns[table], later, keys.get(table, []))
        _reset_identities(conn)
        verify(source, conn, counts)
    return counts


def _copy_table(source, conn, table, columns, self_references, key):
    """Copy one table in chunks; columns referencing the same table are filled in after
    every row is in (a batch may point to one copied after it). Returns the rows copied."""
    later = [c for c in self_references if c in columns]
    if later and not key:
        raise SmsbatchError(f"table {table} refers to itself but has no primary key")
    listed = ", ".join(_name(c) for c in columns)
    insert = f"INSERT INTO {_name(table)} ({listed}) VALUES ({', '.join('?' * len(columns))})"
    positions = [columns.index(c) for c in later]
    cursor = source.conn.execute(f"SELECT {listed} FROM {_name(table)}")
    copied, pending = 0, []
    while True:
        rows = [list(row) for row in cursor.fetchmany(CHUNK)]
        if not rows:
            break
        for row in rows:
            if any(row[p] is not None for p in positions):
                pending.append([row[p] for p in positions] + [row[columns.index(k)] for k in key])
                for p in positions:
                    row[p] = None
        conn.executemany(insert, rows)
        copied += len(rows)
    if pending:
        sets = ", ".join(f"{_name(c)} = ?" for c in later)
        where = " AND ".join(f"{_name(k)} = ?" for k in key)
        conn.executemany(f"UPDATE {_name(table)} SET {sets} WHERE {where}", pending)
    return copied


def verify(source, conn, counts):
    """Compare each table's row count, and every opt-out's and hold's key, with the source.

    Raises:
        SmsbatchError: a difference (the copy is rolled back).
    """
    for table, copied in counts.items():
        had = source.conn.execute(f"SELECT count(*) FROM {_name(table)}").fetchone()[0]
        has = conn.execute(f"SELECT count(*) FROM {_name(table)}").fetchone()[0]
        if not had == copied == has:
            raise SmsbatchError(f"copy of {table} does not match: {had} rows in the source, {has} in the "
                                "target; nothing was kept")
    for table, key in CHECKED_IN_FULL.items():
        if table not in counts:
            continue
        listed = ", ".join(key)
        wanted = {tuple(r) for r in source.conn.execute(f"SELECT {listed} FROM {table}")}
        found = {tuple(r) for r in conn.execute(f"SELECT {listed} FROM {table}")}
        if wanted - found:
            raise SmsbatchError(f"{len(wanted - found)} {table} rows did not arrive; nothing was kept")


def _reset_identities(conn):
    """Move each identity sequence past the largest copied key (the next row gets max + 1)."""
    for table, column in conn.execute(IDENTITY_COLUMNS).fetchall():
        conn.execute(f"SELECT setval(pg_get_serial_sequence(?, ?), coalesce(max({_name(column)}), 0) + 1, false)"
                     f" FROM {_name(table)}", (_name(table), column)).fetchall()


def _foreign_keys(conn):
    """{table: [(column, referenced table)]} in the target."""
    found = {}
    for table, column, referenced in conn.execute(FOREIGN_KEYS).fetchall():
        found.setdefault(table, []).append((column, referenced))
    return found


def _primary_keys(conn):
    found = {}
    for table, column in conn.execute(PRIMARY_KEYS).fetchall():
        found.setdefault(table, []).append(column)
    return found


def _in_dependency_order(tables, references):
    """The tables, each after those it refers to (itself aside), else in name order."""
    ordered, placed = [], set()
    pending = sorted(tables)
    while pending:
        ready = [t for t in pending
                 if all(ref == t or ref in placed or ref not in tables for _, ref in references.get(t, []))]
        if not ready:
            raise SmsbatchError(f"tables {', '.join(pending)} refer to each other: cannot order the copy")
        ordered += ready
        placed.update(ready)
        pending = [t for t in pending if t not in placed]
    return ordered


def _name(identifier):
    """A table or column name fit to be written into SQL. Raises: SmsbatchError."""
    if not NAME.match(identifier):
        raise SmsbatchError(f"unexpected name {identifier!r} in the database: not copied")
    return identifier
