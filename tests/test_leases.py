"""Heartbeat leases with real OS processes: a killed processor's batch is taken over by a
running one within seconds (on one machine as soon as its pid is gone; a frozen processor,
alive but not renewing, like a dead one on another host, when its 4 s lease ends); a
frozen one that wakes up sends nothing; a live one keeps its batch however long the AI takes.

Processor A is started first and holds phone X's batch in its AI call; processor B is
then started and proves it is running by answering phone Y. Real time (no --now): the
heartbeat and the takeover are what is measured.
"""

import json
import signal
import subprocess
import sys
import time

from conftest import add, wait_for
from smsbatch.db import Store
from test_faults import process_env

X, Y = "+15554440001", "+15554440002"
STARTUP = 20.0  # generous bound for a process to start and reach the stand-ins on a loaded machine


def lease_env(openai, twilio, db_path, **extra):
    env = process_env(openai, twilio, db_path)
    # A's AI call may take up to 10 s; the lease renews meanwhile (SMSBATCH_LEASE_SECONDS:
    # the most one claim may hold a batch, renewals included).
    env.update({"SMSBATCH_AI_TIMEOUT_SECONDS": "10", "SMSBATCH_LEASE_SECONDS": "60", **extra})
    return env


def start(env, seconds):
    return subprocess.Popen([sys.executable, "-m", "smsbatch", "process", "--for", str(seconds), "--json",
                             "--concurrency", "1"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def report(proc):
    out, err = proc.communicate(timeout=30)
    assert proc.returncode in (0, 3), err
    return json.loads(out)


def stop(proc):
    """End a `process --for` run early (SIGTERM: finish what is in hand) and return its report."""
    proc.send_signal(signal.SIGTERM)
    return report(proc)


def a_then_b(store, openai, twilio, env_a, env_b, ai_seen=True):
    """A claims X's batch (and, with `ai_seen`, is in its AI call); then B runs and answers Y."""
    now = time.time()
    x = add(store, X, "are you open on sunday?", now - 30).batch_id
    a = start(env_a, 1)
    if ai_seen:
        assert wait_for(lambda: openai.requests, STARTUP), "A never asked the AI"
    else:
        assert wait_for(lambda: store.get_batch(x)["state"] == "sending", STARTUP)
    add(store, Y, "hello", now - 30)
    b = start(env_b, 30)
    assert wait_for(lambda: twilio.bodies_to(Y), STARTUP), "B never answered Y"
    return a, b, x


def assert_one_reply(store, twilio, batch_id):
    row = store.get_batch(batch_id)
    wire = [m for m in twilio.sent if m["to"] == X]
    assert len(wire) == 1, f"X got {len(wire)} replies"
    assert row["state"] == "sent" and row["provider_sid"] == wire[0]["sid"]


def test_killed_processor_batch_is_taken_over_by_a_running_one_within_5_s(db_path, openai_standin,
                                                                         twilio_standin):
    store = Store(db_path)
    env = lease_env(openai_standin, twilio_standin, db_path)
    openai_standin.script = ["hang"]  # A's AI call never answers
    a, b, x = a_then_b(store, openai_standin, twilio_standin, env, env)
    # A live processor keeps its batch while its AI call runs, well past one 4 s lease.
    wait_for(lambda: time.monotonic() - openai_standin.times[0] > 5.0, 6.0)
    row = store.get_batch(x)
    assert row["state"] == "processing" and row["holder"].endswith(f":{a.pid}") and not twilio_standin.bodies_to(X)
    a.kill()
    killed = time.monotonic()
    a.wait()
    assert wait_for(lambda: twilio_standin.bodies_to(X), 10.0), "nobody took the batch over"
    replied = time.monotonic()
    b_asked = openai_standin.times[-1]  # B's AI request for X
    assert b_asked - killed < 5.0, f"taken over {b_asked - killed:.2f} s after the kill"
    assert replied - killed < 5.0 + (replied - b_asked), f"reply {replied - killed:.2f} s after the kill"
    assert stop(b)["sent"] == 2
    assert_one_reply(store, twilio_standin, x)
    assert store.get_batch(x)["holder"].endswith(f":{b.pid}")


def test_processor_frozen_in_its_ai_call_sends_nothing_when_it_wakes(db_path, openai_standin, twilio_standin):
    store = Store(db_path)
    env = lease_env(openai_standin, twilio_standin, db_path)
    openai_standin.script = [("delay", 7)]  # A's answer comes while A is frozen
    a, b, x = a_then_b(store, openai_standin, twilio_standin, env, env)
    a.send_signal(signal.SIGSTOP)
    frozen = time.monotonic()
    try:
        assert wait_for(lambda: twilio_standin.bodies_to(X), 12.0), "nobody took the frozen batch over"
    finally:
        a.send_signal(signal.SIGCONT)
    # Alive but not renewing, as a dead processor on another host: its 4 s lease runs out.
    assert openai_standin.times[-1] - frozen < 5.0, "the heartbeat lease outlived 5 s"
    woken = report(a)  # A gets its AI answer, finds the batch taken over, sends nothing
    assert woken["sent"] == 0 and woken["claimed"] == 1
    assert stop(b)["sent"] == 2
    assert_one_reply(store, twilio_standin, x)


def test_processor_frozen_right_before_its_send_is_fenced_off(db_path, openai_standin, twilio_standin):
    """A freezes after committing *sending* and before calling Twilio: the database said the
    batch was A's. B takes over, asks Twilio, sends. A wakes: its own monotonic clock says
    its lease ran out, so it does not send."""
    store = Store(db_path)
    env = lease_env(openai_standin, twilio_standin, db_path)
    a, b, x = a_then_b(store, openai_standin, twilio_standin, {**env, "SMSBATCH_FAULT_INJECT": "stop:before_twilio"},
                       env, ai_seen=False)
    assert wait_for(lambda: _stopped(a.pid), 5.0)
    try:
        assert wait_for(lambda: twilio_standin.bodies_to(X), 12.0), "nobody took the frozen batch over"
    finally:
        a.send_signal(signal.SIGCONT)
    woken = report(a)
    assert woken["sent"] == 0 and woken["claimed"] == 1
    assert stop(b)["sent"] == 2
    assert_one_reply(store, twilio_standin, x)


def _stopped(pid):
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0] == "T"
