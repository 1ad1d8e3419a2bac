"""`smsbatch process` when nothing is due: the whole run, as cron pays it every minute.

A migrated database with a few open batches that are not yet due (quiet period 10 min),
real provider choice (`--ai openai --sms twilio`) with dummy credentials, so the run
proves the openai and twilio libraries are not even imported when there is no work.
One extra run under `python -X importtime` checks which modules were imported.
The backfill (a look into Twilio's message log, once a minute across all processors) is
off here (SMSBATCH_BACKFILL=0): this is the run that finds nothing to do. With the Twilio
sender, one run a minute also takes the backfill's turn, which imports twilio and asks
Twilio: that run is measured as `backfill turn` (against a refused local port, so it
measures our cost, not Twilio's latency).

Target: <= 150 ms wall per run (median), and openai, twilio and rich never imported.

    python bench/run.py idle [--runs 3]
"""

import re
import statistics
import subprocess
import time

from common import OUR_NUMBER, PYTHON, Figure, clean_env, fresh_db, log, percentile, smsbatch_cmd, tempdir

CALLS_PER_RUN = 10
TARGET_MS = 150.0
FORBIDDEN = ("openai", "twilio", "rich", "httpx", "requests")  # the heavy libraries: only when there is work
OPEN_BATCHES = 5


def idle_env(db):
    return clean_env(
        SMSBATCH_DB=db, SMSBATCH_QUIET_SECONDS=600, SMSBATCH_MAX_WAIT_SECONDS=900,
        OPENAI_API_KEY="sk-dummy-not-used", TWILIO_ACCOUNT_SID="AC" + "0" * 32,
        TWILIO_AUTH_TOKEN="dummy-not-used", TWILIO_FROM_NUMBER=OUR_NUMBER,
        OPENAI_BASE_URL="http://127.0.0.1:9/v1", SMSBATCH_TWILIO_BASE_URL="http://127.0.0.1:9",
        SMSBATCH_BACKFILL="0",
    )


def prepare(folder):
    """A db with a few open batches due in ten minutes."""
    from smsbatch.batching import Rules
    from smsbatch.db import Store

    db = fresh_db(folder, "idle.db")
    store = Store(db)
    rules = Rules(quiet_seconds=600, max_wait_seconds=900)
    now = time.time()
    for i in range(OPEN_BATCHES):
        for j in range(2):
            store.add_message(f"SMidle{i:04d}{j}", f"+1555{4000000 + i:07d}", OUR_NUMBER, f"text {j}", now, rules)
    store.close()
    return db


def one_call(cmd, env):
    started = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    elapsed = (time.perf_counter() - started) * 1000
    if out.returncode != 0 or "claimed 0" not in out.stdout:
        raise RuntimeError(f"process run failed ({out.returncode}): {out.stdout} {out.stderr}")
    return elapsed


def imported_modules(db, env):
    """Top-level names of every module a run imports (python -X importtime)."""
    cmd = [PYTHON, "-X", "importtime", "-m", "smsbatch", "--db", db, "process", "--ai", "openai", "--sms", "twilio"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    names, costs = set(), []
    for line in out.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)", line)
        if m:
            names.add(m.group(4).split(".")[0])
            if not m.group(3).strip(" ") and len(m.group(3)) == 1:
                costs.append((int(m.group(2)), m.group(4)))
    return names, sorted(costs, reverse=True)[:6]


def run(runs=3, **_):
    part = "idle"
    median = Figure(part, "process, nothing due: median wall", "ms", target=TARGET_MS, better="lower")
    p90 = Figure(part, "process, nothing due: p90 wall", "ms")
    bare = Figure(part, "bare `python -c pass` (floor)", "ms")
    turn = Figure(part, "process, nothing due, taking the backfill's turn (once a minute): median wall", "ms")
    with tempdir("idle") as folder:
        db = prepare(folder)
        env = idle_env(db)
        cmd = smsbatch_cmd() + ["--db", db, "process", "--ai", "openai", "--sms", "twilio"]
        one_call(cmd, env)  # warm the OS file cache
        for n in range(runs):
            times = [one_call(cmd, env) for _ in range(CALLS_PER_RUN)]
            floor = [one_call_bare() for _ in range(3)]
            median.values.append(statistics.median(times))
            p90.values.append(percentile(times, 90))
            bare.values.append(statistics.median(floor))
            turn.values.append(statistics.median([backfill_turn(db, cmd, env) for _ in range(3)]))
            log(f"idle run {n + 1}/{runs}: {CALLS_PER_RUN} runs, median {statistics.median(times):.0f} ms, "
                f"p90 {percentile(times, 90):.0f} ms (python alone {statistics.median(floor):.0f} ms)")
        names, top = imported_modules(db, env)
    heavy = [m for m in FORBIDDEN if m in names]
    median.note = (f"imported heavy libraries: {', '.join(heavy)} -- MISS" if heavy else
                   f"openai/twilio/rich/httpx/requests not imported ({len(names)} top-level modules); "
                   "largest imports: " + ", ".join(f"{name} {us / 1000:.0f} ms" for us, name in top[:4]))
    if heavy:
        median.values.append(float("inf"))  # a heavy import is a miss whatever the time
    return [median, p90, bare, turn]


def backfill_turn(db, cmd, env):
    """One run that takes the backfill's turn: the turn is freed first, as a minute passing would."""
    import sqlite3

    conn = sqlite3.connect(db)
    conn.execute("DELETE FROM backfill")
    conn.commit()
    conn.close()
    return one_call(cmd, env | {"SMSBATCH_BACKFILL": "1"})


def one_call_bare():
    started = time.perf_counter()
    subprocess.run([PYTHON, "-c", "pass"], check=True, timeout=30)
    return (time.perf_counter() - started) * 1000
