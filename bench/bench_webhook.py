"""Webhook ingest through `smsbatch serve`, signatures checked, measured with wrk.

Each run: a fresh migrated database, `smsbatch serve --port 0` as a subprocess with
TWILIO_AUTH_TOKEN and SMSBATCH_PUBLIC_URL set, then wrk (16 connections on loopback)
posting pre-signed Twilio forms, every one with its own MessageSid, for a fixed time.
Afterwards the server is stopped and the database must hold exactly as many texts
as wrk sent.

Target: >= 3,000 requests/s with p99 <= 20 ms.

    python bench/run.py webhook [--runs 3] [--seconds 5] [--threads 16]
"""

import json
import os
import shutil
import sqlite3
import subprocess
import time
from urllib.parse import urlencode

from common import (BENCH_DIR, OUR_NUMBER, Figure, clean_env, log, smsbatch_cmd, stop_process,
                    tempdir)

TOKEN = "bench-auth-token-0123456789abcdef"
PUBLIC_URL = "https://bench.smsbatch.invalid/sms"
CONNECTIONS = 16
TARGET_RPS, TARGET_P99_MS = 3000, 20.0
MAX_RATE = 12_000  # bodies prepared per second of run: far above what one Python server can do
INSTALL_HINT = ("wrk is not installed; install it with `sudo apt-get install -y wrk` (Debian/Ubuntu) "
                "or `brew install wrk` (macOS), then run this again")


def twilio_form(i):
    """A Twilio inbound-SMS form as Twilio posts it (all the usual fields), number i."""
    sid = f"SM{i:032x}"
    phone = f"+1555{2000000 + i // 3:07d}"  # bursts of 3 texts per phone: joins and new batches
    return {
        "ToCountry": "US", "ToState": "CA", "SmsMessageSid": sid, "NumMedia": "0", "ToCity": "",
        "FromZip": "94105", "SmsSid": sid, "FromState": "CA", "SmsStatus": "received",
        "FromCity": "SAN FRANCISCO", "Body": f"hello, this is text number {i} - is my order on its way?",
        "FromCountry": "US", "To": OUR_NUMBER, "ToZip": "", "NumSegments": "1", "MessageSid": sid,
        "AccountSid": "AC" + "0" * 32, "From": phone, "ApiVersion": "2010-04-01",
    }


def write_bodies(path, count):
    """`count` lines of '<signature> <body>', signed with twilio's own RequestValidator."""
    from twilio.request_validator import RequestValidator

    validator = RequestValidator(TOKEN)
    with open(path, "w") as out:
        for i in range(count):
            params = twilio_form(i)
            out.write(f"{validator.compute_signature(PUBLIC_URL, params)} {urlencode(params)}\n")


def start_server(db, folder, threads, cmd=None, extra_env=None):
    """`smsbatch serve --port 0` (or `cmd`, printing the same "listening on" line) on a
    fresh db (`extra_env`: more settings); returns (process, port)."""
    subprocess.run(smsbatch_cmd() + ["--db", db, "migrate"], check=True, capture_output=True,
                   env=clean_env(), timeout=60)
    errpath = os.path.join(folder, "serve.stderr")
    errfile = open(errpath, "w")
    env = clean_env(TWILIO_AUTH_TOKEN=TOKEN, SMSBATCH_PUBLIC_URL=PUBLIC_URL, **(extra_env or {}))
    if cmd is None:
        cmd = smsbatch_cmd() + ["--db", db, "serve", "--host", "127.0.0.1", "--port", "0"]
        if threads:
            cmd += ["--threads", str(threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=errfile, env=env)
    errfile.close()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with open(errpath) as f:
                for line in f:
                    if "listening on http://" in line:
                        port = int(line.rsplit(":", 1)[1].split("/")[0])
                        return proc, port
            if proc.poll() is not None:
                raise RuntimeError("smsbatch serve exited: " + open(errpath).read())
            time.sleep(0.02)
        raise RuntimeError("smsbatch serve did not start within 30 s")
    except BaseException:  # also KeyboardInterrupt: never leave a serve running (or its cgroup populated)
        stop_process(proc)
        raise


def run_wrk(port, bodies, seconds, wrk_threads):
    env = dict(os.environ, SMSBATCH_BENCH_BODIES=bodies, SMSBATCH_BENCH_THREADS=str(wrk_threads))
    cmd = ["wrk", f"-t{wrk_threads}", f"-c{CONNECTIONS}", f"-d{max(1, round(seconds))}s", "--timeout", "5s",
           "-s", os.path.join(BENCH_DIR, "wrk_signed.lua"), f"http://127.0.0.1:{port}/sms"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=seconds + 120)
    for line in out.stdout.splitlines():
        if line.startswith("WRKJSON "):
            return json.loads(line[len("WRKJSON "):])
    raise RuntimeError(f"wrk gave no result (exit {out.returncode}): {out.stdout}\n{out.stderr}")


def settle(db, limit=10.0):
    """Wait until the number of stored texts stops changing (at most `limit` seconds)."""
    deadline, last = time.monotonic() + limit, -1
    while time.monotonic() < deadline:
        conn = sqlite3.connect(db, timeout=5)
        now = conn.execute("SELECT count(*) FROM messages").fetchone()[0]
        conn.close()
        if now == last:
            return now
        last = now
        time.sleep(0.2)
    return last


def one_run(bodies, seconds, threads, wrk_threads, cmd=None, extra_env=None):
    """One wrk run against a fresh server; `cmd(db)` gives another server's command line."""
    with tempdir("webhook") as folder:
        db = os.path.join(folder, "webhook.db")
        proc, port = start_server(db, folder, threads, cmd(db) if cmd else None, extra_env)
        try:
            result = run_wrk(port, bodies, seconds, wrk_threads)
            settle(db)  # requests wrk sent just before it stopped are still being stored
        finally:
            code = stop_process(proc)
        conn = sqlite3.connect(db)
        stored_sids = {row[0] for row in conn.execute("SELECT sid FROM messages")}
        stored, batches = conn.execute("SELECT count(*), (SELECT count(*) FROM batches) FROM messages").fetchone()
        conn.close()
        with open(os.path.join(folder, "serve.stderr")) as f:
            server_errors = [ln for ln in f if "ERROR" in ln or "Traceback" in ln]
    # Thread t of n sent bodies t, t+n, t+2n, ...; wrk's start-up check consumed thread 0's first.
    n = len(result["per_thread"])
    expected = {twilio_form(t + n * k)["MessageSid"] for t, count in enumerate(result["per_thread"])
                for k in range(count)}
    expected.discard(twilio_form(0)["MessageSid"])
    result.update(stored=stored, batches=batches, server_exit=code, server_errors=len(server_errors),
                  really_sent=len(expected), missing=len(expected - stored_sids),
                  unexpected=len(stored_sids - expected))
    return result


def run(runs=3, seconds=5.0, threads=None, wrk_threads=1, **_):
    part = "webhook"
    rps = Figure(part, "serve POST /sms (16 conns)", "req/s", target=TARGET_RPS)
    p50 = Figure(part, "latency p50", "ms")
    p99 = Figure(part, "latency p99", "ms", target=TARGET_P99_MS, better="lower")
    figures = [rps, p50, p99]
    if shutil.which("wrk") is None:
        log(INSTALL_HINT)
        rps.note = "NOT MEASURED: " + INSTALL_HINT
        return figures
    problems = []
    with tempdir("bodies") as folder:
        bodies = os.path.join(folder, "bodies.txt")
        count = int(MAX_RATE * seconds)
        started = time.monotonic()
        write_bodies(bodies, count)
        log(f"webhook: {count:,} signed bodies ready in {time.monotonic() - started:.1f} s")
        for n in range(runs):
            r = one_run(bodies, seconds, threads, wrk_threads)
            rate = r["completed"] / (r["duration_us"] / 1e6)
            rps.values.append(rate)
            p50.values.append(r["p50_us"] / 1000)
            p99.values.append(r["p99_us"] / 1000)
            errors = r["err_connect"] + r["err_read"] + r["err_write"] + r["err_timeout"]
            log(f"webhook run {n + 1}/{runs}: {rate:,.0f} req/s, p50 {r['p50_us'] / 1000:.1f} ms, "
                f"p99 {r['p99_us'] / 1000:.1f} ms, max {r['max_us'] / 1000:.1f} ms; sent {r['really_sent']:,}, "
                f"answered {r['completed']:,}, non-2xx {r['non2xx']}, socket errors {errors}; "
                f"db: {r['stored']:,} texts in {r['batches']:,} batches")
            # Every request wrk sent carried a new MessageSid: the db must hold exactly those texts.
            if r["missing"] or r["unexpected"] or r["stored"] != r["really_sent"]:
                problems.append(f"run {n + 1}: sent {r['really_sent']} distinct texts, db holds {r['stored']} "
                                f"({r['missing']} missing, {r['unexpected']} unexpected)")
            if r["non2xx"] or errors:
                problems.append(f"run {n + 1}: {r['non2xx']} non-2xx answers, {errors} socket errors")
            if r["exhausted_threads"]:
                problems.append(f"run {n + 1}: ran out of pre-signed bodies (raise MAX_RATE)")
            if r["server_errors"]:
                problems.append(f"run {n + 1}: {r['server_errors']} error lines in the server log")
    rps.note = "db check: " + ("; ".join(problems) if problems else
                               "every run stored exactly the texts sent (same MessageSids), all answered 200")
    return figures
