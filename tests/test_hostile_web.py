"""The webhook under a hostile client or host: descriptors running out, slowloris, odd
numbers, a database that cannot be written, another process holding the write lock.
Real sockets, a real server; the lock holder and the descriptor-limited server are real
OS processes."""

import http.client
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from urllib.parse import urlencode

import pytest
from twilio.request_validator import RequestValidator

from conftest import T0
from smsbatch.config import Settings
from smsbatch.db import Store
from smsbatch.web import make_app, make_server_for

TOKEN = "hostile-test-token"
URL = "https://hooks.example.com/sms"


def form(n=0, **extra):
    params = {"MessageSid": f"SM{n:032d}", "From": "+15553330001", "To": "+15550000000", "Body": f"hi {n}",
              "NumMedia": "0", "AccountSid": "AC" + "0" * 32}
    params.update(extra)
    return params


def signed_request(params, path="/sms", url=URL):
    """The raw bytes of a signed POST, as Twilio sends it (signed for `url`)."""
    body = urlencode(params).encode()
    signature = RequestValidator(TOKEN).compute_signature(url, params)
    head = (f"POST {path} HTTP/1.1\r\nHost: hooks.example.com\r\nContent-Type: application/x-www-form-urlencoded\r\n"
            f"X-Twilio-Signature: {signature}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    return head + body


def exchange(port, pieces, timeout=5.0, pause=0.05):
    """Send `pieces` (separate TCP segments, `pause` apart), read the answer (its
    Content-Length, else until close). Returns (status, headers text, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i, piece in enumerate(pieces):
            if i:
                time.sleep(pause)
            sock.sendall(piece)
        return read_answer(sock, head_only=bool(pieces) and pieces[0].startswith(b"HEAD "))


def read_answer(sock, head_only=False):
    """One HTTP answer from `sock`: (status, headers text, body), the body by its
    Content-Length (none after a HEAD: `head_only`), or up to the close without one."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lengths = [line.split(b":", 1)[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")]
    want = 0 if head_only else int(lengths[0]) if lengths else None
    while want is None or len(body) < want:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(head.split()[1]), head.decode("latin-1"), body


def timed_get(port, path, method="GET", body=b"", headers=None):
    started = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read(), time.monotonic() - started
    finally:
        conn.close()


@pytest.fixture
def server(db_path):
    """A real server on port 0 (in this process), signatures checked against URL."""
    app = make_app(Settings(db_path=db_path, twilio_auth_token=TOKEN, public_url=URL), clock=lambda: T0)
    server = make_server_for(app, "127.0.0.1", 0, threads=4)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def stored(db_path):
    return {row[0] for row in sqlite3.connect(db_path).execute("SELECT sid FROM messages")}


# -- descriptors and slow clients --------------------------------------------------------


def start_serve(db_path, log_path, preexec_fn=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SMSBATCH_", "TWILIO_"))}
    env.update(SMSBATCH_DB=db_path, TWILIO_AUTH_TOKEN=TOKEN, SMSBATCH_PUBLIC_URL=URL)
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "smsbatch", "serve", "--port", "0"], env=env,
                                stdout=subprocess.DEVNULL, stderr=log, preexec_fn=preexec_fn)
    end = time.monotonic() + 20
    while time.monotonic() < end:
        text = open(log_path).read()
        if "listening on http://" in text:
            return proc, int(text.split("listening on http://", 1)[1].split(":")[1].split("/")[0])
        assert proc.poll() is None, text
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("serve did not start: " + open(log_path).read())


def test_signed_texts_are_answered_with_300_idle_connections_under_ulimit_256(db_path, tmp_path):
    """Each idle connection holds a descriptor: the server caps them below its limit
    (shedding the oldest) instead of failing accept() in a loop."""
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    proc, port = start_serve(db_path, tmp_path / "serve.log", preexec_fn=limit)
    idle = []
    try:
        for _ in range(300):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(b"P")  # one byte, as the attacker did: past TCP_DEFER_ACCEPT, never whole
            idle.append(sock)
        for n in range(5):
            status, _, body = exchange(port, [signed_request(form(n))])
            assert status == 200 and b"<Response/>" in body
        assert timed_get(port, "/health")[0] == 200
    finally:
        for sock in idle:
            sock.close()
        proc.terminate()
        proc.wait(timeout=10)
    assert stored(db_path) == {form(n)["MessageSid"] for n in range(5)}
    assert "Traceback" not in open(tmp_path / "serve.log").read()


def test_a_text_in_several_segments_is_served_while_500_slow_connections_are_open(server, db_path):
    slow = []
    try:
        for _ in range(500):
            sock = socket.create_connection(("127.0.0.1", server.server_port), timeout=5)
            sock.sendall(b"POST /sms HTTP/1.1\r\nHost: x\r\n")  # and then a byte now and then, never the end
            slow.append(sock)
        raw = signed_request(form(1, Body="\U0001f600" * 400))  # emoji-heavy: a long form body
        pieces = [raw[:40], raw[40:len(raw) // 2], raw[len(raw) // 2:]]
        started = time.monotonic()
        status, _, _ = exchange(server.server_port, pieces)
        assert status == 200 and time.monotonic() - started < 3
    finally:
        for sock in slow:
            sock.close()
    assert stored(db_path) == {form(1)["MessageSid"]}


@pytest.mark.parametrize("pieces", [[b"POST /sms HTTP/1.1\r\nHost: x\r\n"],  # headers never end
                                    [b"POST /sms HTTP/1.1\r\nContent-Length: 50\r\n\r\nFrom=1"]])  # nor the body
def test_a_request_not_whole_by_its_deadline_gets_408(server, pieces):
    server.request_deadline = 0.3  # the whole request, however it trickles in
    with socket.create_connection(("127.0.0.1", server.server_port), timeout=5) as sock:
        started = time.monotonic()
        for piece in pieces:
            sock.sendall(piece)
        for _ in range(3):  # a byte now and then does not extend it
            time.sleep(0.08)
            sock.sendall(b"a")
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 408 ") and 0.3 <= time.monotonic() - started < 2


# -- odd numbers and methods -------------------------------------------------------------


def test_num_media_of_5000_digits_is_400(server, db_path):
    status, _, body = exchange(server.server_port, [signed_request(form(2, NumMedia="9" * 5000))])
    assert status == 400 and b"NumMedia" in body and stored(db_path) == set()


def test_head_health_sends_no_body(server):
    status, head, body = exchange(server.server_port, [b"HEAD /health HTTP/1.1\r\nHost: x\r\n\r\n"])
    assert status == 200 and "Content-Length:" in head and body == b""


def test_content_length_with_an_underscore_is_400(server, db_path):
    raw = signed_request(form(3))
    head, _, body = raw.partition(b"\r\n\r\n")
    raw = head.replace(f"Content-Length: {len(body)}".encode(),
                       f"Content-Length: {len(body) // 10}_{len(body) % 10}".encode()) + b"\r\n\r\n" + body
    assert exchange(server.server_port, [raw])[0] == 400
    # The app says the same under any WSGI server (int() takes '9_1').
    app = make_app(Settings(db_path=db_path, twilio_auth_token=TOKEN, public_url=URL))
    environ = {"REQUEST_METHOD": "POST", "PATH_INFO": "/sms", "CONTENT_LENGTH": f"{len(body) // 10}_{len(body) % 10}",
               "CONTENT_TYPE": "application/x-www-form-urlencoded", "wsgi.input": __import__("io").BytesIO(body)}
    seen = {}
    app(environ, lambda status, headers: seen.update(status=status))
    assert seen["status"].startswith("400") and stored(db_path) == set()


# -- the database cannot take a write ----------------------------------------------------


def test_health_is_503_when_the_database_is_read_only(server, db_path):
    """An immutable file (chattr +i): even root cannot write it, as on a read-only mount."""
    if os.geteuid() != 0 or shutil.which("chattr") is None:
        pytest.skip("needs root and chattr to make a file read-only for root")
    Store(db_path).close()
    if subprocess.run(["chattr", "+i", db_path], capture_output=True).returncode != 0:
        pytest.skip("this file system does not support chattr +i")
    try:
        status, body, _ = timed_get(server.server_port, "/health")
        info = json.loads(body)
        assert status == 503 and info == {"ok": False, "can_store": False, "person_needed": False}
        # SQLite may still write through a descriptor it opened before (then the text is
        # stored): whatever the answer, it is the truth.
        status = exchange(server.server_port, [signed_request(form(4))])[0]
    finally:
        subprocess.run(["chattr", "-i", db_path], check=True)
    assert (status, stored(db_path)) in ((503, set()), (200, {form(4)["MessageSid"]}))


LOCK_HOLDER = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
sys.stdin.read()
conn.execute("ROLLBACK")
"""


def test_answers_that_store_nothing_never_wait_while_another_process_holds_the_write_lock(server, db_path):
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, db_path], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        port = server.server_port
        form_type = {"Content-Type": "application/x-www-form-urlencoded"}
        for method, path, body, headers, expected in [
            ("GET", "/health", b"", {}, 503), ("HEAD", "/health", b"", {}, 503), ("GET", "/nope", b"", {}, 404),
            ("GET", "/sms", b"", {}, 405), ("POST", "/sms", b"{}", {"Content-Type": "application/json"}, 415),
            ("POST", "/sms", urlencode(form(5)).encode(), form_type, 403),
        ]:
            status, answer, seconds = timed_get(port, path, method, body, headers)
            assert (status, path) == (expected, path) and seconds < 0.5, (method, path, seconds)
            if (method, path) == ("GET", "/health"):  # before any text has tried and waited: the probe
                assert json.loads(answer)["can_store"] is False
        started = time.monotonic()
        # Receipts waiting for the lock too never push a text past its 5 s (Twilio waits 15 s).
        receipts = [threading.Thread(target=exchange, args=(port, [signed_request(
            {"MessageSid": f"SM{i:032x}", "AccountSid": "AC" + "0" * 32, "MessageStatus": "delivered"}, "/sms/status", URL + "/status")], 20))
            for i in range(20)]
        for thread in receipts:
            thread.start()
        time.sleep(0.5)  # the receipts are waiting for the lock first
        started = time.monotonic()
        assert exchange(port, [signed_request(form(6))], timeout=20)[0] == 503
        assert time.monotonic() - started < 5.0
        for thread in receipts:
            thread.join(20)
        status, body, seconds = timed_get(port, "/health")
        info = json.loads(body)
        assert status == 503 and info["can_store"] is False  # the texts' failures say so
        assert seconds < 0.5
    finally:
        holder.communicate("", timeout=10)
    assert exchange(port, [signed_request(form(7))])[0] == 200  # the lock is free: stored again
    status, body, _ = timed_get(port, "/health")
    assert status == 200 and json.loads(body)["can_store"] is True
    assert stored(db_path) == {form(7)["MessageSid"]}


# -- durability ---------------------------------------------------------------------------


def test_every_store_connection_commits_durably(db_path):
    """synchronous=FULL: in WAL mode each COMMIT fsyncs the WAL before it returns, so an
    acknowledged text and a batch marked sending survive power loss."""
    from smsbatch.writer import Writer

    assert Store(db_path).conn.execute("PRAGMA synchronous").fetchone()[0] == 2
    writer = Writer(db_path)
    assert writer._open().conn.execute("PRAGMA synchronous").fetchone()[0] == 2


def cpu_ticks(pid):
    """User + system CPU time of a process so far, in clock ticks (/proc/PID/stat)."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


SERVE_UNCAPPED = """
import sys
from smsbatch.config import Settings
from smsbatch.web import make_app, make_server_for
server = make_server_for(make_app(Settings(db_path=sys.argv[1], twilio_auth_token=sys.argv[2], public_url=sys.argv[3])),
                         "127.0.0.1", 0)
server.max_connections = 100_000  # as if the limit were read wrong: accept() meets EMFILE itself
print(server.server_port, flush=True)
server.serve_forever(0.05)
"""


def start_uncapped(db_path, log_path, descriptors=128):
    """SERVE_UNCAPPED in an OS process allowed `descriptors` open files; (process, port)."""
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (descriptors, descriptors))

    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-c", SERVE_UNCAPPED, db_path, TOKEN, URL], stdout=subprocess.PIPE,
                                stderr=log, text=True, preexec_fn=limit)
    return proc, int(proc.stdout.readline())


def test_accept_failing_with_emfile_is_logged_once_and_texts_are_still_answered(db_path, tmp_path):
    proc, port = start_uncapped(db_path, tmp_path / "serve.log")
    idle = []
    try:
        for _ in range(300):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(b"P")
            idle.append(sock)
        for n in range(3):
            status, _, _ = exchange(port, [signed_request(form(n))], timeout=10)
            assert status == 200
        busy_before = cpu_ticks(proc.pid)
        time.sleep(0.3)  # nothing arrives now: the server must not spin on accept()
        assert cpu_ticks(proc.pid) - busy_before < 0.1 * os.sysconf("SC_CLK_TCK")
    finally:
        for sock in idle:
            sock.close()
        proc.kill()
        proc.wait(timeout=10)
    log_text = open(tmp_path / "serve.log").read()
    assert log_text.count("out of file descriptors") == 1 and "Traceback" not in log_text
    assert stored(db_path) == {form(n)["MessageSid"] for n in range(3)}


@pytest.mark.parametrize("head", [b"GET /health HTTP/1.1\r\nHost : x\r\n\r\n",  # space before the colon
                                  b"GET /health HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n",  # obs-fold
                                  b"GET /health HTTP/2.0\r\nHost: x\r\n\r\n",
                                  b"GET /health\r\nHost: x\r\n\r\n"])
def test_malformed_request_lines_and_headers_are_400(server, head):
    assert exchange(server.server_port, [head])[0] == 400


def test_a_signed_text_with_lf_only_lines_is_served(server, db_path):
    raw = signed_request(form(8))
    head, _, body = raw.partition(b"\r\n\r\n")
    assert exchange(server.server_port, [head.replace(b"\r\n", b"\n") + b"\n\n" + body])[0] == 200
    assert stored(db_path) == {form(8)["MessageSid"]}


def test_the_processor_commits_the_sending_mark_durably_and_the_rest_cheaply(db_path):
    """A processor's connection runs synchronous=NORMAL (a lost claim or *sent* mark is made
    good by the lease and reconcile), but the commit that marks a batch *sending* runs FULL."""
    from conftest import Clock, add, offline_processor
    from smsbatch.config import Settings

    store = Store(db_path)
    add(store, "+15551230099", "hi", T0)
    processor = offline_processor(Settings(db_path=db_path, ai="offline", sms="console"), Clock(T0 + 60))
    conn = processor.store().conn
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    [row], _ = processor.claim(1)
    seen = []
    conn.set_trace_callback(seen.append)
    assert processor.handle(row) == "sent"  # on this thread, so through this connection
    sending = next(i for i, sql in enumerate(seen) if sql.startswith("UPDATE batches SET state") and "send_started_at" in sql)
    begin = max(i for i in range(sending) if seen[i] == "BEGIN IMMEDIATE")
    assert seen[begin - 1] == "PRAGMA synchronous = FULL"  # the transaction that marks it sending
    commit = next(i for i in range(sending, len(seen)) if seen[i] == "COMMIT")
    assert seen[commit + 1] == "PRAGMA synchronous = NORMAL"
