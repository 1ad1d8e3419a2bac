"""Run the smsbatch benchmarks and print one table of figures (target, median, spread).

Run with the Python of the virtualenv smsbatch is installed in, e.g. `.venv/bin/python`:

    python bench/run.py                  # every part (about 5 minutes)
    python bench/run.py webhook          # one part (or several: webhook idle)
    python bench/run.py --runs 5 claim
    python bench/run.py --wait-idle 300  # first let other processes calm down

Parts:
    webhook   `smsbatch serve` under wrk, signatures checked: >= 3,000 req/s, p99 <= 20 ms
    webhook-vs-flask  serve vs Twilio's Flask quickstart under gunicorn -w 4, both durable,
              alternating runs: ratio >= 2.0, our p99 <= 20 ms (needs the bench extra)
    idle      `smsbatch process` with nothing due: <= 150 ms, openai/twilio/rich not imported
    offline   `smsbatch process --ai offline --sms console`: >= 1,000 batches/s
    slowai    AI stand-in taking 2 s per call, --concurrency 16: >= 7 batches/s
    claim     Store.claim_due with 1,000 vs 100,000 waiting batches: within 20%
    simulate  `smsbatch simulate` on a 100,000-text trace: under a minute (bench_simulate.py)
    prune     Store.prune as `process` calls it (SMSBATCH_RETENTION_DAYS) on 100,000 batches:
              nothing to delete <= 10 ms, 500 old batches <= 500 ms; backup time
    adaptive  Store.add_message with adaptive quiet periods off and on (informational)
    takeover  a processor SIGKILLed mid-AI-call, another running: reply within 5 s (bench_takeover.py)
    pg        PostgreSQL beside SQLite: webhook (1 and 2 serve), claim-to-finish with 4 processors,
              an idle processor's transactions/s (bench_pg.py; once unless --runs)

Each part runs 3 times (simulate: once) unless --runs says otherwise; the table shows
the median and the spread (min-max) over the runs. The webhook part needs wrk
(`apt-get install -y wrk`); without it, that part says NOT MEASURED and how to install it.
Progress goes to stderr, the table to stdout. Exit status 1 if any target was missed.
Only loopback (127.0.0.1) traffic; every load loop is bounded in count and time.
The machine should be otherwise idle: a warning says when it was not.
"""

import argparse
import importlib
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import cpus_busy, log, print_table  # noqa: E402

PARTS = {
    "webhook": "bench_webhook",
    "webhook-vs-flask": "bench_vs_flask",
    "idle": "bench_idle",
    "offline": "bench_offline",
    "slowai": "bench_slowai",
    "claim": "bench_claim",
    "simulate": "bench_simulate",
    "prune": "bench_prune",
    "adaptive": "bench_adaptive",
    "takeover": "bench_takeover",
    "metrics": "bench_metrics",
    "pg": "bench_pg",
}
BUSY_WARN = 0.25  # CPUs used by other processes before a part starts: worth a warning


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("parts", nargs="*", metavar="PART",
                        help=f"parts to run: {', '.join(PARTS)}, or all (default: all)")
    parser.add_argument("--runs", type=int, default=None, help="repetitions per figure (default 3; simulate 1)")
    parser.add_argument("--seconds", type=float, default=5.0, help="webhook: seconds of load per run (default 5)")
    parser.add_argument("--threads", type=int, default=None, help="webhook: `serve --threads` (default: serve's)")
    parser.add_argument("--batches", type=int, default=None, help="offline/slowai: batches per run")
    parser.add_argument("--wait-idle", type=float, default=0, metavar="SECONDS",
                        help="before each part, wait up to this long for other processes to go quiet")
    args = parser.parse_args(argv)
    unknown = [p for p in args.parts if p not in PARTS and p != "all"]
    if unknown:
        parser.error(f"unknown part {', '.join(unknown)}; choose from {', '.join(PARTS)}, all")
    names = list(PARTS) if not args.parts or "all" in args.parts else list(dict.fromkeys(args.parts))
    figures, busy_notes = [], []
    started = time.monotonic()
    for name in names:
        log(f"--- {name}")
        busy = cpus_busy()
        deadline = time.monotonic() + args.wait_idle
        while busy is not None and busy > BUSY_WARN and time.monotonic() < deadline:
            busy = cpus_busy(2.0)
        if busy is not None and busy > BUSY_WARN:
            busy_notes.append(f"{name}: other processes were using {busy:.1f} of {os.cpu_count()} CPUs at the start")
            log("WARNING: " + busy_notes[-1] + "; figures will be low")
        module = importlib.import_module(PARTS[name])
        options = {"seconds": args.seconds, "threads": args.threads}
        if args.runs is not None:
            options["runs"] = max(1, args.runs)
        if args.batches:
            options["batches"] = args.batches
        figures += module.run(**options)
    print()
    print(f"smsbatch benchmarks ({', '.join(names)}; {os.cpu_count()} CPUs; "
          f"{time.monotonic() - started:.0f} s)")
    print_table(figures)
    for note in busy_notes:
        print(f"  WARNING {note}; figures may be low (try --wait-idle 300)")
    missed = [f for f in figures if f.ok is False or (f.target is not None and not f.values)]
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
