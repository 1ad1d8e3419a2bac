"""A PostgreSQL server that vanishes without a word: its host lost in a failover, a network cut.

Nothing closes the connections, so no error comes: a statement waiting for its answer, or a
statement sent and never acknowledged, would wait for the kernel's defaults (2 h of keepalive
silence, some 15 min of retransmissions), and the webhook's committer with it. smsbatch asks
the kernel to give up after 10-11 s (engine_pg.NETWORK_TIMEOUTS). Tested for real: the client
runs in a network namespace of its own, reaching the server through a veth pair and a relay
(tests/test_postgres.Proxy), and the veth is taken down: from then on every packet is lost.
Needs root and `ip` (iproute2); skipped otherwise.
"""

import json
import os
import secrets
import shutil
import subprocess
import sys
import threading
import time
from urllib.parse import urlsplit

import pytest

from conftest import wait_for
from fakes import FakeTwilio
from smsbatch.db import Store
from test_load import base_env, post, start_server, stop
from test_pg_outage import health
from test_postgres import Proxy

pytestmark = pytest.mark.postgres
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The client: a Database (as `process` and the commands use) and a pooled connection (as the
# webhook's committers use). One statement is waiting for its answer when the network goes,
# one is sent after (as a committer's statements in a transaction are: not a read that may run
# again on a new connection within the loan's deadline); each reports how it ended and when. Then, the network back,
# the Database reconnects by itself.
CLIENT = r"""
import json, sys, threading, time
from smsbatch.engine import StoreError
from smsbatch.engine_pg import Database
from smsbatch.engine_pg_pool import Pool

url = sys.argv[1]
database, pool = Database(url, 5.0), Pool(url, 1, 5.0)
pooled = pool.connect(time.monotonic() + 30)
database.conn.execute("SELECT 1")
pooled.conn.execute("SELECT 1")
results = {}

def attempt(name, on, sql):
    started = time.monotonic()
    try:
        on.conn.execute(sql).fetchall()
        results[name] = ["answered", time.monotonic() - started]
    except StoreError as exc:
        results[name] = [type(exc).__name__, time.monotonic() - started]

waiting = threading.Thread(target=attempt, args=("waiting", database, "SELECT pg_sleep(2)"))
waiting.start()
time.sleep(0.3)  # its statement is out and acknowledged
print("READY", flush=True)
sys.stdin.readline()  # the network is gone
attempt("sending", pooled, "SHOW TimeZone")  # not a SELECT: not run again on another connection
waiting.join()
print("RESULT " + json.dumps(results), flush=True)
sys.stdin.readline()  # the network is back
attempt("again", database, "SELECT 1")
print("AGAIN " + json.dumps(results["again"]), flush=True)
"""


def ip(*args, namespace=None):
    cmd = (["ip", "netns", "exec", namespace] if namespace else []) + ["ip", *args]
    subprocess.run(cmd, check=True, capture_output=True, timeout=10)


@pytest.fixture
def namespace():
    """(namespace, our end of its veth, our address, its address): a network namespace joined
    to this one by a veth pair on a /30 of its own."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2's `ip` to make a network namespace")
    tag = secrets.token_hex(3)
    name, ours, theirs = f"smsb{tag}", f"smsa{tag}", f"smsz{tag}"
    net = secrets.randbelow(256), 4 * secrets.randbelow(64)
    here, there = f"10.231.{net[0]}.{net[1] + 1}", f"10.231.{net[0]}.{net[1] + 2}"
    try:
        ip("netns", "add", name)
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"cannot make a network namespace: {exc.stderr.decode().strip()}")
    try:
        ip("link", "add", ours, "type", "veth", "peer", "name", theirs)
        ip("link", "set", theirs, "netns", name)
        ip("addr", "add", f"{here}/30", "dev", ours)
        ip("link", "set", ours, "up")
        ip("addr", "add", f"{there}/30", "dev", theirs, namespace=name)
        ip("link", "set", theirs, "up", namespace=name)
        yield name, ours, here, there
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)  # takes the veth pair along
        subprocess.run(["ip", "link", "del", ours], capture_output=True, timeout=10)


def test_a_server_that_vanishes_is_given_up_within_seconds_and_reconnected_after(pg_url, namespace):
    name, ours, here, _ = namespace
    port = urlsplit(pg_url).port
    proxy = Proxy(port, host=here)
    url = pg_url.replace(f"{urlsplit(pg_url).hostname}:{port}", f"{here}:{proxy.port}", 1)
    env = dict(os.environ, PYTHONPATH=ROOT)
    client = subprocess.Popen(["ip", "netns", "exec", name, sys.executable, "-c", CLIENT, url], env=env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert client.stdout.readline().strip() == "READY", client.stderr.read()
        ip("link", "set", ours, "down")  # from now on every packet between them is lost
        client.stdin.write("gone\n")
        client.stdin.flush()
        line = _line(client, 40)
        assert line.startswith("RESULT "), line
        results = json.loads(line[len("RESULT "):])
        # Without NETWORK_TIMEOUTS both would still be waiting: 15 min to 2 h.
        assert results["waiting"][0] == "StoreUnavailable" and 5 < results["waiting"][1] < 20, results
        assert results["sending"][0] == "StoreUnavailable" and 5 < results["sending"][1] < 20, results
        ip("link", "set", ours, "up")
        client.stdin.write("back\n")
        client.stdin.flush()
        again = json.loads(_line(client, 20)[len("AGAIN "):])
        assert again[0] == "answered", again
    finally:
        client.kill()
        client.wait(10)
        proxy.close()


def _line(process, seconds):
    """The client's next line, or a failure saying it was still waiting after `seconds`."""
    import selectors

    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        if not selector.select(seconds):
            pytest.fail(f"the client was still waiting after {seconds} s (no network timeout)")
    return process.stdout.readline().strip()


def test_every_connection_asks_for_the_timeouts_and_a_url_keeps_its_own(pg_url):
    import socket

    from smsbatch.engine_pg import Database

    def options(url):
        database = Database(url, 5.0)
        try:
            sock = socket.socket(fileno=database.raw().fileno())
            try:
                return (sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT))
            finally:
                sock.detach()  # the descriptor stays psycopg's
        finally:
            database.close()

    assert options(pg_url) == (1, 5, 10_000)
    assert options(pg_url + "&keepalives_idle=30&tcp_user_timeout=20000") == (1, 30, 20_000)



# A relay inside the namespace: listens on its address (argv[1]), passes each connection on to
# argv[2]:argv[3], prints its port. `serve` outside reaches the database through it, so every
# packet of its connections crosses the veth.
RELAY = r"""
import socket, sys, threading
listener = socket.create_server((sys.argv[1], 0))
print(listener.getsockname()[1], flush=True)

def pipe(source, sink):
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    for s in (source, sink):
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

while True:
    client, _ = listener.accept()
    server = socket.create_connection((sys.argv[2], int(sys.argv[3])))
    threading.Thread(target=pipe, args=(client, server), daemon=True).start()
    threading.Thread(target=pipe, args=(server, client), daemon=True).start()
"""


def test_serve_answers_503_within_5_s_and_health_at_once_while_the_server_has_vanished(pg_url, namespace, tmp_path):
    """The webhook, a real `serve`, its database reached across the veth: the veth goes down
    (every packet lost, no error anywhere). Texts held for a COMMIT that cannot come are
    answered 503 within 5 s (server.LATE_GRACE), a text arriving meanwhile too, and /health
    says it cannot store within HEALTH_SECONDS, without holding the texts up. When the network
    is back, texts are stored again by themselves; every text answered 200 is stored once."""
    name, ours, here, there = namespace
    Store(pg_url).migrate()
    port = urlsplit(pg_url).port
    proxy = Proxy(port, host=here)
    relay = subprocess.Popen(["ip", "netns", "exec", name, sys.executable, "-c", RELAY, there, here, str(proxy.port)],
                             stdout=subprocess.PIPE, text=True)
    url = pg_url.replace(f"{urlsplit(pg_url).hostname}:{port}", f"{there}:{relay.stdout.readline().strip()}", 1)
    answered = {}

    def text(n):
        started = time.monotonic()
        status = post(host, web_port, FakeTwilio.TOKEN, form(n))
        answered[n] = (status, time.monotonic() - started)
        return status

    with FakeTwilio() as twilio:
        server, web_url = start_server(base_env(twilio, url), tmp_path / "serve.log")
        host, web_port = urlsplit(web_url).hostname, urlsplit(web_url).port
        try:
            assert wait_for(lambda: text(1) == 200, timeout=20), answered
            assert text(2) == 200 and text(3) == 200
            ip("link", "set", ours, "down")  # from now on every packet to the database is lost
            checks = {}

            def check_health():
                started = time.monotonic()
                checks["health"] = (health(web_url), time.monotonic() - started)

            threads = [threading.Thread(target=text, args=(4,)), threading.Thread(target=check_health)]
            for thread in threads:
                thread.start()
            time.sleep(0.5)  # /health is looking (or has said so) when the next text comes
            threads.append(threading.Thread(target=text, args=(5,)))
            threads[-1].start()
            for thread in threads:
                thread.join(30)
            for n in (4, 5):
                assert answered[n][0] == 503 and answered[n][1] < 5.0, answered
            (status, body), took = checks["health"]
            assert status == 503 and json.loads(body)["can_store"] is False and took < 3.0, checks
            ip("link", "set", ours, "up")  # back: the dead connections are given up, or resume
            assert wait_for(lambda: text(6) == 200, timeout=40), answered
        finally:
            stop(server)
            relay.kill()
            relay.wait(10)
            proxy.close()
    stored = {row[0] for row in Store(pg_url).conn.execute("SELECT sid FROM messages")}
    assert {form(n)["MessageSid"] for n, (status, _) in answered.items() if status == 200} <= stored
    assert len(stored) == len(Store(pg_url).conn.execute("SELECT sid FROM messages").fetchall())


def form(n):
    sid = f"SM{n:032x}"
    return {"MessageSid": sid, "SmsSid": sid, "AccountSid": FakeTwilio.ACCOUNT, "From": f"+1555300{n:04d}",
            "To": "+15550000000", "Body": f"text {n}", "NumMedia": "0"}
