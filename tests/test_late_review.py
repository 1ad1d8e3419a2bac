"""A review of the late answers (server._Held, _answer_late, LATE_GRACE): the COMMIT landing or
failing right at the `late` boundary, on keep-alive and pipelining connections; reads on the pool.
Real server, real sockets; the app is a stand-in whose committer thread answers each burst when
the test says (no database)."""

import heapq
import random
import socket
import threading
import time
import types
from contextlib import contextmanager

from smsbatch.server import LATE_GRACE, make_server_for


class CommitsAtTheBoundary:
    """A WSGI app with burst(): every POST writes. Its committer answers each burst at its
    `late` (deadline + LATE_GRACE) plus a jitter of a few milliseconds either side, committed
    or failed at random. A failed burst's requests come back on the pool threads, where they
    are answered 503 "again" (as the webhook's re-run, which stores nothing here)."""

    offload_reads = True

    def __init__(self, deadline_in, jitter, seed):
        self.deadline_in, self.jitter, self.rng = deadline_in, jitter, random.Random(seed)
        self._current, self._timers, self._cond = None, [], threading.Condition()
        self.outcomes = []  # (committed, failed) per burst, as the committer did it
        self._stop = False
        self._seq = 0
        threading.Thread(target=self._committer, daemon=True).start()

    @contextmanager
    def burst(self, on_done):
        state = types.SimpleNamespace(writes=0, deadline=time.monotonic() + self.deadline_in)
        self._current = state
        try:
            yield state
        finally:
            self._current = None
        if not state.writes:
            on_done(False)
            return
        at = state.deadline + LATE_GRACE + self.rng.uniform(-self.jitter, self.jitter)
        failed = self.rng.random() < 0.3
        with self._cond:
            self._seq += 1
            heapq.heappush(self._timers, (at, self._seq, on_done, failed))
            self._cond.notify()

    def _committer(self):
        while True:
            with self._cond:
                while not self._stop and (not self._timers or self._timers[0][0] > time.monotonic()):
                    self._cond.wait(max(0.0, self._timers[0][0] - time.monotonic()) if self._timers else 0.1)
                if self._stop:
                    return
                _, _, on_done, failed = heapq.heappop(self._timers)
            on_done(failed)

    def close(self):
        with self._cond:
            self._stop = True
            self._cond.notify()

    def __call__(self, environ, start_response):
        body = b"ok\n"
        status = "200 OK"
        if environ["REQUEST_METHOD"] == "POST":
            if threading.current_thread().name.startswith("smsbatch-web-"):  # a pool thread: a re-run
                status, body = "503 Service Unavailable", b"again\n"
            else:  # the selecting thread, in its burst
                self._current.writes += 1
        start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
        return [body]


def read_responses(sock, want, timeout):
    """Responses read from `sock` until `want` of them, EOF, or `timeout`: (responses, eof,
    bytes left over). Each response is (status, headers dict, body)."""
    sock.settimeout(0.2)
    data, responses, eof = b"", [], False
    end = time.monotonic() + timeout
    while time.monotonic() < end and len(responses) < want and not eof:
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            chunk = None
        if chunk == b"":
            eof = True
        elif chunk:
            data += chunk
        while b"\r\n\r\n" in data:
            head, rest = data.split(b"\r\n\r\n", 1)
            lines = head.split(b"\r\n")
            status = int(lines[0].split(b" ")[1])
            headers = {k.strip().lower(): v.strip() for k, v in (line.split(b":", 1) for line in lines[1:])}
            length = int(headers[b"content-length"])
            if len(rest) < length:
                break
            responses.append((status, headers, rest[:length]))
            data = rest[length:]
    if len(responses) >= want and not eof:  # nothing more may follow: wait a little for strays
        try:
            sock.settimeout(0.3)
            extra = sock.recv(65536)
            eof = extra == b""
            data += extra
        except socket.timeout:
            pass
    return responses, eof, data


POST = (b"POST /sms HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
        b"Content-Length: 3\r\n\r\nx=1")


def test_commits_and_failures_right_at_the_late_boundary_give_each_request_one_answer_and_keep_count():
    """Many keep-alive connections, some pipelining two texts: each burst is committed or
    failed within a few ms of its `late`. Every request gets at most one answer, a 503 from
    the late path closes the connection (nothing after it), a 200 keeps it and the pipelined
    text behind it is answered next; afterwards nothing is held and no connection counted."""
    app = CommitsAtTheBoundary(deadline_in=0.1, jitter=0.004, seed=7)
    server = make_server_for(app, "127.0.0.1", 0, threads=4)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    port = server.server_address[1]
    problems, counts = [], {"200": 0, "late": 0, "again": 0}
    lock = threading.Lock()

    def client(i):
        rng = random.Random(i)
        for _ in range(6):
            pipelined = rng.random() < 0.4
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.sendall(POST * (2 if pipelined else 1))
                responses, eof, left = read_responses(sock, 2 if pipelined else 1, 5.0)
                if left:
                    problems.append(("bytes after the answers", i, left[:80]))
                if not responses:
                    problems.append(("no answer", i))
                    continue
                for n, (status, headers, body) in enumerate(responses):
                    closing = headers.get(b"connection", b"").lower() == b"close"
                    with lock:
                        key = "200" if status == 200 else ("late" if b"in time" in body else "again")
                        counts[key] += 1
                    if closing and n != len(responses) - 1:
                        problems.append(("an answer after Connection: close", i, responses))
                    if status == 200 and closing:
                        problems.append(("a 200 closing", i))
                if pipelined and responses[0][0] == 200 and len(responses) != 2:
                    problems.append(("the pipelined text behind a 200 was not answered", i, responses))
                if responses[-1][1].get(b"connection", b"").lower() == b"close" and not eof:
                    problems.append(("not closed after Connection: close", i))

    clients = [threading.Thread(target=client, args=(i,)) for i in range(24)]
    try:
        for c in clients:
            c.start()
        for c in clients:
            c.join(60)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and (server._held or server.open_connections()):
            time.sleep(0.05)
        assert not problems, problems[:5]
        assert counts["200"] and counts["late"] and counts["again"], counts  # every path taken
        assert server._held == 0 and server.open_connections() == 0, (server._held, server.open_connections())
    finally:
        app.close()
        server.shutdown()
        server.server_close()


class SlowReadsFailedWrites:
    """GET takes `read_seconds` (a /metrics or /health waiting on a database that vanished);
    every burst fails at once (failed=True): its POSTs are run again on the pool threads,
    where they are answered at once (the webhook's re-run, finding the database gone)."""

    offload_reads = True

    def __init__(self, read_seconds):
        self.read_seconds = read_seconds
        self._current = None

    @contextmanager
    def burst(self, on_done):
        state = types.SimpleNamespace(writes=0, deadline=time.monotonic() + 4.0)
        self._current = state
        try:
            yield state
        finally:
            self._current = None
        threading.Thread(target=on_done, args=(bool(state.writes),)).start()  # the committer: failed

    def __call__(self, environ, start_response):
        if environ["REQUEST_METHOD"] == "GET":
            time.sleep(self.read_seconds)
            status, body = "200 OK", b"read\n"
        elif threading.current_thread().name.startswith("smsbatch-web-"):
            status, body = "503 Service Unavailable", b"again\n"
        else:
            self._current.writes += 1
            status, body = "200 OK", b"ok\n"
        start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
        return [body]


def ask(port, request, timeout=30):
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(request)
        responses, _, _ = read_responses(sock, 1, timeout)
    return (responses[0][0] if responses else None), time.monotonic() - started


def test_the_rerun_of_a_failed_burst_does_not_wait_behind_slow_reads():
    """Reads (GET) went to the pool threads with the re-runs of failed bursts: as many slow
    reads as threads (scrapes, health checks against a database that does not answer) and a
    text whose burst failed waited for one of them to end before its 503."""
    app = SlowReadsFailedWrites(read_seconds=4.0)
    server = make_server_for(app, "127.0.0.1", 0, threads=4)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    port = server.server_address[1]
    try:
        reads = [threading.Thread(target=ask, args=(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"))
                 for _ in range(8)]
        for r in reads:
            r.start()
        time.sleep(0.3)  # every pool thread is reading
        status, took = ask(port, POST)
        assert status == 503 and took < 1.0, (status, took)
        for r in reads:
            r.join(30)
    finally:
        server.shutdown()
        server.server_close()


def test_a_text_whose_burst_failed_is_counted_once_as_what_it_was_answered(tmp_path):
    """SQLite, another process holding the write lock past the text's deadline: its burst
    fails, the pool runs it again, it is answered 503. /metrics counted it twice (a 200 when
    its burst ran, then the 503); it counts what the client was sent, once."""
    import http.client
    import sqlite3

    from smsbatch.config import Settings
    from smsbatch.db import Store
    from smsbatch.web import make_app

    path = str(tmp_path / "smsbatch.db")
    Store(path).migrate()
    server = make_server_for(make_app(Settings(db_path=path), insecure=True), "127.0.0.1", 0, threads=2)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    port = server.server_address[1]
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")  # the write lock, held past the text's 4 s
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
        conn.request("POST", "/sms", body=f"MessageSid=SM{'1' * 32}&From=%2B15551112222&To=%2B15550000000&Body=hi"
                     f"&AccountSid=AC{'0' * 32}", headers={"Content-Type": "application/x-www-form-urlencoded"})
        response = conn.getresponse()
        assert response.status == 503, response.read()
        response.read()
        holder.execute("ROLLBACK")
        conn.request("GET", "/metrics")
        page = conn.getresponse().read().decode()
        lines = [line for line in page.splitlines() if line.startswith("smsbatch_webhook_requests_total{")
                 and 'route="/sms"' in line]
        assert lines == ['smsbatch_webhook_requests_total{code="503",route="/sms"} 1.0'], lines
        conn.close()
    finally:
        holder.close()
        server.shutdown()
        server.server_close()
