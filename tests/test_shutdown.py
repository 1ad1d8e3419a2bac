"""`process --for` stops cleanly on SIGTERM: it finishes what it holds and leaves nothing claimed."""

import json
import os
import signal
import subprocess
import sys
import time

from conftest import add, wait_for
from fakes import FakeOpenAI, FakeTwilio, provider_env
from smsbatch.db import Store


def test_sigterm_finishes_batches_in_hand_then_exits(db_path):
    store = Store(db_path)
    now = time.time()
    for i in range(6):
        add(store, f"+155570000{i:02d}", "hi", now - 20)
    with FakeOpenAI(delay=1.0) as ai, FakeTwilio() as twilio:
        env = {**os.environ, **provider_env(ai, twilio, SMSBATCH_DB=db_path)}
        run = subprocess.Popen([sys.executable, "-m", "smsbatch", "process", "--for", "50", "--concurrency", "2",
                                "--json"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert wait_for(lambda: len(ai.requests) >= 2), "the AI stand-in was never called"
        started = time.monotonic()
        run.send_signal(signal.SIGTERM)
        out, err = run.communicate(timeout=20)
        took = time.monotonic() - started
        report = json.loads(out)
        sent_wire = len(twilio.sent)
    assert run.returncode == 0, err
    assert took < 5, "it should stop after the batches in hand, not after --for"
    assert report["claimed"] == 2 and report["sent"] == 2 == sent_wire
    states = dict(store.conn.execute("SELECT state, count(*) FROM batches GROUP BY state").fetchall())
    assert states == {"sent": 2, "open": 4}
    assert store.conn.execute("SELECT count(*) FROM batches WHERE claim IS NOT NULL").fetchone()[0] == 0
