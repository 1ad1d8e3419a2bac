"""Races with real concurrency, one contract on both engines: separate OS processes (two
`smsbatch serve`, or tests/racer.py doing one side of a race through the real Store)
started at the same instant, with a transaction held open by the test to line them up.

- twins: two first texts of one person at the same instant on two webhooks: one batch, one reply;
- one MessageSid posted to two webhooks at once: stored once, both 200;
- claimers: each batch claimed once, never two batches of one conversation in flight, and
  (PostgreSQL) a batch locked by a claimer mid-transaction is skipped, not waited for;
- a late move against a takeover: of a lost lease's move and the takeover, exactly one wins;
- receipts: of racing delivery receipts, the status never moves backwards;
- migrate from two processes at once on an empty database: both succeed, schema made once.
"""

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import T0, add, wait_for
from fakes import FakeTwilio, message_sid
from smsbatch.batching import Rules
from smsbatch.config import Settings
from smsbatch.db import Store
from test_load import OUR_NUMBER, base_env, post, start_server, stop

pytestmark = pytest.mark.engines
RACER = str(Path(__file__).with_name("racer.py"))
STARTUP = 30.0


def racers(db_path, *sides):
    """Start one racer process per (action, args); return them once every one is ready."""
    procs = [subprocess.Popen([sys.executable, RACER, action, db_path, json.dumps(args)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for action, args in sides]
    for proc in procs:
        line = proc.stdout.readline()
        assert line.strip() == "ready", proc.communicate(timeout=STARTUP)[1]
    return procs


def go(procs):
    """The start signal, to every racer at once."""
    for proc in procs:
        proc.stdin.write("go\n")
        proc.stdin.flush()


def results(procs):
    out = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 0, stderr
        out.append(json.loads(stdout))
    return out


class Gate:
    """A transaction the test holds open so that the racers all wait at its lock, then
    start together when it ends: SQLite's write lock, or (PostgreSQL) a lock on `batches`
    that stops every writer of it (and FOR UPDATE) but not plain reads."""

    def __init__(self, db_path, table="batches"):
        self.store, self.table = Store(db_path), table
        self.postgres = self.store.db.engine == "postgres"

    def __enter__(self):
        self._txn = self.store.transaction()
        conn = self._txn.__enter__()
        if self.postgres:
            conn.execute(f"LOCK TABLE {self.table} IN EXCLUSIVE MODE")
        return self

    def wait_for_waiters(self, count):
        """Until `count` other sessions wait for a lock (PostgreSQL); SQLite cannot tell: a moment."""
        if not self.postgres:
            time.sleep(0.5)
            return
        watcher = Store(self.store.path)
        try:
            assert wait_for(lambda: watcher.conn.execute(
                "SELECT count(*) FROM pg_locks WHERE NOT granted").fetchone()[0] >= count, STARTUP)
        finally:
            watcher.close()

    def __exit__(self, *exc):
        self._txn.__exit__(None, None, None)
        self.store.close()


# -- through two real webhooks -------------------------------------------------------

@pytest.fixture
def two_webhooks(db_path, tmp_path):
    """Two `smsbatch serve` processes on one database; yields (twilio stand-in, env, [urls])."""
    with FakeTwilio() as twilio:
        env = base_env(twilio, db_path)
        servers = [start_server(env, tmp_path / f"serve{i}.log") for i in range(2)]
        try:
            yield twilio, env, [url for _, url in servers]
        finally:
            for proc, _ in servers:
                stop(proc)
        for i in range(2):
            log = (tmp_path / f"serve{i}.log").read_text()
            assert "Traceback" not in log, log[-3000:]


def at_once(calls):
    """Run the calls on threads released together; returns their results in order."""
    barrier, out = threading.Barrier(len(calls)), [None] * len(calls)

    def run(i, call):
        barrier.wait()
        out[i] = call()

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


def params(sid, phone, body):
    return {"MessageSid": sid, "AccountSid": "AC" + "0" * 32, "From": phone, "To": OUR_NUMBER, "Body": body,
            "NumMedia": "0"}


def test_twins_on_two_webhooks_land_in_one_batch_and_a_sid_on_both_is_stored_once(two_webhooks, db_path):
    twilio, env, urls = two_webhooks
    hosts = [(u.split("//")[1].split(":")[0], int(u.rsplit(":", 1)[1].split("/")[0])) for u in urls]
    phones = [f"+1555919{i:04d}" for i in range(8)]
    for n, phone in enumerate(phones):
        twins = [params(message_sid(f"twin{n:03d}{side}"), phone, f"first text {side}") for side in "ab"]
        same = params(message_sid(f"same{n:03d}"), f"+1555929{n:04d}", "the same text twice")
        statuses = at_once([lambda h=h, p=p: post(*h, FakeTwilio.TOKEN, p) for h, p in zip(hosts, twins)]
                           + [lambda h=h: post(*h, FakeTwilio.TOKEN, same) for h in hosts])
        assert statuses == [200] * 4, statuses
    run = subprocess.run([sys.executable, "-m", "smsbatch", "process", "--now", str(time.time() + 120), "--json"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    store = Store(db_path)
    for n, phone in enumerate(phones):
        batches = store.conn.execute("SELECT id, message_count, state FROM batches WHERE phone = ?",
                                     (phone,)).fetchall()
        assert [(b["message_count"], b["state"]) for b in batches] == [(2, "sent")], (phone, batches)
        assert len(twilio.bodies_to(phone)) == 1
    same = [message_sid(f"same{n:03d}") for n in range(len(phones))]
    sids = [r[0] for r in store.conn.execute(f"SELECT sid FROM messages WHERE sid IN ({','.join('?' * len(same))})", same)]
    assert sorted(sids) == sorted(same)
    assert store.conn.execute("SELECT count(*) FROM batches WHERE phone LIKE '+1555929%'").fetchone()[0] == 8
    store.close()


# -- through the store, one process per side -------------------------------------------

def two_batches_per_conversation(store, conversations):
    """Each conversation: a full (queued) batch and an open one, both due at T0 + 100."""
    rules = Rules(max_messages=2)
    older = {}
    for n in range(conversations):
        phone = f"+1555939{n:04d}"
        older[phone] = add(store, phone, "one", T0, rules=rules).batch_id
        add(store, phone, "two", T0 + 1, rules=rules)
        add(store, phone, "three", T0 + 2, rules=rules)
    return older


def test_claimers_claim_each_batch_once_and_one_per_conversation(db_path, store, engine_name):
    older = two_batches_per_conversation(store, 30)
    # One conversation's due batch is locked by a claimer still in its transaction (PostgreSQL):
    # the others skip it rather than wait, and skip its newer batch too.
    locked_phone = next(iter(older))
    holder = Store(db_path)
    procs = racers(db_path, *[("claim", {"now": T0 + 100, "limit": 3})] * 3)
    if engine_name == "postgres":
        with holder.transaction() as conn:
            conn.execute("SELECT id FROM batches WHERE id = ? FOR UPDATE", (older[locked_phone],)).fetchall()
            go(procs)
            claimed = [c for r in results(procs) for c in r]
    else:
        go(procs)
        claimed = [c for r in results(procs) for c in r]
    holder.close()
    ids = [c[0] for c in claimed]
    assert len(ids) == len(set(ids)), "a batch was claimed twice"
    per_phone = {}
    for batch_id, phone in claimed:
        per_phone.setdefault(phone, []).append(batch_id)
    expected = {p: [b] for p, b in older.items() if engine_name == "sqlite" or p != locked_phone}
    assert per_phone == expected  # the older batch, never two of one conversation
    in_flight = store.conn.execute("SELECT phone, count(*) FROM batches WHERE claim IS NOT NULL GROUP BY phone")
    assert all(n == 1 for _, n in in_flight)
    assert store.conn.execute("SELECT count(*) FROM batches WHERE claim IS NOT NULL").fetchone()[0] == len(expected)


def test_a_late_move_and_a_takeover_never_both_win(db_path, store):
    """Processor A holds ten batches in *sending*; its lease runs out. A records its sends
    while B takes the batches over, both released at once: per batch exactly one wins."""
    for n in range(10):
        add(store, f"+1555949{n:04d}", "hello", T0)
    batches, _ = store.claim_due(T0 + 30, 100, 10, 10 ** 9, holder="a:1")
    settings = Settings(db_path=db_path)
    for b in batches:
        assert store.begin_send(b, "the reply", T0 + 31, settings) == "sending"
    mine = [dict(b) | {"state": "sending"} for b in batches]
    procs = racers(db_path, ("late_moves", {"batches": mine, "now": T0 + 200}), ("takeover", {"now": T0 + 200}))
    with Gate(db_path) as gate:
        go(procs)
        gate.wait_for_waiters(2)
    late, taken = results(procs)
    assert len(late) == 10
    for b in batches:
        row = store.get_batch(b["id"])
        assert late[b["id"]] != (b["id"] in taken), (b["id"], late[b["id"]], taken)
        if late[b["id"]]:
            assert row["state"] == "sent" and row["claim"] is None and row["provider_sid"] == f"SMlate{b['id']}"
        else:
            assert row["state"] == "sending" and row["claim"] not in (None, b["claim"]) and row["provider_sid"] is None
    wins = sum(late.values())
    outbound = store.conn.execute("SELECT count(*) FROM outbound").fetchone()[0]
    assert outbound == wins


def test_racing_receipts_never_move_a_status_backwards(db_path, store):
    sids = [f"SMrcpt{n:04d}" for n in range(40)]
    for sid in sids:
        store.record_manual(sid, "+15559590000", OUR_NUMBER, "a reply", T0)
    procs = racers(db_path, ("receipts", {"sids": sids, "statuses": ["queued", "sent"], "now": T0 + 1}),
                   ("receipts", {"sids": sids, "statuses": ["delivered"], "now": T0 + 2}),
                   ("receipts", {"sids": list(reversed(sids)), "statuses": ["sending", "sent"], "now": T0 + 3}))
    with Gate(db_path, "outbound") as gate:
        go(procs)
        gate.wait_for_waiters(3)
    results(procs)
    statuses = dict(store.conn.execute("SELECT sid, status FROM outbound").fetchall())
    assert statuses == {sid: "delivered" for sid in sids}


@pytest.fixture
def empty_target(engine_name, tmp_path, request):
    """A database nobody migrated yet: a new SQLite path, or an empty PostgreSQL schema."""
    return request.getfixturevalue("pg_url") if engine_name == "postgres" else str(tmp_path / "new.db")


def test_migrate_from_two_processes_at_once_on_an_empty_database(empty_target):
    procs = [subprocess.Popen([sys.executable, "-m", "smsbatch", "--db", empty_target, "migrate"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    said = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        said.append(out.strip().split(": ", 1)[1])
    from smsbatch.db import SCHEMA_VERSION

    assert sorted(said) == sorted([f"created at schema version {SCHEMA_VERSION}"]
                                  + [f"already at schema version {SCHEMA_VERSION}"] * 2), said
    store = Store(empty_target)
    assert store.version() == SCHEMA_VERSION
    if store.db.engine == "postgres":
        assert store.conn.execute("SELECT count(*) FROM schema_version").fetchone()[0] == 1
    store.close()
