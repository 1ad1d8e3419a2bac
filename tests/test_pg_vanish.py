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
from urllib.parse import urlsplit

import pytest

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
    """(namespace, our end of its veth, our address): a network namespace joined to this one
    by a veth pair on a /30 of its own."""
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
        yield name, ours, here
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)  # takes the veth pair along
        subprocess.run(["ip", "link", "del", ours], capture_output=True, timeout=10)


def test_a_server_that_vanishes_is_given_up_within_seconds_and_reconnected_after(pg_url, namespace):
    name, ours, here = namespace
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
