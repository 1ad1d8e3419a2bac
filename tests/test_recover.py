"""Leases, deadlines, counting and reconcile, in one process: the heartbeat renews and
fences, a trickling AI is cut off at our deadline, every AI request and token is counted,
and reconcile finds its reply in Twilio's pages whatever Twilio did to the body."""

import json
import os
import sqlite3
import subprocess
import sys
import threading
import time

import pytest

from conftest import T0, add, invoke, real_processor
from fakes import FakeTwilio, provider_env
from legacy import make_v1_database
from smsbatch.db import SCHEMA_VERSION, Store
from smsbatch.lease import Leases, node_id

A, B = "+15556660001", "+15556660002"
US = "+15550000000"


@pytest.fixture
def fast(real_settings):
    return real_settings.replace(ai_client_retries=0)


class Mono:
    """An injected monotonic clock."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def claimed(store, at=T0 + 10):
    rows, _ = store.claim_due(at, 10, 4.0, 3600, holder="elsewhere:1")
    return rows


# -- heartbeat leases ------------------------------------------------------------------


def test_heartbeat_renews_every_held_batch_and_records_holder(store, clock):
    add(store, A, "hi", T0)
    add(store, B, "hi", T0)
    mono = Mono()
    leases = Leases(store.path, clock, hold_limit=60, monotonic=mono)
    rows = claimed(store)
    leases.add(rows, mono())
    clock.now, mono.now = T0 + 13, mono.now + 3
    leases.renew()
    for row in rows:
        batch = store.get_batch(row["id"])
        assert batch["lease_expires_at"] == T0 + 17 and batch["heartbeat_at"] == T0 + 13
        assert leases.holds(batch)
    status = store.status(T0 + 14)
    assert [(r["holder"], r["renewed_seconds_ago"]) for r in status["in_flight"]] == [("elsewhere:1", 1.0)] * 2


def holding(store, clock, hold_limit=60):
    """A text's batch claimed and held by a Leases on a hand-moved monotonic clock."""
    add(store, A, "hi", T0)
    mono = Mono()
    leases = Leases(store.path, clock, hold_limit=hold_limit, monotonic=mono)
    [row] = claimed(store)
    leases.add([row], mono())
    return mono, leases, row


def test_fence_fails_by_our_own_clock_when_renewals_stop(store, clock):
    """A frozen process's heartbeat froze too: when it wakes, only its own clock tells."""
    mono, leases, row = holding(store, clock)
    mono.now += 2.9
    assert leases.holds(row)  # 1.1 s of lease left: more than the 1 s margin
    mono.now += 0.2
    assert not leases.holds(row)


def test_a_batch_taken_over_is_lost_to_its_old_holder(store, clock):
    mono, leases, row = holding(store, clock)
    [taken] = claimed(store, T0 + 15)  # its lease ran out; another processor claims it
    assert taken["id"] == row["id"] and taken["claim"] != row["claim"]
    leases.renew()  # the old holder wakes: its renewal finds nothing of its own
    assert not leases.holds(row)
    assert store.get_batch(row["id"])["lease_expires_at"] == T0 + 19  # the new holder's lease untouched


def test_renewals_stop_at_the_hold_limit(store, clock):
    mono, leases, row = holding(store, clock, hold_limit=30)
    mono.now += 31
    clock.now = T0 + 41
    leases.renew()
    assert store.get_batch(row["id"])["lease_expires_at"] == T0 + 14 and not leases.holds(row)


def test_a_dead_holder_on_this_machine_is_seen_at_once(store, clock, settings):
    """By pid, on the same machine (same boot, same pid namespace), and only before the
    send: elsewhere, or once *sending*, the lease has to run out."""
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead, alive, here = f"h:{int(gone.stdout)}", f"h:{os.getpid()}", node_id()
    batches = {}
    for name, phone, holder, node in (("dead", A, dead, here), ("alive", B, alive, here),
                                      ("elsewhere", "+15556660003", dead, "another-host/1"),
                                      ("sending", "+15556660004", dead, here)):
        batches[name] = add(store, phone, "hi", T0).batch_id
        [row] = store.claim_due(T0 + 10, 1, 4.0, 3600, holder=holder, node=node)[0]
        if name == "sending":
            store.begin_send(row, "the reply", T0 + 10, settings)
    leases = Leases(store.path, clock, hold_limit=60)
    assert leases.free_dead(store, T0 + 11) == 1
    due = {name: store.get_batch(b)["lease_expires_at"] for name, b in batches.items()}
    assert due == {"dead": T0 + 11, "alive": T0 + 14, "elsewhere": T0 + 14, "sending": T0 + 14}


def test_a_slow_live_processor_keeps_its_batch(fast, store, clock, openai_standin, twilio_standin):
    """The AI takes three leases; another processor keeps trying to claim meanwhile, and
    never can (short leases so the test is quick; real time for the heartbeat)."""
    openai_standin.script = [("delay", 3)]
    batch = add(store, A, "hi", time.time() - 30).batch_id
    processor = real_processor(fast.replace(ai_timeout_seconds=5), time.time)
    processor.leases = Leases(fast.db_path, time.time, hold_limit=60, lease=1.0, interval=0.1, margin=0.2)
    stolen, done = [], threading.Event()

    def rival():
        other = Store(fast.db_path)
        while other.get_batch(batch)["state"] == "open" and not done.is_set():
            time.sleep(0.01)
        while not done.is_set():
            stolen.extend(other.claim_due(time.time(), 1, 1.0, 3600)[0])
            time.sleep(0.1)

    thread = threading.Thread(target=rival)
    thread.start()
    try:
        report = processor.run()
    finally:
        done.set()
        thread.join()
    assert report.counts["sent"] == 1 and stolen == [] and len(twilio_standin.sent) == 1


# -- total deadlines -------------------------------------------------------------------


def test_trickling_ai_is_cut_off_at_our_deadline(fast, store, clock, openai_standin, twilio_standin):
    """One byte a second: no per-read timeout ever fires; the total deadline does."""
    settings = fast.replace(ai_timeout_seconds=1.5)
    assert settings.ai_deadline == 1.5
    openai_standin.script = [("trickle", 20)]
    batch = add(store, A, "hi", T0).batch_id
    clock.now = T0 + 10
    report = real_processor(settings, clock).run()
    took = time.monotonic() - openai_standin.times[0]  # from the request's arrival (imports not counted)
    assert 1.3 < took < 3.5, f"the call took {took:.1f} s"  # 20 s uncut; slack for 2 busy cores
    row = store.get_batch(batch)
    assert report.counts["retrying"] == 1 and "timed out" in row["last_error"] and twilio_standin.sent == []
    assert row["ai_requests"] == 1


def test_trickling_twilio_is_cut_off_at_our_deadline_and_counts_as_maybe_sent(fast, store, clock, twilio_standin):
    """Twilio accepted the message, then answers a byte a second: the send ends at the SMS
    deadline, the batch stays *sending* (maybe sent), and the reconcile finds it: one SMS.
    (Near real time: the stand-in stamps the message it keeps with its own clock.)"""
    settings = fast.replace(sms_timeout_seconds=1.5)
    twilio_standin.script = ["accept-then-trickle"]
    clock.now = round(time.time())
    batch = add(store, A, "hi", clock.now - 30).batch_id
    report = real_processor(settings, clock).run()
    took = time.monotonic() - twilio_standin.times[0]
    assert 1.3 < took < 3.5, f"the send took {took:.1f} s"  # 20 s uncut; slack for 2 busy cores
    row = store.get_batch(batch)
    assert report.counts["retrying"] == 1 and row["state"] == "sending" and "outcome unknown" in row["last_error"]
    clock.now = row["retry_at"] + 1
    assert real_processor(settings, clock).run().counts["sent"] == 1
    assert len(twilio_standin.sent) == 1 and store.get_batch(batch)["provider_sid"] == twilio_standin.sent[0]["sid"]


# -- what the AI cost ------------------------------------------------------------------


def test_every_ai_request_and_token_is_counted(db_path, store, openai_standin, twilio_standin):
    """The openai client retries two 500s itself: three requests for one answer."""
    openai_standin.script = [500, 500]
    batch = add(store, A, "what are your opening hours", T0).batch_id
    env = provider_env(openai_standin, twilio_standin, SMSBATCH_DB=db_path, SMSBATCH_AI_CLIENT_RETRIES=2)
    result = invoke(["process", "--now", str(T0 + 10), "--json"], env=env)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert len(openai_standin.requests) == 3 and report["ai_requests"] == 3 and report["ai_calls"] == 1
    row = store.get_batch(batch)
    reply = twilio_standin.sent[0]["body"]
    assert row["ai_requests"] == 3 and row["completion_tokens"] == len(reply.split())
    assert row["prompt_tokens"] == report["prompt_tokens"] > 0
    line = invoke(["process", "--now", str(T0 + 10)], env=env).output  # nothing left: nothing billed
    assert "AI requests" not in line
    add(store, B, "and on sundays?", T0 + 20)
    line = invoke(["process", "--now", str(T0 + 30)], env=env).output
    assert "AI requests 1, tokens " in line and " prompt + 6 completion" in line  # "AI reply to: and on sundays?"
    status = json.loads(invoke(["status", "--json"], env=env).output)
    assert status["ai"]["requests"] == 4 and status["ai"]["completion_tokens"] == row["completion_tokens"] + 6


# -- reconcile -------------------------------------------------------------------------


def stuck_sending(store, settings, reply, at=T0 + 11):
    """A batch whose processor died around the send: left in *sending*."""
    batch = add(store, A, "hi", T0).batch_id
    [row] = claimed(store)
    assert store.begin_send(row, reply, at, settings) == "sending"
    return batch


def record_manual(store, twilio, body, at):
    """A reply an operator sent by hand: at Twilio, and in our outbound log."""
    message = twilio.record({"To": A, "From": US, "Body": body}, at=at)
    store.conn.execute("INSERT INTO outbound (sid, phone, our_number, body, source, sent_at)"
                       " VALUES (?, ?, ?, ?, 'manual', ?)", (message["sid"], A, US, body, at))
    return message


def reconcile(settings, clock, at=T0 + 30):
    clock.now = at
    return real_processor(settings, clock).run()


def test_reconcile_follows_pages_to_find_its_reply(fast, store, clock, twilio_standin):
    twilio_standin.page_cap = 2
    batch = stuck_sending(store, fast, "the reply")
    ours = twilio_standin.record({"To": A, "From": US, "Body": "the reply"}, at=T0 + 11)
    for i in range(5):  # newer messages, all recorded: ours is on page 3
        record_manual(store, twilio_standin, f"manual note {i}", T0 + 20 + i)
    twilio_standin.record({"To": B, "From": US, "Body": "the reply"}, at=T0 + 12)  # someone else's
    report = reconcile(fast, clock)
    assert report.counts["sent"] == 1 and store.get_batch(batch)["provider_sid"] == ours["sid"]
    assert len(twilio_standin.sent) == 7  # nothing resent
    assert [q.get("Page", "0") for q in twilio_standin.listed] == ["0", "1", "2"]
    assert all(q["To"] == A and q["From"] == US for q in twilio_standin.listed)


def test_reconcile_recognises_a_reply_link_shortening_rewrote(fast, store, clock, twilio_standin):
    twilio_standin.link_shortening = True
    reply = "See https://example.com/opening-hours/sunday for details"
    batch = stuck_sending(store, fast, reply)
    ours = twilio_standin.record({"To": A, "From": US, "Body": reply}, at=T0 + 11)
    assert ours["body"] != reply and "twil.io" in ours["body"]
    report = reconcile(fast, clock)
    assert report.counts["sent"] == 1 and store.get_batch(batch)["provider_sid"] == ours["sid"]
    assert len(twilio_standin.sent) == 1


def test_reconcile_finds_a_reply_twilio_still_queues(fast, store, clock, twilio_standin):
    batch = stuck_sending(store, fast, "the reply")
    ours = twilio_standin.record({"To": A, "From": US, "Body": "the reply"}, at=T0 + 11, queued=True)
    assert reconcile(fast, clock).counts["sent"] == 1
    assert store.get_batch(batch)["provider_sid"] == ours["sid"] and len(twilio_standin.sent) == 1


def test_reconcile_uses_the_body_only_to_break_a_tie(fast, store, clock, twilio_standin):
    batch = stuck_sending(store, fast, "the reply")
    twilio_standin.record({"To": A, "From": US, "Body": "sent from the console"}, at=T0 + 12)  # not recorded
    ours = twilio_standin.record({"To": A, "From": US, "Body": "the reply"}, at=T0 + 11)
    assert reconcile(fast, clock).counts["sent"] == 1
    assert store.get_batch(batch)["provider_sid"] == ours["sid"] and len(twilio_standin.sent) == 2


def test_reconcile_with_two_candidates_is_unknown_never_resent(fast, store, clock, twilio_standin):
    twilio_standin.link_shortening = True
    reply = "See https://example.com/x"
    batch = stuck_sending(store, fast, reply)
    twilio_standin.record({"To": A, "From": US, "Body": reply}, at=T0 + 11)
    twilio_standin.record({"To": A, "From": US, "Body": "Sent by hand: https://example.com/y"}, at=T0 + 12)
    report = reconcile(fast, clock)
    row = store.get_batch(batch)
    assert report.counts["unknown"] == 1 and row["state"] == "unknown" and "2 messages" in row["last_error"]
    assert len(twilio_standin.sent) == 2


def test_stand_in_filters_and_pages_like_twilio(twilio_standin):
    from twilio.rest import Client

    client = Client(FakeTwilio.ACCOUNT, FakeTwilio.TOKEN)
    client.api.base_url = twilio_standin.url
    for i in range(7):
        twilio_standin.record({"To": A, "From": US if i % 2 else "+15550009999", "Body": str(i)}, at=T0 + i)
    twilio_standin.record({"To": B, "From": US, "Body": "b"}, at=T0)
    page = client.messages.page(to=A, page_size=2)
    assert [m.body for m in page] == ["6", "5"] and page.next_page_url
    assert [m.body for m in client.messages.stream(to=A, from_=US, page_size=2)] == ["5", "3", "1"]
    from datetime import datetime, timezone

    when = datetime.fromtimestamp(T0 + 2, timezone.utc)
    assert [m.body for m in client.messages.list(to=A, date_sent_after=when)] == ["6", "5", "4", "3", "2"]
    assert [m.body for m in client.messages.list(to=A, date_sent_before=when)] == ["2", "1", "0"]


# -- schema ----------------------------------------------------------------------------


def test_a_version_1_database_gets_lease_and_cost_columns(tmp_path):
    path = str(tmp_path / "v1.db")
    make_v1_database(path)
    assert Store(path).migrate() == (1, SCHEMA_VERSION)
    conn = sqlite3.connect(path)
    row = conn.execute("SELECT holder, heartbeat_at, ai_requests, prompt_tokens, completion_tokens FROM batches"
                       " WHERE id = 'sent222222'").fetchone()
    assert row == (None, None, 0, 0, 0)
    assert conn.execute("SELECT reported_at FROM outbound").fetchall() == [(None,)]
