"""Several business numbers: each person-and-number pair is its own conversation."""

import pytest

from conftest import T0, add, real_processor
from smsbatch.config import Settings
from smsbatch.db import State

pytestmark = pytest.mark.engines  # on SQLite and PostgreSQL (conftest.ENGINES)

SALES, SUPPORT, PERSON = "+15550000001", "+15550000002", "+15557770009"


def sent_from(twilio, phone):
    return [(m["from"], m["messaging_service_sid"], m["body"]) for m in twilio.sent if m["to"] == phone]


def test_texts_to_two_numbers_are_two_conversations_answered_from_each(real_settings, store, clock,
                                                                         twilio_standin, openai_standin):
    add(store, PERSON, "price of the blue one?", T0, to=SALES)
    add(store, PERSON, "my order is broken", T0 + 1, to=SUPPORT)
    clock.now = T0 + 60
    report = real_processor(real_settings, clock).run()
    assert report.counts["sent"] == 2
    replies = sorted(sent_from(twilio_standin, PERSON))
    assert [(frm, body.removeprefix("AI reply to: ")) for frm, _, body in replies] == [
        (SALES, "price of the blue one?"), (SUPPORT, "my order is broken")]
    # A later text to sales sees only the sales conversation as its history.
    add(store, PERSON, "and in red?", T0 + 100, to=SALES)
    clock.now = T0 + 200
    real_processor(real_settings, clock).run()
    history = [m["content"] for m in openai_standin.calls[-1][2:-1]]  # [1]: the reply budget
    assert history == ["price of the blue one?", "AI reply to: price of the blue one?"]


def test_stop_to_one_number_leaves_the_other_conversation_answered(real_settings, store, clock, twilio_standin):
    add(store, PERSON, "STOP", T0, to=SALES)
    add(store, PERSON, "hello sales", T0 + 1, to=SALES)
    add(store, PERSON, "hello support", T0 + 2, to=SUPPORT)
    clock.now = T0 + 60
    real_processor(real_settings, clock).run()
    assert [frm for frm, _, _ in sent_from(twilio_standin, PERSON)] == [SUPPORT]


def test_with_a_messaging_service_stop_covers_the_service_and_replies_name_the_number(
        real_settings, store, clock, twilio_standin):
    settings = real_settings.replace(twilio_messaging_service_sid="MG" + "1" * 32)
    store.add_message("SMstop", PERSON, SALES, "STOP", T0, _rules(), scope=settings.twilio_messaging_service_sid)
    add(store, PERSON, "hello support", T0 + 1, to=SUPPORT)
    add(store, "+15557770010", "hi", T0 + 2, to=SUPPORT)
    clock.now = T0 + 60
    real_processor(settings, clock).run()
    assert sent_from(twilio_standin, PERSON) == []
    [(frm, service, _)] = sent_from(twilio_standin, "+15557770010")
    assert (frm, service) == (SUPPORT, "MG" + "1" * 32)


def test_reconcile_does_not_take_another_numbers_reply_for_ours(real_settings, store, clock, twilio_standin):
    batch_id = add(store, PERSON, "hours?", T0, to=SUPPORT).batch_id
    clock.now = T0 + 60
    processor = real_processor(real_settings, clock)
    [row], _ = processor.claim(1)
    assert store.begin_send(row, "9 to 5", clock.now, real_settings) == State.SENDING
    # The same words went out earlier from the sales number: not this batch's reply.
    twilio_standin.record({"To": PERSON, "From": SALES, "Body": "9 to 5"}, at=clock.now)
    clock.now += real_settings.lease + 1
    processor.run()
    assert sent_from(twilio_standin, PERSON)[-1][0] == SUPPORT
    assert store.get_batch(batch_id)["state"] == State.SENT


def test_each_number_can_have_its_own_system_prompt(tmp_path, real_settings, store, clock, openai_standin):
    (tmp_path / f"{SALES}.txt").write_text("You sell bicycles.\n")
    settings = real_settings.replace(prompts_dir=str(tmp_path))
    add(store, PERSON, "hi sales", T0, to=SALES)
    add(store, "+15557770011", "hi support", T0, to=SUPPORT)
    clock.now = T0 + 60
    real_processor(settings, clock).run()
    prompts = {call[-1]["content"]: call[0]["content"] for call in openai_standin.calls}
    assert prompts == {"hi sales": "You sell bicycles.", "hi support": Settings().system_prompt}


def _rules():
    from smsbatch.batching import Rules

    return Rules()


def test_an_unreadable_prompt_file_is_retried_with_backoff_and_named(tmp_path, real_settings, store, clock,
                                                                     openai_standin, caplog):
    """A configuration problem, not a bug: the attempt backs off (no traceback, not left
    processing for a lease), and the error and the log line name the file."""
    import logging

    folder = tmp_path / "prompts"
    folder.mkdir()
    bad = folder / f"{SALES}.txt"
    bad.write_bytes(b"\xff\xfe bad")
    settings = real_settings.replace(prompts_dir=str(folder))
    batch_id = add(store, PERSON, "hi sales", T0, to=SALES).batch_id
    clock.now = T0 + 60
    with caplog.at_level(logging.WARNING, logger="smsbatch.processor"):
        assert real_processor(settings, clock).run().counts["retrying"] == 1
    batch = store.get_batch(batch_id)
    assert batch["state"] == State.QUEUED and batch["retry_at"] > clock.now and batch["claim"] is None
    assert batch["last_error"].startswith(f"cannot read the system prompt {bad}: 'utf-8' codec")
    assert f"batch {batch_id}: cannot read the system prompt {bad}" in caplog.text
    assert "Traceback" not in caplog.text and openai_standin.requests == []
    bad.write_text("You sell bicycles.")  # fixed: the next attempt reads it again
    clock.now = batch["retry_at"]
    assert real_processor(settings, clock).run().counts["sent"] == 1
    assert openai_standin.calls[-1][0]["content"] == "You sell bicycles."


def test_our_numbers_are_a_setting_checked_at_start():
    from smsbatch.config import Settings
    from smsbatch.errors import ConfigError

    env = {"SMSBATCH_NUMBERS": " +15550000001, +15550000002,+15550000001", "TWILIO_FROM_NUMBER": "+15550000009"}
    assert Settings.from_env(env).listed_numbers == ("+15550000001", "+15550000002")
    assert Settings.from_env({"TWILIO_FROM_NUMBER": "+15550000009"}).listed_numbers == ("+15550000009",)
    with pytest.raises(ConfigError, match="E.164"):
        Settings.from_env({"SMSBATCH_NUMBERS": "5550000001"})
