"""The webhook's write path with and without adaptive quiet periods: Store.add_message per second.

Each run stores 20,000 texts (500 phones, 40 each, in bursts of 4 texts 3 s apart, bursts
10 minutes apart, so every phone soon has a full window of history) with
Store.add_message, one transaction per text as `ingest` does (the webhook's group commit
shares a transaction between texts arriving together, so this is its worst case), on a
fresh database file. Runs alternate fixed / adaptive so machine noise hits both alike.
Informational (no target): adaptive should cost no more than noise.

With --webhook, also `smsbatch serve` under wrk as bench_webhook.py runs it (signed
requests, 16 connections), SMSBATCH_ADAPTIVE=0 and 1 alternately.

    python bench/bench_adaptive.py [--runs 3] [--texts 20000] [--webhook] [--seconds 5]
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import OUR_NUMBER, T0, Figure, fresh_db, log, tempdir  # noqa: E402

PHONES, BURST, GAP, PAUSE = 500, 4, 3.0, 600.0


def texts(count):
    """(sid, phone, at) in time order: every phone texts in bursts."""
    rows = []
    for i in range(count):
        phone, n = i % PHONES, i // PHONES
        at = T0 + (n // BURST) * PAUSE + (n % BURST) * GAP + phone * 0.001
        rows.append((f"SMad{i:08d}", f"+1555{3000000 + phone:07d}", at))
    return sorted(rows, key=lambda r: r[2])


def rules_for(adaptive):
    from smsbatch.batching import Rules

    try:
        return Rules(adaptive=adaptive)
    except TypeError:  # a smsbatch before adaptive quiet periods: fixed only
        if adaptive:
            return None
        return Rules()


def one_run(rows, adaptive):
    """Texts per second stored by add_message on a fresh database (None if not supported)."""
    from smsbatch.db import Store

    rules = rules_for(adaptive)
    if rules is None:
        return None
    with tempdir("adaptive") as folder:
        store = Store(fresh_db(folder))
        started = time.perf_counter()
        for sid, phone, at in rows:
            store.add_message(sid, phone, OUR_NUMBER, "hello there", at, rules)
        elapsed = time.perf_counter() - started
        store.close()
    return len(rows) / elapsed


def run(runs=3, texts_count=20_000, **_):
    rows = texts(texts_count)
    figures = {mode: Figure("adaptive", f"add_message, {mode}", "texts/s") for mode in ("fixed", "adaptive")}
    for i in range(runs):
        for mode in ("fixed", "adaptive"):
            rate = one_run(rows, mode == "adaptive")
            if rate is not None:
                figures[mode].values.append(rate)
                log(f"run {i + 1} {mode}: {rate:,.0f} texts/s")
    return list(figures.values())


def webhook(runs=3, seconds=5.0):
    """bench_webhook's serve + wrk run, fixed and adaptive alternately: req/s and p99 figures."""
    import bench_webhook as web

    figures = {}
    with tempdir("bodies") as folder:
        bodies = os.path.join(folder, "bodies.txt")
        web.write_bodies(bodies, int(web.MAX_RATE * seconds))
        for i in range(runs):
            for mode, flag in (("fixed", "0"), ("adaptive", "1")):
                r = web.one_run(bodies, seconds, None, 1, {"SMSBATCH_ADAPTIVE": flag})
                rate = r["completed"] / (r["duration_us"] / 1e6)
                figures.setdefault(mode, (Figure("adaptive", f"webhook, {mode}", "req/s"),
                                          Figure("adaptive", f"webhook p99, {mode}", "ms", better="lower")))
                figures[mode][0].values.append(rate)
                figures[mode][1].values.append(r["p99_us"] / 1000)
                log(f"webhook run {i + 1} {mode}: {rate:,.0f} req/s, p99 {r['p99_us'] / 1000:.1f} ms, "
                    f"{r['stored']:,} texts stored of {r['really_sent']:,} sent")
    return [f for pair in figures.values() for f in pair]


if __name__ == "__main__":
    import argparse

    from common import print_table

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--texts", type=int, default=20_000)
    parser.add_argument("--webhook", action="store_true")
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    figures = run(args.runs, args.texts)
    if args.webhook:
        figures += webhook(args.runs, args.seconds)
    print_table(figures)
