"""Upgrading databases made by earlier releases: nothing lost, same schema as a new one."""

import sqlite3

import pytest

from conftest import Clock, invoke, offline_processor
from legacy import BATCHES, MESSAGES, NEWER, OPEN, SENT, T, US, make_v1_database
from smsbatch.batching import Rules
from smsbatch.config import Settings
from smsbatch.db import SCHEMA_VERSION, State, Store


def schema_of(path):
    """Tables -> sorted columns (name, type, notnull, default, pk) and indexes -> columns."""
    conn = sqlite3.connect(path)
    tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
    shape = {}
    for table in tables:
        shape[table] = sorted(tuple(r[1:]) for r in conn.execute(f"PRAGMA table_info({table})"))
        for index in conn.execute(f"PRAGMA index_list({table})"):
            shape[f"{table}.{index[1]}"] = [r[2] for r in conn.execute(f"PRAGMA index_info({index[1]})")]
    conn.close()
    return shape


def test_a_version_1_database_upgrades_with_every_text_batch_and_opt_out_intact(tmp_path):
    path = str(tmp_path / "v1.db")
    counts = make_v1_database(path)
    store = Store(path)
    assert store.migrate() == (1, SCHEMA_VERSION)
    conn = store.conn
    assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
    batches = {r["id"]: dict(r) for r in conn.execute("SELECT * FROM batches")}
    assert len(batches) == counts["batches"]
    for batch_id, phone, state, count, extra in BATCHES:
        row = batches[batch_id]
        assert (row["phone"], row["our_number"], row["state"], row["message_count"]) == (phone, US, state, count)
        # step 11: an open or never-tried queued batch's due_at was its closing time
        assert all(row["closes_at" if k == "due_at" else k] == v for k, v in extra.items())
    texts = {r["sid"]: (r["phone"], r["body"], r["kind"], r["batch_id"]) for r in conn.execute("SELECT * FROM messages")}
    assert texts == {sid: (phone, body, kind, b) for sid, phone, body, kind, b in MESSAGES}
    # The opt-out of version 1 covered every number, and still does.
    assert store.is_opted_out("+15551110004", US) and store.is_opted_out("+15551110004", "+15559999999")
    # The open batch is still its conversation's open batch, so a new text joins it.
    assert [tuple(r) for r in conn.execute("SELECT * FROM conversations")] == [("+15551110005", US, OPEN)]
    # The sent reply is in the outbound log, so the AI keeps seeing it as history.
    assert [tuple(r) for r in conn.execute("SELECT sid, batch_id, body, source FROM outbound")] == [
        ("SM" + "a" * 32, SENT, "Sure, 9 to 5.", "ai")]
    events = conn.execute("SELECT batch_id, to_state FROM batch_events").fetchall()
    assert sorted(map(tuple, events)) == sorted((b[0], b[2]) for b in BATCHES)
    store.close()


def test_an_upgraded_database_has_the_same_schema_as_a_new_one(tmp_path):
    old, new = str(tmp_path / "old.db"), str(tmp_path / "new.db")
    make_v1_database(old)
    for path in (old, new):
        Store(path).migrate()
    assert schema_of(old) == schema_of(new)
    for path in (old, new):  # the new state is allowed by both CHECK constraints
        conn = sqlite3.connect(path)
        conn.execute("UPDATE batches SET state = 'held' WHERE 0")
        conn.execute("INSERT INTO batches (id, phone, our_number, state, first_at, last_at, created_at)"
                     " VALUES ('heldcheck2', '+1', '+2', 'held', 0, 0, 0)")
        conn.close()


def test_an_upgraded_database_keeps_working(tmp_path):
    path = str(tmp_path / "v1.db")
    make_v1_database(path)
    assert "upgraded from schema version 1 to" in invoke(["--db", path, "migrate"]).output
    assert "already at schema version" in invoke(["--db", path, "migrate"]).output
    store = Store(path)
    settings = Settings(db_path=path, ai="offline", sms="console")
    report = offline_processor(settings, Clock(T + 3600)).run()
    # The queued and the open batch are answered; the sent one is not sent again.
    assert report.counts["sent"] == 2
    assert store.get_batch(NEWER)["state"] == State.SENT and store.get_batch(OPEN)["state"] == State.SENT
    assert store.get_batch(SENT)["provider_sid"] == "SM" + "a" * 32
    assert store.conn.execute("SELECT count(*) FROM outbound").fetchone()[0] == 3
    store.close()


def test_a_newer_database_is_refused(tmp_path):
    path = str(tmp_path / "future.db")
    Store(path).migrate()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    result = invoke(["--db", path, "migrate"])
    assert result.exit_code == 1 and "newer than this smsbatch" in result.output


def test_a_version_9_database_upgrades_to_10_with_every_text_batch_and_opt_out_intact(tmp_path):
    """Step 10 adds "one open batch" and "one claim" per conversation as unique indexes; a
    database that broke either rule (possible before) is mended first, losing nothing."""
    path = str(tmp_path / "v9.db")
    make_v1_database(path)
    store = Store(path)
    assert store.db.migrate(9) == 1
    conn = store.conn
    # a second open batch of the open conversation, and two claims in another one
    conn.execute("INSERT INTO batches (id, phone, our_number, state, first_at, last_at, created_at, due_at)"
                 " VALUES ('secondopen', '+15551110005', ?, 'open', ?, ?, ?, ?)", (US, T, T, T, T + 30))
    conn.execute("INSERT INTO batches (id, phone, our_number, state, first_at, last_at, created_at, claim, due_at)"
                 " VALUES ('claimone', '+15551119999', ?, 'processing', ?, ?, ?, 'c1', ?),"
                 " ('claimtwo', '+15551119999', ?, 'processing', ?, ?, ?, 'c2', ?)",
                 (US, T, T, T, T + 4, US, T, T, T, T + 4))
    before = {table: conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
              for table in ("messages", "batches", "opt_outs", "outbound", "batch_events", "conversations")}
    assert store.migrate() == (9, SCHEMA_VERSION)
    after = {table: conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0] for table in before}
    assert after == before
    texts = {r["sid"]: (r["phone"], r["body"], r["kind"], r["batch_id"]) for r in conn.execute("SELECT * FROM messages")}
    assert texts == {sid: (phone, body, kind, b) for sid, phone, body, kind, b in MESSAGES}
    assert store.is_opted_out("+15551110004", US)
    states = dict(conn.execute("SELECT id, state FROM batches WHERE id IN (?, ?)", (OPEN, "secondopen")).fetchall())
    assert states == {OPEN: "open", "secondopen": "queued"}  # texts keep joining the one they joined
    assert store.add_message("SMnew", "+15551110005", US, "more", T + 5, Rules()).batch_id == OPEN
    claims = dict(conn.execute("SELECT id, claim FROM batches WHERE phone = '+15551119999'").fetchall())
    assert claims == {"claimone": "c1", "claimtwo": None}  # claimed again when its lease runs out
    store.close()


@pytest.mark.postgres
def test_postgresql_has_the_same_tables_and_columns_as_sqlite(db_path, pg_url):
    """schema_pg.sql plus the later steps' PostgreSQL statements must give what schema.sql gives."""
    sqlite, postgres = Store(db_path), Store(pg_url)
    try:
        postgres.migrate()
        assert postgres.version() == sqlite.version() == SCHEMA_VERSION
        assert postgres.db.tables() == sqlite.db.tables()
        indexes = "SELECT indexname FROM pg_indexes WHERE schemaname = current_schema() AND indexname LIKE 'batches_%'"
        names = {r[0] for r in postgres.conn.execute(indexes)}
        assert {"batches_one_open", "batches_one_claim", "batches_state_acts_at"} <= names
        # times are double precision: a 4-byte real would round today's epoch to 128 s
        postgres.conn.execute("INSERT INTO holds (phone, since) VALUES ('+1', ?)", (T + 0.25,))
        assert postgres.conn.execute("SELECT since FROM holds").fetchone()[0] == T + 0.25
    finally:
        sqlite.close()
        postgres.close()


# Schema 10 batches, one of each meaning batches.due_at had: (id, state, attempts, claim,
# retried_at, due_at, the column step 11 puts due_at in). Each batch is its own conversation.
V10_BATCHES = [
    ("open000001", "open", 0, None, None, T + 10, "closes_at"),  # still collecting: closes in 10 s
    ("full000001", "queued", 0, None, None, T - 5, "closes_at"),  # closed full, due
    ("backoff001", "queued", 2, None, None, T + 30, "retry_at"),  # a failed attempt backing off
    ("requeued01", "queued", 0, None, T - 100, T - 100, "retry_at"),  # an operator's `retry`
    ("live000001", "processing", 1, "c1", None, T + 60, "lease_expires_at"),  # a live lease
    ("dead000001", "processing", 1, "c2", None, T - 1, "lease_expires_at"),  # its holder died
    ("noclaim001", "processing", 1, None, None, T + 40, "lease_expires_at"),  # claim dropped by step 10
    ("sending001", "sending", 1, "c3", None, T + 60, "lease_expires_at"),  # a send in flight
    ("tocheck001", "sending", 1, None, None, T + 20, "retry_at"),  # a send to check again
    ("sent000001", "sent", 1, None, None, None, None),
    ("held000001", "held", 0, None, None, None, None),
]
MEANINGS = ("closes_at", "retry_at", "lease_expires_at")


KEPT_COLUMNS = {"messages": "sid, phone, our_number, body, kind, received_at, batch_id",
                "opt_outs": "phone, scope, since, keyword",
                "batch_events": "batch_id, at, from_state, to_state, reason"}


@pytest.mark.engines
def test_a_version_10_database_upgrades_to_11_with_each_due_at_in_the_column_of_its_meaning(
        request, tmp_path, engine_name):
    """Step 11 splits batches.due_at by what it meant in each batch's state: every batch keeps
    its closing time, retry time or lease, and exactly the batches claimable before are
    claimable after, at every moment."""
    if engine_name == "postgres":  # schema_pg.sql (version 9), then step 10
        path = request.getfixturevalue("pg_url")
    else:  # a new SQLite database starts at the latest version: build a released one, as in the field
        path = str(tmp_path / "v10.db")
        make_v1_database(path)
    store = Store(path)
    store.db.migrate(10)
    assert store.version() == 10
    with store.transaction() as conn:
        for n, (batch_id, state, attempts, claim, retried_at, due, _) in enumerate(V10_BATCHES):
            conn.execute("INSERT INTO batches (id, phone, our_number, state, message_count, first_at, last_at,"
                         " attempts, claim, retried_at, due_at, created_at) VALUES (?, ?, ?, ?, 1, ?, ?, ?, ?, ?, ?, ?)",
                         (batch_id, f"+1555222{n:04d}", US, state, T - 60, T - 50, attempts, claim, retried_at, due,
                          T - 60))
        conn.execute("INSERT INTO conversations (phone, our_number, open_batch) VALUES (?, ?, ?)",
                     ("+15552220000", US, "open000001"))
        conn.execute("INSERT INTO messages (sid, phone, our_number, body, kind, received_at, batch_id)"
                     " VALUES ('SMv10', '+15552220000', ?, 'still here?', 'text', ?, 'open000001')", (US, T - 50))
        conn.execute("INSERT INTO opt_outs (phone, scope, since, keyword) VALUES ('+15552229999', ?, ?, 'STOP')",
                     (US, T - 70))
    kept = {table: sorted(map(tuple, store.conn.execute(f"SELECT {columns} FROM {table}")))
            for table, columns in KEPT_COLUMNS.items()}
    # what schema 10 claimed at each moment: a pending batch whose due_at had come
    moments = (T, T + 15, T + 25, T + 35, T + 45, T + 65)
    before = {at: {r[0] for r in store.conn.execute(
        "SELECT id FROM batches WHERE state IN ('open', 'queued', 'processing', 'sending') AND due_at <= ?", (at,))}
        for at in moments}
    earliest = store.conn.execute("SELECT min(due_at) FROM batches WHERE state IN ('open', 'queued',"
                                  " 'processing', 'sending')").fetchone()[0]
    assert store.migrate() == (10, SCHEMA_VERSION)
    assert "due_at" not in store.db.columns("batches")
    for table, rows in kept.items():  # every text, opt-out and history row as it was
        assert sorted(map(tuple, store.conn.execute(f"SELECT {KEPT_COLUMNS[table]} FROM {table}"))) == rows, table
    assert store.is_opted_out("+15552229999", US)
    got = {r["id"]: r for r in map(dict, store.conn.execute("SELECT * FROM batches"))}
    for batch_id, state, attempts, claim, retried_at, due, meaning in V10_BATCHES:
        row = got[batch_id]
        assert (row["state"], row["claim"]) == (state, claim)
        assert {m: row[m] for m in MEANINGS} == {m: due if m == meaning else None for m in MEANINGS}, batch_id
    assert store.next_due() == earliest  # the processor's idle wait: the same next moment to act
    claimed = set()
    for at in moments:  # a lease long enough that nothing claimed here is claimed again
        rows, expired = store.claim_due(at, 100, 10_000.0, 86400.0, holder="h:1")
        assert expired == 0
        assert {r["id"] for r in rows} == before[at] - claimed, at
        claimed |= before[at]
    store.close()
