"""The server answers a text 503 once its COMMIT is LATE_GRACE past the deadline, whatever the
committing thread is doing (stuck on a database that vanished: tests/test_pg_vanish.py runs
that for real). Here a stand-in app whose bursts are never committed until the test says so,
on the real server and real sockets: no database needed."""

import http.client
import threading
import time
import types
from contextlib import contextmanager

from smsbatch.server import LATE_GRACE, make_server_for


class NeverCommits:
    """A WSGI app with burst(): every POST writes (is held for the COMMIT), the COMMIT never
    comes by itself (commit_late() calls on_done afterwards); GET answers at once."""

    offload_reads = True  # as the webhook on PostgreSQL: GET on the pool threads

    def __init__(self, deadline_in):
        self.deadline_in, self.bursts, self._current = deadline_in, [], None

    @contextmanager
    def burst(self, on_done):
        self._current = types.SimpleNamespace(writes=0, deadline=time.monotonic() + self.deadline_in)
        yield self._current
        self.bursts.append(on_done)

    def __call__(self, environ, start_response):
        if environ["REQUEST_METHOD"] == "POST":
            self._current.writes += 1
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "3")])
        return [b"ok\n"]

    def commit_late(self):
        for on_done in self.bursts:
            on_done(False)


def ask(port, method, path):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    started = time.monotonic()
    try:
        conn.request(method, path, body=b"x=1" if method == "POST" else None)
        response = conn.getresponse()
        return response.status, response.read(), time.monotonic() - started
    finally:
        conn.close()


def test_a_text_whose_commit_never_comes_is_answered_503_after_its_deadline_and_reads_are_not_held_up():
    app = NeverCommits(deadline_in=1.0)
    server = make_server_for(app, "127.0.0.1", 0, threads=2)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    port = server.server_address[1]
    try:
        results = {}
        post = threading.Thread(target=lambda: results.update(post=ask(port, "POST", "/sms")))
        post.start()
        time.sleep(0.2)
        assert ask(port, "GET", "/health")[:2] == (200, b"ok\n")  # answered while the text waits
        post.join(10)
        status, body, took = results["post"]
        assert status == 503 and b"did not store the text in time" in body
        assert 1.0 <= took < 1.0 + LATE_GRACE + 1.0, took
        app.commit_late()  # the COMMIT lands after all: nothing more is sent, nothing breaks
        assert ask(port, "GET", "/health")[0] == 200
    finally:
        server.shutdown()
        server.server_close()


def test_an_app_may_give_its_commits_longer_and_the_webhook_on_sqlite_does(tmp_path):
    """A late COMMIT on SQLite is a slow disk, not a server that vanished, and it stores the
    text: the webhook gives it until 12 s after the text came (inside Twilio's 15 s) before 503."""
    from smsbatch.config import Settings
    from smsbatch.web import SQLITE_LATE_GRACE, make_app

    app = NeverCommits(deadline_in=0.5)
    app.late_grace = 3.0
    server = make_server_for(app, "127.0.0.1", 0, threads=2)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        results = {}
        post = threading.Thread(target=lambda: results.update(post=ask(server.server_address[1], "POST", "/sms")))
        post.start()
        time.sleep(1.5)  # past deadline + LATE_GRACE, inside deadline + late_grace
        app.commit_late()
        post.join(10)
        assert results["post"][:2] == (200, b"ok\n"), results
    finally:
        server.shutdown()
        server.server_close()
    webhook = make_app(Settings(db_path=str(tmp_path / "s.db"), twilio_auth_token="t", public_url="https://x.example/sms"))
    try:
        assert webhook.late_grace == SQLITE_LATE_GRACE and 4.0 + SQLITE_LATE_GRACE < 15
    finally:
        webhook.drain()
