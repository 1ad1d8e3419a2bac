"""Live load on one database from several processes, on both engines: two `smsbatch serve`
instances take signed texts (each text to one of them, replays and the twins of a person's
first text to both at once) while three `smsbatch process --for` loops answer them and one
of them is SIGKILLed and restarted again and again. Afterwards: every text answered 200 is
stored once, twins are in one batch, every batch is answered once on the wire (the Twilio
stand-in), nothing is left pending. Small on purpose: about 150 texts, a few seconds.
"""

import random
import subprocess
import sys
import threading
import time

import pytest

from conftest import wait_for
from fakes import FakeTwilio, message_sid
from smsbatch.db import Store
from test_load import base_env, post, start_server, stop
from test_pg_races import at_once, params

pytestmark = pytest.mark.engines
PHONES = 30
TEXTS_PER_PHONE = (2, 6)
TWINS = 8
PROCESSORS = 3
KILL_EVERY = (0.8, 1.6)  # seconds between SIGKILLs of a running processor


def processor(env):
    return subprocess.Popen([sys.executable, "-m", "smsbatch", "process", "--for", "60", "--concurrency", "4",
                             "--json", "--limit", "100000"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


class KillStorm:
    """Keeps PROCESSORS loops running, SIGKILLing one at random every KILL_EVERY seconds."""

    def __init__(self, env, seed):
        self.env, self.rng = env, random.Random(seed)
        self.procs = [processor(env) for _ in range(PROCESSORS)]
        self.kills, self.done = 0, threading.Event()
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _run(self):
        while not self.done.wait(self.rng.uniform(*KILL_EVERY)):
            i = self.rng.randrange(len(self.procs))
            self.procs[i].kill()
            self.procs[i].communicate()
            self.kills += 1
            self.procs[i] = processor(self.env)

    def stop(self):
        self.done.set()
        self.thread.join()
        for proc in self.procs:
            _, err = stop(proc)
            assert "Traceback" not in err, err[-3000:]


def texts(seed):
    """(sid, phone, body) in a random interleaving, each phone's in order; every 10th phone ends with STOP."""
    rng = random.Random(seed)
    queues = []
    for p in range(PHONES):
        phone = f"+1555969{p:04d}"
        bodies = [f"{phone} says {n}" for n in range(rng.randint(*TEXTS_PER_PHONE))]
        if p % 10 == 9:
            bodies[-1] = "STOP"
        queues.append([(message_sid(f"live{p:04d}{n:03d}"), phone, b) for n, b in enumerate(bodies)])
    order = []
    while any(queues):
        order.append(rng.choice([q for q in queues if q]).pop(0))
    return order


def test_two_webhooks_and_processors_killed_again_and_again(db_path, tmp_path):
    with FakeTwilio() as twilio:
        env = base_env(twilio, db_path)
        servers = [start_server(env, tmp_path / f"serve{i}.log") for i in range(2)]
        hosts = [(u.split("//")[1].split(":")[0], int(u.rsplit(":", 1)[1].split("/")[0])) for _, u in servers]
        storm = KillStorm(env, 7)
        posted, twins = [], []
        try:
            rng = random.Random(8)
            for i, (sid, phone, body) in enumerate(texts(9)):
                host = hosts[i % 2]
                posted.append((sid, phone, body, post(*host, FakeTwilio.TOKEN, params(sid, phone, body))))
                if i % 10 == 0:  # Twilio retrying on another connection: same sid, other webhook
                    assert post(*hosts[(i + 1) % 2], FakeTwilio.TOKEN, params(sid, phone, body)) == 200
                if i % 15 == 0 and len(twins) < TWINS:  # a new person's first text, twice at the same instant
                    phone = f"+1555979{len(twins):04d}"
                    pair = [(message_sid(f"twin{len(twins):04d}{s}"), phone, f"hi from {phone} {s}") for s in "ab"]
                    codes = at_once([lambda h=h, t=t: post(*h, FakeTwilio.TOKEN, params(*t))
                                     for h, t in zip(hosts, pair)])
                    posted += [t + (c,) for t, c in zip(pair, codes)]
                    twins.append(phone)
                time.sleep(rng.uniform(0, 0.02))
            store = Store(db_path)
            # the loops answer what is due while the storm goes on
            assert wait_for(lambda: store.conn.execute(
                "SELECT count(*) FROM batches WHERE state IN ('open', 'queued')").fetchone()[0] == 0, 30)
        finally:
            storm.stop()
            for proc, _ in servers:
                stop(proc)
        final = subprocess.run([sys.executable, "-m", "smsbatch", "process", "--now", str(time.time() + 120),
                                "--json"], env=env, capture_output=True, text=True, timeout=120)
        assert final.returncode == 0, final.stderr
        for i in range(2):
            log = (tmp_path / f"serve{i}.log").read_text()
            assert "Traceback" not in log, log[-3000:]
        assert storm.kills >= 2, "the storm killed nothing: the test proves little"
        check(store, twilio, posted, twins)
        store.close()


def check(store, twilio, posted, twins):
    assert {code for *_, code in posted} == {200}
    stored = {r["sid"]: r for r in store.conn.execute("SELECT sid, phone, body, batch_id FROM messages")}
    assert len(stored) == len(posted)  # every text stored, once
    for sid, phone, body, _ in posted:
        assert (stored[sid]["phone"], stored[sid]["body"]) == (phone, body)
    batches = {r["id"]: dict(r) for r in store.conn.execute("SELECT * FROM batches")}
    states = {b["state"] for b in batches.values()}
    assert states <= {"sent", "skipped", "superseded"}, states
    for phone in twins:
        [batch] = {m["batch_id"] for m in stored.values() if m["phone"] == phone}
        assert batches[batch]["message_count"] == 2
    sent = [b for b in batches.values() if b["state"] == "sent"]
    wire = {m["sid"]: m for m in twilio.sent}
    assert len(twilio.sent) == len(wire) == len(sent), "a reply went out twice, or was not recorded"
    for b in sent:
        assert (wire[b["provider_sid"]]["to"], wire[b["provider_sid"]]["body"]) == (b["phone"], b["response_text"])
    for m in stored.values():
        assert batches[m["batch_id"]]["state"] != "superseded", "a text was left in a superseded batch"
