"""Texts the webhook never got: found in Twilio's message log and answered once."""

import gc
import json
import logging
import os
import shutil

import pytest

from conftest import T0, add, invoke
from fakes import FakeTwilio, provider_env
from smsbatch.backfill import backfill_if_due
from smsbatch.config import Settings
from smsbatch.db import State, Store
from smsbatch.sms import TwilioSender
from smsbatch.twilio_log import TwilioLog

pytestmark = pytest.mark.engines  # on SQLite and PostgreSQL (conftest.ENGINES)

US, PERSON, OTHER = "+15550000000", "+15557770001", "+15557770002"


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
    # PageSize 1000: two pages of texts to US, the second after next_page_uri (then one of our replies from US)
    assert [q.get("To") for q in twilio_standin.listed] == [US, US, None]


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


# -- issue 16: no second reply after a restore or on a copy; every listed number is read ----

@pytest.mark.sqlite_only  # a file copied back or beside: PostgreSQL restores with pg_restore
def test_a_restored_backup_does_not_answer_a_text_twice(env, db_path, tmp_path, twilio_standin):
    """The README's restore: backup taken, then a text answered, then the backup copied back
    (its -wal and -shm deleted). The next run finds the text in Twilio's log, and our reply
    after it: the text is stored as answered, and no second SMS goes out."""
    twilio_standin.clock = lambda: T0  # our reply is created at the run's `now`
    process(env, T0 - 100)  # the backfill has looked up to T0 - 100
    backup = str(tmp_path / "backup.db")
    assert invoke(["backup", backup], env=env).exit_code == 0
    sid = twilio_standin.deliver_inbound(PERSON, US, "is my order ready?", T0 - 50)
    webhook = Store(db_path)
    add(webhook, PERSON, "is my order ready?", T0 - 50, sid=sid)  # the webhook stored it
    webhook.close()
    assert process(env, T0)["sent"] == 1
    [reply] = twilio_standin.sent
    gc.collect()  # everything stopped: no connection of the in-process runs left open
    for suffix in ("-wal", "-shm"):
        if os.path.exists(db_path + suffix):
            os.remove(db_path + suffix)
    shutil.copyfile(backup, db_path)
    again = process(env, T0 + 61)
    assert again["backfilled"] == 1 and again["sent"] == 0
    assert len(twilio_standin.bodies_to(PERSON)) == 1  # no second SMS
    restored = Store(db_path)
    batch_id = restored.conn.execute("SELECT batch_id FROM messages WHERE sid = ?", (sid,)).fetchone()[0]
    batch = restored.get_batch(batch_id)
    assert batch["state"] == State.SKIPPED and reply["sid"] in batch["last_error"]
    assert "already answered" in batch["last_error"]
    logged = restored.conn.execute("SELECT batch_id, body FROM outbound WHERE sid = ?", (reply["sid"],)).fetchone()
    assert tuple(logged) == (batch_id, reply["body"])  # the reply is history again for the next answer
    later = twilio_standin.deliver_inbound(PERSON, US, "thanks! one more thing", T0 + 90)
    assert process(env, T0 + 130)["sent"] == 1 and restored.has_message(later)  # a new text is answered
    assert len(twilio_standin.bodies_to(PERSON)) == 2


def test_a_text_written_after_our_reply_is_still_answered(env, db_path, twilio_standin):
    twilio_standin.clock = lambda: T0 - 40  # a reply to an earlier text, before this one
    twilio_standin.record({"To": PERSON, "From": US, "Body": "earlier answer"})
    twilio_standin.deliver_inbound(PERSON, US, "another question", T0 - 30)
    twilio_standin.clock = lambda: T0
    assert process(env, T0)["sent"] == 1 and len(twilio_standin.bodies_to(PERSON)) == 2


@pytest.mark.sqlite_only  # a file copied back or beside: PostgreSQL restores with pg_restore
def test_process_on_a_copy_of_the_database_says_so(env, db_path, tmp_path, caplog):
    caplog.set_level(logging.WARNING, "smsbatch")
    copy = str(tmp_path / "copy.db")
    assert invoke(["backup", copy], env=env).exit_code == 0
    assert invoke(["--db", copy, "process", "--now", repr(T0)], env=env).exit_code == 0
    [line] = [r.getMessage() for r in caplog.records if "deployment's database" in r.getMessage()]
    assert copy in line and db_path in line
    caplog.clear()
    assert invoke(["--db", db_path, "process", "--now", repr(T0)], env=env).exit_code == 0
    assert invoke(["--db", copy, "process", "--now", repr(T0), "--sms", "console"], env=env).exit_code == 0
    assert not [r for r in caplog.records if "deployment's database" in r.getMessage()]


def test_the_backfill_reads_every_listed_number_and_the_services(env, store, twilio_standin):
    """Nobody has texted the support number yet (it is in no table), nor the service's number."""
    support, service_number, service = "+15550000002", "+15550000003", "MG" + "1" * 32
    twilio_standin.services[service] = [service_number]
    first = twilio_standin.deliver_inbound(PERSON, support, "support please", T0 - 30)
    second = twilio_standin.deliver_inbound(OTHER, service_number, "hello service", T0 - 30)
    listed = dict(env, SMSBATCH_NUMBERS=f"{US},{support}", TWILIO_MESSAGING_SERVICE_SID=service)
    report = process(listed, T0)
    assert report["backfilled"] == 2 and store.has_message(first) and store.has_message(second)
    asked = {q.get("To") for q in twilio_standin.listed if q.get("To")}
    assert asked == {US, support, service_number}
    assert [m["from"] for m in twilio_standin.sent if m["to"] == PERSON] == [support]


def test_a_picture_whose_media_is_gone_is_stored_without_it(env, store, twilio_standin, caplog):
    caplog.set_level(logging.WARNING, "smsbatch")
    sid = twilio_standin.deliver_inbound(PERSON, US, "look", T0 - 30, media=["image/jpeg"])
    twilio_standin.media_gone.add(sid)
    assert process(env, T0)["backfilled"] == 1
    row = store.conn.execute("SELECT body, media FROM messages WHERE sid = ?", (sid,)).fetchone()
    assert tuple(row) == ("look", None)
    assert any(sid in r.getMessage() and "stored without them" in r.getMessage() for r in caplog.records)


def test_a_lost_text_is_answered_even_after_a_reply_this_database_sent(env, store, twilio_standin):
    """The webhook lost the first text; the second was stored and answered before the next
    backfill. That reply never saw the first text: the first is answered, not skipped."""
    twilio_standin.clock = lambda: T0
    process(env, T0 - 100)
    lost = twilio_standin.deliver_inbound(PERSON, US, "first question", T0 - 90)
    seen = twilio_standin.deliver_inbound(PERSON, US, "second question", T0 - 80)
    add(store, PERSON, "second question", T0 - 80, sid=seen)
    twilio_standin.clock = lambda: T0 - 60
    report = process(env, T0 - 60)  # within the minute: no backfill turn yet
    assert report["sent"] == 1 and report["backfilled"] == 0
    assert process(env, T0 + 61)["backfilled"] == 1 and store.has_message(lost)
    assert len(twilio_standin.bodies_to(PERSON)) == 2
