"""A slow AI: the stand-in takes 2 s per chat completion; `--concurrency 16` must keep 16 in flight.

The real `openai` and `twilio` clients talk to tests/fakes.py's FakeOpenAI(delay=2) and
FakeTwilio on 127.0.0.1 (started in this process). Each run: 200 due batches, then the
whole `smsbatch process --concurrency 16` subprocess is timed; afterwards every batch must
be sent, with exactly one AI call and one Twilio message each. The ideal is
16 / 2 s = 8 batches/s.

Target: >= 7 batches/s.

    python bench/run.py slowai [--runs 3] [--batches 200]
"""

import json
import os
import sqlite3
import subprocess
import time

from common import OUR_NUMBER, T0, Figure, clean_env, fakes, fresh_db, log, smsbatch_cmd, tempdir

BATCHES = 200
DELAY = 2.0
CONCURRENCY = 16
TARGET = 7.0


def build(folder, batches):
    from smsbatch.batching import Rules
    from smsbatch.db import Store

    db = fresh_db(folder, "slowai.db")
    store = Store(db)
    rules = Rules()
    for i in range(batches):
        store.add_message(f"SMslow{i:06d}", f"+1555{6000000 + i:07d}", OUR_NUMBER, f"where is order {i}?", T0, rules)
    store.close()
    return db


def one_run(folder, batches):
    f = fakes()
    db = build(folder, batches)
    # The stand-ins listen with a backlog of 64 and without Nagle delays (tests/fakes.py),
    # so 16 simultaneous calls measure smsbatch, not the stand-ins.
    with f.FakeOpenAI(delay=DELAY) as openai, f.FakeTwilio() as twilio:
        env = clean_env(**f.provider_env(openai, twilio, SMSBATCH_DB=db))
        cmd = smsbatch_cmd() + ["--db", db, "process", "--concurrency", str(CONCURRENCY), "--limit", "100000",
                                "--now", str(T0 + 100), "--json"]
        started = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=batches * DELAY + 120)
        elapsed = time.perf_counter() - started
        ai_calls, sms_sent = len(openai.calls), len(twilio.sent)
    report = json.loads(out.stdout) if out.stdout.strip().startswith("{") else {}
    conn = sqlite3.connect(db)
    sent = conn.execute("SELECT count(*) FROM batches WHERE state = 'sent'").fetchone()[0]
    conn.close()
    os.remove(db)
    if out.returncode != 0 or sent != batches or ai_calls != batches or sms_sent != batches:
        raise RuntimeError(f"slow-AI run incomplete: exit {out.returncode}, {sent} sent in db, {ai_calls} AI calls, "
                           f"{sms_sent} SMS, report {report}, stderr {out.stderr[-500:]}")
    return batches / elapsed, elapsed


def run(runs=3, batches=BATCHES, **_):
    fig = Figure("slowai", f"AI 2 s/call, --concurrency {CONCURRENCY}", "batches/s", target=TARGET)
    with tempdir("slowai") as folder:
        for n in range(runs):
            rate, elapsed = one_run(folder, batches)
            fig.values.append(rate)
            log(f"slowai run {n + 1}/{runs}: {batches} batches in {elapsed:.1f} s = {rate:.2f} batches/s "
                f"(ideal {CONCURRENCY / DELAY:.0f}/s); each sent once, one AI call each")
    fig.note = (f"{batches} batches per run, real openai/twilio clients against tests/fakes.py stand-ins; "
                f"ideal {CONCURRENCY / DELAY:.0f}/s")
    return [fig]
