"""Several `smsbatch process` OS processes on one database: every batch answered exactly once."""

import collections
import json
import os
import subprocess
import sys

from conftest import T0, add
from fakes import FakeOpenAI, FakeTwilio, provider_env
from smsbatch.db import Store

BATCHES = 240
PROCESSES = 4


def test_concurrent_processors_answer_each_batch_once(db_path):
    store = Store(db_path)
    phones = [f"+1555600{i:04d}" for i in range(BATCHES)]
    for i, phone in enumerate(phones):
        add(store, phone, f"hello {i}", T0)
        add(store, phone, f"second text {i}", T0 + 1)
    with FakeOpenAI(delay=0.005) as ai, FakeTwilio() as twilio:
        env = {**os.environ, **provider_env(ai, twilio, SMSBATCH_DB=db_path)}
        runs = [subprocess.Popen([sys.executable, "-m", "smsbatch", "process", "--now", str(T0 + 30),
                                  "--concurrency", "4", "--json"],
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for _ in range(PROCESSES)]
        reports = []
        for run in runs:
            out, err = run.communicate(timeout=120)
            assert run.returncode == 0, err
            reports.append(json.loads(out))
        per_phone = collections.Counter(m["to"] for m in twilio.sent)
    assert sum(r["claimed"] for r in reports) == BATCHES
    assert sum(r["sent"] for r in reports) == BATCHES
    assert sum(1 for r in reports if r["claimed"]) >= 2, "the runs did not overlap; test proves nothing"
    assert set(per_phone) == set(phones) and set(per_phone.values()) == {1}
    states = store.conn.execute("SELECT state, count(*) FROM batches GROUP BY state").fetchall()
    assert [tuple(s) for s in states] == [("sent", BATCHES)]
    assert len(ai.calls) == BATCHES
