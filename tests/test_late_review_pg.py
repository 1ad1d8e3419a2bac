"""A review of the late answers with a real `serve` whose PostgreSQL server vanishes (its link,
across a network namespace's veth, taken down: tests/test_pg_vanish.py's set-up): what
/metrics counts for the texts answered 503 by the server, and how /health and /metrics
behave on the pool threads while the database answers nothing. Needs root and `ip`."""

import http.client
import re
import subprocess
import sys
import threading
import time
import urllib.request
from urllib.error import HTTPError
from urllib.parse import urlencode, urlsplit

import pytest

from conftest import wait_for
from fakes import FakeTwilio
from smsbatch.db import Store
from test_load import base_env, post, start_server, stop
from test_pg_vanish import RELAY, form, ip, namespace  # noqa: F401 (namespace: a fixture)
from test_postgres import Proxy

pytestmark = pytest.mark.postgres


class Vanishing:
    """A real `serve` reaching its database across the namespace's veth (see test_pg_vanish)."""

    def __init__(self, pg_url, namespace, tmp_path, twilio):
        self.name, self.ours, here, there = namespace
        Store(pg_url).migrate()
        port = urlsplit(pg_url).port
        self.proxy = Proxy(port, host=here)
        self.relay = subprocess.Popen(
            ["ip", "netns", "exec", self.name, sys.executable, "-c", RELAY, there, here, str(self.proxy.port)],
            stdout=subprocess.PIPE, text=True)
        url = pg_url.replace(f"{urlsplit(pg_url).hostname}:{port}", f"{there}:{self.relay.stdout.readline().strip()}", 1)
        self.server, self.web_url = start_server(base_env(twilio, url), tmp_path / "serve.log")
        self.host, self.port = urlsplit(self.web_url).hostname, urlsplit(self.web_url).port
        self.answers = []  # (n, status, seconds) of every text posted
        self._lock = threading.Lock()

    def text(self, n):
        started = time.monotonic()
        status = post(self.host, self.port, FakeTwilio.TOKEN, form(n))
        with self._lock:
            self.answers.append((n, status, time.monotonic() - started))
        return status

    def get(self, path, timeout=120):
        started = time.monotonic()
        try:
            with urllib.request.urlopen(f"http://{self.host}:{self.port}{path}", timeout=timeout) as response:
                status, body = response.status, response.read().decode()
        except HTTPError as exc:
            status, body = exc.code, exc.read().decode()
        return status, body, time.monotonic() - started

    def threads(self):
        with open(f"/proc/{self.server.pid}/status") as status:
            return int(re.search(r"^Threads:\s+(\d+)", status.read(), re.M).group(1))

    def down(self):
        ip("link", "set", self.ours, "down")

    def up(self):
        ip("link", "set", self.ours, "up")

    def close(self):
        try:
            self.up()
        except subprocess.CalledProcessError:
            pass
        stop(self.server, timeout=60)
        self.relay.kill()
        self.relay.wait(10)
        self.proxy.close()


def counted(page, route, code):
    match = re.search(rf'^smsbatch_webhook_requests_total\{{code="{code}",route="{route}"\}} (\S+)$', page, re.M)
    return int(float(match.group(1))) if match else 0


@pytest.fixture
def vanishing(pg_url, namespace, tmp_path):  # noqa: F811
    with FakeTwilio() as twilio:
        setup = Vanishing(pg_url, namespace, tmp_path, twilio)
        try:
            assert wait_for(lambda: setup.text(1) == 200, timeout=20), setup.answers
            assert setup.get("/metrics")[0] == 200  # the scrape's own connection is open
            assert setup.get("/health")[0] == 200  # and /health's
            yield setup
        finally:
            setup.close()


def test_texts_the_server_answers_503_late_are_counted_503_not_200(vanishing):
    """smsbatch_webhook_requests_total{route="/sms",code} counts what Twilio was answered:
    a text answered 503 by the late path (its COMMIT never came) is no 200."""
    vanishing.down()
    assert vanishing.text(2) == 503
    vanishing.up()
    assert wait_for(lambda: vanishing.text(3) == 200, timeout=40), vanishing.answers
    page = vanishing.get("/metrics")[1]
    seen = {code: sum(1 for _, status, _ in vanishing.answers if status == code) for code in (200, 503)}
    assert (counted(page, "/sms", 200), counted(page, "/sms", 503)) == (seen[200], seen[503]), vanishing.answers


def test_scrapes_and_health_are_answered_within_seconds_while_the_database_is_gone(vanishing):
    """/metrics read the database with no bound but the kernel's (10-15 s), one scrape at a
    time behind a lock (then 4 s each to fail to connect): 16 scrapes during the outage held
    every pool thread for a minute, and /health (on the same threads) waited behind them.
    Now a scrape waits SCRAPE_SECONDS after the read under way began, at most (then says
    smsbatch_database_readable 0), and /health waits at most for the scrapes before it on the
    read threads (SCRAPE_SECONDS) and its own look (HEALTH_SECONDS)."""
    vanishing.down()
    took = []
    scrapes = [threading.Thread(target=lambda: took.append(vanishing.get("/metrics"))) for _ in range(16)]
    for scrape in scrapes:
        scrape.start()
    time.sleep(0.5)
    status, body, seconds = vanishing.get("/health")
    for scrape in scrapes:
        scrape.join(120)
    vanishing.up()
    assert status == 503 and '"can_store": false' in body and seconds < 4.5, (status, body, seconds)
    assert len(took) == 16 and all(s == 200 and "smsbatch_database_readable 0.0" in page for s, page, _ in took)
    assert max(t for _, _, t in took) < 3.0, sorted(t for _, _, t in took)


def test_health_answers_within_3_s_under_a_flood_of_health_checks_while_the_database_is_gone(vanishing):
    """Every /health waited up to HEALTH_SECONDS on the look still under way (one look at a
    time: no thread piles up), holding a pool thread that long: 40 checkers at once queued
    behind each other for several seconds."""
    baseline = vanishing.threads()
    vanishing.down()
    stop_at = time.monotonic() + 8
    latencies, lock = [], threading.Lock()

    def checker():
        while time.monotonic() < stop_at:
            took = vanishing.get("/health")[2]
            with lock:
                latencies.append((time.monotonic(), took))

    checkers = [threading.Thread(target=checker) for _ in range(40)]
    for c in checkers:
        c.start()
    time.sleep(4)
    threads = vanishing.threads()
    for c in checkers:
        c.join(60)
    vanishing.up()
    late = [took for at, took in latencies if at > stop_at - 4]  # past the first look's 2 s
    assert late and max(late) < 3.0, (len(latencies), sorted(late)[-5:])
    assert threads <= baseline + 3, (baseline, threads)  # one look at a time


def test_a_blip_in_the_network_does_not_count_a_forged_signature_twice(vanishing):
    """The rejection counts' write is given up on after ANSWER_GRACE like a text's (0.5 s past
    its 1 s deadline) while its COMMIT is still on the way; the link back, the COMMIT lands, and
    the counts kept for the next flush were added again: 2 for 1 forged request."""
    vanishing.down()
    conn = http.client.HTTPConnection(vanishing.host, vanishing.port, timeout=20)
    conn.request("POST", "/sms", body=urlencode(form(9)), headers={
        "Content-Type": "application/x-www-form-urlencoded", "X-Twilio-Signature": "forged"})
    response = conn.getresponse()
    response.read()
    conn.close()
    assert response.status == 403
    time.sleep(3.0)  # the counts' write went out within 1 s (FLUSH_EVERY), unanswered since
    vanishing.up()
    assert wait_for(lambda: vanishing.text(3) == 200, timeout=40), vanishing.answers
    time.sleep(4)  # a flush of counts kept after a write given up on would have come by now
    lines = [line for line in vanishing.get("/metrics")[1].splitlines()
             if line.startswith("smsbatch_rejected_signatures_last_hour")]
    assert lines == ["smsbatch_rejected_signatures_last_hour 1.0"], lines
