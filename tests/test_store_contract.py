"""The store's contract, run on both engines (SQLite, and PostgreSQL when
SMSBATCH_TEST_POSTGRES_URL names a server): what every engine must do alike, including
with several writers at once (separate connections, transactions held open).

Like huey's StorageTests: one suite, one run per engine (conftest.ENGINES).
"""

import threading
import time

import pytest

from conftest import T0, add
from smsbatch import migrations
from smsbatch.batching import Rules
from smsbatch.config import Settings
from smsbatch.db import SCHEMA_VERSION, Store
from smsbatch.engine import StoreConflict
from smsbatch.errors import InvalidTransition, NotFound

pytestmark = pytest.mark.engines
ME, US = "+15551230001", "+15550000000"
LEASE, MAX_AGE = 4.0, 86400.0


def rows(store, sql, params=()):
    return [tuple(r) for r in store.conn.execute(sql, params).fetchall()]


def in_thread(target, *args):
    """Run target(*args) on a thread; returns a function that joins it and gives its result
    (or raises its exception)."""
    box = {}

    def run():
        try:
            box["result"] = target(*args)
        except BaseException as exc:  # handed to the caller
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def join(timeout=30):
        thread.join(timeout)
        assert not thread.is_alive(), "the other writer never finished"
        if "error" in box:
            raise box["error"]
        return box["result"]
    return join


@pytest.fixture
def other(db_path):
    """A second connection to the same database: another writer (another host)."""
    s = Store(db_path)
    yield s
    s.close()


# -- storing -----------------------------------------------------------------------


def test_texts_join_the_open_batch_and_a_duplicate_sid_is_stored_once(store):
    first = store.add_message("SMa", ME, US, "hi", T0, Rules())
    second = store.add_message("SMb", ME, US, "there", T0 + 1, Rules())
    again = store.add_message("SMa", ME, US, "hi", T0, Rules())
    assert second.batch_id == first.batch_id and not second.duplicate
    assert again.duplicate and again.batch_id == first.batch_id
    assert rows(store, "SELECT count(*), max(message_count) FROM messages m JOIN batches b ON b.id = m.batch_id") \
        == [(2, 2)]


def test_a_sid_stored_meanwhile_by_another_writer_is_a_duplicate_not_an_error(store, other):
    """The webhook and the backfill (or two webhooks) store the same MessageSid at once:
    the second finds it only when it writes (its check ran before the first committed)."""
    add(store, "+15559990000", "elsewhere", T0, sid="SMother")
    # Hold a transaction open that stores SMrace for another conversation (no shared lock).
    with store.transaction() as conn:
        conn.execute("INSERT INTO messages (sid, phone, our_number, body, kind, received_at, batch_id)"
                     " SELECT 'SMrace', phone, our_number, 'twin', 'text', ?, id FROM batches LIMIT 1", (T0,))
        join = in_thread(other.add_message, "SMrace", ME, US, "twin", T0, Rules())
        time.sleep(0.3)  # the other writer is now waiting for this transaction
    added = join()
    assert added.duplicate
    assert rows(store, "SELECT count(*) FROM messages WHERE sid = 'SMrace'") == [(1,)]
    assert rows(store, "SELECT count(*) FROM batches WHERE phone = ?", (ME,)) == [(0,)]  # nothing half-written


def test_first_texts_of_one_conversation_at_once_land_in_one_batch(db_path):
    """Two writers, each the first text of a conversation at the same instant, twenty times."""
    stores = [Store(db_path) for _ in range(2)]
    try:
        for n in range(20):
            phone = f"+1555000{n:04d}"
            barrier = threading.Barrier(2)

            def write(s, sid, phone=phone, barrier=barrier):
                barrier.wait()
                return s.add_message(sid, phone, US, "hello", T0, Rules())

            joins = [in_thread(write, s, f"SM{n}-{i}") for i, s in enumerate(stores)]
            results = [j() for j in joins]
            assert results[0].batch_id == results[1].batch_id
        assert rows(stores[0], "SELECT count(*), min(message_count), max(message_count) FROM batches") \
            == [(20, 2, 2)]
    finally:
        for s in stores:
            s.close()


def test_the_database_refuses_a_second_open_batch_of_a_conversation(store):
    add(store, ME, "hi", T0)
    with pytest.raises(StoreConflict):
        store.conn.execute("INSERT INTO batches (id, phone, our_number, state, first_at, last_at, created_at)"
                           " VALUES ('second', ?, ?, 'open', ?, ?, ?)", (ME, US, T0, T0, T0))


# -- claiming ----------------------------------------------------------------------


def due_batches(store, n):
    """n conversations, each with one batch due at T0 + 60."""
    rules = Rules(quiet_seconds=30)
    return [store.add_message(f"SMd{i}", f"+1555100{i:04d}", US, "hello", T0, rules).batch_id for i in range(n)]


def test_claims_move_through_transitions_and_are_recorded(store):
    [batch_id] = due_batches(store, 1)
    assert store.claim_due(T0 + 1, 10, LEASE, MAX_AGE) == ([], 0)  # not due yet
    claimed, _ = store.claim_due(T0 + 60, 10, LEASE, MAX_AGE, holder="h:1")
    assert [(c["id"], c["state"], c["attempts"], c["lease_expires_at"]) for c in claimed] == \
        [(batch_id, "processing", 1, T0 + 60 + LEASE)]
    assert rows(store, "SELECT from_state, to_state FROM batch_events WHERE batch_id = ? ORDER BY id",
                (batch_id,))[-1] == ("open", "processing")


def test_two_claimers_at_once_never_take_the_same_batch(store, other):
    due_batches(store, 6)
    with store.transaction() as conn:  # one claimer holds its claim uncommitted...
        mine = store._claim(conn, T0 + 60, 3, LEASE, "a:1", None)
        join = in_thread(other.claim_due, T0 + 60, 3, LEASE, MAX_AGE, "b:2")  # ...while another claims
        time.sleep(0.3)
    theirs, _ = join()
    assert len(mine) == 3 and len(theirs) == 3
    assert not {r["id"] for r in mine} & {r["id"] for r in theirs}
    assert rows(store, "SELECT count(*) FROM batches WHERE claim IS NOT NULL") == [(6,)]


def test_one_batch_of_a_conversation_in_flight_however_many_claimers(store, other):
    rules = Rules(quiet_seconds=30, max_messages=1)  # each text its own batch
    for i in range(3):
        store.add_message(f"SMc{i}", ME, US, f"text {i}", T0 + i, rules)
    first, _ = store.claim_due(T0 + 60, 10, LEASE, MAX_AGE)
    second, _ = other.claim_due(T0 + 61, 10, LEASE, MAX_AGE)
    assert len(first) == 1 and second == []
    # and the database itself refuses a second claim in the conversation
    with pytest.raises(StoreConflict):
        store.conn.execute("UPDATE batches SET claim = 'forged' WHERE phone = ? AND claim IS NULL", (ME,))


def test_a_dead_holders_batch_is_taken_over_and_its_late_moves_are_refused(store, other):
    [batch_id] = due_batches(store, 1)
    [held], _ = store.claim_due(T0 + 60, 1, LEASE, MAX_AGE, holder="dead:1")
    [taken], _ = other.claim_due(T0 + 60 + LEASE + 1, 1, LEASE, MAX_AGE, holder="alive:2")
    assert taken["id"] == batch_id and taken["claim"] != held["claim"] and taken["attempts"] == 2
    # the first holder wakes: every move it tries is refused, nothing changes
    assert store.finish(held, "failed", T0 + 70, "late") is False
    assert store.begin_send(held, "late reply", T0 + 70, Settings()) is None
    assert store.mark_sent(held, "SMlate", T0 + 70) is False
    assert store.renew_claims([held["claim"]], T0 + 80, T0 + 70) == set()
    assert rows(store, "SELECT state, claim FROM batches WHERE id = ?", (batch_id,)) == \
        [("processing", taken["claim"])]
    assert store.finish(taken, "failed", T0 + 71, "given up") is True


def test_a_forbidden_move_is_refused_and_changes_nothing(store):
    [batch_id] = due_batches(store, 1)
    with pytest.raises(InvalidTransition):
        with store.transaction() as conn:
            store._move(conn, batch_id, "sent", T0, "skipping ahead")
    with pytest.raises(NotFound):
        with store.transaction() as conn:
            store._move(conn, "nosuchbatch", "queued", T0, "nothing")
    assert rows(store, "SELECT state FROM batches WHERE id = ?", (batch_id,)) == [("open",)]


def test_leases_renew_only_the_holders_claims(store):
    due_batches(store, 2)
    claimed, _ = store.claim_due(T0 + 60, 2, LEASE, MAX_AGE)
    renewed = store.renew_claims([claimed[0]["claim"]], T0 + 100, T0 + 61)
    assert renewed == {(claimed[0]["claim"], claimed[0]["id"]), (claimed[1]["claim"], claimed[1]["id"])}
    assert rows(store, "SELECT DISTINCT lease_expires_at FROM batches") == [(T0 + 100,)]
    assert store.claim_due(T0 + 99, 2, LEASE, MAX_AGE) == ([], 0)  # lease still running


def test_a_live_lease_is_not_taken_for_a_closing_time(store):
    """A claimed batch keeps the closing time it had (long past) beside its lease: the claim,
    the next moment to act and the lease left read the lease, never the closing time."""
    [batch_id] = due_batches(store, 1)
    closes = store.get_batch(batch_id)["closes_at"]
    assert closes == T0 + 30
    claimed, _ = store.claim_due(T0 + 60, 1, LEASE, MAX_AGE)
    row = store.get_batch(batch_id)
    assert (row["closes_at"], row["retry_at"], row["lease_expires_at"]) == (closes, None, T0 + 60 + LEASE)
    assert store.claim_due(T0 + 60 + LEASE - 0.5, 1, LEASE, MAX_AGE) == ([], 0)  # closed long ago, but held
    assert store.next_due() == T0 + 60 + LEASE
    assert [r["lease_left_seconds"] for r in store.status(T0 + 61)["in_flight"]] == [LEASE - 1]
    store.renew_claims([claimed[0]["claim"]], T0 + 200, T0 + 62)
    assert store.get_batch(batch_id)["closes_at"] == closes  # a heartbeat moves the lease only
    assert store.claim_due(T0 + 199, 1, LEASE, MAX_AGE) == ([], 0)
    [taken], _ = store.claim_due(T0 + 200, 1, LEASE, MAX_AGE)  # its holder stopped renewing
    assert taken["id"] == batch_id and taken["claim"] != claimed[0]["claim"]


def test_a_retry_time_is_kept_apart_from_the_closing_time_and_the_lease(store):
    """A failed attempt backs off: retry_at says when, the lease is over; a claim spends it."""
    [batch_id] = due_batches(store, 1)
    [row], _ = store.claim_due(T0 + 60, 1, LEASE, MAX_AGE)
    assert store.requeue(row, T0 + 500, "AI returned HTTP 500", T0 + 61)
    row = store.get_batch(batch_id)
    assert (row["state"], row["closes_at"], row["retry_at"], row["lease_expires_at"]) == \
        ("queued", T0 + 30, T0 + 500, None)
    assert store.next_retry() == (T0 + 500, batch_id) and store.next_due() == T0 + 500
    assert store.claim_due(T0 + 499, 1, LEASE, MAX_AGE) == ([], 0)  # closed long ago, but backing off
    [again], _ = store.claim_due(T0 + 500, 1, LEASE, MAX_AGE)
    assert (again["retry_at"], again["lease_expires_at"]) == (None, T0 + 500 + LEASE)
    assert store.next_retry() is None


def test_old_batches_expire_once_among_several_claimers(store, other):
    due_batches(store, 3)
    _, expired = store.claim_due(T0 + MAX_AGE + 100, 10, LEASE, MAX_AGE)
    _, again = other.claim_due(T0 + MAX_AGE + 100, 10, LEASE, MAX_AGE)
    assert (expired, again) == (3, 0)
    assert rows(store, "SELECT count(*) FROM batch_events WHERE to_state = 'expired'") == [(3,)]


# -- operators -----------------------------------------------------------------------


def failed_batch(store):
    [batch_id] = due_batches(store, 1)
    [batch], _ = store.claim_due(T0 + 60, 1, LEASE, MAX_AGE)
    store.finish(batch, "failed", T0 + 61, "boom")
    return batch_id


def test_retry_requeues_once_and_refuses_what_cannot_be_retried(store):
    batch_id = failed_batch(store)
    assert store.retry(batch_id, T0 + 100)["state"] == "queued"
    with pytest.raises(InvalidTransition):
        store.retry(batch_id, T0 + 101)
    with pytest.raises(NotFound):
        store.retry("nosuchbatch", T0 + 101)


def test_hold_and_release_and_a_second_release_finds_no_hold(store, other):
    store.hold(ME, "checking", T0)
    add(store, ME, "hello?", T0 + 1)
    hold, requeued = store.release(ME, T0 + 5)
    assert hold["reason"] == "checking" and requeued == []
    with pytest.raises(NotFound):
        other.release(ME, T0 + 6)
    assert rows(store, "SELECT state FROM batches WHERE phone = ?", (ME,)) == [("held",)]


def test_prune_never_deletes_a_batch_retried_meanwhile(store, other):
    batch_id = failed_batch(store)
    with store.transaction() as conn:
        # prune's chunk: the batch is picked (and, on PostgreSQL, locked) ...
        doomed = store._prunable(conn, T0 + 10_000, 10, store.db.for_update)
        assert doomed == [batch_id]
        join = in_thread(other.retry, batch_id, T0 + 200)  # ... while an operator retries it
        time.sleep(0.3)
        store._delete_batches(conn, doomed)
    with pytest.raises(NotFound):  # the retry waited, and found it gone: never a half-deleted batch
        join()
    assert rows(store, "SELECT count(*) FROM batches") == [(0,)]
    assert rows(store, "SELECT count(*) FROM messages") == [(0,)]


def test_prune_keeps_a_batch_retried_before_it(store):
    batch_id = failed_batch(store)
    store.retry(batch_id, T0 + 200)
    assert store.prune(T0 + 10_000)["batches"] == 0
    assert rows(store, "SELECT state FROM batches WHERE id = ?", (batch_id,)) == [("queued",)]


def test_a_pruned_texts_sid_stays_a_duplicate_with_nothing_else_kept(store):
    """A captured webhook request stays validly signed for ever: after prune its MessageSid
    is still a duplicate, and the tombstone holds only the sid and when the text came."""
    failed_batch(store)
    [(sid, body)] = rows(store, "SELECT sid, body FROM messages")
    assert store.prune(T0 + 10_000)["texts"] == 1
    assert rows(store, "SELECT * FROM pruned_sids") == [(sid, T0)]
    again = store.add_message(sid, ME, US, body, T0 + 20_000, Rules())
    assert again.duplicate and again.batch_id is None
    assert rows(store, "SELECT count(*) FROM messages") == [(0,)]
    assert rows(store, "SELECT count(*) FROM batches") == [(0,)]
    assert not store.add_message("SM" + "9" * 32, ME, US, "new", T0 + 20_000, Rules()).duplicate


# -- receipts and outages -----------------------------------------------------------


def sent_reply(store):
    [batch_id] = due_batches(store, 1)
    [batch], _ = store.claim_due(T0 + 60, 1, LEASE, MAX_AGE)
    assert store.begin_send(batch, "hello back", T0 + 61, Settings()) == "sending"
    assert store.mark_sent(batch, "SMreply", T0 + 62)
    return batch_id


def test_delivery_status_never_moves_backwards_even_when_receipts_race(store, other):
    sent_reply(store)
    assert store.record_delivery("SMreply", "delivered", None, T0 + 70)
    assert other.record_delivery("SMreply", "sent", None, T0 + 71)  # late receipt: ignored
    assert not store.record_delivery("SMnever", "delivered", None, T0 + 72)
    assert rows(store, "SELECT status FROM outbound WHERE sid = 'SMreply'") == [("delivered",)]
    # racing: 'sent' and 'delivered' at once, many times over; 'delivered' always wins
    for n in range(10):
        store.conn.execute("UPDATE outbound SET status = 'queued' WHERE sid = 'SMreply'")
        barrier = threading.Barrier(2)

        def receipt(s, status, barrier=barrier):
            barrier.wait()
            return s.record_delivery("SMreply", status, None, T0 + 80 + n)

        joins = [in_thread(receipt, store, "delivered"), in_thread(receipt, other, "sent")]
        [j() for j in joins]
        assert rows(store, "SELECT status FROM outbound WHERE sid = 'SMreply'") == [("delivered",)]


def test_one_outage_alert_however_many_processors(db_path):
    stores = [Store(db_path) for _ in range(4)]
    try:
        for s in stores:
            assert s.record_provider("ai", T0, "timeout", alert_after=300) is None
        barrier = threading.Barrier(4)

        def fail(s):
            barrier.wait()
            return s.record_provider("ai", T0 + 400, "timeout", alert_after=300)

        results = [j() for j in [in_thread(fail, s) for s in stores]]
        assert [r[0] for r in results if r] == ["outage"]
        recovered = [s.record_provider("ai", T0 + 500) for s in stores]
        assert [r[0] for r in recovered if r] == ["recovered"]
    finally:
        for s in stores:
            s.close()


# -- schema --------------------------------------------------------------------------


def test_migrate_creates_then_says_already(engine_name, request, tmp_path):
    path = request.getfixturevalue("pg_url") if engine_name == "postgres" else str(tmp_path / "new.db")
    store = Store(path)
    try:
        assert store.version() == 0
        assert store.migrate() == (0, SCHEMA_VERSION)
        assert store.migrate() == (SCHEMA_VERSION, SCHEMA_VERSION)
        store.require_schema()
    finally:
        store.close()


def test_two_hosts_migrating_at_once_both_succeed(engine_name, request, tmp_path):
    path = request.getfixturevalue("pg_url") if engine_name == "postgres" else str(tmp_path / "new.db")
    stores = [Store(path) for _ in range(2)]
    try:
        barrier = threading.Barrier(2)

        def migrate(s):
            barrier.wait()
            return s.migrate()

        results = sorted(j() for j in [in_thread(migrate, s) for s in stores])
        assert results == [(0, SCHEMA_VERSION), (SCHEMA_VERSION, SCHEMA_VERSION)]
    finally:
        for s in stores:
            s.close()


def test_every_step_after_the_postgresql_baseline_is_written_for_both_engines():
    for version in range(migrations.PG_BASELINE + 1, migrations.LATEST + 1):
        step = migrations.STEPS[version]
        assert isinstance(step, migrations.Step) and step.sqlite and step.postgres, version


def test_the_database_clock_is_close_to_this_hosts(store):
    assert abs(store.db_now() - time.time()) < 5


def test_space_is_measured_and_reclaimed(store):
    failed_batch(store)
    before = store.db.space()
    assert before["bytes"] > 0 and before["free_bytes"] >= 0
    store.prune(T0 + 10_000)
    after = store.db.reclaim_space()
    assert after["bytes"] > 0 and after["free_bytes"] == 0


def test_no_driver_is_imported_outside_its_engine():
    """One seam: sqlite3 only in engine_sqlite, psycopg only in engine_pg (and its pool's
    module), psycopg_pool only in engine_pg_pool."""
    import pathlib
    import re

    package = pathlib.Path(__file__).parent.parent / "smsbatch"
    for path in package.glob("*.py"):
        text = path.read_text()
        for driver, homes in (("sqlite3", ["engine_sqlite.py"]), ("psycopg", ["engine_pg.py", "engine_pg_pool.py"]),
                              ("psycopg_pool", ["engine_pg_pool.py"])):
            if path.name not in homes:
                assert not re.search(rf"^\s*(import|from) {driver}\b", text, re.M), f"{path.name} imports {driver}"


@pytest.mark.parametrize("missing", ["psycopg", "psycopg_pool"])
def test_a_postgresql_url_without_the_driver_is_one_line_naming_the_extra(tmp_path, missing):
    import subprocess
    import sys

    code = (f"import sys; sys.modules[{missing!r}] = None; from smsbatch.cli import cli;"
            " cli(['--db', 'postgresql://u:secretpw@db.example/smsbatch', 'status'])")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 1 and run.stderr.count("\n") == 1, run.stderr
    assert "pip install 'smsbatch[postgres]'" in run.stderr and "secretpw" not in run.stderr
