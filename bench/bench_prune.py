"""Pruning is cheap when there is nothing to delete, and bounded when there is.

`process` with SMSBATCH_RETENTION_DAYS calls Store.prune(cutoff, limit=500) every run, so
its cost with nothing old enough is paid every minute. The history is built directly with
executemany: 100,000 sent batches, each with one text, three state-history rows and its
reply in outbound, plus a few opted-out people's old batches (which prune must skip, and
does skip every run).

Figures:
- nothing to delete: one prune call on 100,000 recent batches: <= 10 ms
- one run's share: pruning 500 old batches (with their texts, history and replies) out of
  100,000 in one call: <= 500 ms
- `smsbatch backup` of that database: informational

    python bench/run.py prune [--runs 3]
"""

import os
import shutil
import statistics
import time

from common import T0, Figure, fresh_db, log, tempdir

SIZE = 100_000
OPTED_OUT = 50
PER_RUN = 500
DAY = 86400.0


def build_history(path, at):
    """SIZE sent batches whose texts and replies are at `at`, and OPTED_OUT old ones of people who said STOP."""
    from smsbatch.db import Store

    store = Store(path)
    batches, messages, events, outbound = [], [], [], []
    for i in range(SIZE + OPTED_OUT):
        batch_id, phone = f"b{i:09d}", f"+1555{i:07d}"
        when = at if i < SIZE else T0 - 400 * DAY
        batches.append((batch_id, phone, "+15550000000", "sent", 1, when, when, when, when, f"SM{i:032d}", when))
        messages.append((f"SMin{i:030d}", phone, "+15550000000", "hello there", when, batch_id))
        events += [(batch_id, when, None, "open", "first text"), (batch_id, when, "open", "processing", "claimed"),
                   (batch_id, when, "processing", "sent", "sent")]
        outbound.append((f"SM{i:032d}", batch_id, phone, "+15550000000", "hi!", "ai", when))
    with store.transaction() as conn:
        conn.executemany("INSERT INTO batches (id, phone, our_number, state, message_count, first_at, last_at,"
                         " completed_at, sent_at, provider_sid, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                         batches)
        conn.executemany("INSERT INTO messages (sid, phone, our_number, body, received_at, batch_id)"
                         " VALUES (?, ?, ?, ?, ?, ?)", messages)
        conn.executemany("INSERT INTO batch_events (batch_id, at, from_state, to_state, reason) VALUES (?, ?, ?, ?, ?)",
                         events)
        conn.executemany("INSERT INTO outbound (sid, batch_id, phone, our_number, body, source, sent_at)"
                         " VALUES (?, ?, ?, ?, ?, ?, ?)", outbound)
        conn.executemany("INSERT INTO opt_outs (phone, scope, since, keyword) VALUES (?, '*', ?, 'STOP')",
                         [(f"+1555{i:07d}", T0 - 400 * DAY) for i in range(SIZE, SIZE + OPTED_OUT)])
    store.conn.execute("ANALYZE")
    store.close()


def timed_prune(path, cutoff):
    from smsbatch.db import Store

    store = Store(path)
    started = time.perf_counter()
    gone = store.prune(cutoff, limit=PER_RUN)
    elapsed = (time.perf_counter() - started) * 1000
    store.close()
    return elapsed, gone


def run(runs=3, **_):
    idle = Figure("prune", "prune call, nothing to delete (100k batches)", "ms", target=10.0, better="lower")
    share = Figure("prune", f"prune {PER_RUN} old of 100k batches", "ms", target=500.0, better="lower")
    backup = Figure("prune", "backup of the 100k-batch database", "s", note="informational: SQLite backup API")
    with tempdir("prune") as folder:
        recent, old = fresh_db(folder, "recent.db"), fresh_db(folder, "old.db")
        log(f"building {SIZE:,} recent and {SIZE:,} old batches")
        build_history(recent, T0)
        build_history(old, T0 - 200 * DAY)
        for n in range(runs):
            elapsed, gone = timed_prune(recent, T0 - 90 * DAY)
            assert gone["batches"] == 0, gone
            idle.values.append(elapsed)
            work = os.path.join(folder, "work.db")
            shutil.copyfile(old, work)
            elapsed, gone = timed_prune(work, T0 - 90 * DAY)
            assert gone["batches"] == PER_RUN and gone["texts"] == PER_RUN and gone["events"] == 3 * PER_RUN, gone
            share.values.append(elapsed)
            os.unlink(work)
            backup.values.append(timed_backup(old, os.path.join(folder, f"copy{n}.db")))
            log(f"run {n + 1}: nothing {idle.values[-1]:.1f} ms, {PER_RUN} old {share.values[-1]:.0f} ms, "
                f"backup {backup.values[-1]:.2f} s")
    log(f"median: nothing {statistics.median(idle.values):.1f} ms")
    return [idle, share, backup]


def timed_backup(db, dest):
    from smsbatch.ops import backup

    started = time.perf_counter()
    backup(db, dest)
    return time.perf_counter() - started
