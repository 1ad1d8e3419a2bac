"""Load: several client processes post thousands of signed texts from hundreds of phones
to a real `smsbatch serve` process while two `smsbatch process --for` processes answer
them on the same database. Afterwards every text is stored once and is in exactly one
batch, answered once (checked against what the Twilio stand-in received).

Run as a script (`python test_load.py client ...`) this file is one load client.
"""

import http.client
import json
import os
import random
import signal
import subprocess
import sys
import time
from urllib.parse import urlencode, urlparse

CLIENTS = 4
PHONES_PER_CLIENT = 100
TEXTS_PER_PHONE = (8, 16)  # uniform range: about 4800 texts in all
REPLAY_EVERY = 10  # every 10th request is followed by an exact replay of an earlier one
STOP_EVERY = 15  # every 15th phone ends with STOP
SHARED = 40  # texts every client posts, same MessageSid, at the same time: stored once
PROCESSORS = 2
PUBLIC_URL = "https://smsbatch.example.test/sms"
OUR_NUMBER = "+15550000000"
CLIENT_DEADLINE = 90.0  # seconds: every loop here is bounded in count and in time
URGENT_WORDS = ["urgent", "emergency"]


# -- the client (a separate OS process) -------------------------------------------

def client_texts(index, seed):
    """This client's texts: (sid, phone, body), phones interleaved at random, each phone's in order."""
    rng = random.Random(seed)
    queues = []
    for p in range(PHONES_PER_CLIENT):
        phone = f"+1555{index:02d}{p:05d}"
        count = rng.randint(*TEXTS_PER_PHONE)
        bodies = [f"{phone} says {n}: " + rng.choice(["hi", "quick question", "where is my order",
                                                      "are you open", "thanks", "also"]) for n in range(count)]
        for n in range(count):
            if rng.random() < 0.03:
                bodies[n] += " " + rng.choice(URGENT_WORDS)
        if p % STOP_EVERY == 0:
            bodies[-1] = "STOP"
        queues.append([(f"SM{0x10ad:04x}{index:06d}{p:010d}{n:012d}", phone, b) for n, b in enumerate(bodies)])
    order = []
    while any(queues):
        queue = rng.choice([q for q in queues if q])
        order.append(queue.pop(0))
    for n in range(SHARED):  # as if Twilio retried a webhook on another connection
        order.insert(rng.randrange(len(order) + 1), (f"SM{0x5ea2ed:06x}{n:026d}", f"+1555888{n:04d}", f"shared {n}"))
    return order


def post(host, port, token, params):
    from twilio.request_validator import RequestValidator

    body = urlencode(params)
    signature = RequestValidator(token).compute_signature(PUBLIC_URL, params)
    conn = http.client.HTTPConnection(host, port, timeout=20)
    try:
        conn.request("POST", "/sms", body=body, headers={
            "Content-Type": "application/x-www-form-urlencoded", "X-Twilio-Signature": signature})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def client_main(url, token, index, seed):
    """Post this client's texts (and some exact replays); print a JSON summary on stdout."""
    parsed = urlparse(url)
    rng = random.Random(seed + 1)
    statuses, posted, replays = {}, [], 0
    end = time.monotonic() + CLIENT_DEADLINE
    for i, (sid, phone, body) in enumerate(client_texts(index, seed)):
        if time.monotonic() > end:
            break
        params = {"MessageSid": sid, "AccountSid": "AC" + "0" * 32, "From": phone, "To": OUR_NUMBER,
                  "Body": body, "NumMedia": "0"}
        status = post(parsed.hostname, parsed.port, token, params)
        statuses[status] = statuses.get(status, 0) + 1
        posted.append([sid, phone, body, status])
        if i % REPLAY_EVERY == REPLAY_EVERY - 1:
            old_sid, old_phone, old_body, _ = posted[rng.randrange(len(posted))]
            again = {"MessageSid": old_sid, "AccountSid": "AC" + "0" * 32, "From": old_phone,
                     "To": OUR_NUMBER, "Body": old_body, "NumMedia": "0"}
            replay_status = post(parsed.hostname, parsed.port, token, again)
            statuses[replay_status] = statuses.get(replay_status, 0) + 1
            replays += 1
    json.dump({"posted": posted, "statuses": statuses, "replays": replays}, sys.stdout)


if __name__ == "__main__":
    if sys.argv[1:2] == ["client"]:
        client_main(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
        sys.exit(0)


# -- the test ------------------------------------------------------------------------

from fakes import FakeTwilio  # noqa: E402
from smsbatch.db import Store  # noqa: E402


def base_env(twilio, db_path):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SMSBATCH_", "TWILIO_", "OPENAI_", "ENABLE_AI", "AI_SMS"))}
    env.update({
        # the offline AI; SMS through the real twilio client to the stand-in, whose token also signs
        "SMSBATCH_DB": db_path, "SMSBATCH_AI": "offline", "SMSBATCH_SMS": "twilio",
        "TWILIO_ACCOUNT_SID": twilio.ACCOUNT, "TWILIO_AUTH_TOKEN": twilio.TOKEN,
        "TWILIO_FROM_NUMBER": OUR_NUMBER, "SMSBATCH_TWILIO_BASE_URL": twilio.url,
        "SMSBATCH_PUBLIC_URL": PUBLIC_URL, "SMSBATCH_QUIET_SECONDS": "0.3", "SMSBATCH_MAX_WAIT_SECONDS": "1",
        "SMSBATCH_SMS_TIMEOUT_SECONDS": "5",
        # the replies must quote every text (checked below): a budget that fits a phone's 16
        # texts, so a batch that folded in a later one is never cut to the default 3 segments
        "SMSBATCH_MAX_SEGMENTS": "10",
    })
    return env


def start_server(env, log_path):
    """`smsbatch serve --port 0`; returns (process, URL) once it says where it listens."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "smsbatch", "serve", "--port", "0", "--threads", "16"],
                                env=env, stdout=subprocess.DEVNULL, stderr=log)
    end = time.monotonic() + 20
    while time.monotonic() < end:
        with open(log_path) as log:
            for line in log:
                if "listening on " in line:
                    return proc, line.split("listening on ", 1)[1].strip()
        assert proc.poll() is None, open(log_path).read()
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("smsbatch serve did not start: " + open(log_path).read())


def stop(proc, timeout=30):
    proc.send_signal(signal.SIGTERM)
    return proc.communicate(timeout=timeout)


def test_thousands_of_signed_texts_while_two_processors_run(db_path, tmp_path):
    with FakeTwilio() as twilio:
        env = base_env(twilio, db_path)
        server, url = start_server(env, tmp_path / "serve.log")
        try:
            # --limit well above the texts posted: a loop that reached its limit would exit on its
            # own, and the SIGTERM meant to stop it could then land in its interpreter's shutdown.
            processors = [subprocess.Popen(
                [sys.executable, "-m", "smsbatch", "process", "--for", "120", "--concurrency", "4", "--json",
                 "--limit", "100000"],
                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(PROCESSORS)]
            started = time.monotonic()
            clients = [subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "client", url, FakeTwilio.TOKEN, str(i), str(1000 + i)],
                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(CLIENTS)]
            results = []
            for client in clients:
                out, err = client.communicate(timeout=CLIENT_DEADLINE + 30)
                assert client.returncode == 0, err
                results.append(json.loads(out))
            posting_seconds = time.monotonic() - started
            loops = [stop(p) for p in processors]
            for p, (out, err) in zip(processors, loops):
                assert p.returncode == 0, err
                assert "Traceback" not in err and "locked" not in err, err[-3000:]
            during = [json.loads(out) for out, _ in loops]
            # Whatever the loops had not reached yet: one run as of a minute later (no sleeping).
            final = subprocess.run([sys.executable, "-m", "smsbatch", "process", "--now", str(time.time() + 60),
                                    "--json"], env=env, capture_output=True, text=True, timeout=120)
            assert final.returncode == 0, final.stderr
        finally:
            stop(server)
        server_log = open(tmp_path / "serve.log").read()
        assert "Traceback" not in server_log and "locked" not in server_log, server_log[-3000:]
        check_everything(Store(db_path), results, twilio, during, json.loads(final.stdout), posting_seconds)


def check_everything(store, results, twilio, during, final, posting_seconds):
    posted = [row for r in results for row in r["posted"]]
    statuses = {}
    for r in results:
        for code, n in r["statuses"].items():
            statuses[code] = statuses.get(code, 0) + n
    replays = sum(r["replays"] for r in results)
    requests = len(posted) + replays
    unique = {p[0] for p in posted}
    print(f"\nload: {requests} signed requests ({len(unique)} distinct texts, {requests - len(unique)} repeats: "
          f"replays and the same text from {CLIENTS} clients at once) from "
          f"{CLIENTS * PHONES_PER_CLIENT + SHARED} phones in {posting_seconds:.1f} s; "
          f"processed while posting: {sum(d['claimed'] for d in during)} claims; after: {final['claimed']}")
    assert len(unique) >= 4000 and statuses == {"200": requests}, statuses
    assert all(d["claimed"] > 0 for d in during), during  # both loops worked while texts poured in
    for report in during + [final]:
        assert report["failed"] == report["unknown"] == report["taken_over"] == report["error"] == 0, report

    # Every text stored once, exactly as posted; replays stored nothing.
    stored = {r["sid"]: r for r in store.conn.execute("SELECT sid, phone, body, kind, batch_id FROM messages")}
    assert len(stored) == len(unique)
    for sid, phone, body, _ in posted:
        assert (stored[sid]["phone"], stored[sid]["body"]) == (phone, body)

    batches = {r["id"]: dict(r) for r in store.conn.execute("SELECT * FROM batches")}
    opted_out = {r[0] for r in store.conn.execute("SELECT phone FROM opt_outs")}
    by_batch = {}
    for m in stored.values():
        by_batch.setdefault(m["batch_id"], []).append(m)
    # Nothing pending, nothing failed, nothing lost in a superseded batch.
    states = {}
    for b in batches.values():
        states[b["state"]] = states.get(b["state"], 0) + 1
    assert set(states) <= {"sent", "skipped", "superseded"}, states
    for batch_id, texts in by_batch.items():
        batch = batches[batch_id]
        if batch["state"] == "sent":
            assert all(t["kind"] == "text" and t["body"] in batch["response_text"] for t in texts), batch_id
        else:  # skipped: a keyword, or the phone said STOP before the reply went out
            assert batch["state"] == "skipped", batch
            assert batch["phone"] in opted_out or all(t["kind"] != "text" for t in texts), batch
    assert not any(by_batch.get(b["id"]) for b in batches.values() if b["state"] == "superseded")

    # Against the wire: one SMS per sent batch, the one recorded; none for the others.
    sent = [b for b in batches.values() if b["state"] == "sent"]
    wire = {m["sid"]: m for m in twilio.sent}
    assert len(twilio.sent) == len(wire) == len(sent)
    for b in sent:
        m = wire[b["provider_sid"]]
        assert (m["to"], m["body"]) == (b["phone"], b["response_text"])
    print(f"load: {len(sent)} batches answered once, {states.get('skipped', 0)} skipped (STOP), "
          f"{states.get('superseded', 0)} superseded; {len(stored)} texts, none lost")
