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
