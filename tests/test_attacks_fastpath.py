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
    store.db.begin(5.0)
    added = store.add_texts_guessed(texts, facts, opens)
    memory.learn(*store.last_intake)
    return added


def count(store, sql, *params):
    return store.conn.execute(sql, params).fetchone()[0]


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
