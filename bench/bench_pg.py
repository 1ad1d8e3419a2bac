"""PostgreSQL beside SQLite, in one run: the webhook, claim-to-finish with four processors,
and what an idle processor costs the database.

webhook   `smsbatch serve` under wrk (16 connections, pre-signed bodies, every one a new
          MessageSid; bench_webhook's helpers) on a fresh SQLite file, on a fresh PostgreSQL
          database with one instance, and with two instances on two ports, each under a wrk
          of its own at the same time. Every stored text is checked against what wrk sent.
          Both engines acknowledge durably: SQLite synchronous=FULL (group commit),
          PostgreSQL synchronous_commit=on (one transaction per text).
backlog   claiming 16 at a time (each then finished) with 1,000 and with 100,000 batches due, as
          the `claim` part does on SQLite (bench_claim.py)
claim     four `smsbatch process --ai offline --sms console` at once on 400 due batches
          (one text each): batches/s for the four together, and the median claim-to-finish
          time of one batch (completed_at - started_at, stamped by the processors).
idle      `smsbatch process --for 10` and `--for 20` with nothing due, each on a PostgreSQL
          database of its own: the transactions/s its idle rounds cost (the difference of
          the two runs over 10 s; pg_stat_database.xact_commit, where each statement outside
          a transaction is one), the rows they read (tup_returned), and a whole short run.

Targets (issue 14): one webhook on PostgreSQL >= 0.8x SQLite; two instances >= 1.3x one;
an idle processor about one query a second at most.

The server: SMSBATCH_BENCH_POSTGRES_URL, else SMSBATCH_TEST_POSTGRES_URL, else
postgresql://postgres@127.0.0.1:5432/postgres; each measurement makes a database of its
own there (smsbatch_bench_*) and drops it.

    python bench/run.py pg [--runs 1] [--seconds 5]
"""

import os
import secrets
import shutil
import statistics
import subprocess
import time
from urllib.parse import urlsplit, urlunsplit

from bench_webhook import CONNECTIONS, INSTALL_HINT, MAX_RATE, run_wrk, start_server, twilio_form
from common import T0, Figure, clean_env, log, smsbatch_cmd, stop_process, tempdir

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
WEBHOOK_RATIO, TWO_INSTANCES_RATIO, IDLE_QPS = 0.8, 1.3, 1.0
CLAIM_BATCHES, PROCESSORS = 400, 4
IDLE_SECONDS = 10


def server_url():
    return os.environ.get("SMSBATCH_BENCH_POSTGRES_URL") or os.environ.get("SMSBATCH_TEST_POSTGRES_URL") \
        or DEFAULT_URL


class Scratch:
    """A database of its own on the server (dropped on exit); `.url` reaches it."""

    def __init__(self, admin_url):
        from smsbatch.db import Store

        self.name = f"smsbatch_bench_{secrets.token_hex(4)}"
        self.admin = Store(admin_url)
        self.admin.conn.execute(f"CREATE DATABASE {self.name}")
        parts = urlsplit(admin_url)
        self.url = urlunsplit((parts.scheme, parts.netloc, f"/{self.name}", parts.query, ""))

    def __enter__(self):
        return self

    def stats(self):
        """(xact_commit, tup_returned) of this database so far."""
        row = self.admin.conn.execute("SELECT xact_commit, tup_returned FROM pg_stat_database WHERE datname = ?",
                                      (self.name,)).fetchone()
        return row[0], row[1]

    def __exit__(self, *exc):
        self.admin.conn.execute(f"DROP DATABASE {self.name} WITH (FORCE)")
        self.admin.close()


def write_bodies(path, first, count):
    """Lines '<signature> <body>' for texts first .. first+count-1 (bench_webhook's forms)."""
    from urllib.parse import urlencode

    from twilio.request_validator import RequestValidator

    from bench_webhook import PUBLIC_URL, TOKEN

    validator = RequestValidator(TOKEN)
    with open(path, "w") as out:
        for i in range(first, first + count):
            params = twilio_form(i)
            out.write(f"{validator.compute_signature(PUBLIC_URL, params)} {urlencode(params)}\n")


def sent_sids(result, first):
    """The MessageSids one wrk really sent (thread t of n: lines t, t+n, ...; the first body
    of thread 0 is only wrk's start-up check)."""
    n = len(result["per_thread"])
    sids = {twilio_form(first + t + n * k)["MessageSid"] for t, count in enumerate(result["per_thread"])
            for k in range(count)}
    sids.discard(twilio_form(first)["MessageSid"])
    return sids


def stored_sids(db):
    from smsbatch.db import Store

    store = Store(db)
    try:
        return {r[0] for r in store.conn.execute("SELECT sid FROM messages")}
    finally:
        store.close()


def settle(db, limit=10.0):
    """Wait until the number of stored texts stops changing (at most `limit` seconds)."""
    from smsbatch.db import Store

    store, last = Store(db), -1
    try:
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            now = store.conn.execute("SELECT count(*) FROM messages").fetchone()[0]
            if now == last:
                return
            last = now
            time.sleep(0.2)
    finally:
        store.close()


def webhook_run(db, folder, bodies, seconds, instances):
    """Instances of `serve` on `db`, each under its own wrk at once. Returns (req/s, p99 ms, problems)."""
    servers, results = [], [None] * instances
    try:  # every serve started is stopped, whatever fails (a second one not starting, Ctrl-C)
        for i in range(instances):  # each its own folder: its own serve.stderr
            os.makedirs(os.path.join(folder, str(i)))
            servers.append(start_server(db, os.path.join(folder, str(i)), None))
        import threading

        def load(i):
            results[i] = run_wrk(servers[i][1], bodies[i][0], seconds, 1)

        threads = [threading.Thread(target=load, args=(i,)) for i in range(instances)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        settle(db)  # requests wrk sent just before it stopped are still being stored
    finally:
        for proc, _ in servers:
            stop_process(proc)
    expected = set().union(*(sent_sids(r, first) for r, (_, first) in zip(results, bodies)))
    stored = stored_sids(db)
    rate = sum(r["completed"] / (r["duration_us"] / 1e6) for r in results)
    p99 = max(r["p99_us"] for r in results) / 1000
    problems = []
    if stored != expected:
        problems.append(f"{len(expected - stored)} sent texts missing, {len(stored - expected)} unexpected")
    bad = sum(r["non2xx"] + r["err_connect"] + r["err_read"] + r["err_write"] + r["err_timeout"] for r in results)
    if bad:
        problems.append(f"{bad} non-2xx answers or socket errors")
    return rate, p99, len(stored), problems


def webhook(admin_url, runs, seconds):
    names = {"sqlite": "SQLite, 1 serve", "pg1": "PostgreSQL, 1 serve", "pg2": "PostgreSQL, 2 serve (2 ports)"}
    rps = {k: Figure("pg", f"webhook {v}", "req/s") for k, v in names.items()}
    p99 = {k: Figure("pg", f"webhook {v} p99", "ms") for k, v in names.items()}
    ratio1 = Figure("pg", "webhook PostgreSQL / SQLite (1 serve)", "x", target=WEBHOOK_RATIO)
    ratio2 = Figure("pg", "webhook PostgreSQL 2 serve / 1 serve", "x", target=TWO_INSTANCES_RATIO)
    figures = [*rps.values(), *p99.values(), ratio1, ratio2]
    if shutil.which("wrk") is None:
        ratio1.note = "NOT MEASURED: " + INSTALL_HINT
        return figures
    problems = []
    with tempdir("pgbodies") as folder:
        count = int(MAX_RATE * seconds)
        bodies = [(os.path.join(folder, f"bodies{i}.txt"), i * count) for i in range(2)]
        for path, first in bodies:
            write_bodies(path, first, count)
        for n in range(runs):
            for key in ("sqlite", "pg1", "pg2"):
                with tempdir("pgwebhook") as work:
                    if key == "sqlite":
                        rate, late, stored, trouble = webhook_run(os.path.join(work, "webhook.db"), work, bodies,
                                                                  seconds, 1)
                    else:
                        with Scratch(admin_url) as scratch:
                            rate, late, stored, trouble = webhook_run(scratch.url, work, bodies, seconds,
                                                                      1 if key == "pg1" else 2)
                rps[key].values.append(rate)
                p99[key].values.append(late)
                problems += [f"{names[key]} run {n + 1}: {t}" for t in trouble]
                log(f"pg webhook {names[key]} run {n + 1}/{runs}: {rate:,.0f} req/s, p99 {late:.1f} ms, "
                    f"{stored:,} texts stored{'; ' + '; '.join(trouble) if trouble else ', all as sent'}")
            ratio1.values.append(rps["pg1"].values[-1] / rps["sqlite"].values[-1])
            ratio2.values.append(rps["pg2"].values[-1] / rps["pg1"].values[-1])
    ratio1.note = "db check: " + ("; ".join(problems) if problems else
                                  "every stored text is one wrk sent, every one sent is stored; all 200")
    return figures


def seed(db, count):
    """`count` people, one text each, all due now (real time: the processors use the clock)."""
    from smsbatch.batching import Rules
    from smsbatch.db import Store

    store = Store(db)
    store.migrate()
    at = time.time() - 60
    for i in range(count):
        store.add_message(f"SMclaim{i:08d}", f"+1555{4000000 + i:07d}", "+15550000000", f"question {i}", at, Rules())
    store.close()


def claim_run(db, scratch=None):
    """Four processors at once on CLAIM_BATCHES due batches: (batches/s, median claim-to-finish
    ms, database transactions per batch (PostgreSQL: `scratch`'s statistics; else None))."""
    from smsbatch.db import Store

    seed(db, CLAIM_BATCHES)
    if scratch:
        time.sleep(1.0)  # pg_stat_database is updated when a session reports: let the seeding's land
        before = scratch.stats()[0]
    env = clean_env(SMSBATCH_DB=db)
    cmd = smsbatch_cmd() + ["process", "--ai", "offline", "--sms", "console", "--concurrency", "4", "--json"]
    started = time.monotonic()
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for _ in range(PROCESSORS)]
    for proc in procs:
        proc.wait(300)
    wall = time.monotonic() - started
    store = Store(db)
    rows = store.conn.execute("SELECT completed_at - started_at FROM batches WHERE state = 'sent'").fetchall()
    store.close()
    if len(rows) != CLAIM_BATCHES:
        raise RuntimeError(f"{len(rows)} of {CLAIM_BATCHES} batches sent")
    per_batch = None
    if scratch:
        time.sleep(1.5)
        per_batch = (scratch.stats()[0] - before) / CLAIM_BATCHES
    return CLAIM_BATCHES / wall, statistics.median(r[0] for r in rows) * 1000, per_batch


def claim(admin_url, runs):
    rate = {k: Figure("pg", f"claim-to-finish, 4 processors, {k}", "batches/s") for k in ("SQLite", "PostgreSQL")}
    each = {k: Figure("pg", f"claim-to-finish one batch, {k} (median)", "ms") for k in ("SQLite", "PostgreSQL")}
    xacts = Figure("pg", "claim-to-finish, PostgreSQL transactions per batch", "xact")
    for n in range(runs):
        with tempdir("pgclaim") as folder:
            r, m, _ = claim_run(os.path.join(folder, "claim.db"))
        rate["SQLite"].values.append(r)
        each["SQLite"].values.append(m)
        with Scratch(admin_url) as scratch:
            r, m, x = claim_run(scratch.url, scratch)
        rate["PostgreSQL"].values.append(r)
        each["PostgreSQL"].values.append(m)
        xacts.values.append(x)
        log(f"pg claim run {n + 1}/{runs}: SQLite {rate['SQLite'].values[-1]:.0f} batches/s "
            f"({each['SQLite'].values[-1]:.1f} ms each), PostgreSQL {r:.0f} batches/s ({m:.1f} ms each, "
            f"{x:.1f} transactions a batch)")
    xacts.note = "pg_stat_database.xact_commit over the run / batches (a statement outside a transaction is one)"
    return [*rate.values(), *each.values(), xacts]


def backlog(admin_url, runs):
    """Claiming with a backlog on PostgreSQL, as the `claim` part measures it on SQLite
    (bench_claim: claim 16 at a time and finish each, 1,000 vs 100,000 due)."""
    from bench_claim import TARGET_RATIO, build_backlog, measure

    rates = {n: Figure("pg", f"claim 16 at a time, {n:,} due, PostgreSQL", "batches/s") for n in (1000, 100000)}
    ratio = Figure("pg", "claim, 100,000 / 1,000 due, PostgreSQL", "x", target=TARGET_RATIO)
    for n in range(runs):
        for count, figure in rates.items():
            with Scratch(admin_url) as scratch:
                seed(scratch.url, 0)
                build_backlog(scratch.url, count)
                figure.values.append(measure(scratch.url, 16))
        ratio.values.append(rates[100000].values[-1] / rates[1000].values[-1])
        log(f"pg backlog run {n + 1}/{runs}: {rates[1000].values[-1]:.0f} batches/s with 1,000 due, "
            f"{rates[100000].values[-1]:.0f} with 100,000")
    return [*rates.values(), ratio]


def idle_transactions(admin_url, seconds):
    """(transactions, rows read) of one `process --for seconds` with nothing due, on a new database."""
    with Scratch(admin_url) as scratch:
        seed(scratch.url, 0)
        time.sleep(1.0)  # pg_stat_database is updated when a session reports: let migrate's land
        before = scratch.stats()
        env = clean_env(SMSBATCH_DB=scratch.url, SMSBATCH_BACKFILL="0")
        proc = subprocess.run(smsbatch_cmd() + ["process", "--for", str(seconds), "--ai", "offline",
                                                "--sms", "console", "--json"], env=env, capture_output=True,
                              timeout=seconds + 60)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr.decode()[-2000:])
        time.sleep(1.5)
        after = scratch.stats()
    return after[0] - before[0], after[1] - before[1]


def idle(admin_url, runs):
    """An idle `process --for`: what its rounds cost (a long run minus a short one, so the
    start and the end of a run are left out), and what a whole short run costs."""
    qps = Figure("pg", "idle processor, steady state", "xact/s", target=IDLE_QPS, better="lower")
    rows = Figure("pg", "idle processor, steady state rows read", "rows/s")
    whole = Figure("pg", f"idle processor, a whole --for {IDLE_SECONDS} run", "xact")
    for n in range(runs):
        short, long_ = idle_transactions(admin_url, IDLE_SECONDS), idle_transactions(admin_url, 2 * IDLE_SECONDS)
        qps.values.append((long_[0] - short[0]) / IDLE_SECONDS)
        rows.values.append((long_[1] - short[1]) / IDLE_SECONDS)
        whole.values.append(short[0])
        log(f"pg idle run {n + 1}/{runs}: --for {IDLE_SECONDS}: {short[0]} transactions, {short[1]} rows read; "
            f"--for {2 * IDLE_SECONDS}: {long_[0]} transactions, {long_[1]} rows read")
    qps.note = ("pg_stat_database.xact_commit (a statement outside a transaction is one): "
                f"--for {2 * IDLE_SECONDS} minus --for {IDLE_SECONDS}, per second")
    return [qps, rows, whole]


def run(runs=None, seconds=5.0, **_):
    runs = runs or 1
    admin_url = server_url()
    try:
        from smsbatch.db import Store

        Store(admin_url).close()
    except Exception as exc:
        figure = Figure("pg", "PostgreSQL", "-")
        figure.note = f"NOT MEASURED: no PostgreSQL server at {admin_url.split('@')[-1]} ({exc})"
        return [figure]
    log(f"pg: server {admin_url.split('@')[-1]}; T0 {T0:.0f}; {CONNECTIONS} wrk connections per serve")
    return webhook(admin_url, runs, seconds) + claim(admin_url, runs) + backlog(admin_url, runs) + idle(admin_url, runs)
