"""`smsbatch serve` side by side with Twilio's Flask quickstart shape, both durable.

The other server is what a user would write instead (flask_quickstart.py): Flask +
RequestValidator + one SQLite INSERT OR IGNORE per request (a connection per worker,
WAL, synchronous = FULL, as smsbatch), under gunicorn with 4 sync workers. Both get the
same pre-signed bodies from the same wrk script (16 connections, a new MessageSid per
request), in alternating runs (ours first, then last); afterwards each database must
hold exactly the texts wrk sent. A third contender, smsbatch's own app on plain threaded
wsgiref with the Writer's group commit (plain_wsgiref.py), shows what server.py's
selector and bursts earn.

Targets: ours / theirs requests per second >= 2.0 (median of the paired runs), and our
p99 <= 20 ms. Needs wrk and the bench extra (`pip install -e '.[bench]'`: flask, gunicorn).

    python bench/run.py webhook-vs-flask [--runs 4] [--seconds 5]
"""

import importlib.util
import os
import shutil
import sqlite3
import subprocess
import time

from bench_webhook import (INSTALL_HINT, MAX_RATE, PUBLIC_URL, TOKEN, one_run, run_wrk, settle, twilio_form,
                           write_bodies)
from common import BENCH_DIR, PYTHON, Figure, clean_env, log, stop_process, tempdir

TARGET_RATIO, TARGET_P99_MS = 2.0, 20.0
WORKERS = 4
FLASK_HINT = "flask/gunicorn are not installed; install the bench extra: pip install -e '.[bench]'"
PLAIN_CMD = lambda db: [PYTHON, os.path.join(BENCH_DIR, "plain_wsgiref.py"), db]  # noqa: E731
TABLE = "CREATE TABLE messages (sid TEXT PRIMARY KEY, phone TEXT, our_number TEXT, body TEXT, received_at REAL)"


def start_flask(db, folder):
    """gunicorn -w 4 (sync) on flask_quickstart:app, port 0; returns (process, port)."""
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(TABLE)
    conn.close()
    errpath = os.path.join(folder, "gunicorn.stderr")
    env = clean_env(TWILIO_AUTH_TOKEN=TOKEN, SMSBATCH_PUBLIC_URL=PUBLIC_URL, BENCH_FLASK_DB=db)
    cmd = [PYTHON, "-m", "gunicorn", "-w", str(WORKERS), "-k", "sync", "-b", "127.0.0.1:0",
           "--chdir", BENCH_DIR, "--log-level", "info", "flask_quickstart:app"]
    with open(errpath, "w") as errfile:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=errfile, env=env)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        text = open(errpath).read()
        booted = text.count("Booting worker")
        if "Listening at: http://127.0.0.1:" in text and booted >= WORKERS:
            return proc, int(text.split("Listening at: http://127.0.0.1:", 1)[1].split()[0])
        if proc.poll() is not None:
            raise RuntimeError("gunicorn exited: " + text)
        time.sleep(0.05)
    stop_process(proc)
    raise RuntimeError("gunicorn did not start within 30 s")


def flask_run(bodies, seconds, wrk_threads):
    with tempdir("flask") as folder:
        db = os.path.join(folder, "flask.db")
        proc, port = start_flask(db, folder)
        time.sleep(0.5)  # let the workers finish importing flask before the clock starts
        try:
            result = run_wrk(port, bodies, seconds, wrk_threads)
            settle(db)
        finally:
            stop_process(proc)
        conn = sqlite3.connect(db)
        stored_sids = {row[0] for row in conn.execute("SELECT sid FROM messages")}
        conn.close()
    n = len(result["per_thread"])
    expected = {twilio_form(t + n * k)["MessageSid"] for t, count in enumerate(result["per_thread"])
                for k in range(count)}
    expected.discard(twilio_form(0)["MessageSid"])
    result.update(stored=len(stored_sids), really_sent=len(expected), missing=len(expected - stored_sids))
    return result


def describe(name, r):
    rate = r["completed"] / (r["duration_us"] / 1e6)
    errors = r["err_connect"] + r["err_read"] + r["err_write"] + r["err_timeout"]
    log(f"{name}: {rate:,.0f} req/s, p50 {r['p50_us'] / 1000:.1f} ms, p99 {r['p99_us'] / 1000:.1f} ms, "
        f"non-2xx {r['non2xx']}, socket errors {errors}; sent {r['really_sent']:,}, stored {r['stored']:,}")
    problems = []
    if r["stored"] != r["really_sent"] or r.get("missing"):
        problems.append(f"{name}: sent {r['really_sent']} texts, db holds {r['stored']}")
    if r["non2xx"] or errors:
        problems.append(f"{name}: {r['non2xx']} non-2xx answers, {errors} socket errors")
    return rate, problems


def run(runs=4, seconds=5.0, threads=None, wrk_threads=1, **_):
    part = "webhook-vs-flask"
    ours = Figure(part, "smsbatch serve (16 conns)", "req/s")
    theirs = Figure(part, f"Flask + gunicorn -w {WORKERS}", "req/s")
    ratio = Figure(part, "ratio serve / Flask", "x", target=TARGET_RATIO)
    our_p99 = Figure(part, "smsbatch serve p99", "ms", target=TARGET_P99_MS, better="lower")
    their_p99 = Figure(part, "Flask p99", "ms")
    plain = Figure(part, "plain threaded wsgiref + group commit", "req/s")
    plain_p99 = Figure(part, "plain threaded wsgiref p99", "ms")
    figures = [ours, theirs, ratio, our_p99, their_p99, plain, plain_p99]
    missing = [hint for ok, hint in ((shutil.which("wrk"), INSTALL_HINT),
                                     (importlib.util.find_spec("gunicorn") and importlib.util.find_spec("flask"),
                                      FLASK_HINT)) if not ok]
    if missing:
        log("; ".join(missing))
        ratio.note = "NOT MEASURED: " + "; ".join(missing)
        return figures
    problems = []
    with tempdir("bodies") as folder:
        bodies = os.path.join(folder, "bodies.txt")
        write_bodies(bodies, int(MAX_RATE * seconds))
        for n in range(runs):
            pair = {}
            for name in (("serve", "flask", "plain") if n % 2 == 0 else ("plain", "flask", "serve")):
                if name == "flask":
                    r = flask_run(bodies, seconds, wrk_threads)
                else:
                    r = one_run(bodies, seconds, threads, wrk_threads, PLAIN_CMD if name == "plain" else None)
                rate, trouble = describe(f"run {n + 1}/{runs} {name}", r)
                problems += trouble
                pair[name] = (rate, r["p99_us"] / 1000)
            ours.values.append(pair["serve"][0])
            theirs.values.append(pair["flask"][0])
            ratio.values.append(pair["serve"][0] / pair["flask"][0])
            our_p99.values.append(pair["serve"][1])
            their_p99.values.append(pair["flask"][1])
            plain.values.append(pair["plain"][0])
            plain_p99.values.append(pair["plain"][1])
    ratio.note = ("paired runs, alternating which server goes first; db check: " +
                  ("; ".join(problems) if problems else "both stored exactly the texts sent, all answered 200"))
    return figures
