"""Processing through the real openai and twilio clients, talking to stand-in servers."""

import json

import pytest

from conftest import T0, TextMeanwhile, add, offline_processor, real_processor
from smsbatch.ai import budget_note
from smsbatch.config import Settings

pytestmark = pytest.mark.engines  # on SQLite and PostgreSQL (conftest.ENGINES)

A, B = "+15552220001", "+15552220002"


@pytest.fixture
def fast(real_settings):
    """No client-side retries: each scripted failure is one attempt."""
    return real_settings.replace(ai_client_retries=0, retry_base_seconds=30)


def run(settings, clock, at):
    clock.now = at
    return real_processor(settings, clock).run()


def test_one_burst_one_ai_call_one_sms(fast, store, clock, openai_standin, twilio_standin):
    for i, text in enumerate(["hi", "quick question", "about my claim"]):
        add(store, A, text, T0 + i * 2)
    report = run(fast, clock, T0 + 14)
    assert report.counts["sent"] == 1 and report.claimed == 1
    [call] = openai_standin.calls
    assert call[0]["role"] == "system" and call[0]["content"] == fast.system_prompt
    for text in ["hi", "quick question", "about my claim"]:
        assert text in call[-1]["content"]
    [sms] = twilio_standin.sent
    assert sms["to"] == A and sms["from"] == "+15550000000" and sms["body"].startswith("AI reply to:")
    [batch] = store.conn.execute("SELECT * FROM batches").fetchall()
    assert batch["state"] == "sent" and batch["provider_sid"] == sms["sid"] and batch["sent_at"] == T0 + 14
    assert batch["response_text"] == sms["body"] and batch["attempts"] == 1


def test_prompt_carries_the_conversation_so_far(fast, store, clock, openai_standin, twilio_standin):
    add(store, A, "my name is Ann", T0)
    run(fast, clock, T0 + 10)
    add(store, A, "what's my name?", T0 + 100)
    run(fast, clock, T0 + 110)
    second = openai_standin.calls[1]
    assert [m["role"] for m in second] == ["system", "system", "user", "assistant", "user"]
    assert second[1]["content"] == budget_note(3)  # the reply budget, SMSBATCH_MAX_SEGMENTS
    assert second[2]["content"] == "my name is Ann" and second[3]["content"] == twilio_standin.sent[0]["body"]


def test_picture_message_is_described_to_the_ai(fast, store, clock, openai_standin):
    add(store, A, "", T0, media=["https://api.twilio.com/media/ME1"])
    run(fast, clock, T0 + 10)
    assert "https://api.twilio.com/media/ME1" in openai_standin.calls[0][-1]["content"]


def test_long_reply_is_shortened_not_rejected(fast, store, clock, twilio_standin):
    add(store, A, "tell me everything " * 120, T0)
    assert run(fast, clock, T0 + 10).counts["sent"] == 1
    body = twilio_standin.sent[0]["body"]
    assert 0 < len(body) <= 459 and body.endswith("...")  # SMSBATCH_MAX_SEGMENTS: 3 GSM-7 segments


def test_messaging_service_is_used_when_set(fast, store, clock, twilio_standin):
    add(store, A, "hi", T0)
    run(fast.replace(twilio_messaging_service_sid="MG" + "1" * 32, twilio_from_number=""), clock, T0 + 10)
    assert twilio_standin.sent[0]["messaging_service_sid"] == "MG" + "1" * 32


def test_opted_out_number_gets_no_reply_and_keywords_skip_the_ai(fast, store, clock, openai_standin, twilio_standin):
    add(store, A, "hi", T0)
    add(store, A, "STOP", T0 + 1)
    report = run(fast, clock, T0 + 20)
    assert report.counts["sent"] == 0 and openai_standin.requests == [] and twilio_standin.sent == []
    add(store, A, "START", T0 + 30)
    add(store, A, "back again", T0 + 31)
    assert run(fast, clock, T0 + 50).counts["sent"] == 1
    assert "START" not in openai_standin.calls[0][-1]["content"]


def test_stop_arriving_while_the_ai_answers_wins(fast, store, clock, twilio_standin):
    from smsbatch.processor import Processor
    from smsbatch.sms import TwilioSender

    add(store, A, "hi", T0)
    clock.now = T0 + 10
    stop_meanwhile = TextMeanwhile(fast.db_path, A, "stop", T0 + 11, reply="hello")
    report = Processor(fast.db_path, fast, stop_meanwhile, TwilioSender(fast), clock=clock).run()
    assert report.counts["skipped"] == 1 and twilio_standin.sent == []


def test_test_number_only(fast, store, clock, twilio_standin):
    add(store, A, "hi", T0)
    add(store, B, "hi", T0)
    report = run(fast.replace(test_number=B), clock, T0 + 10)
    assert report.counts == report.counts | {"sent": 1, "skipped": 1}
    assert [m["to"] for m in twilio_standin.sent] == [B]
    skipped = store.conn.execute("SELECT last_error FROM batches WHERE phone = ?", (A,)).fetchone()[0]
    assert "AI_SMS_TEST_NUMBER" in skipped


def test_disabled_flag_pauses_replies_but_keeps_texts(fast, store, clock, twilio_standin):
    add(store, A, "hi", T0)
    report = run(fast.replace(enabled=False), clock, T0 + 10)
    assert report.paused and report.claimed == 0 and twilio_standin.sent == []
    assert store.conn.execute("SELECT state FROM batches").fetchone()[0] == "open"
    assert run(fast, clock, T0 + 20).counts["sent"] == 1


def test_ai_outage_backs_off_then_answers_once(fast, store, clock, openai_standin, twilio_standin):
    openai_standin.script = [500, 429]
    batch = add(store, A, "hi", T0).batch_id
    assert run(fast, clock, T0 + 10).counts["retrying"] == 1
    first = store.get_batch(batch)
    assert first["state"] == "queued" and "500" in first["last_error"]
    assert 15 <= first["retry_at"] - (T0 + 10) <= 30  # base 30 s, jittered
    assert run(fast, clock, first["retry_at"] - 1).claimed == 0  # not before the backoff
    assert run(fast, clock, first["retry_at"]).counts["retrying"] == 1
    second = store.get_batch(batch)
    assert 30 <= second["retry_at"] - first["retry_at"] <= 60
    assert run(fast, clock, second["retry_at"]).counts["sent"] == 1
    assert store.get_batch(batch)["attempts"] == 3 and len(twilio_standin.sent) == 1


def test_permanent_ai_error_fails_at_once(fast, store, clock, openai_standin, twilio_standin):
    openai_standin.script = [401]
    batch = add(store, A, "hi", T0).batch_id
    report = run(fast, clock, T0 + 10)
    assert report.counts["failed"] == 1
    row = store.get_batch(batch)
    assert row["state"] == "failed" and "401" in row["last_error"] and "sk-test" not in row["last_error"]


def test_gives_up_after_max_attempts(fast, store, clock, openai_standin):
    openai_standin.script = [503] * 10
    settings = fast.replace(max_attempts=2)
    batch = add(store, A, "hi", T0).batch_id
    run(settings, clock, T0 + 10)
    report = run(settings, clock, store.get_batch(batch)["retry_at"])
    row = store.get_batch(batch)
    assert report.counts["failed"] == 1 and row["state"] == "failed" and row["attempts"] == 2
    assert "after 2 attempts" in row["last_error"]


def test_a_failed_batch_does_not_block_the_next_one(fast, store, clock, openai_standin, twilio_standin):
    openai_standin.script = [400]
    add(store, A, "hi", T0)
    run(fast, clock, T0 + 10)
    add(store, A, "hello?", T0 + 60)
    assert run(fast, clock, T0 + 70).counts["sent"] == 1


@pytest.mark.parametrize("code,status,outcome", [(21610, 400, "skipped"), (21211, 400, "failed"),
                                                 (20429, 429, "retrying"), (30003, 400, "retrying")])
def test_twilio_errors_are_classified(fast, store, clock, twilio_standin, code, status, outcome):
    twilio_standin.script = [(status, code)]
    batch = add(store, A, "hi", T0).batch_id
    report = run(fast, clock, T0 + 10)
    assert report.counts[outcome] == 1
    if code == 21610:
        assert store.is_opted_out(A, "+15550000000")
        assert store.get_batch(batch)["state"] == "skipped"


def test_sending_batch_with_expired_lease_is_reconciled_not_resent(fast, store, clock, twilio_standin):
    """A processor died after Twilio accepted: the next run finds the message and records it."""
    batch = add(store, A, "hi", T0).batch_id
    rows, _ = store.claim_due(T0 + 10, 1, fast.lease, 3600)
    assert store.begin_send(rows[0], "the reply", T0 + 11, fast) == "sending"
    twilio_standin.record({"To": A, "From": "+15550000000", "Body": "the reply"}, at=T0 + 11)  # it went out
    report = run(fast, clock, T0 + 11 + fast.lease)
    row = store.get_batch(batch)
    assert report.counts["sent"] == 1 and row["state"] == "sent"
    assert row["provider_sid"] == twilio_standin.sent[0]["sid"] and len(twilio_standin.sent) == 1


def test_sending_batch_not_found_at_twilio_is_sent_once(fast, store, clock, twilio_standin):
    batch = add(store, A, "hi", T0).batch_id
    rows, _ = store.claim_due(T0 + 10, 1, fast.lease, 3600)
    store.begin_send(rows[0], "the reply", T0 + 11, fast)
    run(fast, clock, T0 + 11 + fast.lease)
    assert twilio_standin.bodies_to(A) == ["the reply"] and store.get_batch(batch)["state"] == "sent"


def test_reconcile_waits_when_twilio_cannot_be_asked(fast, store, clock, twilio_standin):
    twilio_standin.list_script = [(503, 20500)]
    batch = add(store, A, "hi", T0).batch_id
    rows, _ = store.claim_due(T0 + 10, 1, fast.lease, 3600)
    store.begin_send(rows[0], "the reply", T0 + 11, fast)
    report = run(fast, clock, T0 + 11 + fast.lease)
    row = store.get_batch(batch)
    assert report.counts["retrying"] == 1 and row["state"] == "sending" and twilio_standin.sent == []
    assert "could not check" in row["last_error"]


def test_console_sender_cannot_reconcile_so_batch_becomes_unknown(settings, store, clock):
    batch = add(store, A, "hi", T0).batch_id
    rows, _ = store.claim_due(T0 + 10, 1, settings.lease, 3600)
    store.begin_send(rows[0], "the reply", T0 + 11, settings)
    clock.now = T0 + 11 + settings.lease
    report = offline_processor(settings, clock).run()
    assert report.counts["unknown"] == 1 and store.get_batch(batch)["state"] == "unknown"
    assert store.retry(batch, clock.now)["state"] == "queued"


def test_ai_timeout_is_transient(fast, store, clock, openai_standin):
    openai_standin.script = [("delay", 1.5)]
    settings = fast.replace(ai_timeout_seconds=0.5)
    batch = add(store, A, "hi", T0).batch_id
    assert run(settings, clock, T0 + 10).counts["retrying"] == 1
    assert "timed out" in store.get_batch(batch)["last_error"]


def test_lease_shorter_than_the_timeouts_is_refused():
    from smsbatch.errors import ConfigError

    with pytest.raises(ConfigError, match="SMSBATCH_LEASE_SECONDS"):
        Settings.from_env({"SMSBATCH_LEASE_SECONDS": "20", "SMSBATCH_AI_TIMEOUT_SECONDS": "30"})


def test_offline_stand_in_answers_every_text(settings, store, clock):
    add(store, A, "one", T0)
    add(store, A, "two", T0 + 1)
    clock.now = T0 + 20
    report = offline_processor(settings, clock).run()
    reply = store.conn.execute("SELECT response_text FROM batches").fetchone()[0]
    assert report.ai_calls == 1 and "one" in reply and "two" in reply
    assert json.dumps(report.as_dict())


def test_yes_is_an_answer_unless_the_number_opted_out(fast, store, clock, openai_standin):
    add(store, A, "yes", T0)
    assert run(fast, clock, T0 + 10).counts["sent"] == 1
    assert openai_standin.calls[0][-1]["content"] == "yes"
    add(store, B, "STOP", T0)
    add(store, B, "YES", T0 + 5)
    assert not store.is_opted_out(B, "+15550000000")


def test_twilio_5xx_is_checked_before_sending_again(fast, store, clock, twilio_standin):
    """A 500 may come after Twilio queued the message: the retry asks first, so no double send."""
    twilio_standin.script = [(500, 20500)]
    batch = add(store, A, "hi", T0).batch_id
    assert run(fast, clock, T0 + 10).counts["retrying"] == 1
    row = store.get_batch(batch)
    assert row["state"] == "sending"
    twilio_standin.record({"To": A, "From": "+15550000000", "Body": row["response_text"]}, at=T0 + 10)
    assert run(fast, clock, row["retry_at"]).counts["sent"] == 1
    assert len(twilio_standin.requests) == 1 and len(twilio_standin.sent) == 1


def test_reconcile_gives_up_as_unknown_after_max_attempts(fast, store, clock, twilio_standin):
    settings = fast.replace(max_attempts=2)
    twilio_standin.list_script = [(503, 20500)] * 5
    batch = add(store, A, "hi", T0).batch_id
    rows, _ = store.claim_due(T0 + 10, 1, settings.lease, 3600)
    store.begin_send(rows[0], "the reply", T0 + 11, settings)
    outcomes = []
    at = T0 + 11 + settings.lease
    for _ in range(2):
        outcomes.append(run(settings, clock, at).as_dict())
        at = store.get_batch(batch)["retry_at"]
    assert outcomes[0]["retrying"] == 1 and outcomes[1]["unknown"] == 1
    assert store.get_batch(batch)["state"] == "unknown" and twilio_standin.sent == []


def sending_batch(store, settings, phone=A, reply="the reply"):
    """A batch whose processor died after committing *sending*, before recording the send."""
    batch = add(store, phone, "hi", T0).batch_id
    rows, _ = store.claim_due(T0 + 10, 1, settings.lease, 3600)
    assert store.begin_send(rows[0], reply, T0 + 11, settings) == "sending"
    return batch


def test_reconcile_rechecks_opt_out_before_resending(fast, store, clock, twilio_standin):
    batch = sending_batch(store, fast)
    add(store, A, "STOP", T0 + 12)
    report = run(fast, clock, T0 + 11 + fast.lease)
    assert report.counts["skipped"] == 1 and twilio_standin.sent == []
    assert store.get_batch(batch)["state"] == "skipped"


def test_reconcile_ignores_an_identical_reply_from_long_before(fast, store, clock, twilio_standin):
    twilio_standin.record({"To": A, "From": "+15550000000", "Body": "the reply"}, at=T0 - 3600)
    batch = sending_batch(store, fast)
    run(fast, clock, T0 + 11 + fast.lease)
    assert twilio_standin.bodies_to(A) == ["the reply", "the reply"]
    assert store.get_batch(batch)["provider_sid"] == twilio_standin.sent[1]["sid"]


def test_a_batch_whose_processor_keeps_dying_fails_after_max_attempts(fast, store, clock, openai_standin):
    settings = fast.replace(max_attempts=2)
    batch = add(store, A, "hi", T0).batch_id
    at = T0 + 10
    for _ in range(2):  # claimed, then the processor dies (the lease runs out)
        store.claim_due(at, 1, settings.lease, 3600)
        at += settings.lease
    report = run(settings, clock, at)
    row = store.get_batch(batch)
    assert report.counts["failed"] == 1 and row["state"] == "failed" and "gave up after 2" in row["last_error"]
    assert openai_standin.requests == []


def test_reconcile_out_of_attempts_asks_twilio_first(fast, store, clock, twilio_standin):
    """Even on the last attempt the reply is looked for, and found, rather than given up on."""
    settings = fast.replace(max_attempts=1)
    batch = sending_batch(store, settings)
    twilio_standin.record({"To": A, "From": "+15550000000", "Body": "the reply"}, at=T0 + 11)
    assert run(settings, clock, T0 + 11 + settings.lease).counts["sent"] == 1
    assert store.get_batch(batch)["state"] == "sent" and len(twilio_standin.sent) == 1


def test_one_batch_per_phone_in_flight(fast, store, clock, openai_standin, twilio_standin):
    """A newer batch of a phone waits while an older one is with the AI, then takes its texts."""
    first = add(store, A, "hi", T0).batch_id
    [claimed], _ = store.claim_due(T0 + 10, 10, fast.lease, 3600)
    add(store, A, "about my claim", T0 + 11)
    rows, _ = store.claim_due(T0 + 30, 10, fast.lease, 3600)
    assert rows == []  # the first is still in flight
    assert store.begin_send(claimed, "stale reply", T0 + 31, fast) == "superseded"
    assert run(fast, clock, T0 + 40).counts["sent"] == 1
    [sms] = twilio_standin.sent
    assert "hi" in openai_standin.calls[0][-1]["content"] and "about my claim" in openai_standin.calls[0][-1]["content"]
    assert store.get_batch(first)["state"] == "superseded"


def test_an_older_batch_retried_after_a_newer_reply_is_not_sent(fast, store, clock, openai_standin, twilio_standin):
    openai_standin.script = [503]
    first = add(store, A, "hello??", T0).batch_id
    run(fast, clock, T0 + 10)  # fails, backs off 15-30 s
    add(store, A, "what time do you open?", T0 + 12)
    assert run(fast, clock, T0 + 23).counts["sent"] == 1  # the newer batch is answered
    assert run(fast, clock, T0 + 100).counts["superseded"] == 1
    assert len(twilio_standin.sent) == 1 and store.get_batch(first)["state"] == "superseded"


def test_test_number_compares_digits(fast, store, clock, twilio_standin):
    add(store, "+15551234567", "hi", T0)
    report = run(fast.replace(test_number="1 (555) 123-4567"), clock, T0 + 10)
    assert report.counts["sent"] == 1


def test_for_stops_claiming_at_its_deadline(settings, store):
    """With texts falling due all the time, `--for` still ends on time."""
    import time

    now = time.time()
    for i in range(200):
        add(store, f"+1555800{i:04d}", "hi", now - 60)

    class Slow:
        calls = 0

        def answer(self, messages):
            time.sleep(0.05)
            return "ok"

    started = time.monotonic()
    report = offline_processor(settings, time.time, Slow()).run(concurrency=2, seconds=0.3)
    assert time.monotonic() - started < 1.0 and 0 < report.claimed < 200


def test_reconcile_recognises_a_reply_twilio_re_encoded(fast, store, clock, twilio_standin):
    """Smart Encoding stores curly quotes and "…" as plain ones: still our reply, not resent."""
    batch = sending_batch(store, fast, reply="We’re open “all day” — see you…")
    twilio_standin.record({"To": A, "From": "+15550000000", "Body": 'We\'re open "all day" - see you...'}, at=T0 + 11)
    assert run(fast, clock, T0 + 11 + fast.lease).counts["sent"] == 1
    assert len(twilio_standin.sent) == 1 and store.get_batch(batch)["state"] == "sent"


def test_an_operator_retry_is_answered_even_after_a_newer_reply(fast, store, clock, openai_standin, twilio_standin):
    openai_standin.script = [400]
    first = add(store, A, "cancel my 3pm appointment", T0).batch_id
    run(fast, clock, T0 + 10)  # fails at once
    add(store, A, "thanks!", T0 + 20)
    run(fast, clock, T0 + 30)  # the newer batch is answered
    store.retry(first, T0 + 40)
    assert run(fast, clock, T0 + 40).counts["sent"] == 1
    assert len(twilio_standin.sent) == 2 and store.get_batch(first)["state"] == "sent"


def test_a_retry_is_only_folded_into_a_reply_that_saw_its_texts(fast, store, clock, openai_standin, twilio_standin):
    """Without history the newer reply never saw the older texts: the older one is answered."""
    openai_standin.script = [503]
    settings = fast.replace(history_messages=0)
    first = add(store, A, "cancel my 3pm appointment", T0).batch_id
    run(settings, clock, T0 + 10)
    add(store, A, "thanks!", T0 + 12)
    run(settings, clock, T0 + 23)
    assert run(settings, clock, T0 + 100).counts["sent"] == 1
    assert store.get_batch(first)["state"] == "sent" and len(twilio_standin.sent) == 2


def test_a_send_waiting_to_be_checked_does_not_hold_back_newer_texts(fast, store, clock, twilio_standin):
    """A batch left in *sending* during backoff holds no lease: the phone's newer batch goes
    ahead, and the older one, found not sent, folds into it rather than going out stale."""
    twilio_standin.script = [(503, 20500)]  # maybe sent: check later
    first = add(store, A, "hi", T0).batch_id
    run(fast, clock, T0 + 10)
    assert store.get_batch(first)["state"] == "sending"
    add(store, A, "URGENT: pipe burst", T0 + 11)
    assert run(fast, clock, T0 + 11).counts["sent"] == 1  # not held behind the backoff
    report = run(fast, clock, store.get_batch(first)["retry_at"])
    assert report.counts["superseded"] == 1 and len(twilio_standin.sent) == 1


def test_a_run_is_recorded_with_its_start_and_end(fast, store, clock):
    assert store.last_activity() == {"last_text_at": None, "last_run_at": None}
    add(store, A, "hi", T0)
    run(fast, clock, T0 + 30)
    [row] = store.conn.execute("SELECT * FROM processors").fetchall()
    assert row["started_at"] == row["finished_at"] == T0 + 30
    assert store.last_activity() == {"last_text_at": T0, "last_run_at": T0 + 30}
