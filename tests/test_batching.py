"""Batching rules on a real SQLite file with an injected clock: no sleeping."""

import pytest

from conftest import T0, TextMeanwhile, add, offline_processor
from smsbatch import batching
from smsbatch.batching import Rules

A, B = "+15551110001", "+15551110002"


def claim(store, now, limit=100, lease=300, max_age=3600):
    rows, _ = store.claim_due(now, limit, lease, max_age)
    return rows


def test_burst_joins_one_batch_until_quiet(store):
    ids = {add(store, A, text, T0 + i * 3).batch_id for i, text in enumerate(["hi", "quick question", "claim"])}
    assert len(ids) == 1
    assert claim(store, T0 + 6 + 9.9) == []  # quiet period not over since the last text
    rows = claim(store, T0 + 6 + 10)
    assert [r["message_count"] for r in rows] == [3]


def test_max_wait_closes_a_batch_that_never_goes_quiet(store):
    claimed = []
    for i in range(12):  # a text every 5 s: the quiet period never passes
        now = T0 + i * 5
        add(store, A, f"t{i}", now, rules=Rules(max_messages=100))
        claimed.append((now - T0, [r["message_count"] for r in claim(store, now + 4.9)]))
    # due at first text + 45 s although texts keep coming: the text at 45 s is in it too
    assert [c for c in claimed if c[1]] == [(45, [10])]


def test_max_messages_closes_the_batch_and_the_next_text_opens_another(store):
    rules = Rules(max_messages=3)
    first = {add(store, A, f"t{i}", T0 + i, rules=rules).batch_id for i in range(3)}
    fourth = add(store, A, "t3", T0 + 3, rules=rules).batch_id
    assert len(first) == 1 and fourth not in first
    rows = claim(store, T0 + 3)
    assert [r["id"] for r in rows] == list(first)


def test_urgent_keyword_makes_the_batch_due_at_once(store):
    add(store, A, "hello", T0)
    add(store, A, "this is URGENT!", T0 + 1)
    assert [r["message_count"] for r in claim(store, T0 + 1)] == [2]


@pytest.mark.parametrize("body,urgent", [("Emergency", True), ("urgently", False), ("an emergency.", True)])
def test_urgent_matches_whole_words(body, urgent):
    assert batching.is_urgent(body, ("urgent", "emergency")) is urgent


def test_claimed_batch_is_closed_and_later_texts_open_a_new_one(store):
    first = add(store, A, "hi", T0).batch_id
    assert [r["id"] for r in claim(store, T0 + 10)] == [first]
    second = add(store, A, "one more thing", T0 + 11).batch_id
    assert second != first


def test_phones_batch_separately(store):
    assert add(store, A, "hi", T0).batch_id != add(store, B, "hi", T0).batch_id


def test_repeated_sid_is_stored_once(store):
    one = add(store, A, "hi", T0, sid="SM1")
    two = add(store, A, "hi", T0 + 1, sid="SM1")
    assert two.duplicate and two.batch_id == one.batch_id
    assert store.conn.execute("SELECT count(*) FROM messages").fetchone()[0] == 1
    assert store.get_batch(one.batch_id)["message_count"] == 1


def test_expired_lease_makes_a_batch_claimable_again(store):
    add(store, A, "hi", T0)
    first = claim(store, T0 + 10, lease=60)
    assert claim(store, T0 + 69) == []
    again = claim(store, T0 + 70, lease=60)
    assert [r["id"] for r in again] == [first[0]["id"]] and again[0]["claim"] != first[0]["claim"]
    assert again[0]["attempts"] == 2


def test_old_batches_expire_instead_of_being_answered(store):
    batch = add(store, A, "hi", T0).batch_id
    rows, expired = store.claim_due(T0 + 3601, 10, 300, 3600)
    assert rows == [] and expired == 1
    assert store.get_batch(batch)["state"] == "expired"


def test_claim_takes_the_earliest_due_first(store):
    late = add(store, A, "hi", T0 + 5).batch_id
    early = add(store, B, "hi", T0).batch_id
    assert [r["id"] for r in claim(store, T0 + 100, limit=1)] == [early]
    assert [r["id"] for r in claim(store, T0 + 100, limit=1)] == [late]


def test_text_during_processing_supersedes_and_folds_into_the_next_batch(settings, store, clock):
    """A late text arrives while the AI answers: that reply is not sent; the next one covers both."""
    first = add(store, A, "hi", T0).batch_id
    late = TextMeanwhile(settings.db_path, A, lambda n: "and one more thing" if n == 1 else None, T0 + 12)
    clock.now = T0 + 10
    report = offline_processor(settings, clock, late).run()
    assert report.counts["superseded"] == 1 and report.counts["sent"] == 0
    assert store.get_batch(first)["state"] == "superseded"
    clock.now = T0 + 22
    report = offline_processor(settings, clock, late).run()
    assert report.counts["sent"] == 1
    second = store.get_batch(store.get_batch(first)["superseded_by"])
    assert second["state"] == "sent" and second["message_count"] == 2
    assert "hi" in late.prompts[-1] and "and one more thing" in late.prompts[-1]


def test_supersede_stops_after_two_in_a_row(settings, store, clock):
    """A person who keeps typing during every answer still gets the third reply."""
    add(store, A, "t0", T0)
    always_late = TextMeanwhile(settings.db_path, A, lambda n: f"late {n}", lambda n: clock.now + 1)
    outcomes = []
    for tick in range(3):
        clock.now = T0 + 10 + tick * 11
        report = offline_processor(settings, clock, always_late).run()
        outcomes.append((report.counts["superseded"], report.counts["sent"]))
    assert outcomes == [(1, 0), (1, 0), (0, 1)]


def test_supersede_can_be_turned_off(settings, store, clock):
    add(store, A, "hi", T0)
    clock.now = T0 + 10
    late = TextMeanwhile(settings.db_path, A, "late", T0 + 11)
    report = offline_processor(settings.replace(supersede=False), clock, late).run()
    assert report.counts["sent"] == 1 and report.counts["superseded"] == 0


@pytest.mark.parametrize("body,kind", [("STOP", "opt_out"), (" stop ", "opt_out"), ("Unsubscribe", "opt_out"),
                                       ("start", "opt_in"), ("please stop", None), ("yes!", "opt_in")])
def test_keywords(body, kind):
    assert batching.keyword_kind(body) == kind


def test_backoff_grows_and_is_jittered():
    import random

    rng = random.Random(1)
    values = [batching.backoff_seconds(n, 30, rng) for n in (1, 2, 3, 4)]
    for n, value in enumerate(values, 1):
        assert 15 * 2 ** (n - 1) <= value <= 30 * 2 ** (n - 1)


def test_texts_waiting_before_the_claim_do_not_supersede_a_full_batch(settings, store, clock):
    """Only texts written after the claim hold a reply back: a batch closed by max
    messages is answered even though the person kept typing before it was claimed."""
    small = settings.replace(max_messages=2)
    rules = Rules(max_messages=2)
    full = {add(store, A, f"t{i}", T0 + i, rules=rules).batch_id for i in range(2)}
    newer = add(store, A, "t2", T0 + 2, rules=rules).batch_id
    clock.now = T0 + 3
    report = offline_processor(small, clock).run()
    assert report.counts["sent"] == 1 and report.counts["superseded"] == 0
    assert store.get_batch(full.pop())["state"] == "sent" and store.get_batch(newer)["state"] == "open"
