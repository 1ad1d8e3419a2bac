"""GET /health for monitors (issue 16 "Health for monitors", issue 15 L11): 200 while texts
can be stored; ?strict=1 answers 503 whenever a person is needed; nothing but those two
facts is said without credentials. The verdict is attention.needed, a pure function of `now`."""

import json

import pytest

from conftest import T0, add
from smsbatch import attention
from smsbatch.config import Settings
from smsbatch.web import make_app
from test_web import call

URL = "https://hooks.example.com/sms"
ERROR = "AI unreachable at http://10.1.2.3:8000/v1 (ConnectError: connection refused)"


def health(db_path, now, query=""):
    app = make_app(Settings(db_path=db_path, twilio_auth_token="t", public_url=URL), clock=lambda: now)
    status, _, body = call(app, method="GET", path="/health", headers={"QUERY_STRING": query})
    return status, json.loads(body)


def both(db_path, now):
    """(plain status, strict status, the strict body)."""
    plain, _ = health(db_path, now)
    strict, info = health(db_path, now, "strict=1")
    return plain, strict, info


def test_all_well_is_200_even_when_strict(db_path, store):
    store.note_run("host-a", T0 - 50)
    add(store, "+15551110001", "hi", T0)
    assert both(db_path, T0 + 5) == (200, 200, {"ok": True, "can_store": True, "person_needed": False})


def test_a_provider_outage_needs_a_person_and_says_nothing_of_it(db_path, store):
    store.note_run("host-a", T0 - 50)
    for at in (T0 - 400, T0 - 10):
        store.record_provider("ai", at, ERROR, 300)
    plain, strict, info = both(db_path, T0)
    assert (plain, strict) == (200, 503) and info == {"ok": False, "can_store": True, "person_needed": True}
    _, body = health(db_path, T0, "strict=1")
    assert "10.1.2.3" not in json.dumps(body) and "unreachable" not in json.dumps(body)


def test_a_batch_stuck_past_its_deadline_needs_a_person(db_path, store):
    add(store, "+15551110002", "hi", T0)  # due when its quiet period ends, a few seconds on
    due = store.conn.execute("SELECT closes_at FROM batches").fetchone()[0]
    store.note_run("host-a", due + attention.STUCK_AFTER_SECONDS)  # runs go on, but it is never taken
    assert both(db_path, due + attention.STUCK_AFTER_SECONDS - 1)[:2] == (200, 200)
    assert both(db_path, due + attention.STUCK_AFTER_SECONDS + 1)[:2] == (200, 503)


def test_no_processor_run_for_3_minutes_while_batches_wait_needs_a_person(db_path, store):
    store.note_run("host-a", T0 - 100)
    store.note_run("host-a", T0 - 99, finished=True)
    add(store, "+15551110003", "hi", T0)
    assert both(db_path, T0 + 78)[:2] == (200, 200)  # last run 177 s ago
    assert both(db_path, T0 + 81)[:2] == (200, 503)  # 180 s: cron or the timer stopped


def test_no_processor_run_for_long_with_nothing_waiting_is_fine(db_path, store):
    store.note_run("host-a", T0 - 86400)
    assert both(db_path, T0)[:2] == (200, 200)


def test_unknown_strict_values_are_not_strict(db_path, store):
    for at in (T0 - 400, T0 - 10):
        store.record_provider("sms", at, ERROR, 300)
    assert health(db_path, T0, "strict=0")[0] == 200 and health(db_path, T0, "strict=yes")[0] == 503


@pytest.mark.parametrize("facts, now, codes", [
    ({"outages": [], "pending": 0, "earliest_due_at": None, "last_run_at": None}, T0, []),
    ({"outages": ["ai", "sms"], "pending": 0, "earliest_due_at": None, "last_run_at": T0}, T0, ["outage", "outage"]),
    ({"outages": [], "pending": 1, "earliest_due_at": T0 - 301, "last_run_at": T0}, T0, ["stuck"]),
    ({"outages": [], "pending": 1, "earliest_due_at": T0 - 299, "last_run_at": T0}, T0, []),
    ({"outages": [], "pending": 2, "earliest_due_at": T0 + 5, "last_run_at": T0 - 180}, T0, ["idle"]),
    ({"outages": [], "pending": 2, "earliest_due_at": T0 + 5, "last_run_at": None}, T0, ["idle"]),
    ({"outages": ["ai"], "pending": 2, "earliest_due_at": T0 - 900, "last_run_at": T0 - 900}, T0,
     ["outage", "stuck", "idle"]),
])
def test_the_verdict_is_a_pure_function_of_the_facts_and_now(facts, now, codes):
    reasons = attention.needed(facts, now)
    assert [r.code for r in reasons] == codes and all(r.text for r in reasons)


def test_a_long_processor_run_notes_that_it_still_runs(db_path, settings, store, monkeypatch):
    """`process --for 3600` is running, not stopped: it notes so while it runs."""
    import sqlite3
    import threading

    from conftest import Clock, offline_processor, wait_for
    from smsbatch import processor

    monkeypatch.setattr(processor, "STILL_RUNNING_EVERY", 0.05, raising=False)
    clock = Clock(T0)
    run = threading.Thread(target=offline_processor(settings, clock).run, kwargs={"seconds": 2.0})
    run.start()
    try:
        assert wait_for(lambda: store.last_activity()["last_run_at"] == T0)
        add(store, "+15551110004", "hi", T0 + 190)  # it waits for its quiet period
        clock.now = T0 + 200  # 200 s into the run
        rows = lambda: sqlite3.connect(db_path).execute("SELECT started_at, finished_at FROM processors").fetchall()
        assert wait_for(lambda: rows() == [(T0 + 200, None)])  # noted mid-run, not at its end
        assert attention.needed(attention.gather(store, T0 + 200), T0 + 200) == []
    finally:
        run.join(10)
