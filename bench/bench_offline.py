"""`smsbatch process` with the offline stand-ins: batches claimed, answered and recorded per second.

Setup (once): 5,000 batches, one per phone, two texts each, stored with Store.add_message
at T0 and due by T0+10. Each run copies that database and times the whole
`smsbatch process --ai offline --sms console --limit 100000 --now T0+100 --json`
subprocess (console output to /dev/null), then checks every batch is recorded as sent.

Target: >= 1,000 batches/s (default --concurrency 4; also measured with 1 and 16).

    python bench/run.py offline [--runs 3] [--batches 5000]
"""

import json
import os
import shutil
import sqlite3
import subprocess
import time

from common import OUR_NUMBER, T0, Figure, clean_env, fresh_db, log, smsbatch_cmd, tempdir

BATCHES = 5_000
TEXTS_PER_BATCH = 2
CONCURRENCIES = (4, 1, 16)
TARGET = 1000.0


def build(folder, batches):
    from smsbatch.batching import Rules
    from smsbatch.db import Store

    db = fresh_db(folder, "offline-template.db")
    store = Store(db)
    rules = Rules()
    for i in range(batches):
        for j in range(TEXTS_PER_BATCH):
            store.add_message(f"SMoff{i:06d}{j}", f"+1555{5000000 + i:07d}", OUR_NUMBER,
                              f"hello, question {j} about order {i}", T0 + j, rules)
    store.close()  # the last connection to close checkpoints the WAL into the file
    return db


def one_run(template, folder, batches, concurrency):
    db = os.path.join(folder, "offline.db")
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(db + suffix):
            os.remove(db + suffix)
    shutil.copyfile(template, db)
    cmd = smsbatch_cmd() + ["--db", db, "process", "--ai", "offline", "--sms", "console", "--limit", "100000",
                            "--now", str(T0 + 100), "--concurrency", str(concurrency), "--json"]
    started = time.perf_counter()
    out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                         env=clean_env(), timeout=600)
    elapsed = time.perf_counter() - started
    report = json.loads(out.stdout)
    conn = sqlite3.connect(db)
    sent, with_sid = conn.execute(
        "SELECT count(*), count(provider_sid) FROM batches WHERE state = 'sent' AND response_text IS NOT NULL"
    ).fetchone()
    conn.close()
    if out.returncode != 0 or report["sent"] != batches or sent != batches or with_sid != batches:
        raise RuntimeError(f"offline run incomplete: exit {out.returncode}, report {report}, {sent} sent in db")
    return batches / elapsed, elapsed


def run(runs=3, batches=BATCHES, **_):
    part = "offline"
    figures = {c: Figure(part, f"process --concurrency {c}", "batches/s",
                         target=TARGET if c == 4 else None) for c in CONCURRENCIES}
    with tempdir("offline") as folder:
        started = time.monotonic()
        template = build(folder, batches)
        log(f"offline: {batches:,} due batches ({batches * TEXTS_PER_BATCH:,} texts) stored in "
            f"{time.monotonic() - started:.1f} s")
        for n in range(runs):
            for c in CONCURRENCIES:
                rate, elapsed = one_run(template, folder, batches, c)
                figures[c].values.append(rate)
                log(f"offline run {n + 1}/{runs}, --concurrency {c}: {batches:,} batches in {elapsed:.2f} s "
                    f"= {rate:,.0f} batches/s (whole process, start-up included); all recorded as sent")
    figures[4].note = (f"{batches:,} batches, whole `smsbatch process` wall time; every batch checked "
                       "sent with a reply and provider SID in the db")
    return [figures[c] for c in CONCURRENCIES]
