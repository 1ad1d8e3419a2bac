"""HTTP/1.1 keep-alive: a client (a proxy in front, wrk) sends its texts on one connection.
Every text on a kept connection is stored and answered in order, pipelined requests
included; the connection closes when the client asks, after HTTP/1.0, after a refusal, and
when it has been idle too long; a slow next request still gets its 408; idle kept
connections are the first shed at the descriptor cap; Caddy or nginx in front keeps its connections.
Real sockets, a real server, on both engines (on PostgreSQL the answers leave from the
committer's thread)."""

import http.client
import shutil
import socket
import threading
import time
from urllib.parse import urlencode

import pytest
from twilio.request_validator import RequestValidator

from conftest import T0
from smsbatch.config import Settings
from smsbatch.db import Store
from smsbatch.web import make_app, make_server_for
from test_deploy import start_caddy, start_nginx
from test_hostile_web import TOKEN, URL, form, read_answer, server, signed_request, start_serve  # noqa: F401

pytestmark = pytest.mark.engines


def stored(db_path):
    store = Store(db_path)
    try:
        return {row[0] for row in store.conn.execute("SELECT sid FROM messages")}
    finally:
        store.close()


def connect(server):
    sock = socket.create_connection(("127.0.0.1", server.server_port), timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


HEALTH = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"


def asking_health(server):
    """A new connection to `server` that has sent GET /health (its answer not read)."""
    sock = connect(server)
    sock.sendall(HEALTH)
    return sock


def closed_within(sock, seconds):
    """True if the server closes `sock` within `seconds` (and sent nothing more)."""
    sock.settimeout(seconds)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False


def sids(*numbers):
    return {form(n)["MessageSid"] for n in numbers}


def test_texts_sent_one_after_another_on_one_connection_are_each_stored(server, db_path):
    with connect(server) as sock:
        for n in range(3):
            sock.sendall(signed_request(form(n)))
            status, head, body = read_answer(sock)
            assert (status, head.split()[0], body) == (200, "HTTP/1.1", b'<?xml version="1.0" encoding="UTF-8"?>'
                                                                          b"<Response/>")
        assert not closed_within(sock, 0.3)  # still open for the next one
    assert stored(db_path) == sids(0, 1, 2)


def test_pipelined_texts_are_answered_in_order_even_split_between_segments(server, db_path):
    first, second, third = (signed_request(form(n, Body=f"text {n}")) for n in range(3))
    with connect(server) as sock:
        sock.sendall(first + second + third[:30])  # two whole and the start of a third, at once
        time.sleep(0.1)
        sock.sendall(third[30:])
        stream = b""
        while stream.count(b"<Response/>") < 3:  # the three answers, which may come in one segment
            chunk = sock.recv(65536)
            assert chunk, "closed before the third answer"
            stream += chunk
    assert stream.count(b"HTTP/1.1 200 OK\r\n") == 3
    assert stored(db_path) == sids(0, 1, 2)


def test_a_pipelined_request_after_a_refused_one_is_not_read(server, db_path):
    """A 400 closes the connection: what followed it in the buffer is not taken as a request."""
    bad = b"GET /health HTTP/1.1\r\nHost : x\r\n\r\n"  # a space before the colon: 400, and close
    with connect(server) as sock:
        sock.sendall(bad + signed_request(form(1)))
        status, head, _ = read_answer(sock)
        assert status == 400 and head.startswith("HTTP/1.0")
        assert closed_within(sock, 2)
    assert stored(db_path) == set()


@pytest.mark.parametrize("request_line, header", [("HTTP/1.1", "Connection: close\r\n"), ("HTTP/1.1", "Connection: Close\r\n"),
                                                   ("HTTP/1.0", "")])
def test_the_connection_closes_when_the_client_asks_or_speaks_http_1_0(server, db_path, request_line, header):
    raw = signed_request(form(1)).replace(b"HTTP/1.1\r\n", f"{request_line}\r\n{header}".encode(), 1)
    with connect(server) as sock:
        sock.sendall(raw)
        status, head, _ = read_answer(sock)
        assert status == 200 and head.startswith("HTTP/1.0 ")
        assert closed_within(sock, 2)
    assert stored(db_path) == sids(1)


def test_an_idle_kept_connection_is_closed_without_a_word_after_its_time(server, db_path):
    server.keep_alive_seconds = 0.3
    with connect(server) as sock:
        sock.sendall(HEALTH)
        assert read_answer(sock)[0] == 200
        started = time.monotonic()
        assert closed_within(sock, 3)  # no 408: nothing was asked
        assert 0.25 <= time.monotonic() - started < 2


def test_a_next_request_that_never_ends_gets_its_408_on_time(server, db_path):
    server.request_deadline = 0.3  # a kept connection idles for KEEP_ALIVE_SECONDS, a request has this
    with connect(server) as sock:
        sock.sendall(signed_request(form(1)))
        assert read_answer(sock)[0] == 200
        time.sleep(0.5)  # idle longer than a request may take: still kept
        sock.sendall(b"POST /sms HTTP/1.1\r\nHost: x\r\n")  # and then nothing
        started = time.monotonic()
        status, head, _ = read_answer(sock)
        assert status == 408 and 0.25 <= time.monotonic() - started < 2
        assert closed_within(sock, 2)
    assert stored(db_path) == sids(1)


def test_idle_kept_connections_are_shed_first_at_the_descriptor_cap(server, db_path):
    server.max_connections = 4
    kept = []
    try:
        for _ in range(4):
            sock = asking_health(server)
            assert read_answer(sock)[0] == 200
            kept.append(sock)
        with connect(server) as sock:
            sock.sendall(signed_request(form(7)))
            assert read_answer(sock)[0] == 200
        assert closed_within(kept[0], 2)  # the oldest idle one made room
        kept[-1].sendall(signed_request(form(8)))  # the newest is still served
        assert read_answer(kept[-1])[0] == 200
    finally:
        for sock in kept:
            sock.close()
    assert stored(db_path) == sids(7, 8)


def test_stopping_the_server_closes_kept_connections(db_path):
    app = make_app(Settings(db_path=db_path, twilio_auth_token=TOKEN, public_url=URL), clock=lambda: T0)
    server = make_server_for(app, "127.0.0.1", 0, threads=2)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    with connect(server) as sock:
        sock.sendall(signed_request(form(1)))
        assert read_answer(sock)[0] == 200
        server.shutdown()
        server.server_close()
        assert closed_within(sock, 2)
    assert stored(db_path) == sids(1)


def established_to(port):
    """How many TCP connections to local `port` are established now (/proc/net/tcp)."""
    with open("/proc/net/tcp") as table:
        rows = [line.split() for line in table.readlines()[1:]]
    return sum(1 for row in rows if int(row[1].split(":")[1], 16) == port and row[3] == "01")


@pytest.mark.parametrize("proxy", ["caddy", "nginx"])
def test_texts_through_the_shipped_proxies_are_stored_on_connections_they_keep(tmp_path, proxy):
    """deploy/Caddyfile or deploy/nginx.conf in front of a real `smsbatch serve`: the proxy
    keeps its connections to serve (Caddy's default idle 2 min, the nginx upstream's 60 s: below
    serve's KEEP_ALIVE_SECONDS); every text is stored once. On SQLite only: the proxy's side is
    the same on both engines."""
    if shutil.which(proxy) is None:
        pytest.skip(f"{proxy} not installed")
    db_path = str(tmp_path / "smsbatch.db")
    store = Store(db_path)
    store.migrate()
    store.close()
    proc, serve_port = start_serve(db_path, tmp_path / "serve.log")
    front, port = (start_caddy if proxy == "caddy" else start_nginx)(tmp_path, serve_port)
    try:
        statuses = []
        for n in range(20):
            params = form(n)
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("POST", "/sms", body=urlencode(params), headers={
                "Content-Type": "application/x-www-form-urlencoded",
                "X-Twilio-Signature": RequestValidator(TOKEN).compute_signature(URL, params)})
            statuses.append(conn.getresponse().status)
            conn.close()
        assert statuses == [200] * 20
        assert 1 <= established_to(serve_port) <= 2  # kept by the proxy for its next texts, not one per text
    finally:
        front.terminate()
        front.wait(timeout=30)
        proc.terminate()
        proc.wait(timeout=10)
    assert stored(db_path) == sids(*range(20))
    assert "Traceback" not in open(tmp_path / "serve.log").read()


def test_stopping_closes_idle_kept_connections_before_waiting_for_the_last_commits():
    """server_close() waits for the app's last commits (drain). A kept connection left open
    meanwhile is read by no one: a text the proxy sends on it then is neither answered nor
    refused, only reset at the close. Closed first, the proxy sees the close before it
    would send, and opens a new connection (refused: safe to try elsewhere)."""
    from smsbatch.server import make_server_for as plain_server

    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "3")])
        return [b"ok\n"]

    drained = threading.Event()

    class Draining:
        def __call__(self, environ, start_response):
            return app(environ, start_response)

        def drain(self):
            time.sleep(1.5)  # the last COMMIT waiting for the database lock
            drained.set()

    server = plain_server(Draining(), "127.0.0.1", 0, threads=1)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    with connect(server) as sock:
        sock.sendall(HEALTH)
        assert read_answer(sock)[0] == 200
        server.shutdown()
        closing = threading.Thread(target=server.server_close)
        closing.start()
        try:
            assert closed_within(sock, 1.0) and not drained.is_set()
        finally:
            closing.join(10)


def test_at_the_cap_a_kept_connection_holding_a_pipelined_text_is_shed_last():
    """At the descriptor cap a connection is closed to make room. One answered and kept whose
    client already sent its next text (pipelined, whole in its buffer) must not go while an
    empty kept one or a slow arriving one can: closing it loses a text the client sent."""
    from smsbatch.server import Connection, make_server_for as plain_server

    server = plain_server(lambda environ, start_response: [], "127.0.0.1", 0, threads=1)
    pairs = [socket.socketpair() for _ in range(3)]
    try:
        pipelined, empty, arriving = (Connection(ours, None, time.monotonic() + 5) for ours, _ in pairs)
        pipelined.buffer += b"POST /sms HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
        arriving.buffer += b"POST /sms HTT"
        server.kept.extend([pipelined, empty])  # pipelined the older: the first a plain FIFO would shed
        server.conns[arriving.sock.fileno()] = arriving

        def shed_one():
            assert server._shed_oldest()
            return [i for i, (_, theirs) in enumerate(pairs) if closed_within(theirs, 0.5)]

        assert shed_one() == [1]  # the empty kept one
        assert shed_one() == [1, 2]  # then the slowest arriving
        assert shed_one() == [0, 1, 2]  # the pipelined text last
        assert not server._shed_oldest()
    finally:
        server.server_close()
        for pair in pairs:
            for end in pair:
                end.close()
