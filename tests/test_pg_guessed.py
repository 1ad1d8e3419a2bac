"""The PostgreSQL webhook's one-round-trip groups: planned from what the writer remembers
(intake.Memory), every guess checked by the server in the same transaction
(Store.add_texts_guessed). A wrong guess must store nothing and leave the group to the
ordinary way; what ends up stored must be exactly what storing each text alone stores."""

import random

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
A, B, US = "+15551230001", "+15551230002", "+15550000000"
ADAPTIVE = Rules(adaptive=True, max_messages=5)


@pytest.fixture
def engine_name():
    return "postgres"


def text(sid, at, phone=A, body="hi", rules=ADAPTIVE, **kw):
    return Text(f"SM{sid:032d}", phone, US, body, at, rules, **kw)


def _bursts(seed, n=150):
    """Twelve people texting in bursts of 1-4 texts to two of our numbers, in order but now
    and then: a keyword, a MessageSid again, a picture, a time a little earlier than the one
    before."""
    rng = random.Random(seed)
    rules = Rules(max_messages=4, adaptive=True)
    people = [f"+1555123{k:04d}" for k in range(12)]
    words = ["hi", "quick question", "about my claim", "URGENT please", "ok"] * 8 + ["STOP", "START", "yes"]
    out, at = [], T0
    while len(out) < n:
        phone, ours = rng.choice(people), US if rng.random() < 0.9 else "+15550009999"
        for _ in range(rng.randint(1, 4)):
            i = len(out)
            sid = rng.randrange(i + 1) if rng.random() < 0.03 else i
            at += 1.0
            out.append(Text(f"SM{seed:02d}{sid:030d}", phone, ours, rng.choice(words),
                            at - (rng.uniform(1, 4) if rng.random() < 0.03 else 0), rules,
                            media=("https://x/m",) if rng.random() < 0.03 else ()))
    return out


def guessed(store, memory, texts, now=0.0):
    """What the writer does: store `texts` from memory's guess in one round trip; the
    store's Added, or GuessedWrong (then nothing is stored)."""
    facts, opens = memory.guess(texts, now)
    added = store.add_texts_guessed(texts, facts, opens, 5.0)
    memory.learn(*store.last_intake)
    return added


def assert_stored_as_alone(db_path, alone, texts, rng, sizes, next_writer):
    """`texts` into `alone` one transaction each, and into `db_path` in bursts of random
    `sizes` (lowest, highest), each through the PgWriter next_writer() gives; asserts both
    stored the same (test_intake._outcome)."""
    for t in texts:
        alone.add_texts([t])
    i = 0
    while i < len(texts):
        size = rng.randint(*sizes)
        assert burst_of(next_writer(), texts[i:i + size])
        i += size
    store = Store(db_path)
    try:
        assert _outcome(store) == _outcome(alone)
    finally:
        store.close()


def count(store, sql, *params):
    return store.conn.execute(sql, params).fetchone()[0]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_texts_through_the_writer_store_exactly_what_each_text_alone_stores(db_path, tmp_path, seed):
    """A trace with keywords, repeated MessageSids, two numbers and times out of order, in
    bursts of random sizes through two real PgWriters (two hosts: each one's guesses go wrong
    where the other wrote), against each text alone on SQLite: the same batches, states,
    times, quiet periods, history."""
    texts, rng = _bursts(seed), random.Random(seed)
    alone = Store(str(tmp_path / "alone.db"))
    alone.migrate()
    writers = [PgWriter(db_path, 5.0), PgWriter(db_path, 5.0)]
    try:
        assert_stored_as_alone(db_path, alone, texts, rng, (1, 6), lambda: writers[rng.random() < 0.3])
        guesses = writers[0].guesses + writers[1].guesses
        assert guesses["right"] >= 2 and guesses["wrong"] >= 1, guesses
    finally:
        for writer in writers:
            writer.close()
        alone.close()


def test_a_burst_of_a_new_person_is_one_batch_and_its_next_texts_join_it(store):
    memory = Memory()
    first = guessed(store, memory, [text(1, T0), text(2, T0 + 1)])
    again = guessed(store, memory, [text(3, T0 + 2)])
    assert {a.batch_id for a in first + again} == {first[0].batch_id}
    row = store.conn.execute("SELECT message_count, first_at, last_at, state FROM batches").fetchone()
    assert tuple(row) == (3, T0, T0 + 2, "open")


def test_an_open_batch_another_host_joined_meanwhile_is_not_joined_blind(store, db_path):
    """The guess says 2 texts; another writer added a third (between the two: the batch's
    times stay as they were): the compare-and-set refuses, nothing is stored, and the
    ordinary way then makes it 4."""
    memory = Memory()
    batch = guessed(store, memory, [text(1, T0, rules=Rules()), text(2, T0 + 1, rules=Rules())])[0].batch_id
    other = Store(db_path)
    other.add_texts([text(3, T0 + 0.5, rules=Rules())])
    other.close()
    with pytest.raises(GuessedWrong):
        guessed(store, memory, [text(4, T0 + 3, rules=Rules())])
    assert count(store, "SELECT count(*) FROM messages") == 3
    store.add_texts([text(4, T0 + 3, rules=Rules())])
    assert count(store, "SELECT message_count FROM batches WHERE id = ?", batch) == 4


def test_an_open_batch_a_processor_claimed_meanwhile_is_not_joined(store):
    memory = Memory()
    batch = guessed(store, memory, [text(1, T0)])[0].batch_id
    claimed, _ = store.claim_due(T0 + 100, 1, 60, 3600)
    assert [b["id"] for b in claimed] == [batch]
    with pytest.raises(GuessedWrong):
        guessed(store, memory, [text(2, T0 + 1)])
    assert count(store, "SELECT count(*) FROM messages") == 1
    added = store.add_texts([text(2, T0 + 1)])[0]
    assert added.batch_id != batch and not added.duplicate


def test_a_conversation_this_writer_never_saw_with_an_open_batch_is_not_opened_twice(store, db_path):
    """A restarted webhook guesses an unknown conversation new: the one-open-batch index refuses."""
    other = Store(db_path)
    batch = other.add_texts([text(1, T0, rules=Rules())])[0].batch_id
    other.close()
    with pytest.raises(GuessedWrong):
        guessed(store, Memory(), [text(2, T0 + 1, rules=Rules())])
    assert count(store, "SELECT count(*) FROM batches") == 1
    assert store.add_texts([text(2, T0 + 1, rules=Rules())])[0].batch_id == batch


def test_a_messagesid_another_webhook_stored_is_a_duplicate_not_a_second_text(store, db_path):
    """Stored under another conversation even (a forged or garbled form): only the MessageSid's
    uniqueness catches the guess."""
    other = Store(db_path)
    other.add_texts([text(1, T0, phone=A)])
    other.close()
    with pytest.raises(GuessedWrong):
        guessed(store, Memory(), [text(1, T0, phone=B)])
    assert store.add_texts([text(1, T0, phone=B)])[0].duplicate
    assert count(store, "SELECT count(*) FROM messages") == 1


def test_a_pruned_messagesid_is_never_stored_again(store):
    store.conn.execute("INSERT INTO pruned_sids (sid, received_at) VALUES (?, ?)", (f"SM{1:032d}", T0))
    with pytest.raises(GuessedWrong):
        guessed(store, Memory(), [text(1, T0)])
    assert count(store, "SELECT count(*) FROM messages") == 0


def test_a_persons_texts_another_host_stored_change_the_guess_of_their_pace(store, db_path):
    """Adaptive: the person's latest times are part of the guess; a text of theirs stored by
    another host (another of our numbers) makes it wrong, and the quiet period is then the
    one each text alone gives."""
    memory = Memory()
    guessed(store, memory, [text(1, T0), text(2, T0 + 2)])
    other = Store(db_path)
    other.add_texts([Text(f"SM{3:032d}", A, "+15550009999", "hi", T0 + 3, ADAPTIVE)])
    other.close()
    with pytest.raises(GuessedWrong):
        guessed(store, memory, [text(4, T0 + 4)])
    assert count(store, "SELECT count(*) FROM messages") == 3


def test_a_wrong_guess_is_not_tried_again_for_a_while(store, db_path):
    memory = Memory()
    guessed(store, memory, [text(1, T0)])
    memory.forget([text(1, T0)], now=100.0)
    assert memory.guess([text(2, T0 + 1)], 100.0 + Memory.FORGET_SECONDS - 1) is None
    assert memory.guess([text(2, T0 + 1)], 100.0 + Memory.FORGET_SECONDS + 1) is not None


def test_keywords_late_texts_and_open_batches_past_their_closing_are_not_guessed(store):
    memory = Memory()
    guessed(store, memory, [text(1, T0, rules=Rules(quiet_seconds=10))])
    assert memory.guess([text(2, T0 + 1, body="STOP")], 0.0) is None
    assert memory.guess([text(2, T0 + 1, expired=True)], 0.0) is None
    assert memory.guess([text(2, T0 + 11, rules=Rules(quiet_seconds=10))], 0.0) is None
    assert memory.guess([text(2, T0 + 1, rules=Rules(quiet_seconds=10))], 0.0) is not None


def test_a_wrong_guess_leaves_no_transaction_open_and_the_connection_works(store):
    with pytest.raises(GuessedWrong):
        store.conn.execute("INSERT INTO pruned_sids (sid, received_at) VALUES (?, ?)", (f"SM{1:032d}", T0))
        guessed(store, Memory(), [text(1, T0)])
    assert not store.db.in_transaction
    with psycopg.connect(POSTGRES_URL, autocommit=True) as admin:
        states = {r[0] for r in admin.execute("SELECT state FROM pg_stat_activity WHERE pid = %s",
                                               (store.conn.execute("SELECT pg_backend_pid()").fetchone()[0],))}
    assert "idle in transaction (aborted)" not in states and "idle in transaction" not in states
    assert store.add_texts([text(2, T0 + 1)])[0].batch_id


def test_texts_at_the_same_moment_are_remembered_as_often_as_they_are_stored(store):
    """Two texts of a person at one time are two times in the person's pace, not one: the
    third text's guess must still be right."""
    memory = Memory()
    for n in range(3):
        guessed(store, memory, [text(n, T0)])
    assert count(store, "SELECT message_count FROM batches") == 3
