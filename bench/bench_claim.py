"""Claiming stays flat as the backlog grows: Store.claim_due with 1,000 vs 100,000 waiting.

The backlog is built directly with executemany inside one transaction: open batches in
arrival order (later rows, later texts, phones in random order), each due 10 s after
its text, all due before "now" and none old enough to expire. Each
measurement claims the same number of batches (chunks of 1 and of 16, like
`--concurrency 1` and `16`) and marks each one finished, one transaction per claim
and per finish, as the processor does. Rate = batches claimed and finished per second.
Each run alternates short measurements of both sizes (fresh copies) and keeps the
median, so a burst of load from another process does not land on one size only.

Target: the rate with 100,000 waiting is within 20% of the rate with 1,000.

    python bench/run.py claim [--runs 3]
"""

import os
import random
import statistics
import time

from common import T0, Figure, fresh_db, log, tempdir

SIZES = (1_000, 100_000)
CHUNKS = (1, 16)
CLAIMED = 480  # batches claimed per measurement (divisible by every chunk size)
LEASE, MAX_AGE = 300.0, 3600.0
TARGET_RATIO = 0.8
ROUNDS = 5


def build_backlog(path, count, seed=7):
    """`count` open batches with one text each, all due at T0."""
    from smsbatch.db import Store, new_id

    rng = random.Random(seed)
    store = Store(path)
    rows, ids = [], set()
    phones = list(range(count))
    rng.shuffle(phones)  # people write in any order
    for i in range(count):
        batch_id = new_id()
        while batch_id in ids:
            batch_id = new_id()
        ids.add(batch_id)
        # Batches are created as texts arrive: later rows have later texts (with a little
        # jitter), spread over the 50 s before T0-10, so all are due by the quiet period.
        last = T0 - 60.0 + 50.0 * i / count + rng.uniform(0.0, 0.5)
        rows.append((batch_id, f"+1555{3000000 + phones[i]:07d}", "+15550000000", "open", 1, last, last, 0,
                     last + 10.0, last))
    with store.transaction() as conn:
        conn.executemany(
            "INSERT INTO batches (id, phone, our_number, state, message_count, first_at, last_at, urgent,"
            " closes_at, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
    store.conn.execute("ANALYZE")
    store.close()


def measure(path, chunk, claimed=CLAIMED):
    """Claim `claimed` batches `chunk` at a time, finishing each; returns batches/s."""
    from smsbatch.db import State, Store

    store = Store(path)
    done = 0
    started = time.perf_counter()
    while done < claimed:
        rows, _ = store.claim_due(T0, chunk, LEASE, MAX_AGE)
        if not rows:
            raise RuntimeError(f"backlog ran dry after {done} claims")
        for row in rows:
            if not store.finish(row, State.SKIPPED, T0, "bench"):
                raise RuntimeError("lost a lease during the benchmark")
        done += len(rows)
    elapsed = time.perf_counter() - started
    store.close()
    return done / elapsed


def fresh_copy(template, folder):
    work = os.path.join(folder, "work.db")
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(work + suffix):
            os.remove(work + suffix)
    with open(template, "rb") as src, open(work, "wb") as dst:
        dst.write(src.read())
    return work


def run(runs=3, rounds=ROUNDS, **_):
    part = "claim"
    figures = {}
    for chunk in CHUNKS:
        for size in SIZES:
            figures[chunk, size] = Figure(part, f"claim+finish, chunk {chunk}, {size:,} waiting", "batches/s")
    ratios = {chunk: Figure(part, f"chunk {chunk}: rate 100k / rate 1k", "ratio", target=TARGET_RATIO)
              for chunk in CHUNKS}
    with tempdir("claim") as folder:
        templates = {}
        for size in SIZES:
            started = time.monotonic()
            templates[size] = fresh_db(folder, f"backlog-{size}.db")
            build_backlog(templates[size], size)
            log(f"claim: backlog of {size:,} built in {time.monotonic() - started:.1f} s")
        for n in range(runs):
            for chunk in CHUNKS:
                # Short measurements, alternating sizes, each on a fresh copy: a neighbour's
                # burst of CPU use hits both sizes alike; the median of the rounds is kept.
                rates = {size: [] for size in SIZES}
                for _ in range(rounds):
                    for size in SIZES:
                        work = fresh_copy(templates[size], folder)
                        measure(work, chunk, claimed=32)  # warm the page cache and statement cache
                        rates[size].append(measure(work, chunk))
                median = {size: statistics.median(rates[size]) for size in SIZES}
                for size in SIZES:
                    figures[chunk, size].values.append(median[size])
                ratio = median[SIZES[1]] / median[SIZES[0]]
                ratios[chunk].values.append(ratio)
                log(f"claim run {n + 1}/{runs}, chunk {chunk}: {median[SIZES[0]]:,.0f} batches/s with "
                    f"{SIZES[0]:,} waiting, {median[SIZES[1]]:,.0f} with {SIZES[1]:,} (ratio {ratio:.2f}; "
                    f"median of {rounds} alternating rounds)")
    out = []
    for chunk in CHUNKS:
        out += [figures[chunk, size] for size in SIZES] + [ratios[chunk]]
    return out
