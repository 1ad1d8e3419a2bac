"""`smsbatch hold` / `release` / `send`: an operator takes a conversation over and hands it back."""

import json

import pytest

from conftest import T0, TextMeanwhile, add, invoke, offline_processor, real_processor
from fakes import FakeTwilio, provider_env
from smsbatch.db import Store

pytestmark = pytest.mark.engines  # on SQLite and PostgreSQL (conftest.ENGINES)

A = "+15554440001"
US = "+15550000000"


@pytest.fixture
def env(db_path, openai_standin, twilio_standin):
    return provider_env(openai_standin, twilio_standin, SMSBATCH_DB=db_path, SMSBATCH_AI_CLIENT_RETRIES=0)


def states(store, phone=A):
    return [r[0] for r in store.conn.execute("SELECT state FROM batches WHERE phone = ? ORDER BY seq", (phone,))]


def test_a_held_person_gets_no_ai_reply_and_their_start_does_not_undo_it(
        db_path, store, real_settings, clock, openai_standin, twilio_standin):
    result = invoke(["hold", A, "--reason", "angry, Sam replies", "--now", str(T0)], {"SMSBATCH_DB": db_path})
    assert result.exit_code == 0 and f"{A} on hold since" in result.output and "angry, Sam replies" in result.output
    first = add(store, A, "this is the third time!", T0 + 1).batch_id
    clock.now = T0 + 60
    report = real_processor(real_settings, clock).run()
    assert report.counts["held"] == 1 and "held 1" in __import__("smsbatch.cli").cli.summary_line(report)
    row = store.get_batch(first)
    assert row["state"] == "held" and "angry, Sam replies" in row["last_error"]
    add(store, A, "START", T0 + 70)  # the customer's opt-in keyword is not an operator's release
    add(store, A, "hello??", T0 + 71)
    clock.now = T0 + 200
    real_processor(real_settings, clock).run()
    assert states(store) == ["held", "skipped", "held"]
    assert openai_standin.requests == [] and twilio_standin.sent == []
    texts = [r[0] for r in store.conn.execute("SELECT body FROM messages WHERE phone = ? ORDER BY id", (A,))]
    assert texts == ["this is the third time!", "START", "hello??"]  # still stored
    reasons = [r[0] for r in store.conn.execute(
        "SELECT reason FROM batch_events WHERE batch_id = ? ORDER BY id", (first,))]
    assert reasons[-1].startswith("on hold")


def test_release_does_not_answer_late_unless_asked(db_path, store, settings, clock):
    env = {"SMSBATCH_DB": db_path}
    invoke(["hold", A, "--now", str(T0)], env)
    add(store, A, "one", T0 + 1)
    clock.now = T0 + 60
    offline_processor(settings, clock).run()
    result = invoke(["release", A, "--now", str(T0 + 100)], env)
    assert result.exit_code == 0 and "1 text came while on hold, not answered (to answer them: smsbatch retry " in result.output
    clock.now = T0 + 200
    assert offline_processor(settings, clock).run().claimed == 0
    assert states(store) == ["held"] and store.find_hold(A) is None
    add(store, A, "are you there", T0 + 300)  # after the release, the AI answers again
    clock.now = T0 + 400
    assert offline_processor(settings, clock).run().counts["sent"] == 1
    again = invoke(["release", A], env)
    assert again.exit_code == 1 and again.output.strip() == f"Error: {A} is not on hold"


def test_release_answer_pending_answers_every_held_text_with_one_reply(db_path, store, settings, clock):
    env = {"SMSBATCH_DB": db_path}
    invoke(["hold", A, "--now", str(T0)], env)
    add(store, A, "first", T0 + 1)
    clock.now = T0 + 60
    offline_processor(settings, clock).run()
    add(store, A, "second", T0 + 100)
    clock.now = T0 + 200
    offline_processor(settings, clock).run()
    assert states(store) == ["held", "held"]
    result = invoke(["release", A, "--answer-pending", "--now", str(T0 + 300)], env)
    assert result.exit_code == 0 and "2 texts came while on hold: requeued for one reply" in result.output
    sender = __import__("smsbatch.sms").sms.ConsoleSender(quiet=True)
    clock.now = T0 + 301
    assert offline_processor(settings, clock, sender=sender).run().counts["sent"] == 1
    assert len(sender.sent) == 1 and "first" in sender.sent[0][2] and "second" in sender.sent[0][2]
    assert states(store) == ["superseded", "sent"]


def test_a_hold_placed_while_the_ai_answers_wins(db_path, store, settings, clock):
    """The hold is checked again in the transaction that commits the reply for sending."""
    batch_id = add(store, A, "hi", T0).batch_id

    class HoldMeanwhile(TextMeanwhile):
        def answer(self, messages):
            Store(self.db_path).hold(A, "operator took over", T0 + 30)
            return "the AI's reply"

    sender = __import__("smsbatch.sms").sms.ConsoleSender(quiet=True)
    clock.now = T0 + 60
    report = offline_processor(settings, clock, responder=HoldMeanwhile(db_path, A, None, T0), sender=sender).run()
    assert report.counts["held"] == 1 and sender.sent == []
    assert store.get_batch(batch_id)["last_error"].startswith("on hold before the reply was sent")


def test_send_by_hand_goes_through_twilio_and_the_ai_sees_it(env, store, clock, real_settings,
                                                              openai_standin, twilio_standin):
    """The whole take-over: hold, a text comes in (held), reply by hand, release, the AI carries on."""
    invoke(["hold", A, "--now", str(T0 - 1)], env)
    add(store, A, "can I talk to a person", T0, to="+15550000009")
    clock.now = T0 + 20
    assert real_processor(real_settings, clock).run().counts["held"] == 1
    ours = env | {"SMSBATCH_NUMBERS": "+15550000000,+15550000009"}  # the default is the last number when ours
    result = invoke(["send", A, "Hi, this is Sam from Acme. Calling you now.", "--now", str(T0 + 25)], ours)
    assert result.exit_code == 0, result.output
    assert twilio_standin.sent[-1]["to"] == A and twilio_standin.sent[-1]["from"] == "+15550000009"
    sid = twilio_standin.sent[-1]["sid"]
    assert f"sent to {A} from +15550000009 ({sid})" in result.output
    row = store.conn.execute("SELECT * FROM outbound WHERE sid = ?", (sid,)).fetchone()
    assert (row["source"], row["batch_id"], row["body"]) == ("manual", None, "Hi, this is Sam from Acme. Calling you now.")
    invoke(["release", A, "--now", str(T0 + 30)], env)
    add(store, A, "thanks, talk soon", T0 + 60, to="+15550000009")
    clock.now = T0 + 120
    real_processor(real_settings, clock).run()
    assert len(openai_standin.calls) == 1
    assert openai_standin.calls[0][1]["role"] == "system"  # the reply budget
    assert openai_standin.calls[0][2:] == [
        {"role": "user", "content": "can I talk to a person"},
        {"role": "assistant", "content": "Hi, this is Sam from Acme. Calling you now."},
        {"role": "user", "content": "thanks, talk soon"}]
    assert twilio_standin.sent[-1]["body"] == "AI reply to: thanks, talk soon"


def test_send_from_a_chosen_number(env, twilio_standin):
    env = env | {"SMSBATCH_NUMBERS": f"{US},+15550000007"}
    result = invoke(["send", A, "hello", "--from", "+15550000007"], env)
    assert result.exit_code == 0 and twilio_standin.sent[-1]["from"] == "+15550000007"
    assert f"note: {A} is not on hold" in result.output  # the AI would still answer them


def test_send_from_a_number_that_is_not_ours_is_refused(env, store, twilio_standin):
    """Issue 16: --from must be a listed number (SMSBATCH_NUMBERS, else TWILIO_FROM_NUMBER,
    plus the messaging service's)."""
    result = invoke(["send", A, "hello", "--from", "+15550000007"], env)
    assert result.exit_code == 1 and twilio_standin.sent == []
    assert result.output.strip() == (f"Error: +15550000007 is not one of our numbers ({US}); list it in "
                                     "SMSBATCH_NUMBERS to send from it")
    assert store.conn.execute("SELECT count(*) FROM outbound").fetchone()[0] == 0
    service = "MG" + "2" * 32
    twilio_standin.services[service] = ["+15550000007"]
    result = invoke(["send", A, "hello", "--from", "+15550000007"], env | {"TWILIO_MESSAGING_SERVICE_SID": service})
    assert result.exit_code == 0, result.output
    assert (twilio_standin.sent[-1]["from"], twilio_standin.sent[-1]["messaging_service_sid"]) == (
        "+15550000007", service)
    result = invoke(["send", A, "hello", "--from", "+15550000008"], env | {"TWILIO_MESSAGING_SERVICE_SID": service})
    assert result.exit_code == 1 and "is not one of our numbers" in result.output and len(twilio_standin.sent) == 1


def test_send_is_refused_for_an_opted_out_number(env, store, twilio_standin):
    add(store, A, "STOP", T0, to=US)
    result = invoke(["send", A, "please come back"], env)
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
    assert "opted out" in result.output and twilio_standin.sent == []
    assert store.conn.execute("SELECT count(*) FROM outbound").fetchone()[0] == 0


def test_send_failure_is_one_line_and_records_nothing(env, store, twilio_standin):
    twilio_standin.script = [(400, 21211)]
    result = invoke(["send", A, "hello"], env)
    assert result.exit_code == 1 and "not sent: Twilio error 21211" in result.output
    assert FakeTwilio.TOKEN not in result.output and "Traceback" not in result.output
    assert store.conn.execute("SELECT count(*) FROM outbound").fetchone()[0] == 0
    twilio_standin.script = [(400, 21610)]  # Twilio says they unsubscribed: remembered
    assert invoke(["send", A, "hello"], env).exit_code == 1
    assert store.is_opted_out(A, US)


def test_a_send_found_not_to_have_gone_out_is_not_resent_to_a_person_put_on_hold(
        store, real_settings, clock, openai_standin, twilio_standin):
    """Twilio answered 500 (maybe sent): the next run asks Twilio, finds nothing, and the hold wins."""
    batch_id = add(store, A, "hi", T0).batch_id
    twilio_standin.script = [(500, 20500)]
    settings = real_settings.replace(retry_base_seconds=1)
    clock.now = T0 + 20
    assert real_processor(settings, clock).run().counts["retrying"] == 1
    assert store.get_batch(batch_id)["state"] == "sending" and twilio_standin.sent == []
    store.hold(A, "taking over", T0 + 21)
    clock.now = T0 + 30
    assert real_processor(settings, clock).run().counts["held"] == 1
    row = store.get_batch(batch_id)
    assert row["state"] == "held" and row["last_error"].startswith("on hold before the reply was sent")
    assert twilio_standin.sent == []


def test_release_leaves_texts_not_yet_claimed_unanswered_unless_asked(db_path, store, settings, clock):
    """Texts of the hold whose batches were still open or queued (the processor had not run,
    or was paused) are not answered by a plain release: they end held, like the others."""
    env = {"SMSBATCH_DB": db_path}
    invoke(["hold", A, "--now", str(T0)], env)
    add(store, A, "while held 1", T0 + 1)
    add(store, A, "while held 2", T0 + 2, to="+15550000009")  # another of our numbers: its own batch
    assert states(store) == ["open", "open"]
    result = invoke(["release", A, "--now", str(T0 + 100)], env)
    assert result.exit_code == 0 and "2 texts came while on hold, not answered" in result.output
    assert states(store) == ["held", "held"]
    clock.now = T0 + 200
    assert offline_processor(settings, clock).run().claimed == 0
    add(store, A, "after the release", T0 + 300)  # a new text opens a new batch, answered as usual
    clock.now = T0 + 400
    assert offline_processor(settings, clock).run().counts["sent"] == 1


def test_release_answer_pending_answers_texts_not_yet_claimed(db_path, store, settings, clock):
    env = {"SMSBATCH_DB": db_path}
    add(store, A, "before the hold", T0 - 50)  # not the hold's: answered as usual
    clock.now = T0 - 30
    assert offline_processor(settings, clock).run().counts["sent"] == 1
    invoke(["hold", A, "--now", str(T0)], env)
    add(store, A, "while held", T0 + 1)
    clock.now = T0 + 60
    offline_processor(settings, clock).run()
    add(store, A, "still held", T0 + 70)
    result = invoke(["release", A, "--answer-pending", "--now", str(T0 + 80)], env)
    assert result.exit_code == 0 and "2 texts came while on hold: requeued for one reply" in result.output
    sender = __import__("smsbatch.sms").sms.ConsoleSender(quiet=True)
    clock.now = T0 + 81
    assert offline_processor(settings, clock, sender=sender).run().counts["sent"] == 1
    assert "while held" in sender.sent[0][2] and "still held" in sender.sent[0][2]


def test_a_hold_reason_with_control_characters_is_never_printed_raw(db_path, store):
    reason = "angry\x1b[2J\x1b]0;pwned\x07 customer\rover"
    result = invoke(["hold", A, "--reason", reason, "--now", str(T0)], {"SMSBATCH_DB": db_path})
    assert result.exit_code == 0 and "\x1b" not in result.output and "\x07" not in result.output
    assert "(angry\\x1b[2J\\x1b]0;pwned\\x07 customer over)" in result.output
    assert len(result.output.splitlines()) == 1
    assert store.find_hold(A)["reason"] == reason  # stored as given; cleaned only when shown


def test_show_phone_keeps_telling_a_hold_after_its_release(db_path, store):
    import json

    env = {"SMSBATCH_DB": db_path}
    assert invoke(["hold", A, "--reason", "angry customer", "--now", repr(T0)], env).exit_code == 0
    add(store, A, "hello?", T0 + 5)
    offline_processor(__import__("smsbatch.config").config.Settings(db_path=db_path, ai="offline", sms="console"),
                      lambda: T0 + 60).run()
    assert invoke(["release", A, "--now", repr(T0 + 120)], env).exit_code == 0
    items = json.loads(invoke(["show", A, "--json", "--now", repr(T0 + 200)], env).output)["items"]
    kinds = [(i["kind"], i["body"]) for i in items if i["kind"] in ("hold", "release")]
    assert kinds == [("hold", "angry customer"), ("release", "1 text(s) that came meanwhile not answered")]
    human = invoke(["show", A, "--now", repr(T0 + 200)], env).output
    assert "put on hold: angry customer" in human and "released from hold: 1 text(s)" in human


# -- issue 16: pause one of our numbers --------------------------------------------------------------

SALES, SUPPORT, B = "+15550000001", "+15550000002", "+15554440002"


def test_a_paused_number_stores_its_texts_holds_its_batches_and_the_others_are_answered(
        db_path, store, real_settings, clock, twilio_standin):
    env = {"SMSBATCH_DB": db_path, "COLUMNS": "160", "SMSBATCH_NUMBERS": f"{SALES},{SUPPORT}"}
    result = invoke(["hold", "--number", SUPPORT, "--reason", "closed overnight", "--now", str(T0)], env)
    assert result.exit_code == 0, result.output
    assert f"our number {SUPPORT} paused since" in result.output and "closed overnight" in result.output
    to_support = add(store, A, "my order is broken", T0 + 1, to=SUPPORT).batch_id
    add(store, B, "also broken", T0 + 2, to=SUPPORT)
    add(store, A, "price of the blue one?", T0 + 3, to=SALES)
    clock.now = T0 + 60
    report = real_processor(real_settings, clock).run()
    assert (report.counts["held"], report.counts["sent"]) == (2, 1)
    assert [(m["to"], m["from"]) for m in twilio_standin.sent] == [(A, SALES)]
    row = store.get_batch(to_support)
    assert row["state"] == "held"
    assert row["last_error"] == (f"our number {SUPPORT} paused (smsbatch release --number {SUPPORT} to end it): "
                                 "closed overnight")
    status = invoke(["status", "--now", str(T0 + 70)], env).output
    assert f"paused numbers (not answered): {SUPPORT} (closed overnight)" in status
    paused = json.loads(invoke(["status", "--json", "--now", str(T0 + 70)], env).output)["paused_numbers"]
    assert paused == [{"number": SUPPORT, "since": T0, "reason": "closed overnight"}]
    assert "my order is broken" in invoke(["show", A], env).output  # stored and shown
    retry = invoke(["retry", to_support], env)
    assert retry.exit_code == 1 and f"our number {SUPPORT} is paused" in retry.output
    add(store, B, "hello??", T0 + 80, to=SUPPORT)  # not yet due at the release: ends held too
    result = invoke(["release", "--number", SUPPORT, "--now", str(T0 + 90)], env)
    assert result.exit_code == 0
    assert f"our number {SUPPORT} released; 3 texts came while paused, not answered" in result.output
    assert "paused numbers" not in invoke(["status", "--now", str(T0 + 95)], env).output
    add(store, A, "are you open now?", T0 + 100, to=SUPPORT)  # after the release: answered again
    clock.now = T0 + 200
    assert real_processor(real_settings, clock).run().counts["sent"] == 1
    assert (twilio_standin.sent[-1]["to"], twilio_standin.sent[-1]["from"]) == (A, SUPPORT)
    again = invoke(["release", "--number", SUPPORT], env)
    assert again.exit_code == 1 and again.output.strip() == f"Error: our number {SUPPORT} is not paused"


def test_release_number_answer_pending_gives_each_conversation_one_reply(db_path, store, settings, clock):
    env = {"SMSBATCH_DB": db_path}
    invoke(["hold", "--number", SUPPORT, "--now", str(T0)], env)
    invoke(["hold", B, "--now", str(T0)], env)  # B is on hold themselves: stays unanswered
    add(store, A, "first", T0 + 1, to=SUPPORT)
    add(store, B, "from b", T0 + 2, to=SUPPORT)
    clock.now = T0 + 60
    offline_processor(settings, clock).run()
    add(store, A, "second", T0 + 100, to=SUPPORT)
    clock.now = T0 + 200
    offline_processor(settings, clock).run()
    result = invoke(["release", "--number", SUPPORT, "--answer-pending", "--now", str(T0 + 300)], env)
    assert result.exit_code == 0 and "3 texts came while paused: requeued for one reply" in result.output
    sender = __import__("smsbatch.sms").sms.ConsoleSender(quiet=True)
    clock.now = T0 + 301
    assert offline_processor(settings, clock, sender=sender).run().counts["sent"] == 1
    assert [(to, "first" in body and "second" in body) for _, to, body in sender.sent] == [(A, True)]
    assert states(store, B) == ["held"]


def test_a_number_paused_while_the_ai_answers_wins(db_path, store, settings, clock):
    """Like a person's hold: checked again in the transaction that commits the reply for sending."""
    batch_id = add(store, A, "hi", T0, to=SUPPORT).batch_id

    class PauseMeanwhile(TextMeanwhile):
        def answer(self, messages):
            assert invoke(["hold", "--number", SUPPORT, "--now", str(T0 + 30)], {"SMSBATCH_DB": db_path}).exit_code == 0
            return "the AI's reply"

    sender = __import__("smsbatch.sms").sms.ConsoleSender(quiet=True)
    clock.now = T0 + 60
    report = offline_processor(settings, clock, responder=PauseMeanwhile(db_path, A, None, T0), sender=sender).run()
    assert report.counts["held"] == 1 and sender.sent == []
    assert store.get_batch(batch_id)["last_error"].startswith(f"our number {SUPPORT} paused before the reply was sent")


def test_a_send_found_not_to_have_gone_out_is_not_resent_from_a_paused_number(
        store, real_settings, clock, twilio_standin):
    batch_id = add(store, A, "hi", T0, to=SUPPORT).batch_id
    twilio_standin.script = [(500, 20500)]
    settings = real_settings.replace(retry_base_seconds=1)
    clock.now = T0 + 20
    assert real_processor(settings, clock).run().counts["retrying"] == 1
    assert store.get_batch(batch_id)["state"] == "sending" and twilio_standin.sent == []
    store.hold_number(SUPPORT, None, T0 + 21)
    clock.now = T0 + 30
    assert real_processor(settings, clock).run().counts["held"] == 1
    assert store.get_batch(batch_id)["state"] == "held" and twilio_standin.sent == []


def test_hold_and_release_take_a_person_or_a_number_not_both(db_path):
    env = {"SMSBATCH_DB": db_path}
    for args in (["hold"], ["hold", A, "--number", SUPPORT], ["release"], ["release", A, "--number", SUPPORT]):
        result = invoke(args, env)
        assert result.exit_code == 2 and "--number" in result.output and "Traceback" not in result.output
    assert "Pause one of our numbers" in invoke(["hold", "--help"]).output
