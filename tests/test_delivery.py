"""Delivery receipts: each reply's fate, by Twilio's signed status callbacks or, without a
public URL, by asking Twilio once; shown by `status`, reported once by `process`."""

import json
import logging

import pytest

from conftest import T0, add, invoke, real_processor
from smsbatch import delivery
from smsbatch.web import make_app
from test_web import call

pytestmark = pytest.mark.engines  # on SQLite and PostgreSQL (conftest.ENGINES)

A, B = "+15557770001", "+15557770002"
PUBLIC = "https://sms.example.com/sms"


@pytest.fixture
def fast(real_settings):
    return real_settings.replace(ai_client_retries=0)


@pytest.fixture
def public(fast):
    return fast.replace(public_url=PUBLIC)


@pytest.fixture
def webhook(public):
    return make_app(public, clock=lambda: T0 + 100)


def answered(settings, store, clock, *phones):
    """Each phone texts and gets its reply; returns the stand-in's messages in order."""
    for phone in phones:
        add(store, phone, "hi", T0)
    clock.now = T0 + 10
    assert real_processor(settings, clock).run().counts["sent"] == len(phones)


def receipt(app, twilio, message, status, error_code=None):
    url, body, headers = twilio.callback(message, status, error_code)
    assert url == PUBLIC + "/status"
    return call(app, path="/sms/status", body=body, headers=headers)[0]


def outbound(store, sid):
    return dict(store.conn.execute("SELECT * FROM outbound WHERE sid = ?", (sid,)).fetchone())


def test_reply_asks_for_receipts_at_the_public_url_plus_status(public, store, clock, twilio_standin):
    answered(public, store, clock, A)
    assert twilio_standin.sent[0]["status_callback"] == "https://sms.example.com/sms/status"


def test_no_public_url_no_callback(fast, store, clock, twilio_standin):
    answered(fast, store, clock, A)
    assert twilio_standin.sent[0]["status_callback"] is None


def test_signed_receipts_record_the_latest_status_and_never_move_back(public, webhook, store, clock,
                                                                       twilio_standin):
    answered(public, store, clock, A)
    [message] = twilio_standin.sent
    assert receipt(webhook, twilio_standin, message, "sent") == 200
    assert outbound(store, message["sid"])["status"] == "sent"
    assert receipt(webhook, twilio_standin, message, "undelivered", 30007) == 200
    assert receipt(webhook, twilio_standin, message, "sent") == 200  # late, out of order: ignored
    row = outbound(store, message["sid"])
    assert (row["status"], row["error_code"], row["status_at"]) == ("undelivered", 30007, T0 + 100)


def test_unsigned_or_forged_receipts_are_refused_and_unknown_ones_ignored(public, webhook, store, clock,
                                                                         twilio_standin):
    answered(public, store, clock, A)
    [message] = twilio_standin.sent
    url, body, headers = twilio_standin.callback(message, "failed", 30005)
    assert call(webhook, path="/sms/status", body=body)[0] == 403
    _, _, forged = twilio_standin.callback(message, "failed", 30005, token="not-the-token")
    assert call(webhook, path="/sms/status", body=body, headers=forged)[0] == 403
    assert outbound(store, message["sid"])["status"] is None
    stranger = {**message, "sid": "SM" + "f" * 32}
    assert receipt(webhook, twilio_standin, stranger, "delivered") == 200
    assert store.conn.execute("SELECT count(*) FROM outbound").fetchone()[0] == 1
    assert call(webhook, method="GET", path="/status")[0] == 405


def test_status_counts_replies_by_delivery_and_explains_failures(public, webhook, store, clock, twilio_standin,
                                                                 db_path):
    answered(public, store, clock, A, B, "+15557770003")
    first, second = sorted(twilio_standin.sent, key=lambda m: m["to"])[:2]
    receipt(webhook, twilio_standin, first, "delivered")
    receipt(webhook, twilio_standin, second, "undelivered", 30007)
    info = json.loads(invoke(["--db", db_path, "status", "--json"]).output)
    assert info["delivery"] == {"delivered": 1, "no_receipt": 1, "undelivered": 1}  # no receipt: not "queued"
    [problem] = info["delivery_problems"]
    assert problem["error"] == "undelivered: 30007 carrier filtered (spam)" and problem["phone"] == second["to"]
    human = invoke(["--db", db_path, "status"]).output
    assert "30007 carrier filtered" in human and "delivered 1" in human and "no receipt yet 1" in human


def test_error_codes_in_words():
    assert delivery.explain("undelivered", 30003).endswith("unreachable (handset off or out of coverage)")
    assert delivery.explain("failed", 30005).endswith("unknown number (does not exist)")
    assert "landline" in delivery.explain("undelivered", 30006)
    assert "unknown error" in delivery.explain("undelivered", 30008)
    assert delivery.explain("failed", 30410) == "failed: Twilio error 30410"


def test_process_reports_each_newly_failed_reply_once(public, webhook, store, clock, twilio_standin, caplog):
    answered(public, store, clock, A)
    [message] = twilio_standin.sent
    receipt(webhook, twilio_standin, message, "failed", 30006)
    caplog.set_level(logging.WARNING, "smsbatch")
    clock.now = T0 + 200
    assert real_processor(public, clock).run().undelivered == 1
    [line] = [r.getMessage() for r in caplog.records if "reply failed" in r.getMessage()]
    batch = store.conn.execute("SELECT batch_id FROM outbound").fetchone()[0]
    assert line == f"batch {batch}: reply failed: 30006 landline or unreachable carrier"
    assert A not in line
    assert real_processor(public, clock).run().undelivered == 0


def test_without_callbacks_replies_not_final_are_checked_once_a_few_per_run(fast, store, clock, twilio_standin,
                                                                          monkeypatch):
    monkeypatch.setattr(delivery, "CHECKS_PER_RUN", 2)
    answered(fast, store, clock, A, B, "+15557770003")
    fates = {A: ("delivered", None), B: ("undelivered", 30003), "+15557770003": ("sent", None)}
    for message in twilio_standin.sent:
        message["status"], message["error_code"] = fates[message["to"]]
    clock.now = T0 + 10 + delivery.CHECK_AFTER_SECONDS - 1
    assert real_processor(fast, clock).run().undelivered == 0 and twilio_standin.fetched == []  # too soon
    clock.now = T0 + 10 + delivery.CHECK_AFTER_SECONDS
    reported = real_processor(fast, clock).run().undelivered
    assert len(twilio_standin.fetched) == 2
    reported += real_processor(fast, clock).run().undelivered
    assert len(twilio_standin.fetched) == 3 and reported == 1  # the third in the next run; none twice
    real_processor(fast, clock).run()
    assert len(twilio_standin.fetched) == 3
    statuses = dict(store.conn.execute("SELECT phone, status FROM outbound"))
    assert statuses == {A: "delivered", B: "undelivered", "+15557770003": "sent"}


def test_a_receipt_that_came_before_the_reply_was_recorded_is_made_good_by_asking(public, webhook, store, clock,
                                                                                  twilio_standin):
    """Twilio's callback can beat our own record of the send (or be lost): the reply's fate
    is still learned, by asking Twilio once when no final receipt came."""
    answered(public, store, clock, A)
    [message] = twilio_standin.sent
    store.conn.execute("UPDATE outbound SET status = NULL")  # as if the early 'delivered' found no row
    message["status"] = "delivered"
    clock.now = T0 + 10 + delivery.CHECK_AFTER_SECONDS
    real_processor(public, clock).run()
    assert twilio_standin.fetched == [message["sid"]] and outbound(store, message["sid"])["status"] == "delivered"


def test_a_status_twilio_added_later_is_answered_200_and_not_recorded(public, webhook, store, clock,
                                                                       twilio_standin):
    answered(public, store, clock, A)
    [message] = twilio_standin.sent
    assert str(receipt(webhook, twilio_standin, message, "partially_delivered")).startswith("200")
    assert outbound(store, message["sid"])["status"] is None


def test_a_reply_twilio_cannot_find_is_final_and_the_others_are_still_checked(fast, store, clock, twilio_standin,
                                                                             caplog):
    """Issue 16: a 404 for one reply used to break the loop before the reply was marked, so
    every run asked again, warned again, and no later reply was ever checked."""
    answered(fast, store, clock, A, B, "+15557770003")
    lost = next(m for m in twilio_standin.sent if m["to"] == A)
    with store.transaction() as conn:  # asked first
        conn.execute("UPDATE outbound SET sent_at = sent_at - 1 WHERE sid = ?", (lost["sid"],))
    twilio_standin.sent.remove(lost)  # Twilio has no such message: 404, code 20404
    for message in twilio_standin.sent:
        message["status"] = "delivered"
    caplog.set_level(logging.WARNING, "smsbatch")
    clock.now = T0 + 10 + delivery.CHECK_AFTER_SECONDS
    real_processor(fast, clock).run()
    assert len(twilio_standin.fetched) == 3
    statuses = dict(store.conn.execute("SELECT phone, status FROM outbound"))
    assert statuses == {A: None, B: "delivered", "+15557770003": "delivered"}
    batch = store.conn.execute("SELECT batch_id FROM outbound WHERE sid = ?", (lost["sid"],)).fetchone()[0]
    [line] = [r.getMessage() for r in caplog.records if lost["sid"] in r.getMessage()]
    assert line.startswith(f"batch {batch}: ") and "20404" in line and "not asked again" in line
    clock.now += 60
    caplog.clear()
    real_processor(fast, clock).run()
    assert len(twilio_standin.fetched) == 3 and not [r for r in caplog.records if lost["sid"] in r.getMessage()]
