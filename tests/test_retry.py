"""`smsbatch retry`: several ids, --failed/--unknown --since, --dry-run, and reusing a stored reply."""

import json

import pytest

from conftest import T0, add, invoke, real_processor
from fakes import provider_env
from smsbatch.db import Store

pytestmark = pytest.mark.engines  # on SQLite and PostgreSQL (conftest.ENGINES)

A, B, C = "+15554440001", "+15554440002", "+15554440003"


def failed_batch(store, phone, at, error="AI returned HTTP 400", state="failed"):
    batch_id = add(store, phone, "hi", at).batch_id
    rows, _ = store.claim_due(at + 10, 10, 300, 10**9)
    row = next(r for r in rows if r["id"] == batch_id)
    if state == "unknown":  # only a batch being sent can end unknown
        from smsbatch.config import Settings

        assert store.begin_send(row, "the reply", at + 10, Settings()) == "sending"
    store.finish(row, state, at + 11, error)
    return batch_id


def env_for(db_path, **extra):
    return {"SMSBATCH_DB": db_path, **extra}


def test_retry_several_ids_requeues_each_and_reports_refusals(db_path, store):
    first, second = failed_batch(store, A, T0), failed_batch(store, B, T0)
    result = invoke(["retry", first, second, "nope", "--now", str(T0 + 100)], env_for(db_path))
    assert result.exit_code == 1
    assert f"batch {first} requeued (1 text from {A})" in result.output
    assert "requeued 2 batches" in result.output and "Error: no batch with id 'nope'" in result.output
    assert {store.get_batch(b)["state"] for b in (first, second)} == {"queued"}


def test_retry_failed_since_and_dry_run(db_path, store):
    old = failed_batch(store, A, T0)
    recent = failed_batch(store, B, T0 + 7200)
    unknown = failed_batch(store, C, T0 + 7200, "send outcome unknown", state="unknown")
    now = str(T0 + 7300)
    dry = invoke(["retry", "--failed", "--since", "1h", "--now", now, "--dry-run"], env_for(db_path))
    assert dry.exit_code == 0, dry.output
    assert f"would requeue batch {recent} (failed, 1 text from {B}): AI returned HTTP 400" in dry.output
    assert old not in dry.output and unknown not in dry.output and "would requeue 1 batch" in dry.output
    assert store.get_batch(recent)["state"] == "failed"  # a dry run changes nothing
    result = invoke(["retry", "--failed", "--unknown", "--since", "2026-01-01T00:00:00Z", "--now", now, "--json"],
                    env_for(db_path))
    data = json.loads(result.output)
    assert result.exit_code == 0 and {b["id"] for b in data["requeued"]} == {old, recent, unknown}
    assert {store.get_batch(b)["state"] for b in (old, recent, unknown)} == {"queued"}
    again = invoke(["retry", "--failed", "--since", "1h", "--now", now], env_for(db_path))
    assert again.exit_code == 0 and "requeued 0 batches" in again.output


def test_retry_usage_errors(db_path):
    for args in (["retry"], ["retry", "--failed"], ["retry", "abc", "--failed", "--since", "1h"],
                 ["retry", "abc", "--since", "1h"], ["retry", "--failed", "--since", "soon"]):
        result = invoke(args, env_for(db_path))
        assert result.exit_code == 2 and "Traceback" not in result.output, (args, result.output)


def send_fails_once(db_path, openai_standin, twilio_standin, clock):
    """A batch whose AI reply was stored and whose send failed for good (Twilio 400)."""
    store = Store(db_path)
    batch_id = add(store, A, "where is my claim", T0).batch_id
    twilio_standin.script = [(400, 21211)]
    settings = real_settings_for(db_path, openai_standin, twilio_standin)
    clock.now = T0 + 20
    assert real_processor(settings, clock).run().counts["failed"] == 1
    assert len(openai_standin.calls) == 1 and twilio_standin.sent == []
    return store, settings, batch_id


def real_settings_for(db_path, openai_standin, twilio_standin):
    from smsbatch.config import Settings

    return Settings.from_env(provider_env(openai_standin, twilio_standin, SMSBATCH_DB=db_path,
                                          SMSBATCH_AI_CLIENT_RETRIES=0))


def test_retry_of_a_failed_send_reuses_the_stored_reply(db_path, openai_standin, twilio_standin, clock):
    store, settings, batch_id = send_fails_once(db_path, openai_standin, twilio_standin, clock)
    result = invoke(["retry", batch_id, "--now", str(T0 + 30)], env_for(db_path))
    assert "reusing its stored reply" in result.output
    clock.now = T0 + 31
    assert real_processor(settings, clock).run().counts["sent"] == 1
    assert len(openai_standin.requests) == 1  # no second AI call
    assert twilio_standin.bodies_to(A) == ["AI reply to: where is my claim"]
    assert store.get_batch(batch_id)["state"] == "sent"
    # the retry extends the batch's history: why it failed is still there
    history = [(r["to_state"], r["reason"]) for r in store.conn.execute(
        "SELECT to_state, reason FROM batch_events WHERE batch_id = ? ORDER BY id", (batch_id,))]
    failed_at = next(i for i, (state, why) in enumerate(history)
                     if state == "failed" and why.startswith("Twilio error 21211"))
    assert history[failed_at + 1] == ("queued", "requeued by an operator (smsbatch retry)")
    assert ("sending", "sending the stored reply again (no new AI call)") in history[failed_at:]
    assert history[-1][0] == "sent"


def test_retry_fresh_asks_the_ai_again(db_path, openai_standin, twilio_standin, clock):
    store, settings, batch_id = send_fails_once(db_path, openai_standin, twilio_standin, clock)
    result = invoke(["retry", batch_id, "--fresh", "--now", str(T0 + 30)], env_for(db_path))
    assert result.exit_code == 0 and "reusing" not in result.output
    clock.now = T0 + 31
    assert real_processor(settings, clock).run().counts["sent"] == 1
    assert len(openai_standin.requests) == 2 and len(twilio_standin.bodies_to(A)) == 1


def test_retry_refuses_a_batch_of_a_person_on_hold(db_path, store):
    batch_id = failed_batch(store, A, T0)
    store.hold(A, None, T0 + 20)
    result = invoke(["retry", batch_id], env_for(db_path))
    assert result.exit_code == 1 and f"{A} is on hold; `smsbatch release {A}` first" in result.output
    listed = invoke(["retry", "--failed", "--since", "1d", "--now", str(T0 + 30), "--dry-run"], env_for(db_path))
    assert batch_id not in listed.output and store.get_batch(batch_id)["state"] == "failed"


def retried_unknown(db_path, store, twilio_standin, already_sent):
    """An *unknown* batch (its reply "the reply" may have gone out), retried by an operator."""
    batch_id = failed_batch(store, A, T0, "send outcome unknown", state="unknown")
    earlier = twilio_standin.record({"To": A, "From": "+15550000000", "Body": "the reply"}, at=T0 + 10)
    if not already_sent:
        twilio_standin.sent.clear()
    result = invoke(["retry", "--unknown", "--since", "1d", "--now", str(T0 + 100)], env_for(db_path))
    assert result.exit_code == 0 and f"batch {batch_id} requeued (1 text from {A}, reusing its stored reply " \
        "unless Twilio's log shows it went out)" in result.output
    return batch_id, earlier["sid"]


def reasons(store, batch_id):
    return [r[0] for r in store.conn.execute("SELECT reason FROM batch_events WHERE batch_id = ? ORDER BY id",
                                             (batch_id,))]


def test_retry_of_an_unknown_batch_whose_reply_went_out_sends_nothing(db_path, store, openai_standin,
                                                                        twilio_standin, clock):
    batch_id, sid = retried_unknown(db_path, store, twilio_standin, already_sent=True)
    clock.now = T0 + 101
    counts = real_processor(real_settings_for(db_path, openai_standin, twilio_standin), clock).run().counts
    assert counts["sent"] == 1 and twilio_standin.bodies_to(A) == ["the reply"]  # no second SMS
    batch = store.get_batch(batch_id)
    assert batch["state"] == "sent" and batch["provider_sid"] == sid
    assert reasons(store, batch_id)[-1] == f"sent ({sid}): the earlier send was found in Twilio's message log"
    assert [r[0] for r in store.conn.execute("SELECT sid FROM outbound WHERE batch_id = ?", (batch_id,))] == [sid]


def test_retry_of_an_unknown_batch_whose_reply_never_went_out_sends_it(db_path, store, openai_standin,
                                                                       twilio_standin, clock):
    batch_id, _ = retried_unknown(db_path, store, twilio_standin, already_sent=False)
    clock.now = T0 + 101
    real_processor(real_settings_for(db_path, openai_standin, twilio_standin), clock).run()
    assert twilio_standin.bodies_to(A) == ["the reply"] and store.get_batch(batch_id)["state"] == "sent"
    assert openai_standin.requests == []  # the stored reply, not a new one


def test_retry_of_an_unknown_batch_sends_when_twilio_cannot_be_asked(db_path, store, openai_standin,
                                                                     twilio_standin, clock):
    batch_id, _ = retried_unknown(db_path, store, twilio_standin, already_sent=False)
    twilio_standin.list_script = [(500, 20500)]
    clock.now = T0 + 101
    real_processor(real_settings_for(db_path, openai_standin, twilio_standin), clock).run()
    assert twilio_standin.bodies_to(A) == ["the reply"] and store.get_batch(batch_id)["state"] == "sent"
    assert any(r.startswith("could not check whether the earlier send went out") and
               r.endswith("sending, as the operator retried it") for r in reasons(store, batch_id))


def test_an_id_given_twice_is_requeued_once(db_path, store):
    batch_id = failed_batch(store, A, T0)
    dry = invoke(["retry", batch_id, batch_id, "--dry-run", "--now", str(T0 + 100)], env_for(db_path))
    assert dry.exit_code == 0 and dry.output.count(f"would requeue batch {batch_id}") == 1, dry.output
    result = invoke(["retry", batch_id, batch_id, "--now", str(T0 + 100)], env_for(db_path))
    assert result.exit_code == 0 and result.output.strip() == f"batch {batch_id} requeued (1 text from {A})"
    assert store.get_batch(batch_id)["state"] == "queued"


def test_a_fresh_reply_is_refused_for_a_batch_whose_reply_may_have_gone_out(db_path, store):
    batch_id = failed_batch(store, A, T0, "send outcome unknown", state="unknown")
    result = invoke(["retry", batch_id, "--fresh", "--now", str(T0 + 100)], env_for(db_path))
    assert result.exit_code == 1 and "may already have been sent; retry it without --fresh" in result.output
    assert store.get_batch(batch_id)["state"] == "unknown" and store.get_batch(batch_id)["response_text"]
