"""Crash tests: `smsbatch process` is SIGKILLed at each point of a batch's life, then
processing restarts; what the Twilio stand-in received proves every batch went out once.

The processes are real OS processes (`python -m smsbatch process`) using the real
openai and twilio clients against the stand-ins. Kills come from inside (the
SMSBATCH_FAULT_INJECT hooks in processor.py) or from outside, while the stand-in
holds the AI or Twilio call open. Time is `--now`, near real time because the
reconcile step compares with the date_created the Twilio stand-in stamps.
"""

import json
import os
import signal
import stat
import subprocess
import sys
import time

import pytest

from conftest import add, wait_for
from smsbatch.db import Store

PHONES = [f"+1555330{i:04d}" for i in range(4)]
LEASE = 25  # >= Settings.min_lease_seconds (21) with the timeouts below and no client retries
KILL_TIMEOUT = 15.0
RUN_TIMEOUT = 60.0

# name -> (how: "inject" a fault point or kill from "outside", stand-in setup, state the killed batch is left in)
KILL_POINTS = {
    "before_ai": ("inject", None, "processing"),
    "during_ai": ("outside", "ai_delay", "processing"),
    "after_ai": ("inject", None, "processing"),
    "before_twilio": ("inject", None, "sending"),
    "during_twilio_unaccepted": ("outside", "hang", "sending"),
    "during_twilio_accepted": ("outside", "accept-then-hang", "sending"),
    "after_twilio": ("inject", None, "sending"),
}


def process_env(openai, twilio, db_path, fault=None):
    """A clean environment (nothing from the caller's SMSBATCH_/TWILIO_/OPENAI_) for the stand-ins."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SMSBATCH_", "TWILIO_", "OPENAI_", "ENABLE_AI", "AI_SMS"))}
    env.update({
        "OPENAI_API_KEY": "sk-test-standin-key",
        "OPENAI_BASE_URL": openai.url + "/v1",
        "TWILIO_ACCOUNT_SID": twilio.ACCOUNT,
        "TWILIO_AUTH_TOKEN": twilio.TOKEN,
        "TWILIO_FROM_NUMBER": "+15550000000",
        "SMSBATCH_TWILIO_BASE_URL": twilio.url,
        "SMSBATCH_DB": db_path,
        "SMSBATCH_LEASE_SECONDS": str(LEASE),
        "SMSBATCH_AI_TIMEOUT_SECONDS": "2",
        "SMSBATCH_SMS_TIMEOUT_SECONDS": "2",
        "SMSBATCH_AI_CLIENT_RETRIES": "0",
    })
    if fault:
        env["SMSBATCH_FAULT_INJECT"] = fault
    return env


def start(env, now, concurrency=1):
    return subprocess.Popen(
        [sys.executable, "-m", "smsbatch", "process", "--now", repr(now), "--json",
         "--concurrency", str(concurrency)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def finish(proc):
    """Wait for a run that must complete; returns its JSON report."""
    out, err = proc.communicate(timeout=RUN_TIMEOUT)
    assert proc.returncode == 0, err
    return json.loads(out)


def seed(store, now):
    """Two texts from each phone, due well before `now`. Returns {phone: batch id}."""
    batches = {}
    for i, phone in enumerate(PHONES):
        batches[phone] = add(store, phone, f"question {i} part one", now - 60).batch_id
        assert add(store, phone, f"question {i} part two", now - 58).batch_id == batches[phone]
    return batches


def assert_each_answered_once(store, batches, twilio):
    """Against the wire: one SMS per batch, the one the database recorded; all sent."""
    for phone, batch_id in batches.items():
        row = store.get_batch(batch_id)
        assert row["state"] == "sent", (phone, row["state"], row["last_error"])
        wire = [m for m in twilio.sent if m["to"] == phone]
        assert len(wire) == 1, f"{phone} got {len(wire)} replies for one batch"
        assert wire[0]["body"] == row["response_text"] and wire[0]["sid"] == row["provider_sid"]
        texts = store.batch_texts(batch_id)
        assert len(texts) == 2 and all(t["body"] in row["response_text"] for t in texts)
    assert len(twilio.sent) == len(batches)


def kill_at(point, openai, twilio, env, now):
    """Start a run and see it die at `point`."""
    how, setup, _ = KILL_POINTS[point]
    if setup == "ai_delay":
        openai.delay = 1.5  # under the 2 s AI timeout: only the kill can end the call
    elif setup:
        twilio.script = [setup]
    proc = start({**env, **({"SMSBATCH_FAULT_INJECT": point} if how == "inject" else {})}, now)
    if how == "outside":
        # the call is in the stand-in's hands: asked (AI), received (Twilio), or accepted (Twilio)
        seen = {"ai_delay": lambda: openai.requests, "hang": lambda: twilio.requests,
                "accept-then-hang": lambda: twilio.sent}[setup]
        assert wait_for(seen, KILL_TIMEOUT), f"the stand-in never saw the call for {point}"
        proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=KILL_TIMEOUT)
    assert proc.returncode == -signal.SIGKILL, f"{point}: process was not killed (rc {proc.returncode})"
    openai.delay = 0.0


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_kill_then_restart_answers_every_batch_once(point, db_path, openai_standin, twilio_standin):
    store = Store(db_path)
    now = round(time.time())
    batches = seed(store, now)
    env = process_env(openai_standin, twilio_standin, db_path)
    kill_at(point, openai_standin, twilio_standin, env, now)

    # The crash left exactly one batch (concurrency 1) in the state this point is about.
    states = {b: store.get_batch(b)["state"] for b in batches.values()}
    expected = KILL_POINTS[point][2]
    assert sorted(states.values()) == sorted([expected] + ["open"] * (len(batches) - 1)), states
    [victim] = [b for b, s in states.items() if s == expected]
    accepted = point in ("during_twilio_accepted", "after_twilio")
    assert len(twilio_standin.sent) == int(accepted)  # the dangerous window: out, but not recorded

    # The next run answers the others. A victim killed before its send is answered afresh
    # at once: its holder's process is gone, on this machine. A *sending* one waits for its
    # lease to end (a request written just before the death must reach Twilio's log first),
    # then is reconciled.
    report = finish(start(env, now + 1))
    early = expected == "processing"
    assert report["sent"] == len(batches) - 1 + early
    if not early:
        assert store.get_batch(victim)["state"] == expected
        report = finish(start(env, now + LEASE + 2))
        assert report["claimed"] == 1 and report["sent"] == 1
    assert_each_answered_once(store, batches, twilio_standin)
    assert store.get_batch(victim)["attempts"] == 2  # every claim counts, a reconcile too


def test_kill_again_and_again_including_during_recovery(db_path, openai_standin, twilio_standin):
    """Every run dies. The first four runs leave the four batches killed at four different
    points; the recovery runs die too: after a reconcile found nothing and before the
    resend, and after the resend went out (once right after another batch was reconciled)."""
    store = Store(db_path)
    now = round(time.time())
    batches = seed(store, now)
    env = process_env(openai_standin, twilio_standin, db_path)
    chain = ["before_ai", "after_ai", "before_twilio", "after_twilio"] + ["before_twilio", "after_twilio"] * 2
    for step, point in enumerate(chain):
        proc = start({**env, "SMSBATCH_FAULT_INJECT": point}, now + step * (LEASE + 2))
        proc.communicate(timeout=RUN_TIMEOUT)
        assert proc.returncode == -signal.SIGKILL, (step, point, proc.returncode)
        if step == 3:
            assert sorted(store.get_batch(b)["state"] for b in batches.values()) == [
                "processing", "processing", "sending", "sending"]
    # Three replies are out but only one is recorded; one batch is sending and not out.
    assert len(twilio_standin.sent) == 3
    assert sorted(store.get_batch(b)["state"] for b in batches.values()) == ["sending"] * 3 + ["sent"]
    finish(start(env, now + len(chain) * (LEASE + 2)))
    assert_each_answered_once(store, batches, twilio_standin)


def test_kill_with_concurrent_workers_in_flight(db_path, openai_standin, twilio_standin):
    """With four workers, the kill catches several batches at different points at once."""
    store = Store(db_path)
    now = round(time.time())
    batches = seed(store, now)
    env = process_env(openai_standin, twilio_standin, db_path)
    openai_standin.script = [("delay", 0.05 * i) for i in range(len(PHONES))]
    proc = start({**env, "SMSBATCH_FAULT_INJECT": "after_twilio"}, now, concurrency=4)
    proc.communicate(timeout=RUN_TIMEOUT)
    assert proc.returncode == -signal.SIGKILL
    assert 1 <= len(twilio_standin.sent) <= len(PHONES)
    finish(start(env, now + LEASE + 2, concurrency=4))
    assert_each_answered_once(store, batches, twilio_standin)


@pytest.mark.parametrize("point", ["before_twilio", "after_twilio"])
def test_reconcile_does_not_take_an_earlier_identical_reply_for_this_one(point, db_path, openai_standin,
                                                                        twilio_standin):
    """The same question twice gets the same reply text. If the process dies around the
    second send, the earlier reply (same body, same recipient, a minute ago) must not count
    as the second one: sent once if it had not gone out, found (not resent) if it had."""
    store = Store(db_path)
    now = round(time.time())
    phone = PHONES[0]
    env = process_env(openai_standin, twilio_standin, db_path)
    first = add(store, phone, "are you open today?", now - 120).batch_id
    finish(start(env, now - 100))
    second = add(store, phone, "are you open today?", now - 60).batch_id
    proc = start({**env, "SMSBATCH_FAULT_INJECT": point}, now)
    proc.communicate(timeout=RUN_TIMEOUT)
    assert proc.returncode == -signal.SIGKILL and store.get_batch(second)["state"] == "sending"
    assert len(twilio_standin.sent) == (2 if point == "after_twilio" else 1)
    assert store.get_batch(second)["response_text"] == store.get_batch(first)["response_text"]
    finish(start(env, now + LEASE + 2))
    rows = [store.get_batch(first), store.get_batch(second)]
    assert [r["state"] for r in rows] == ["sent", "sent"]
    assert len(twilio_standin.sent) == 2, "the second reply was never sent, or sent twice"
    assert [r["provider_sid"] for r in rows] == [m["sid"] for m in twilio_standin.sent]


def test_database_file_is_created_private_even_with_a_permissive_umask(tmp_path):
    """0600 for the file `migrate` creates (umask 000 in that process), and for the WAL and
    shared-memory files SQLite adds while it is in use."""
    path = tmp_path / "private.db"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMSBATCH_")}
    run = subprocess.run([sys.executable, "-m", "smsbatch", "--db", str(path), "migrate"], env=env,
                         capture_output=True, text=True, timeout=60, preexec_fn=lambda: os.umask(0))
    assert run.returncode == 0, run.stderr
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    store = Store(str(path))
    add(store, PHONES[0], "hi", time.time())  # the WAL is in use now
    for suffix in ("", "-wal", "-shm"):
        assert stat.S_IMODE(os.stat(f"{path}{suffix}").st_mode) == 0o600, suffix
    store.close()
