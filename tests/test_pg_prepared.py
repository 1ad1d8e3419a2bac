"""The PostgreSQL webhook's prepared reads (engine.Named, engine_pg's PREPARE/EXECUTE per
connection, generic plans) and the committers' kept connections: what happens when a
round trip fails half-way, when the server or someone else drops what a connection had
prepared, with hostile values, and whether the generic plans stay index searches."""

import random
import threading
import time

import psycopg
import pytest

from conftest import POSTGRES_URL, T0
from smsbatch.batching import Rules
from smsbatch.db import Store
from smsbatch.engine import StoreBusy
from smsbatch.intake import Text
from smsbatch.writer_pool import PgWriter
from test_intake import store_both_ways
from test_pg_writer import burst_of, pid_and, sids, terminate

pytestmark = pytest.mark.postgres
A, B, US = "+15551230001", "+15551230002", "+15550000000"
NAMES = {"smsbatch_lock_conversations", "smsbatch_text_facts", "smsbatch_open_batches"}


@pytest.fixture
def engine_name():
    return "postgres"


def prepared(store):
    """The names prepared on the store's connection, as the server has them."""
    return {r[0] for r in store.conn.execute("SELECT name FROM pg_prepared_statements")} & NAMES


def text(sid, phone=A, at=T0, body="hi", rules=Rules(), **kw):
    return Text(sid, phone, US, body, at, rules, **kw)


def count(store, sql="SELECT count(*) FROM messages"):
    return store.conn.execute(sql).fetchone()[0]


class Locker:
    """Another session holding a conversation's advisory lock (as another host's writer would)."""

    def __init__(self, phone=A, to=US):
        self.conn = psycopg.connect(POSTGRES_URL, autocommit=True)
        self.conn.execute("SELECT pg_advisory_lock(hashtext(%s), hashtext(%s))", (phone, to))

    def release(self):
        self.conn.close()


# -- a round trip that fails after its PREPAREs ran ------------------------------------


def test_a_first_round_trip_failing_after_its_prepares_leaves_the_next_text_stored(store):
    """A fresh connection's first texts: the PREPAREs run, then the conversation's lock times
    out (another host holds it). PREPARE is not undone by the ROLLBACK: the next text on the
    same connection must neither PREPARE again ("already exists") nor miss one."""
    locker = Locker()
    try:
        store.db.deadline = time.monotonic() + 0.2
        with pytest.raises(StoreBusy):
            store.add_message("SM1", A, US, "hi", T0, Rules())
    finally:
        store.db.deadline = None
        locker.release()
    assert prepared(store) == NAMES  # they ran before the lock's wait
    assert store.add_message("SM1", A, US, "hi", T0, Rules()).duplicate is False
    assert store.add_message("SM2", B, US, "hi", T0, Rules()).duplicate is False
    assert count(store) == 2


def test_a_grouped_round_trip_with_its_begin_failing_after_its_prepares_leaves_the_next_group_working(db_path):
    """The same in the webhook's group (BEGIN, timeouts, PREPAREs and EXECUTEs in one round
    trip): the group fails at the lock; the committer's next group on the same kept
    connection stores its texts."""
    writer = PgWriter(db_path, 4.0)
    try:
        locker = Locker(phone=B)
        try:
            works = [text("SM1", phone=A), text("SM2", phone=B)]
            done, outcome = threading.Event(), []
            with writer.burst(lambda failed: (outcome.append(failed), done.set())):
                for work in works:  # a short deadline: the group's statement and lock timeouts
                    writer.submit(work, deadline=time.monotonic() + 0.3)
            assert done.wait(5) and outcome == [True]
        finally:
            locker.release()
        assert burst_of(writer, [text("SM1", phone=A), text("SM2", phone=B)])
        for i in range(3, 9):  # either committer, on either connection
            assert burst_of(writer, [text(f"SM{i}", phone=A)])
        assert writer.trouble() is None
    finally:
        writer.close()
    assert sids(db_path) == {f"SM{i}" for i in range(1, 9)}


def test_a_statement_error_after_the_prepares_then_texts_on_the_same_connection(store):
    """A statement after the PREPARE and its EXECUTE fails in the same round trip (a division
    by zero): the transaction is rolled back, the PREPARE stays; the next texts work."""
    conn = store.conn
    with pytest.raises(Exception):
        with store.transaction() as c:
            c.execute_all(store.db.lock_conversations([(A, US)]) + [("SELECT 1/0", ())])
    assert store.add_texts([text("SM1"), text("SM2", phone=B)])[1].duplicate is False
    assert count(store) == 2 and conn is store.conn


# -- what a connection prepared, dropped by someone else --------------------------------


def names_and(work):
    """work, returning also the backend pid and the names prepared on its connection after it."""
    def run(store):
        result = work(store)
        return store.conn.execute("SELECT pg_backend_pid()").fetchone()[0], prepared(store), result
    return run


def test_a_committers_kept_connection_the_server_dropped_is_replaced_and_prepares_again(db_path):
    """The server ends a committer's kept connection between groups (pg_terminate_backend):
    the next text is stored, with no failure left for /health, on a new connection that
    prepares its statements anew."""
    writer = PgWriter(db_path, 4.0)
    try:
        pids = set()
        for i in (1, 2, 3):
            pid, names, result = writer.submit(names_and(text(f"SM{i}")))
            assert result.duplicate is False and names == NAMES
            pids.add(pid)
        terminate(pids)  # the committers' kept connections
        time.sleep(0.05)
        for i in range(4, 7):
            new, names, result = writer.submit(names_and(text(f"SM{i}")))
            assert new not in pids and result.duplicate is False and names == NAMES
        assert burst_of(writer, [text("SM7"), text("SM8", phone=B)])
        assert writer.trouble() is None
    finally:
        writer.close()
    assert sids(db_path) == {f"SM{i}" for i in range(1, 9)}


@pytest.mark.parametrize("statement", ["DEALLOCATE ALL", "DISCARD ALL", "DEALLOCATE smsbatch_text_facts"])
def test_prepared_statements_dropped_by_someone_else_are_prepared_again(store, statement):
    """What the connection prepared is gone (a pooler's DISCARD ALL, a DEALLOCATE run on
    it): the next texts fail at most once, then are stored; the connection does not stay
    useless."""
    assert store.add_message("SM1", A, US, "hi", T0, Rules()).duplicate is False
    store.conn.execute(statement)
    outcomes = two_more_texts(store)
    assert outcomes[-1] is False, outcomes
    assert prepared(store) == NAMES


def two_more_texts(store):
    """Whether SM2 and SM3 were duplicates, or what storing each raised."""
    outcomes = []
    for i in (2, 3):
        try:
            outcomes.append(store.add_message(f"SM{i}", A, US, "hi", T0 + i, Rules()).duplicate)
        except Exception as exc:  # noqa: BLE001 - what it raised is the finding
            outcomes.append(repr(exc))
    return outcomes


def test_a_migration_while_a_connection_holds_prepared_reads_leaves_them_working(store):
    """A schema change under a connection's prepared reads (a column added and dropped, an
    index replaced, as steps 10-11 do): the server plans them again; the texts are stored."""
    assert store.add_message("SM1", A, US, "hi", T0, Rules()).duplicate is False
    other = Store(store.path)
    try:
        for sql in ("ALTER TABLE batches ADD COLUMN extra double precision",
                    "ALTER TABLE messages ADD COLUMN extra text",
                    "ALTER TABLE batches DROP COLUMN extra",
                    "DROP INDEX messages_number", "CREATE INDEX messages_number ON messages(our_number)"):
            other.conn.execute(sql)
    finally:
        other.close()
    assert store.add_message("SM2", A, US, "hi", T0 + 1, Rules(adaptive=True)).duplicate is False
    assert store.add_message("SM1", A, US, "hi", T0, Rules()).duplicate is True


def test_a_column_type_a_prepared_read_returns_changed_by_a_migration(store):
    """A migration that changes the type of a column a prepared read returns (here
    batches.message_count integer -> bigint): PostgreSQL refuses to run the prepared
    statement again ("cached plan must not change result type"); the connection must
    recover (prepare again), not fail every text until it is retired."""
    assert store.add_message("SM1", A, US, "hi", T0, Rules()).duplicate is False
    other = Store(store.path)
    try:
        other.conn.execute("ALTER TABLE batches ALTER COLUMN message_count TYPE bigint")
    finally:
        other.close()
    outcomes = two_more_texts(store)
    assert outcomes[-1] is False, outcomes


@pytest.mark.parametrize("change", ["DEALLOCATE ALL", "ALTER TABLE batches ALTER COLUMN message_count TYPE bigint"])
def test_the_webhook_stores_every_text_after_its_connections_prepared_reads_went_stale(db_path, change):
    """The committers' kept connections hold prepared reads that go stale (dropped on the
    server; a schema change of a column they return): no text is refused for it, and the
    failure leaves no trouble for /health."""
    writer = PgWriter(db_path, 4.0)
    try:
        pids = {writer.submit(names_and(text(f"SM{i}", phone=B)))[0] for i in range(4)}
        with psycopg.connect(POSTGRES_URL, autocommit=True) as admin:
            if change.startswith("DEALLOCATE"):
                # as a pooler or an operator would on those very sessions: here through the writer
                for _ in range(6):
                    writer.submit(lambda store: store.conn.execute(change))
            else:
                schema = db_path.split("search_path%3D")[1]
                admin.execute(f"SET search_path = {schema}")
                admin.execute(change)
        failed = []
        for i in range(10, 16):
            try:
                writer.submit(text(f"SM{i}"))
            except Exception as exc:  # noqa: BLE001 - what it raised is the finding
                failed.append(repr(exc))
        assert burst_of(writer, [text("SM16"), text("SM17", phone=B)])
        assert failed == []
        assert writer.trouble() is None
    finally:
        writer.close()
    assert pids and {f"SM{i}" for i in range(10, 18)} <= sids(db_path)


@pytest.mark.parametrize("change", ["DEALLOCATE ALL", "ALTER TABLE batches ALTER COLUMN message_count TYPE bigint"])
def test_a_group_whose_prepared_reads_went_stale_is_stored_at_its_first_try(db_path, change):
    """The webhook's group (its BEGIN in the same round trip as the reads): stale prepared
    reads are dropped and prepared again in the same call; the group is not failed for them."""
    from smsbatch.writer_pool import GroupStore

    store = GroupStore(db_path)
    try:
        store.add_message("SM1", A, US, "hi", T0, Rules())
        other = Store(db_path)
        try:
            (store if change.startswith("DEALLOCATE") else other).conn.execute(change)
        finally:
            other.close()
        store.begin_group(time.monotonic() + 2)
        added = store.add_texts([text("SM2"), text("SM3", phone=B)])
        store.end_group(commit=True)
        assert [a.duplicate for a in added] == [False, False] and prepared(store) == NAMES
        assert count(store) == 3
    finally:
        store.close()


# -- hostile values and group sizes: the same as SQLite -----------------------------------


def _hostile(seed, n):
    """Texts with quotes, backslashes, bidi and control characters, long bodies, repeats,
    keywords, adaptive and fixed rules mixed, times a little out of order."""
    rng = random.Random(seed)
    odd = ["'", "''", "\\", "\\'", '"', "$1", "$$", "%s", "?", "\u202e", "\u2066", "\x01", "\x7f", "\t\n", "é", "😀"]
    phones = [A, B, f"+1555{rng.choice(odd)}0003", "+1555'0004\\", "+1555\u202e0005"]
    numbers = [US, "+1555000'0009", "+1555000\\0008"]
    words = ["hi", "STOP", "START", "yes", "URGENT", "x" * 5000, "'; DROP TABLE messages; --", "\\x00"]
    rules = [Rules(max_messages=4, adaptive=True), Rules(max_messages=6), Rules(adaptive=True, adaptive_window=3)]
    out = []
    for i in range(n):
        sid = f"SM{seed}{rng.choice(odd)}{rng.randrange(i + 1) if rng.random() < 0.1 else i:020d}"
        out.append(Text(sid, rng.choice(phones), rng.choice(numbers), rng.choice(words) + rng.choice(odd),
                        T0 + i * 3 + rng.uniform(-5, 5), rng.choice(rules)))
    return out


@pytest.mark.parametrize("sizes", [(1, 1), (200, 200), (1, 250)])
def test_groups_of_hostile_texts_store_what_sqlite_stores_one_at_a_time(store, tmp_path, sizes):
    """One text, 200 (two chunks of ROWS_PER_STATEMENT) or any number a group: the prepared
    reads (arrays of quoted values, the LIMIT of the adaptive window) decide as SQLite does."""
    alone = Store(str(tmp_path / "alone.db"))
    alone.migrate()
    try:
        grouped = store_both_ways(store, alone, _hostile(sum(sizes), 400), random.Random(1), sizes)
        assert any(a.duplicate for a in grouped) and any(a.kind == "opt_out" for a in grouped)
    finally:
        alone.close()


def test_the_quiet_period_read_alone_matches_sqlite(store, tmp_path):
    """quiet_now: the facts' read alone, outside any transaction (its own implicit one),
    with the adaptive window's LIMIT: the same quiet period as SQLite."""
    alone = Store(str(tmp_path / "alone.db"))
    alone.migrate()
    try:
        rules = Rules(adaptive=True)
        texts = [text(f"SM{i}", at=T0 + i * 40 + (i % 3) * 7, rules=rules) for i in range(30)]
        store.add_texts(texts)
        alone.add_texts(texts)
        for now in (T0 + 1300, T0 + 5000):
            assert store.quiet_now(A, now, rules) == pytest.approx(alone.quiet_now(A, now, rules), abs=1e-4)
        assert store.conn.execute("SHOW plan_cache_mode").fetchone()[0] == "auto"
    finally:
        alone.close()


# -- the generic plans: index searches, whatever the tables hold ---------------------------


def _fill(store, people):
    """`people` conversations, each with an open batch and 4 texts, one in 10 opted out,
    added in bulk after the connection planned its reads on empty tables, and never analysed."""
    for table in ("batches", "conversations", "messages", "opt_outs", "pruned_sids"):
        store.conn.execute(f"ALTER TABLE {table} SET (autovacuum_enabled = false)")
    store.conn.execute(
        "INSERT INTO batches (id, phone, our_number, state, message_count, first_at, last_at, created_at)"
        " SELECT 'b' || g, '+1666' || g, ?, 'open', 4, ? + g, ? + g + 30, ? + g FROM generate_series(1, ?) g",
        (US, T0, T0, T0, people))
    store.conn.execute("INSERT INTO conversations (phone, our_number, open_batch)"
                       " SELECT '+1666' || g, ?, 'b' || g FROM generate_series(1, ?) g", (US, people))
    store.conn.execute(
        "INSERT INTO messages (sid, phone, our_number, body, media, kind, received_at, batch_id)"
        " SELECT 'SMbulk' || g || '_' || k, '+1666' || g, ?, repeat('x', 200), '[]', 'text', ? + g + k * 10,"
        " 'b' || g FROM generate_series(1, ?) g, generate_series(0, 3) k", (US, T0, people))
    store.conn.execute("INSERT INTO opt_outs (phone, scope, since, keyword)"
                       " SELECT '+1666' || g, ?, ?, 'STOP' FROM generate_series(1, ?, 10) g", (US, T0, people))


def _buffers(store, sql):
    """Shared buffers (hit and read) an EXPLAIN ANALYZE of `sql` touched, under the generic plan."""
    raw = store.db.raw()
    raw.execute("BEGIN")
    try:
        raw.execute("SET LOCAL plan_cache_mode = force_generic_plan")
        plan = raw.execute(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {sql}").fetchone()[0][0]["Plan"]
    finally:
        raw.execute("ROLLBACK")
    return plan["Shared Hit Blocks"] + plan["Shared Read Blocks"], plan


def test_the_prepared_reads_generic_plans_are_index_searches_on_unanalysed_tables(store):
    store.add_texts([text("SM1", rules=Rules(adaptive=True))])  # prepared and planned on empty tables
    assert prepared(store) == NAMES
    people = 5000
    _fill(store, people)
    phones = [f"+1666{g}" for g in range(1, people, people // 10)]
    arr = "ARRAY[" + ", ".join(f"'{p}'" for p in phones) + "]::text[]"
    us = "ARRAY[" + ", ".join(f"'{US}'" for _ in phones) + "]::text[]"
    sids_ = "ARRAY[" + ", ".join(f"'SMbulk{p[5:]}_1'" for p in phones) + "]::text[]"
    ats = "ARRAY[" + ", ".join(str(T0 + 10**6) for _ in phones) + "]::double precision[]"
    table_pages = count(store, "SELECT pg_relation_size('messages') / 8192 + pg_relation_size('batches') / 8192")
    facts, plan = _buffers(store, f"EXECUTE smsbatch_text_facts({sids_}, {arr}, {us}, {ats}, 19)")
    assert plan["Actual Rows"] == len(phones)
    opened, plan2 = _buffers(store, f"EXECUTE smsbatch_open_batches({arr}, {us})")
    assert plan2["Actual Rows"] == len(phones)
    locks, _ = _buffers(store, f"EXECUTE smsbatch_lock_conversations({arr}, {us})")
    # about a dozen index pages a text for the facts (4 lookups), a few for its open batch
    assert facts <= 20 * len(phones) and opened <= 10 * len(phones), (facts, opened, table_pages)
    assert table_pages > 10 * (facts + opened) / len(phones)
    assert locks < 10


def test_an_adaptive_window_beyond_32_bits_is_a_limit_as_before(store):
    """SMSBATCH_ADAPTIVE_WINDOW has no upper bound (config: a whole number, at least 2): the
    facts' LIMIT was a bigint literal before it became the prepared read's parameter; a window
    of 2**31 or more must not refuse every text ("integer out of range")."""
    rules = Rules(adaptive=True, adaptive_window=2**31 + 1)
    assert store.add_message("SM1", A, US, "hi", T0, rules).duplicate is False
    assert store.add_message("SM2", A, US, "hi", T0 + 30, rules).duplicate is False
    assert count(store) == 2


def test_the_guessed_groups_check_is_index_searches_on_unanalysed_tables(store):
    """The one-round-trip group's check (db_intake._GUARD), planned on empty tables: with
    5,000 open batches it must look each conversation up, not hash every open batch (an
    EXISTS did: 4,500 rows a group, 1.1 ms)."""
    from smsbatch.intake import Memory

    memory = Memory()
    first = [text("SM1", rules=Rules(adaptive=True))]
    store.add_texts_guessed(first, *memory.guess(first, 0.0), 5.0)  # prepared, planned on empty tables
    _fill(store, 5000)
    phones = [f"+1777{g}" for g in range(10)]  # new people: no texts, no open batch
    arr = "ARRAY[" + ", ".join(f"'{p}'" for p in phones) + "]::text[]"
    us = "ARRAY[" + ", ".join(f"'{US}'" for _ in phones) + "]::text[]"
    sids_ = "ARRAY[" + ", ".join(f"'SMnew{p}'" for p in phones) + "]::text[]"
    slices = ", ".join(["1"] * len(phones)) + "]::integer[], ARRAY[" + ", ".join(["0"] * len(phones))
    none = f"ARRAY[{slices}]::integer[], ARRAY[]::double precision[]"  # each person's times: an empty slice
    checked, plan = _buffers(store, f"EXECUTE smsbatch_guessed_v2({sids_}, {none}, {arr}, 19, {arr}, {us})")
    assert plan["Actual Rows"] == 1
    assert checked <= 10 * len(phones), checked
