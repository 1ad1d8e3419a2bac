"""Where inbound texts go: intake.Plan's decisions without a database, and Store.add_texts
(a group of texts in a few statements) against the same texts stored one at a time, on both
engines."""

import random

import pytest

from conftest import T0
from smsbatch.batching import Rules
from smsbatch.db import Store
from smsbatch.errors import InvalidTransition
from smsbatch.intake import Facts, OpenBatch, Plan, Text
from smsbatch.states import State

A, B, US, THEM = "+15551230001", "+15551230002", "+15550000000", "+15550000009"
FIXED = Rules(max_messages=3)


def ids():
    n = iter(range(1000))
    return lambda: f"b{next(n):09d}"


def text(sid, body="hi", at=T0, phone=A, to=US, rules=FIXED, **kw):
    return Text(sid, phone, to, body, at, rules, **kw)


def test_a_groups_texts_join_the_batch_the_first_opened_and_a_full_one_closes():
    plan = Plan({}, ids())
    added = [plan.add(text(f"s{i}", at=T0 + i), Facts()) for i in range(4)]
    assert [a.batch_id for a in added] == ["b000000000"] * 3 + ["b000000001"]
    first, second = plan.batches["b000000000"], plan.batches["b000000001"]
    assert (first.count, first.state, second.count, second.state) == (3, State.QUEUED, 1, State.OPEN)
    assert [(was, to) for _, was, to, _ in first.moves] == [(None, State.OPEN), (State.OPEN, State.QUEUED)]
    assert plan.conversations == {(A, US): "b000000001"}  # the open one, after the group
    assert Plan.closes_at(first) == T0 + 2  # full: due at once
    assert Plan.closes_at(second) == T0 + 3 + FIXED.quiet_seconds


def test_a_text_joins_an_open_batch_read_from_the_database_and_keeps_its_first_time():
    read = OpenBatch("old", T0 - 5, T0 - 5, 1, False, State.OPEN, 10.0)
    plan = Plan({(A, US): read}, ids())
    added = plan.add(text("s1", "this is URGENT", at=T0 - 8), Facts())  # came earlier than the one stored
    assert added.batch_id == "old" and not read.created
    assert (read.first_at, read.last_at, read.count, read.urgent) == (T0 - 8, T0 - 5, 2, True)
    assert Plan.closes_at(read) == T0 - 5  # urgent: due at its last text
    assert plan.conversations == {}  # the conversation's open batch did not change


def test_stop_then_yes_in_one_group_is_a_resubscription_and_yes_alone_is_a_text():
    plan = Plan({}, ids())
    stop = plan.add(text("s1", "STOP"), Facts())
    yes = plan.add(text("s2", "yes", at=T0 + 1), Facts())
    assert (stop.kind, yes.kind) == ("opt_out", "opt_in")
    assert [c[0] for c in plan.opt_changes] == ["opt_out", "opt_in"]
    assert all(plan.batches[a.batch_id].state == State.SKIPPED for a in (stop, yes))
    other = Plan({}, ids())
    assert other.add(text("s3", "Yes!"), Facts(opted_out=False)).kind == "text"
    assert other.add(text("s4", "yes", phone=B), Facts(opted_out=True)).kind == "opt_in"


def test_a_sid_twice_in_one_group_is_stored_once_and_a_stored_or_pruned_one_is_a_duplicate():
    plan = Plan({}, ids())
    first, again = plan.add(text("s1"), Facts()), plan.add(text("s1", at=T0 + 1), Facts())
    assert again.duplicate and again.batch_id == first.batch_id and len(plan.stored) == 1
    assert plan.add(text("s2"), Facts(seen=("x",))).batch_id == "x"
    pruned = plan.add(text("s3"), Facts(seen=(None,)))
    assert pruned.duplicate and pruned.batch_id is None and len(plan.stored) == 1


def test_late_and_answered_texts_get_final_batches_of_their_own():
    plan = Plan({}, ids())
    late = plan.add(text("s1", expired=True), Facts())
    done = plan.add(text("s2", at=T0 + 1, answered="our reply is in Twilio's log"), Facts())
    assert plan.batches[late.batch_id].state == State.EXPIRED
    assert plan.batches[done.batch_id].reason == "our reply is in Twilio's log"
    assert plan.conversations == {} and not plan.open  # neither is anyone's open batch


def test_the_adaptive_quiet_period_counts_the_groups_earlier_texts():
    rules = Rules(adaptive=True, max_messages=50)
    times = [T0 + 2 * i for i in range(6)]  # typing every 2 s
    grouped = Plan({}, ids())
    for i, at in enumerate(times):
        grouped.add(text(f"s{i}", at=at, rules=rules), Facts())
    alone = Plan({}, ids())  # the last text alone, the earlier ones read from the database
    alone.add(text("s5", at=times[-1], rules=rules), Facts(recent=tuple(times[:-1])))
    assert grouped.batches["b000000000"].quiet == alone.batches["b000000000"].quiet < rules.quiet_seconds


def test_a_move_transitions_does_not_allow_is_refused():
    plan = Plan({(A, US): OpenBatch("x", T0, T0, 2, False, State.SENT)}, ids())
    with pytest.raises(InvalidTransition):
        plan.add(text("s1", rules=Rules(max_messages=3)), Facts())


def _trace(seed, n=120):
    """Texts as they might come: bursts, keywords, YES, repeats, media, two numbers, times a
    little out of order."""
    rng = random.Random(seed)
    rules = Rules(max_messages=4, adaptive=True)
    words = ["hi", "quick question", "about my claim", "URGENT please", "STOP", "START", "yes", "ok"]
    out = []
    for i in range(n):
        sid = f"SM{seed:02d}{rng.randrange(i + 1) if rng.random() < 0.05 else i:030d}"
        out.append(Text(sid, rng.choice([A, B, "+15551230003"]), rng.choice([US, THEM]), rng.choice(words),
                        T0 + i * 2 + rng.uniform(-3, 3), rules, media=("https://x/m",) if rng.random() < 0.05 else ()))
    return out


def _outcome(store):
    """What was stored, batch ids aside: each text's batch as (its texts' sids), the batches'
    state/count/times, the opt-outs, each batch's history."""
    rows = store.conn.execute("SELECT sid, batch_id, kind FROM messages").fetchall()
    members = {}
    for sid, batch_id, _ in rows:
        members.setdefault(batch_id, []).append(sid)
    key = {b: tuple(sorted(s)) for b, s in members.items()}
    # quiet periods to 0.1 ms: SQLite hands the history's times back as text, about a microsecond
    # off, while a group's own earlier texts count with their exact times
    batches = {key[r["id"]]: (r["state"], r["message_count"], r["first_at"], r["last_at"], r["urgent"],
                              round(r["closes_at"] or 0, 4), round(r["quiet_seconds"] or 0, 4), r["last_error"])
               for r in store.conn.execute("SELECT * FROM batches")}
    history = {}
    for batch_id, to_state in store.conn.execute("SELECT batch_id, to_state FROM batch_events ORDER BY id"):
        history.setdefault(key[batch_id], []).append(to_state)
    opt_outs = sorted(tuple(r) for r in store.conn.execute("SELECT phone, scope FROM opt_outs"))
    open_now = sorted(key[r[0]] for r in store.conn.execute("SELECT open_batch FROM conversations c JOIN batches b"
                                                               " ON b.id = c.open_batch WHERE b.state = 'open'"))
    return {sid: key[b] for sid, b, _ in rows}, {sid: k for sid, _, k in rows}, batches, history, opt_outs, open_now


@pytest.mark.engines
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_group_stores_exactly_what_the_same_texts_one_at_a_time_store(store, tmp_path, seed):
    """Grouped (as the webhook's committers store them) and one transaction per text (as
    before): the same batches, states, times, quiet periods, history and opt-outs."""
    alone = Store(str(tmp_path / "alone.db"))
    alone.migrate()
    try:
        grouped = store_both_ways(store, alone, _trace(seed), random.Random(seed), (1, 20))
        assert sum(a.duplicate for a in grouped) > 0 and any(a.kind == "opt_out" for a in grouped)
    finally:
        alone.close()


def store_both_ways(store, alone, texts, rng, sizes):
    """`texts` into `alone` one transaction each, into `store` in groups of random `sizes`
    (lowest, highest); asserts both stored the same (_outcome). Returns the groups' Added."""
    singles = [alone.add_texts([t])[0] for t in texts]
    grouped, i = [], 0
    while i < len(texts):
        size = rng.randint(*sizes)
        grouped += store.add_texts(texts[i:i + size])
        i += size
    assert [(a.duplicate, a.kind) for a in grouped] == [(a.duplicate, a.kind) for a in singles]
    assert _outcome(store) == _outcome(alone)
    return grouped


@pytest.mark.engines
def test_a_group_of_forty_texts_of_two_people_makes_two_batches_and_a_repeat_finds_them(store):
    rules = Rules(max_messages=50)
    first = store.add_texts([text(f"SM{i:032d}", at=T0 + i, phone=[A, B][i % 2], rules=rules) for i in range(40)])
    assert len({a.batch_id for a in first}) == 2 and not any(a.duplicate for a in first)
    again = store.add_texts([text(f"SM{i:032d}", at=T0 + 50, rules=rules) for i in range(0, 40, 2)])
    assert all(a.duplicate for a in again)
    assert [a.batch_id for a in again] == [a.batch_id for a in first[0::2]]
    assert store.conn.execute("SELECT count(*) FROM messages").fetchone()[0] == 40

