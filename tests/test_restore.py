"""Issue 16: a batch pending inside a backup (or a copy of the database) and answered
elsewhere is not answered a second time: before a stale batch is answered, Twilio's log is
asked for a reply this database has no record of (smsbatch.elsewhere)."""

import gc
import json
import logging
import os
import shutil

import pytest

from conftest import T0, add, invoke
from fakes import provider_env
from smsbatch.batching import STALE_AFTER_SECONDS, is_stale
from smsbatch.db import State, Store

pytestmark = pytest.mark.engines  # on SQLite and PostgreSQL (conftest.ENGINES)

US, PERSON = "+15550000000", "+15557770001"


@pytest.fixture
def env(db_path, openai_standin, twilio_standin):
    return provider_env(openai_standin, twilio_standin, SMSBATCH_DB=db_path, SMSBATCH_AI_TIMEOUT_SECONDS=2,
                        SMSBATCH_SMS_TIMEOUT_SECONDS=2, SMSBATCH_RETRY_BASE_SECONDS=5)


def process(env, now):
    result = invoke(["process", "--now", repr(now), "--json"], env=env)
    assert result.exit_code in (0, 3), result.output
    return json.loads(result.output)


def text(db_path, twilio_standin, body, at):
    """A text as it arrives: in Twilio's log, and stored by the webhook. Returns its batch id."""
    sid = twilio_standin.deliver_inbound(PERSON, US, body, at)
    webhook = Store(db_path)
    try:
        return add(webhook, PERSON, body, at, sid=sid).batch_id
    finally:
        webhook.close()


def log_checks(twilio_standin):
    """The list requests asking Twilio's log for our replies to PERSON (smsbatch.elsewhere)."""
    return [q for q in twilio_standin.listed if q.get("To") == PERSON and q.get("From") == US
            and q.get("PageSize") == "1000"]


def batch_of(db_path, batch_id):
    store = Store(db_path)
    try:
        return store.get_batch(batch_id)
    finally:
        store.close()


def test_staleness_is_measured_from_when_the_batch_became_due():
    batch = {"last_at": T0, "quiet_seconds": 30.0}
    assert not is_stale(batch, T0 + 30 + STALE_AFTER_SECONDS)
    assert is_stale(batch, T0 + 30 + STALE_AFTER_SECONDS + 1)
    assert is_stale({"last_at": T0, "quiet_seconds": None}, T0 + STALE_AFTER_SECONDS + 1)


@pytest.mark.sqlite_only  # a file copied back: PostgreSQL restores with pg_restore
def test_a_batch_pending_in_the_backup_is_not_answered_again_after_the_restore(env, db_path, tmp_path,
                                                                                twilio_standin, caplog):
    """The restore of docs/operations.md: texts stored, a backup taken while their batch waits,
    the batch answered, the backup copied back (its -wal and -shm removed). The next run finds
    our reply in Twilio's log: no second SMS, the batch ends skipped naming that reply."""
    caplog.set_level(logging.WARNING, "smsbatch")
    env = dict(env, SMSBATCH_BACKFILL="0")  # the backfill has nothing to do with it: the texts are stored
    batch_id = text(db_path, twilio_standin, "is my order ready?", T0 - 50)
    assert text(db_path, twilio_standin, "order 1234", T0 - 45) == batch_id
    backup = str(tmp_path / "backup.db")
    assert invoke(["backup", backup], env=env).exit_code == 0  # the batch is pending in it
    twilio_standin.clock = lambda: T0  # our reply is created at the run's `now`
    assert process(env, T0)["sent"] == 1
    [reply] = twilio_standin.sent
    assert log_checks(twilio_standin) == []  # answered on time: Twilio's log not asked
    gc.collect()  # everything stopped: no connection of the in-process runs left open
    for suffix in ("-wal", "-shm"):
        if os.path.exists(db_path + suffix):
            os.remove(db_path + suffix)
    shutil.copyfile(backup, db_path)
    assert batch_of(db_path, batch_id)["state"] in (State.OPEN, State.QUEUED)  # pending again
    caplog.clear()
    again = process(env, T0 + 600)  # the restore took a few minutes
    assert again["sent"] == 0 and again["skipped"] == 1
    assert twilio_standin.bodies_to(PERSON) == [reply["body"]]  # no second SMS
    batch = batch_of(db_path, batch_id)
    assert batch["state"] == State.SKIPPED and batch["response_text"] is None
    assert batch["last_error"].startswith(f"answered already: Twilio's log shows reply {reply['sid']} at ")
    assert "(a restored or copied database?)" in batch["last_error"]
    restored = Store(db_path)
    logged = restored.conn.execute("SELECT batch_id, body FROM outbound WHERE sid = ?", (reply["sid"],)).fetchone()
    restored.close()
    assert tuple(logged) == (batch_id, reply["body"])  # history for the next answer
    lines = [r.getMessage() for r in caplog.records if "answered already" in r.getMessage()]
    assert len(lines) == 1 and batch_id in lines[0] and reply["sid"] in lines[0]
    # The person writes again: answered as usual, with our reply in the prompt's history.
    twilio_standin.clock = lambda: T0 + 700
    text(db_path, twilio_standin, "thanks! when does it ship?", T0 + 690)
    assert process(env, T0 + 700)["sent"] == 1 and len(twilio_standin.bodies_to(PERSON)) == 2


def test_a_stale_batch_with_no_reply_in_twilios_log_is_answered(env, db_path, twilio_standin):
    env = dict(env, SMSBATCH_BACKFILL="0")
    twilio_standin.clock = lambda: T0 - 900  # a reply to an earlier text, before this batch
    twilio_standin.record({"To": PERSON, "From": US, "Body": "earlier answer"})
    twilio_standin.clock = lambda: T0
    batch_id = text(db_path, twilio_standin, "still there?", T0 - 600)
    assert process(env, T0)["sent"] == 1
    assert len(log_checks(twilio_standin)) == 1  # asked once, found nothing after the text
    assert batch_of(db_path, batch_id)["state"] == State.SENT
    assert len(twilio_standin.bodies_to(PERSON)) == 2


def test_a_fresh_batch_costs_no_twilio_request(env, db_path, twilio_standin):
    env = dict(env, SMSBATCH_BACKFILL="0")
    text(db_path, twilio_standin, "hi", T0 - 20)
    assert process(env, T0)["sent"] == 1
    assert twilio_standin.listed == []


def test_when_twilios_log_cannot_be_asked_the_batch_backs_off(env, db_path, twilio_standin):
    env = dict(env, SMSBATCH_BACKFILL="0")
    twilio_standin.list_script = [(503, 20503)]
    batch_id = text(db_path, twilio_standin, "still there?", T0 - 600)
    report = process(env, T0)
    assert report["retrying"] == 1 and report["sent"] == 0 and twilio_standin.sent == []  # not sent blind
    batch = batch_of(db_path, batch_id)
    assert batch["state"] == State.QUEUED and "earlier reply" in batch["last_error"]
    assert process(env, T0 + 600)["sent"] == 1  # Twilio answers again: checked, then answered


def test_an_operator_retry_finds_a_reply_sent_by_hand_meanwhile(env, db_path, twilio_standin, openai_standin):
    """A batch failed (the AI refused); an operator answered the person in Twilio's console,
    then retried the batch anyway: the hand-sent reply is found, no second SMS."""
    env = dict(env, SMSBATCH_BACKFILL="0")
    batch_id = text(db_path, twilio_standin, "refund please", T0 - 30)
    openai_standin.script = [400]  # a refusal: the batch fails at once
    assert process(env, T0)["failed"] == 1
    twilio_standin.clock = lambda: T0 + 300
    by_hand = twilio_standin.record({"To": PERSON, "From": US, "Body": "Refund done. -- Ann"})
    assert invoke(["retry", batch_id, "--now", repr(T0 + 400)], env=env).exit_code == 0
    report = process(env, T0 + 400)
    assert report["skipped"] == 1 and report["sent"] == 0
    assert twilio_standin.bodies_to(PERSON) == ["Refund done. -- Ann"]
    assert by_hand["sid"] in batch_of(db_path, batch_id)["last_error"]
    # Retried again: that reply is now on record, so the batch is answered (the operator's call).
    assert invoke(["retry", batch_id, "--now", repr(T0 + 500)], env=env).exit_code == 0
    assert process(env, T0 + 500)["sent"] == 1 and len(twilio_standin.bodies_to(PERSON)) == 2


def test_a_retried_stored_reply_is_looked_up_once(env, db_path, twilio_standin):
    """A batch whose stored reply failed to send, retried: the lookup of its earlier send
    (Processor._earlier_send) is the only look into Twilio's log."""
    env = dict(env, SMSBATCH_BACKFILL="0")
    batch_id = text(db_path, twilio_standin, "what time do you open?", T0 - 30)
    twilio_standin.script = [(400, 21211)]  # an invalid number: failed, the AI's reply stored
    assert process(env, T0)["failed"] == 1
    assert invoke(["retry", batch_id, "--now", repr(T0 + 600)], env=env).exit_code == 0
    assert process(env, T0 + 600)["sent"] == 1
    assert len(twilio_standin.listed) == 1 and log_checks(twilio_standin) == []


def test_the_store_ends_an_answered_batch_and_logs_its_reply_at_once(store):
    """Store.finish_answered: the move and the reply in one transaction, and nothing at all
    from a processor that lost its claim."""
    batch_id = add(store, PERSON, "hello?", T0 - 600).batch_id
    [batch], _ = store.claim_due(T0, 10, 30.0, 3600.0)
    reply = {"sid": "SM" + "a" * 32, "at": T0 - 500, "body": "Hi! -- Ann", "status": "delivered"}
    assert not store.finish_answered(dict(batch, claim="not-ours"), reply, T0, "answered already: x")
    assert store.reply_sids(PERSON) == set() and store.get_batch(batch_id)["state"] == State.PROCESSING
    assert store.finish_answered(batch, reply, T0, "answered already: x")
    assert store.get_batch(batch_id)["state"] == State.SKIPPED and store.reply_sids(PERSON) == {reply["sid"]}
    history = store.history(PERSON, US, "another", T0, 10)
    assert [(h[1], h[2]) for h in history] == [("user", "hello?"), ("assistant", "Hi! -- Ann")]
