"""Texts the webhook never got: found in Twilio's message log and answered once."""

import json

import pytest

from conftest import T0, add, invoke
from fakes import FakeTwilio, provider_env
from smsbatch.backfill import backfill_if_due
from smsbatch.config import Settings
from smsbatch.db import State, Store
from smsbatch.sms import TwilioLog, TwilioSender

pytestmark = pytest.mark.engines  # on SQLite and PostgreSQL (conftest.ENGINES)

US, PERSON = "+15550000000", "+15557770001"


@pytest.fixture
def env(db_path, openai_standin, twilio_standin):
    return provider_env(openai_standin, twilio_standin, SMSBATCH_DB=db_path, SMSBATCH_AI_TIMEOUT_SECONDS=2,
                        SMSBATCH_SMS_TIMEOUT_SECONDS=2)


def process(env, now):
    result = invoke(["process", "--now", repr(now), "--json"], env=env)
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_a_text_that_reached_only_twilios_log_is_answered_once(env, store, twilio_standin):
    sid = twilio_standin.deliver_inbound(PERSON, US, "is my order ready?", T0 - 30)
    report = process(env, T0)
    assert report["backfilled"] == 1 and report["sent"] == 1
    assert store.has_message(sid)
    assert [(m["from"], m["body"].startswith("AI reply to: is my order ready?"))
            for m in twilio_standin.sent if m["to"] == PERSON] == [(US, True)]
    # The next minute looks again (overlap) and finds it already stored: no second reply.
    again = process(env, T0 + 61)
    assert again["backfilled"] == 0 and len(twilio_standin.bodies_to(PERSON)) == 1


def test_a_text_in_both_the_log_and_the_webhook_is_stored_once(env, store, twilio_standin):
    sid = twilio_standin.deliver_inbound(PERSON, US, "hello", T0 - 20)
    add(store, PERSON, "hello", T0 - 20, sid=sid)  # the webhook got it too
    report = process(env, T0)
    assert report["backfilled"] == 0 and report["sent"] == 1
    assert store.conn.execute("SELECT count(*) FROM messages").fetchone()[0] == 1


def test_a_page_boundary_does_not_drop_a_text(db_path, store, twilio_standin, openai_standin):
    phones = [f"+1555888{i:04d}" for i in range(40)]
    sids = {twilio_standin.deliver_inbound(phones[i % 40], US, f"text {i}", T0 - 600 + i * 0.25)
            for i in range(1003)}
    settings = Settings.from_env(provider_env(openai_standin, twilio_standin, SMSBATCH_DB=db_path))
    report = backfill_if_due(store, TwilioLog(TwilioSender(settings)), settings, T0)
    stored = {r[0] for r in store.conn.execute("SELECT sid FROM messages")}
    assert stored == sids and report.stored == 1003
    assert twilio_standin.pages_served == 2  # PageSize 1000: two pages, the second after next_page_uri


def test_the_backfill_runs_once_a_minute_across_processors(db_path, store, twilio_standin, openai_standin):
    settings = Settings.from_env(provider_env(openai_standin, twilio_standin, SMSBATCH_DB=db_path))
    log = TwilioLog(TwilioSender(settings))
    assert backfill_if_due(store, log, settings, T0) is not None
    assert backfill_if_due(Store(db_path), log, settings, T0 + 30) is None  # another processor's turn
    twilio_standin.deliver_inbound(PERSON, US, "later", T0 + 50)
    report = backfill_if_due(store, log, settings, T0 + 61)
    assert report.since == T0 - 300 and report.stored == 1  # from the last check, with the overlap


def test_a_text_found_too_late_is_stored_but_not_answered(env, store, twilio_standin):
    old = twilio_standin.deliver_inbound(PERSON, US, "anyone there?", T0 - 7200)
    dry = invoke(["backfill", "--since", repr(T0 - 86400), "--until", repr(T0), "--dry-run"], env=env)
    assert dry.exit_code == 0 and "would store 1" in dry.output and old in dry.output
    assert not store.has_message(old)
    result = invoke(["backfill", "--since", repr(T0 - 86400), "--now", repr(T0), "--json"], env=env)
    assert json.loads(result.output)["expired"] == 1
    batch_id = store.conn.execute("SELECT batch_id FROM messages WHERE sid = ?", (old,)).fetchone()[0]
    assert store.get_batch(batch_id)["state"] == State.EXPIRED
    process(env, T0)
    assert twilio_standin.bodies_to(PERSON) == []


def test_backfill_can_be_turned_off(env, twilio_standin):
    twilio_standin.deliver_inbound(PERSON, US, "hi", T0 - 30)
    report = process(dict(env, SMSBATCH_BACKFILL="0"), T0)
    assert report["backfilled"] == 0 and twilio_standin.pages_served == 0


def test_a_picture_found_in_the_log_keeps_its_media(env, store, twilio_standin):
    twilio_standin.deliver_inbound(PERSON, US, "", T0 - 30, media=["image/jpeg"])
    process(env, T0)
    [media] = store.conn.execute("SELECT media FROM messages").fetchone()
    [url] = json.loads(media)
    assert url.startswith(twilio_standin.url + f"/2010-04-01/Accounts/{FakeTwilio.ACCOUNT}/Messages/")
    assert url.endswith("/Media/ME" + "0" * 32)
