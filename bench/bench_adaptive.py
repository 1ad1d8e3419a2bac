"""The webhook's write path with and without adaptive quiet periods: Store.add_message per second.

Setup (once): a database holding 20,000 texts (500 phones, 40 each, in bursts of 4 texts
3 s apart, bursts 10 minutes apart), so every phone has a full window of history. Each
round copies it and times Store.add_message for the next 2,000 texts (4 more per phone),
one transaction per text as `ingest` does (the webhook's group commit shares a
transaction between texts arriving together, so this is its worst case). Rounds alternate
fixed / adaptive, so machine noise hits both alike; the table shows texts/s and the extra
microseconds per text (median of the rounds). Informational, no target.

With --webhook, also `smsbatch serve` under wrk as bench_webhook.py runs it (signed
requests, 16 connections), SMSBATCH_ADAPTIVE=0 and 1 alternately.

    python bench/bench_adaptive.py [--runs 10] [--webhook] [--seconds 5]
"""

import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import OUR_NUMBER, T0, Figure, fresh_db, log, tempdir  # noqa: E402

PHONES, BURST, GAP, PAUSE = 500, 4, 3.0, 600.0
HISTORY, ROUND = 20_000, 2_000


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
        return None if adaptive else Rules()


def build(folder, rows):
    """The template database: the history every round starts from."""
    from smsbatch.db import Store

    path = fresh_db(folder, "template.db")
    store = Store(path)
    for sid, phone, at in rows:
        store.add_message(sid, phone, OUR_NUMBER, "hello there", at, rules_for(False))
    store.close()
    return path


def one_round(template, folder, rows, adaptive):
    """Texts per second stored by add_message, on a copy of the template (None if not supported)."""
    from smsbatch.db import Store

    rules = rules_for(adaptive)
    if rules is None:
        return None
    path = os.path.join(folder, "round.db")
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.remove(path + suffix)
    shutil.copyfile(template, path)
    store = Store(path)
    started, cpu = time.perf_counter(), time.process_time()
    for sid, phone, at in rows:
        store.add_message(sid, phone, OUR_NUMBER, "hello there", at, rules)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    store.close()
    return len(rows) / elapsed, cpu / len(rows) * 1e6


def run(runs=10, **_):
    rows = texts(HISTORY + ROUND)
    figures = {mode: Figure("adaptive", f"add_message, {mode}", "texts/s") for mode in ("fixed", "adaptive")}
    cpu = {mode: Figure("adaptive", f"CPU per text, {mode}", "us", better="lower") for mode in figures}
    extra = Figure("adaptive", "adaptive extra per text (wall)", "us", better="lower")
    with tempdir("adaptive") as folder:
        template = build(folder, rows[:HISTORY])
        for i in range(runs):
            got = {mode: one_round(template, folder, rows[HISTORY:], mode == "adaptive")
                   for mode in (("fixed", "adaptive") if i % 2 == 0 else ("adaptive", "fixed"))}
            for mode, result in got.items():
                if result is not None:
                    figures[mode].values.append(result[0])
                    cpu[mode].values.append(result[1])
            if got["adaptive"] is not None:
                extra.values.append((1 / got["adaptive"][0] - 1 / got["fixed"][0]) * 1e6)
            log(f"round {i + 1}: " + ", ".join(f"{m} {r[0]:,.0f} texts/s ({r[1]:.0f} us CPU)"
                                             for m, r in got.items() if r))
    return [*figures.values(), *cpu.values(), extra]


def webhook(runs=3, seconds=5.0):
    """bench_webhook's serve + wrk run, fixed and adaptive alternately: req/s and p99 figures."""
    import bench_webhook as web

    figures = {}
    with tempdir("bodies") as folder:
        bodies = os.path.join(folder, "bodies.txt")
        web.write_bodies(bodies, int(web.MAX_RATE * seconds))
        for i in range(runs):
            for mode, flag in (("fixed", "0"), ("adaptive", "1")):
                r = web.one_run(bodies, seconds, None, 1, extra_env={"SMSBATCH_ADAPTIVE": flag})
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
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--webhook", action="store_true")
    parser.add_argument("--webhook-runs", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    figures = run(args.runs)
    if args.webhook:
        figures += webhook(args.webhook_runs, args.seconds)
    print_table(figures)
