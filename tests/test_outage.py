"""Outages: the AI or Twilio stand-in fails for a while, then recovers. Processing runs
tick by tick with an injected clock; each batch is answered once, and the backoff shows
in its attempt count and due time.

The real openai and twilio clients talk to the stand-ins. Ticks start near real time
because reconciling a send compares with the date_created the Twilio stand-in stamps.
"""

import os
import socket
import subprocess
import sys
import time

import pytest

from conftest import Clock, add, real_processor
from fakes import provider_env
from smsbatch.db import Store

PHONES = [f"+1555440{i:04d}" for i in range(4)]
BASE = 30.0  # SMSBATCH_RETRY_BASE_SECONDS


@pytest.fixture
def fast(real_settings):
    """No client-side retries (one scripted failure is one attempt), short timeouts."""
    return real_settings.replace(ai_client_retries=0, ai_timeout_seconds=0.5, sms_timeout_seconds=0.5,
                                 retry_base_seconds=BASE, max_attempts=8)


def closed_port():
    """A loopback port nobody listens on: connecting to it is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def seed(store, now, ago=60):
    return {phone: [add(store, phone, f"{phone} asks {n}", now - ago + n).batch_id for n in range(2)][0]
            for phone in PHONES}


def tick(settings, store, batches, at):
    """One processing run at time `at`; returns the report and each batch's row after it."""
    clock = Clock(at)
    report = real_processor(settings, clock).run(concurrency=len(PHONES))
    return report, [store.get_batch(b) for b in batches.values()]


def assert_backoff(rows, at, attempts):
    """Due again after full-jitter exponential backoff: [c/2, c] with c = base * 2^(attempts-1)."""
    ceiling = BASE * 2 ** (attempts - 1)
    for row in rows:
        assert row["attempts"] == attempts
        assert ceiling / 2 <= row["retry_at"] - at <= ceiling, (row["retry_at"] - at, ceiling)


def assert_answered_once(rows, twilio):
    for row in rows:
        assert row["state"] == "sent", (row["state"], row["last_error"])
        wire = [m for m in twilio.sent if m["to"] == row["phone"]]
        assert [(m["sid"], m["body"]) for m in wire] == [(row["provider_sid"], row["response_text"])]
    assert len(twilio.sent) == len(rows)


def test_ai_outage_500_then_429_then_timeouts_then_recovery(fast, db_path, openai_standin, twilio_standin):
    store = Store(db_path)
    now = round(time.time())
    batches = seed(store, now)
    n = len(PHONES)
    openai_standin.script = [500] * n + [429] * n + [("delay", 1.5)] * n
    at = now
    for attempts, error in enumerate(["AI returned HTTP 500", "AI returned HTTP 429", "AI timed out"], 1):
        report, rows = tick(fast, store, batches, at)
        assert report.counts["retrying"] == n and twilio_standin.sent == []
        assert {r["state"] for r in rows} == {"queued"}
        assert all(error in r["last_error"] for r in rows), [r["last_error"] for r in rows]
        assert_backoff(rows, at, attempts)
        # Not a moment early: one second before the first is due, nothing is claimed.
        earliest = min(r["retry_at"] for r in rows)
        assert tick(fast, store, batches, earliest - 1)[0].claimed == 0
        at = max(r["retry_at"] for r in rows)
    report, rows = tick(fast, store, batches, at)
    assert report.counts["sent"] == n
    assert_answered_once(rows, twilio_standin)
    assert all(r["attempts"] == 4 for r in rows)
    assert len(openai_standin.requests) == 4 * n and len(openai_standin.calls) == n
    # The recovered answers covered both texts of each burst.
    assert all(f"{r['phone']} asks 0" in r["response_text"] and f"{r['phone']} asks 1" in r["response_text"]
               for r in rows)


def test_twilio_outage_every_kind_then_recovery(fast, db_path, openai_standin, twilio_standin):
    """5xx (not accepted), 20429, connection refused, a hung call, the list call down,
    and a 5xx after Twilio did accept the message: one SMS per batch in the end."""
    store = Store(db_path)
    now = round(time.time())
    # Written long enough ago that every batch is stale (batching.is_stale) from the first tick:
    # each one taken from the queue asks Twilio's log for a reply we lack before the AI is asked.
    batches = seed(store, now, ago=300)
    n = len(PHONES)
    refused = fast.replace(twilio_base_url=f"http://127.0.0.1:{closed_port()}")
    # (what the outage looks like, settings, state the batches are left in, error they record)
    stages = [
        (lambda: setattr(twilio_standin, "script", [(500, 20500)] * n), fast, "sending", "Twilio error 20500"),
        (lambda: setattr(twilio_standin, "script", [(429, 20429)] * n), fast, "queued", "Twilio error 20429"),
        (lambda: None, refused, "queued", "Twilio unreachable"),
        (lambda: setattr(twilio_standin, "script", ["hang"] * n), fast, "sending", "outcome unknown"),
        (lambda: setattr(twilio_standin, "list_script", [(503, 20503)] * n), fast, "sending",
         "could not check the earlier send"),
        (lambda: setattr(twilio_standin, "script", [("accept-then", 502, 20500)] * n), fast, "sending",
         "Twilio error 20500"),
    ]
    at = now
    for attempts, (outage, settings, state, error) in enumerate(stages, 1):
        outage()
        report, rows = tick(settings, store, batches, at)
        assert report.counts["retrying"] == n, report.counts
        assert [r["state"] for r in rows] == [state] * n
        assert all(error in r["last_error"] for r in rows), [r["last_error"] for r in rows]
        assert_backoff(rows, at, attempts)
        assert twilio_standin.list_script == [] and twilio_standin.script == []
        at = max(r["retry_at"] for r in rows)
    # Only the last stage's messages reached Twilio; recovery finds them instead of resending.
    assert len(twilio_standin.sent) == n
    report, rows = tick(fast, store, batches, at)
    assert report.counts["sent"] == n and report.ai_calls == 0
    assert_answered_once(rows, twilio_standin)
    # The AI answered again only after the outage that put a batch back in the queue and left
    # Twilio reachable: with Twilio refused, the look into its log stops the batch before the AI.
    assert len(openai_standin.calls) == 2 * n


def test_outage_longer_than_the_attempts_fails_then_retry_answers_once(fast, db_path, openai_standin,
                                                                      twilio_standin):
    """An outage that outlasts SMSBATCH_MAX_ATTEMPTS: the batch is failed (dead letter),
    keeps its error and count; `retry` after recovery answers it once."""
    store = Store(db_path)
    now = round(time.time())
    settings = fast.replace(max_attempts=3)
    batch = add(store, PHONES[0], "anyone there?", now - 30).batch_id
    openai_standin.script = [503] * 3
    at = now
    for _ in range(3):
        report, [row] = tick(settings, store, {PHONES[0]: batch}, at)
        at = row["retry_at"] or at
    assert report.counts["failed"] == 1 and row["state"] == "failed" and row["attempts"] == 3
    assert "503" in row["last_error"] and "after 3 attempts" in row["last_error"]
    assert tick(settings, store, {PHONES[0]: batch}, at + 3600)[0].claimed == 0  # dead, not retried by itself
    store.retry(batch, at + 10)
    report, [row] = tick(settings, store, {PHONES[0]: batch}, at + 10)
    assert report.counts["sent"] == 1
    assert_answered_once([row], twilio_standin)


# -- failures must not leak secrets ----------------------------------------------------

OPENAI_KEYS = ["sk-proj-Zx9SecretKeyValue4242", "gsk_Zx9SecretKeyValue4242"]  # OpenAI, and a compatible provider
TWILIO_SECRET = "tw9SecretAuthTokenValue4242"


def cli(args, env):
    return subprocess.run([sys.executable, "-m", "smsbatch", *args], env=env, capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize("failing", ["ai-401", "twilio-401"])
@pytest.mark.parametrize("key", OPENAI_KEYS)
def test_secrets_never_appear_in_errors_status_or_output(failing, key, db_path, openai_standin, twilio_standin):
    """The AI stand-in answers 401 quoting the whole key it was sent (the worst case), or
    Twilio refuses the auth token: neither secret may reach the database, `status` or the logs."""
    store = Store(db_path)
    now = round(time.time())
    batch = add(store, PHONES[0], "hello?", now - 30).batch_id
    twilio_standin.TOKEN = TWILIO_SECRET if failing == "ai-401" else "the-token-twilio-expects"
    if failing == "ai-401":
        openai_standin.script = [("echo-key", 401)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SMSBATCH_", "TWILIO_", "OPENAI_"))}
    env.update(provider_env(openai_standin, twilio_standin, SMSBATCH_DB=db_path, OPENAI_API_KEY=key,
                            TWILIO_AUTH_TOKEN=TWILIO_SECRET, SMSBATCH_AI_CLIENT_RETRIES=0))
    run = cli(["process", "--now", str(now), "--json"], env)
    assert run.returncode == 3, run.stderr  # finished, some batches failed
    row = store.get_batch(batch)
    assert row["state"] == "failed" and ("401" in row["last_error"] or "20003" in row["last_error"])
    if failing == "ai-401":
        assert "Incorrect API key" in row["last_error"]  # the error is kept; only the key is not
    outputs = {"process stdout": run.stdout, "process stderr": run.stderr, "last_error": row["last_error"]}
    for args in (["status", "--json"], ["status"]):
        shown = cli(args, env)
        assert shown.returncode == 0, shown.stderr
        outputs[" ".join(args)] = shown.stdout + shown.stderr
    outputs["database"] = "\n".join(store.conn.iterdump())
    for secret in (key, TWILIO_SECRET):
        for where, text in outputs.items():
            assert secret not in text, f"{secret} in {where}"
            assert secret[-12:] not in text, f"part of {secret} in {where}"
