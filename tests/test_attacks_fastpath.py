"""Attacks on the PostgreSQL webhook's one-round-trip groups (Store.add_texts_guessed,
intake.Memory, PgWriter._run_guessed): each stores what the ordinary way stores, or the
guess is refused by the server and nothing of it is stored."""

import threading
import time

import psycopg
import pytest

from conftest import POSTGRES_URL, T0
from smsbatch.batching import Rules
from smsbatch.db import Store
from smsbatch.db_intake import GuessedWrong
from smsbatch.intake import Memory, Text
from smsbatch.writer_pool import PgWriter
from test_intake import _outcome
from test_pg_guessed import assert_stored_as_alone
from test_pg_writer import burst_of

pytestmark = pytest.mark.postgres
A, B, US, US2 = "+15551230001", "+15551230002", "+15550000000", "+15550009999"
ADAPTIVE = Rules(adaptive=True, max_messages=5)


@pytest.fixture
def engine_name():
    return "postgres"


def text(sid, at, phone=A, body="hi", rules=ADAPTIVE, ours=US, **kw):
    return Text(f"SM{sid:032d}", phone, ours, body, at, rules, **kw)


def guessed(store, memory, texts, now=0.0):
    facts, opens = memory.guess(texts, now)
    added = store.add_texts_guessed(texts, facts, opens, 5.0)
    memory.learn(*store.last_intake)
    return added


def stored(store, memory, texts, now=0.0):
    """What the writer does: guessed when it can (and right), else the ordinary way; 'guessed'/'read'."""
    if memory.guess(texts, now) is not None:
        try:
            guessed(store, memory, texts, now)
            return "guessed"
        except GuessedWrong:
            memory.forget(texts, now)
    store.add_texts(texts)
    memory.learn(*store.last_intake)
    return "read"


def count(store, sql, *params):
    return store.conn.execute(sql, params).fetchone()[0]


def counts(db_path, *queries):
    """Each query's one value, read on a connection of its own."""
    store = Store(db_path)
    try:
        return [count(store, sql) for sql in queries]
    finally:
        store.close()


def fresh(path):
    s = Store(path)
    s.migrate()
    return s


def test_one_text_a_batch_after_an_open_batch_this_writer_never_saw(store, db_path):
    """SMSBATCH_MAX_MESSAGES lowered to 1 and the webhook restarted (its memory empty): the
    person's open batch (written under the old setting) must take the next text, as the
    ordinary way does; a guess of 'no open batch' is checked by the one-open-batch index only
    when the plan opens a batch, and a batch of one text is created queued."""
    other = Store(db_path)
    batch = other.add_texts([text(1, T0, rules=Rules(max_messages=5))])[0].batch_id
    other.close()
    one = Rules(max_messages=1)
    try:
        added = guessed(store, Memory(), [text(2, T0 + 1, rules=one)])
    except GuessedWrong:
        added = store.add_texts([text(2, T0 + 1, rules=one)])
    assert added[0].batch_id == batch
    assert count(store, "SELECT count(*) FROM batches WHERE state = 'open'") == 0
    # and the conversation can open a batch again once the setting is back
    later = store.add_texts([text(3, T0 + 2, rules=Rules(max_messages=5))])
    assert later[0].batch_id != batch


def test_one_text_a_batch_through_the_writer_matches_each_text_alone(db_path, tmp_path):
    alone = fresh(str(tmp_path / "alone.db"))
    pg = Store(db_path)
    writer = PgWriter(db_path, 5.0)
    try:
        first = text(1, T0, rules=Rules(max_messages=5))
        alone.add_texts([first])
        pg.add_texts([first])
        later = [text(2, T0 + 1, rules=Rules(max_messages=1)), text(3, T0 + 2, rules=Rules(max_messages=5)),
                 text(4, T0 + 3, rules=Rules(max_messages=5))]
        for t in later:
            alone.add_texts([t])
            assert burst_of(writer, [t])
        assert _outcome(pg) == _outcome(alone)
    finally:
        writer.close()
        pg.close()
        alone.close()


def test_a_restarted_webhook_fills_an_open_batch_it_never_saw_instead_of_orphaning_it(store, db_path):
    """No setting changed: two texts a batch, the person's open batch holds one text, the
    webhook restarts (memory empty) and two more texts come in one group. Guessed new, the
    plan opens a batch and fills it in the group: inserted queued, nothing for the
    one-open-batch index to refuse; the old open batch would lose its conversation's pointer."""
    two = Rules(max_messages=2)
    other = Store(db_path)
    batch = other.add_texts([text(1, T0, rules=two)])[0].batch_id
    other.close()
    group = [text(2, T0 + 1, rules=two), text(3, T0 + 2, rules=two)]
    try:
        added = guessed(store, Memory(), group)
    except GuessedWrong:
        added = store.add_texts(group)
    assert added[0].batch_id == batch and added[1].batch_id != batch
    assert count(store, "SELECT state FROM batches WHERE id = ?", batch) == "queued"
    assert count(store, "SELECT count(*) FROM batches WHERE state = 'open'") == 1


def test_a_group_of_more_than_a_statements_rows_of_texts_and_conversations(store, tmp_path):
    """250 texts of 130 people, guessed new, then 130 more joining: what each alone stores."""
    alone = fresh(str(tmp_path / "alone.db"))
    memory = Memory()
    try:
        rules = Rules(max_messages=3, adaptive=True)
        first = [text(i, T0 + i * 0.01, phone=f"+1555000{i % 130:04d}", rules=rules) for i in range(250)]
        second = [text(1000 + i, T0 + 10 + i * 0.01, phone=f"+1555000{i:04d}", rules=rules) for i in range(130)]
        for t in first + second:
            alone.add_texts([t])
        assert stored(store, memory, first) == "guessed"
        stored(store, memory, second)
        assert _outcome(store) == _outcome(alone)
    finally:
        alone.close()


def test_one_messagesid_twice_in_a_guessed_group_is_stored_once(store):
    added = guessed(store, Memory(), [text(1, T0), text(1, T0), text(2, T0 + 1)])
    assert [a.duplicate for a in added] == [False, True, False]
    assert count(store, "SELECT count(*) FROM messages") == 2
    assert count(store, "SELECT message_count FROM batches") == 2


def test_a_conversation_locked_by_another_session_fails_the_group_within_its_deadline(db_path):
    """Another host holds the conversation's lock (its transaction hangs): the one round trip
    must give up at the group's deadline, not wait for the lock forever; the text is then
    stored once the lock is free."""
    writer = PgWriter(db_path, 0.5)
    holder = psycopg.connect(POSTGRES_URL, autocommit=True)
    try:
        assert burst_of(writer, [text(1, T0, rules=Rules())])  # remembered: the next is guessed
        holder.execute("SELECT pg_advisory_lock(hashtext(%s), hashtext(%s))", (A, US))
        started = time.monotonic()
        done, outcome = threading.Event(), []
        with writer.burst(lambda failed: (outcome.append(failed), done.set())):
            writer.submit(text(2, T0 + 1, rules=Rules()))
        assert done.wait(5)
        assert time.monotonic() - started < 2.0
        assert outcome == [True]
        holder.execute("SELECT pg_advisory_unlock_all()")
        assert burst_of(writer, [text(2, T0 + 1, rules=Rules())])
        assert counts(db_path, "SELECT count(*) FROM messages", "SELECT message_count FROM batches") == [2, 2]
    finally:
        holder.close()
        writer.close()


def _backend_waiting_on_advisory_lock(admin, timeout=3.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        row = admin.execute("SELECT pid FROM pg_stat_activity WHERE wait_event = 'advisory'"
                            " AND query LIKE '%%smsbatch_guessed%%'").fetchone()
        if row:
            return row[0]
        time.sleep(0.01)
    raise AssertionError("no guessed round trip waits on the lock")


@pytest.mark.parametrize("release_first", [False, True])
def test_the_connection_dropped_during_the_one_round_trip_neither_loses_nor_doubles(db_path, release_first):
    """The writer's backend is ended while its round trip (BEGIN..COMMIT) waits on the
    conversation's lock: the group runs again on a new connection; the text is stored once,
    and joins the batch its first text opened."""
    writer = PgWriter(db_path, 3.0)
    holder = psycopg.connect(POSTGRES_URL, autocommit=True)
    admin = psycopg.connect(POSTGRES_URL, autocommit=True)
    try:
        assert burst_of(writer, [text(1, T0, rules=Rules())])
        holder.execute("SELECT pg_advisory_lock(hashtext(%s), hashtext(%s))", (A, US))
        done, outcome = threading.Event(), []
        with writer.burst(lambda failed: (outcome.append(failed), done.set())):
            writer.submit(text(2, T0 + 1, rules=Rules()))
        pid = _backend_waiting_on_advisory_lock(admin)
        if release_first:
            holder.execute("SELECT pg_advisory_unlock_all()")
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        holder.execute("SELECT pg_advisory_unlock_all()")
        assert done.wait(5)
        if outcome == [True]:  # the group failed: the webhook runs the request again alone
            assert burst_of(writer, [text(2, T0 + 1, rules=Rules())])
        assert counts(db_path, "SELECT count(*) FROM messages", "SELECT count(*) FROM batches",
                      "SELECT message_count FROM batches") == [2, 1, 2]
    finally:
        admin.close()
        holder.close()
        writer.close()


def test_a_hold_released_between_two_guessed_groups(store):
    """Held: a person put on hold, a text guessed new, the hold released (the open batch
    ends held): the next text is not put blind into the held batch."""
    memory = Memory()
    store.hold(A, "check", T0 - 1)
    batch = guessed(store, memory, [text(1, T0, rules=Rules())])[0].batch_id
    store.release(A, T0 + 0.5)
    assert count(store, "SELECT state FROM batches WHERE id = ?", batch) == "held"
    with pytest.raises(GuessedWrong):
        guessed(store, memory, [text(2, T0 + 1, rules=Rules())])
    assert count(store, "SELECT count(*) FROM messages") == 1
    added = store.add_texts([text(2, T0 + 1, rules=Rules())])[0]
    assert added.batch_id != batch


@pytest.mark.parametrize("seed", [11, 12])
def test_restarts_and_small_batches_through_the_writer_store_what_each_text_alone_stores(db_path, tmp_path, seed):
    """Two texts a batch, urgent words, a text now and then older than the one before; the
    webhook restarted now and then (its memory empty) while open batches remain: the same
    batches, states, times and history as each text alone."""
    import random

    rng = random.Random(seed)
    rules = Rules(max_messages=2, adaptive=rng.random() < 0.5)
    people = [f"+1555124{k:04d}" for k in range(4)]
    texts, at = [], T0
    for i in range(48):
        at += rng.uniform(0.2, 3)
        texts.append(Text(f"SM{seed:02d}{i:030d}", rng.choice(people), US, rng.choice(["hi", "ok", "URGENT pls"]),
                          at - (rng.uniform(1, 3) if rng.random() < 0.1 else 0), rules))
    alone = fresh(str(tmp_path / "alone.db"))
    writer = [PgWriter(db_path, 5.0)]

    def now_and_then_restarted():
        if rng.random() < 0.25:
            writer[0].close()
            writer[0] = PgWriter(db_path, 5.0)
        return writer[0]
    try:
        assert_stored_as_alone(db_path, alone, texts, rng, (1, 4), now_and_then_restarted)
    finally:
        writer[0].close()
        alone.close()


def test_a_connection_lost_after_the_one_round_trips_commit_stores_nothing_twice(store):
    """The server ran the whole round trip, COMMIT included, and the connection was lost
    before its answer came: execute_all sends it once more on a new connection (it cannot
    tell this from a drop before anything ran). That second run must refuse itself (the
    MessageSids' plain INSERTs), so the group goes the ordinary way and finds its text stored."""
    memory = Memory()
    batch = guessed(store, memory, [text(1, T0, rules=Rules())])[0].batch_id
    database, real = store.db, store.db.client_cursor
    admin = psycopg.connect(POSTGRES_URL, autocommit=True)
    runs = []

    class DroppedAfterRunning:
        def __init__(self, cursor):
            self.cursor = cursor

        def execute(self, query):
            self.cursor.execute(query)  # everything ran, the COMMIT too
            runs.append(query)
            raw = self.cursor.connection
            admin.execute("SELECT pg_terminate_backend(%s)", (raw.info.backend_pid,))
            try:
                raw.execute("SELECT 1")  # how the client finds out: the connection is broken now
            except psycopg.OperationalError as exc:
                database.client_cursor = real
                raise exc
            raise AssertionError("the backend was not terminated")

    database.client_cursor = lambda raw: DroppedAfterRunning(real(raw))
    try:
        with pytest.raises(GuessedWrong):
            guessed(store, memory, [text(2, T0 + 1, rules=Rules())])
    finally:
        database.client_cursor = real
        admin.close()
    assert len(runs) == 1
    assert count(store, "SELECT count(*) FROM messages") == 2
    assert count(store, "SELECT message_count FROM batches WHERE id = ?", batch) == 2
    added = store.add_texts([text(2, T0 + 1, rules=Rules())])[0]
    assert added.duplicate and added.batch_id == batch


def test_a_value_that_cannot_be_written_leaves_no_begin_pending_on_the_kept_connection(store, monkeypatch):
    """add_texts_guessed is over when it raises, whatever it raised: the committer keeps its
    connection for the next groups, and a BEGIN left pending would be sent inside the next
    transaction (with that group's stale timeouts)."""
    import smsbatch.db_intake as db_intake
    real = db_intake._guarded_writes
    monkeypatch.setattr(db_intake, "_guarded_writes", lambda plan, was: real(plan, was) + [("SELECT ?", (object(),))])
    with pytest.raises(TypeError):
        guessed(store, Memory(), [text(1, T0)])
    assert store.db.pending_begin is None and not store.db.in_transaction
    monkeypatch.undo()
    assert store.add_texts([text(1, T0)])[0].batch_id
    assert count(store, "SELECT count(*) FROM messages") == 1
