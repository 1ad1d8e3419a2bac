"""Upgrading databases made by earlier releases: nothing lost, same schema as a new one."""

import sqlite3

from conftest import Clock, invoke, offline_processor
from legacy import BATCHES, MESSAGES, NEWER, OPEN, SENT, T, US, make_v1_database
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
        assert all(row[k] == v for k, v in extra.items())
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
