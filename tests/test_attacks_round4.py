"""Fourth hostile run: the grouped write path (intake.Plan, Store.add_texts, engine_pg's
execute_all/_inline/_literal/lock_conversations, writer_pool's groups). A passing test
documents a promise that held; an xfail(strict) one is a defect that still works on the
code as it stands (each says, in its reason, what breaks)."""

import random
import threading
import time

import pytest

from conftest import T0
from smsbatch.batching import Rules
from smsbatch.db import Store
from smsbatch.engine import StoreError
from smsbatch.ingest import ingest_lines
from smsbatch.config import Settings
from smsbatch.intake import Text
from smsbatch.writer import run_works
from smsbatch.writer_pool import GroupStore
from test_intake import _trace, store_both_ways

A, B, C, US = "+15551230001", "+15551230002", "+15551230003", "+15550000000"


def count(store, sql, params=()):
    return store.conn.execute(sql, params).fetchone()[0]


def fresh(path):
    s = Store(path)
    s.migrate()
    return s


# -- D1: SMSBATCH_MAX_MESSAGES=1 and two texts of one person in one group -----------------


@pytest.mark.engines
def test_with_one_text_a_batch_two_texts_of_a_person_in_one_group_make_two_batches(store):
    rules = Rules(max_messages=1)
    added = store.add_texts([Text("SM" + "a" * 32, A, US, "hi", T0, rules),
                             Text("SM" + "b" * 32, A, US, "are you there?", T0 + 1, rules)])
    assert len({a.batch_id for a in added}) == 2
    assert count(store, "SELECT count(*) FROM batches WHERE state = 'queued' AND message_count = 1") == 2


@pytest.mark.postgres
@pytest.mark.parametrize("seed", [4, 5])
def test_with_one_text_a_batch_the_webhook_group_still_stores_every_text_once(pg_url, seed):
    """Held (through the fallback): in the webhook's GroupStore the InvalidTransition above
    spoils the group; the texts run again one by one are each stored once, in a batch of one."""
    texts = [Text(f"SM{seed}{i:031d}", random.Random(seed + i).choice([A, B]), US, "hi", T0 + i,
                  Rules(max_messages=1)) for i in range(6)]
    fresh(pg_url).close()
    group = GroupStore(pg_url)
    try:
        group.begin_group(time.monotonic() + 10)
        try:
            run_works(group, texts)
            failed = False
        except Exception:
            failed = True
        if failed:
            group.end_group(commit=False)
            for t in texts:
                group.add_texts([t])
        else:
            group.end_group(commit=True)
        assert count(group, "SELECT count(*) FROM messages") == 6
        assert count(group, "SELECT max(message_count) FROM batches") == 1
    finally:
        group.close()


# -- D2: two hosts' groups split by a receipt lock conversations in opposite orders --------


@pytest.mark.postgres
def test_two_hosts_groups_split_by_a_receipt_do_not_deadlock(pg_url):
    fresh(pg_url).close()
    stores = [GroupStore(pg_url), GroupStore(pg_url)]
    both_locked_first = threading.Barrier(2)
    errors = []

    def receipt(store):  # what web.py submits for a delivery receipt; meanwhile the other host goes on
        store.record_delivery("SM" + "9" * 32, "delivered", None, T0)
        try:  # (before the fix both hosts got here holding one lock each, then waited for each other)
            both_locked_first.wait(timeout=1.0)
        except threading.BrokenBarrierError:
            pass  # the other host waits for this one's locks: it cannot get here first

    def host(store, first, second, n):
        try:
            store.begin_group(time.monotonic() + 10)
            try:
                run_works(store, [Text(f"SM{n}a{'0' * 29}", first, US, "hi", T0, Rules()), receipt,
                                  Text(f"SM{n}b{'0' * 29}", second, US, "hi", T0, Rules())])
            except BaseException:
                store.end_group(commit=False)
                raise
            store.end_group(commit=True)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=host, args=(stores[0], A, B, 1)),
               threading.Thread(target=host, args=(stores[1], B, A, 2))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        assert errors == [], errors
        assert count(stores[0], "SELECT count(*) FROM messages") == 4
    finally:
        for s in stores:
            s.close()


@pytest.mark.postgres
def test_two_writers_of_overlapping_conversation_sets_in_opposite_orders_never_deadlock(pg_url):
    """Held: within one add_texts call the advisory locks are taken in key order (one
    statement), so two writers of the same 40 conversations, shuffled differently, never
    wait for each other in a circle."""
    fresh(pg_url).close()
    phones = [f"+1555{i:07d}" for i in range(40)]
    errors = []

    def writer(n):
        store = Store(pg_url)
        rng = random.Random(n)
        try:
            for round_ in range(15):
                order = phones[:]
                rng.shuffle(order)
                store.add_texts([Text(f"SM{n}{round_:03d}{i:028d}", p, US, "hi", T0 + round_, Rules())
                                 for i, p in enumerate(order)])
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)
        finally:
            store.close()

    threads = [threading.Thread(target=writer, args=(n,)) for n in (1, 2, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    check = Store(pg_url)
    try:
        assert count(check, "SELECT count(*) FROM messages") == 3 * 15 * 40
        assert count(check, "SELECT count(*) FROM batches WHERE state = 'open'") == 40
    finally:
        check.close()


# -- D3: a text in a JSONL trace that PostgreSQL refuses stops `ingest` for the rest --------


@pytest.mark.postgres
def test_a_trace_line_with_a_nul_body_is_stored_and_the_lines_after_it_too(pg_url):
    store = fresh(pg_url)
    try:
        lines = ['{"from": "+15551230001", "to": "+15550000000", "body": "first", "at": %r}' % T0,
                 '{"from": "+15551230001", "to": "+15550000000", "body": "bad\\u0000body", "at": %r}' % (T0 + 1),
                 '{"from": "+15551230002", "to": "+15550000000", "body": "after", "at": %r}' % (T0 + 2)]
        try:
            result = ingest_lines(store, lines, Settings(db_path=pg_url), now=T0 + 10)
        except StoreError:
            result = None
        assert count(store, "SELECT count(*) FROM messages WHERE body = 'after'") == 1
        # fixed by storing it: the NUL becomes U+FFFD (intake.storable), on both engines
        assert result is not None and not result["errors"]
        assert count(store, "SELECT count(*) FROM messages WHERE body = ?", ("bad\ufffdbody",)) == 1
    finally:
        store.close()


# -- D4: _literal's negative zero ---------------------------------------------------------


@pytest.mark.postgres
def test_negative_zero_is_written_so_that_it_cannot_start_a_comment(pg_url):
    store = fresh(pg_url)
    try:
        results = store.conn.execute_all([("SELECT 1 -?", [-0.0]), ("SELECT 2", [])])
        assert [r.fetchall()[0][0] for r in results] == [1, 2]
    finally:
        store.close()


@pytest.mark.postgres
def test_negative_numbers_and_odd_floats_are_written_as_themselves(pg_url):
    store = fresh(pg_url)
    values = [-1, -1.5, 1e-300, 5e-324, 1.7976931348623157e308, -1e308, 2 ** 62, -(2 ** 62), 0.1 + 0.2,
              float("inf"), float("-inf")]
    try:
        results = store.conn.execute_all([("SELECT 1 -?, CAST(? AS double precision)", [v, v]) for v in values])
        for v, r in zip(values, results):
            got = r.fetchall()[0]
            assert float(got[1]) == v
    finally:
        store.close()


# -- held: no injection through any customer-controlled value ------------------------------

HOSTILE = ["'", "''", "\\", "\\'", "'; DROP TABLE messages; --", "$$; DROP TABLE batches; $$", "E'\\x27'",
           "?", "%s", "%(x)s", "-- comment", "/* open comment", "\"", "\u2019 \u02bc \uff07", "\r\n;\r\n",
           "\U0001f600 emoji", "a" * 1600, "?'?\\?", "\\\\'"]


@pytest.mark.engines
def test_hostile_values_in_every_field_of_a_big_group_are_stored_as_given(store):
    texts = []
    for i, value in enumerate(HOSTILE * 6):  # 114 texts: more than ROWS_PER_STATEMENT
        texts.append(Text(f"SM{i:03d}{value[:20]}", f"+1555{i % 7:07d}{value[:8]}", US + value[:5], value,
                          T0 + i * 0.001, Rules(max_messages=4), media=(f"https://x/{value}",) if i % 3 else ()))
    added = store.add_texts(texts)
    assert not any(a.duplicate for a in added[:len(HOSTILE)])
    rows = {r[0]: tuple(r[1:]) for r in store.conn.execute("SELECT sid, phone, our_number, body FROM messages")}
    expected = {}
    for t, a in zip(texts, added):
        expected.setdefault(t.sid, (t.phone, t.our_number, t.body))
    assert rows == expected
    assert count(store, "SELECT count(*) FROM batches") > 0
    assert {r[0] for r in store.conn.execute("SELECT DISTINCT media FROM messages WHERE media IS NOT NULL")} \
        <= {t.media_json for t in texts}


# -- held: the group is what the texts one at a time would be ------------------------------


@pytest.mark.engines
@pytest.mark.parametrize("seed", [11, 12])
def test_groups_larger_than_a_statement_store_what_texts_one_at_a_time_store(store, tmp_path, seed):
    """Groups of 101-260 texts (several statements a kind), texts late and answered among
    them, times out of order, repeats: the same outcome as one transaction per text."""
    rng = random.Random(seed)
    texts = []
    for t in _trace(seed, n=400):
        roll = rng.random()
        if roll < 0.04:
            t.expired = True
        elif roll < 0.08:
            t.answered = "found answered"
        texts.append(t)
    alone = fresh(str(tmp_path / "alone.db"))
    try:
        store_both_ways(store, alone, texts, rng, (101, 260))
    finally:
        alone.close()


@pytest.mark.engines
def test_one_messagesid_from_two_phones_in_one_group_is_stored_once_and_opens_no_empty_batch(store):
    sid = "SM" + "d" * 32
    added = store.add_texts([Text(sid, A, US, "hi", T0, Rules()), Text(sid, B, US, "forged", T0, Rules())])
    assert [a.duplicate for a in added] == [False, True] and added[0].batch_id == added[1].batch_id
    assert count(store, "SELECT count(*) FROM messages") == 1
    assert count(store, "SELECT count(*) FROM batches") == 1
    assert count(store, "SELECT count(*) FROM batches b WHERE NOT EXISTS"
                        " (SELECT 1 FROM messages m WHERE m.batch_id = b.id)") == 0


@pytest.mark.engines
def test_stop_a_text_and_yes_of_one_person_in_one_group(store):
    added = store.add_texts([Text("SM" + "1" * 32, A, US, "hello", T0, Rules()),
                             Text("SM" + "2" * 32, A, US, "STOP", T0 + 1, Rules()),
                             Text("SM" + "3" * 32, A, US, "still there?", T0 + 2, Rules()),
                             Text("SM" + "4" * 32, A, US, "yes", T0 + 3, Rules()),
                             Text("SM" + "5" * 32, A, US, "yes", T0 + 4, Rules())])
    assert [a.kind for a in added] == ["text", "opt_out", "text", "opt_in", "text"]
    assert count(store, "SELECT count(*) FROM opt_outs") == 0
    assert count(store, "SELECT count(*) FROM batches WHERE state = 'open'") == 1
    assert added[0].batch_id == added[2].batch_id == added[4].batch_id


@pytest.mark.engines
def test_a_group_whose_open_batch_is_full_closes_it_and_opens_one_more_never_two_open(store):
    rules = Rules(max_messages=3)
    store.add_texts([Text(f"SM{i:032d}", A, US, "hi", T0 + i, rules) for i in range(2)])
    store.add_texts([Text(f"SM{i:032d}", A, US, "hi", T0 + i, rules) for i in range(2, 11)])
    assert count(store, "SELECT count(*) FROM batches WHERE state = 'open'") == 1
    assert count(store, "SELECT count(*) FROM batches WHERE state = 'queued'") == 3
    assert count(store, "SELECT sum(message_count) FROM batches") == 11
    assert count(store, "SELECT count(*) FROM conversations c JOIN batches b ON b.id = c.open_batch"
                        " WHERE b.state = 'open'") == 1


@pytest.mark.postgres
def test_a_nul_in_any_field_of_a_group_fails_the_group_on_postgres_and_leaves_nothing(pg_url):
    """Held: the NUL is refused before anything is sent; the transaction is rolled back and
    the connection works for the next text."""
    store = fresh(pg_url)
    try:
        for bad in [dict(phone=A + "\x00"), dict(our_number=US + "\x00"),
                    dict(sid="SM\x00" + "e" * 31)]:
            fields = dict(sid="SM" + "e" * 32, phone=A, our_number=US, body="hi", at=T0, rules=Rules())
            fields.update(bad)
            with pytest.raises(StoreError):
                store.add_texts([Text("SM" + "f" * 32, B, US, "good", T0, Rules()), Text(**fields)])
            assert count(store, "SELECT count(*) FROM messages") == 0
        assert not store.add_texts([Text("SM" + "f" * 32, B, US, "good", T0, Rules())])[0].duplicate
    finally:
        store.close()


# -- D5: a text in Twilio's log that PostgreSQL refuses stops every `process` run ----------


@pytest.mark.postgres
@pytest.mark.parametrize("engine_name", ["postgres"])
def test_a_nul_body_in_twilios_log_does_not_stop_processing_on_postgres(engine_name, db_path, store, twilio_standin,
                                                                          openai_standin):
    from fakes import provider_env
    from conftest import add as add_text, invoke

    env = provider_env(openai_standin, twilio_standin, SMSBATCH_DB=db_path, SMSBATCH_AI_TIMEOUT_SECONDS=2,
                       SMSBATCH_SMS_TIMEOUT_SECONDS=2)
    twilio_standin.clock = lambda: T0
    add_text(store, B, "is my order ready?", T0 - 60)  # stored by the webhook, due by T0
    twilio_standin.deliver_inbound(A, US, "odd\x00text", T0 - 30)
    result = invoke(["process", "--now", repr(T0 + 60), "--json"], env=env)
    assert result.exit_code == 0, result.output
    assert count(store, "SELECT count(*) FROM batches WHERE phone = ? AND state = 'sent'", (B,)) == 1
