"""Attacks on HTTP/1.1 keep-alive: what a hostile or odd client does on one kept
connection, or with many. Real sockets, a real server (in this process, or an OS process
when its descriptor limit matters); every text answered 200 is stored exactly once."""

import socket

import pytest

from test_hostile_web import exchange, form, read_answer, signed_request, start_uncapped
from test_keep_alive import HEALTH, asking_health, connect, server, sids, stored  # noqa: F401 (server: the fixture)

pytestmark = pytest.mark.engines


def test_a_text_after_a_header_block_ending_lf_crlf_is_not_swallowed(server, db_path):
    """An LF-ended header line followed by a CRLF empty line ends the block for the
    request parser; the framer must agree, else the text pipelined after it is taken as
    more headers of the first request: never stored, never answered, the client waits."""
    first = b"GET /health HTTP/1.1\nHost: x\n\r\n"
    with connect(server) as sock:
        sock.sendall(first + signed_request(form(1)))
        assert read_answer(sock)[0] == 200
        sock.settimeout(3)
        status, head, body = read_answer(sock)
        assert status == 200 and b"<Response/>" in body
    assert stored(db_path) == sids(1)


@pytest.mark.sqlite_only
def test_accept_failing_with_emfile_sheds_idle_kept_connections(db_path, tmp_path):
    """Connections kept idle after their answer hold descriptors for KEEP_ALIVE_SECONDS.
    When accept() meets EMFILE with only such connections open, they must be shed, or no
    new client (Twilio) is accepted until they time out."""
    proc, port = start_uncapped(db_path, tmp_path / "serve.log")
    kept = []
    try:
        for _ in range(160):  # more than the descriptors: each is answered, then kept idle
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(HEALTH)
            kept.append(sock)
        status, _, body = exchange(port, [signed_request(form(1))], timeout=3)
        assert status == 200 and b"<Response/>" in body
    finally:
        for sock in kept:
            sock.close()
        proc.kill()
        proc.wait(timeout=10)
    assert "Traceback" not in open(tmp_path / "serve.log").read()
    assert stored(db_path) == sids(1)


def test_a_new_text_is_served_while_more_idle_kept_connections_than_the_cap_are_open(server, db_path):
    """Connections accepted together, answered and kept, can outnumber the cap (it was
    lowered after EMFILE, or they came in one wake-up): a new client must get room by
    shedding idle kept connections, not be closed at accept() while they stay."""
    import threading

    server.shutdown()  # let ten connections queue up, to be accepted in one wake-up
    server.max_connections = 4
    burst = []
    try:
        for _ in range(10):
            burst.append(asking_health(server))
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        for sock in burst:  # answered (or refused at the cap), and the answered kept
            sock.settimeout(2)
            try:
                sock.recv(65536)
            except OSError:
                pass
        with connect(server) as sock:
            sock.sendall(signed_request(form(1)))
            status, _, body = read_answer(sock)
            assert status == 200 and b"<Response/>" in body
    finally:
        for sock in burst:
            sock.close()
    assert stored(db_path) == sids(1)


@pytest.mark.parametrize("later", [False, True], ids=["crlf-with-the-body", "crlf-alone-later"])
def test_an_empty_line_after_a_body_does_not_cost_the_next_text(server, db_path, later):
    """Some clients end a POST body with a CRLF that Content-Length does not count, and
    RFC 9112 2.2 says a server SHOULD ignore empty lines before a request line. On a kept
    connection that CRLF comes before the next text: it must not make that text a 400
    (Twilio does not send it again), nor give the idle connection a request deadline (408)."""
    import time

    server.request_deadline = 0.3
    with connect(server) as sock:
        sock.sendall(signed_request(form(1)) + (b"" if later else b"\r\n"))
        assert read_answer(sock)[0] == 200
        if later:
            sock.sendall(b"\r\n")
        time.sleep(0.6)  # longer than a request may take: the connection is idle, not mid-request
        sock.sendall(signed_request(form(2)))
        status, _, body = read_answer(sock)
        assert status == 200 and b"<Response/>" in body
    assert stored(db_path) == sids(1, 2)
