"""The PostgreSQL webhook's group commit (smsbatch.writer_pool.PgWriter): many texts in one
transaction, and what happens when one of them cannot be stored."""

import socket
import threading
import time
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
from twilio.request_validator import RequestValidator

from conftest import POSTGRES_URL, T0, wait_for
from smsbatch.batching import Rules
from smsbatch.config import Settings
from smsbatch.db import Store
from smsbatch.engine import StoreBusy, StoreError
from smsbatch.web import make_app, make_server_for
from smsbatch.writer_pool import PgWriter

pytestmark = pytest.mark.postgres
TOKEN = "pg-writer-token"
URL = "https://hooks.example.com/sms"


@pytest.fixture
def engine_name():
    return "postgres"


def sids(db_path):
    store = Store(db_path)
    try:
        return {row[0] for row in store.conn.execute("SELECT sid FROM messages")}
    finally:
        store.close()


def add(sid, phone="+15550001111", body="hi"):
    return lambda store: store.add_message(sid, phone, "+15550000000", body, T0, Rules())


def test_a_burst_with_a_text_that_cannot_be_stored_stores_the_others_once_run_again(db_path):
    """A text PostgreSQL refuses (a NUL in its number: the webhook refuses such a form, the
    store too) fails the burst's one transaction: nothing of it is stored and on_done says so;
    run again text by text (as the server does), the others are stored and only the bad one fails."""
    writer = PgWriter(db_path, 4.0)
    done, outcome = threading.Event(), []
    texts = [add(f"SM{i}", phone="+1555000\x001111" if i == 2 else "+15550001111") for i in range(5)]
    with writer.burst(lambda failed: (outcome.append(failed), done.set())):
        assert all(writer.submit(work) is None for work in texts)  # kept, not run
    assert done.wait(5) and outcome == [True] and sids(db_path) == set()
    results = {}

    def again(i):
        try:
            results[i] = writer.submit(texts[i]).duplicate
        except StoreError as exc:
            results[i] = exc

    threads = [threading.Thread(target=again, args=(i,)) for i in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    writer.close()
    assert isinstance(results.pop(2), StoreError) and results == {0: False, 1: False, 3: False, 4: False}
    assert sids(db_path) == {"SM0", "SM1", "SM3", "SM4"}


def test_a_write_that_raised_inside_the_group_is_never_committed_half_done(db_path):
    """A write whose store transaction raised (and whose caller swallowed it, like a
    MessageSid another host stored meanwhile) cannot be undone alone: the whole group
    is rolled back rather than committing what it wrote before raising."""
    writer = PgWriter(db_path, 4.0)

    def half_done(store):
        try:
            with store.transaction() as conn:
                conn.execute("INSERT INTO opt_outs (phone, scope, since, keyword) VALUES (?, ?, ?, ?)",
                             ("+15550009999", "*", T0, "STOP"))
                raise ValueError("changed its mind")
        except ValueError:
            return "swallowed"

    done, outcome = threading.Event(), []
    with writer.burst(lambda failed: (outcome.append(failed), done.set())):
        writer.submit(add("SM1"))
        writer.submit(half_done)
    assert done.wait(5) and outcome == [True]
    writer.close()
    store = Store(db_path)
    try:
        assert store.conn.execute("SELECT count(*) FROM opt_outs").fetchone()[0] == 0
    finally:
        store.close()
    assert sids(db_path) == set()


def test_a_locked_conversation_fails_its_text_at_the_deadline_and_delays_no_other(db_path):
    """Another host holds a conversation's lock: that text fails at its deadline (StoreBusy,
    then a 503), /health says why meanwhile, and a text of another conversation is stored
    while it waits (another committer, another connection)."""
    writer = PgWriter(db_path, 4.0)
    holder = Store(db_path)
    try:
        with holder.transaction():
            holder.conn.execute_all(holder.db.lock_conversations([("+15550001111", "+15550000000")]))
            failed = {}

            def locked():
                start = time.monotonic()
                try:
                    writer.submit(add("SM1"), start + 1.5)
                except StoreBusy as exc:
                    failed["after"], failed["error"] = time.monotonic() - start, exc

            thread = threading.Thread(target=locked)
            thread.start()
            time.sleep(0.3)  # the locked text is waiting
            assert writer.submit(add("SM2", phone="+15550002222")).duplicate is False
            time.sleep(1.0)
            assert "waited" in (writer.trouble() or "")
            thread.join(5)
    finally:
        holder.close()
    writer.close()
    assert 1.0 <= failed["after"] < 2.5 and sids(db_path) == {"SM2"}


def test_a_burst_over_http_with_a_nul_in_a_body_answers_every_text_200(db_path):
    """Through the real server: requests that arrive together share a transaction; a body
    holding a NUL, which PostgreSQL cannot store, is stored with U+FFFD in its place (Twilio
    would not send a refused text again), and every text is answered 200."""
    app = make_app(Settings(db_path=db_path, twilio_auth_token=TOKEN, public_url=URL))
    server = make_server_for(app, "127.0.0.1", 0, threads=4)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    validator = RequestValidator(TOKEN)
    socks = []
    try:
        requests = []
        for i in range(8):
            params = {"MessageSid": f"SM{i:032d}", "AccountSid": "AC" + "0" * 32, "From": f"+1555000{i % 3:04d}", "To": "+15550000000",
                      "Body": "bad\x00text" if i == 5 else f"text {i}", "NumMedia": "0"}
            body = urlencode(params).encode()
            requests.append(b"POST /sms HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
                            b"X-Twilio-Signature: " + validator.compute_signature(URL, params).encode() +
                            b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
            socks.append(socket.create_connection(("127.0.0.1", server.server_port), timeout=10))
        for sock, request in zip(socks, requests):  # all at once: whole in the same round of the server
            sock.sendall(request)
        statuses = [int(_read_all(sock).split(b" ", 2)[1]) for sock in socks]
    finally:
        for sock in socks:
            sock.close()
        server.shutdown()
        server.server_close()
    assert statuses == [200] * 8
    assert sids(db_path) == {f"SM{i:032d}" for i in range(8)}
    store = Store(db_path)
    try:
        assert store.conn.execute("SELECT body FROM messages WHERE sid = ?", (f"SM{5:032d}",)).fetchone()[0] \
            == "bad\ufffdtext"
    finally:
        store.close()


def _read_all(sock):
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def sessions(db_path):
    """{pid: state} of the sessions of this test's URL (its application_name) but this one."""
    import psycopg

    name = parse_qs(urlsplit(db_path).query)["application_name"][0]
    with psycopg.connect(POSTGRES_URL, autocommit=True) as admin:
        return dict(admin.execute("SELECT pid, state FROM pg_stat_activity WHERE application_name = %s"
                                  " AND pid <> pg_backend_pid()", (name,)).fetchall())


def terminate(pids):
    import psycopg

    with psycopg.connect(POSTGRES_URL, autocommit=True) as admin:
        for pid in pids:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))


def pid_and(work):
    """work, returning also the backend pid of the connection it ran on."""
    return lambda store: (store.conn.execute("SELECT pg_backend_pid()").fetchone()[0], work(store))


def burst_of(writer, works):
    """works handed over as one burst; True once they are committed."""
    done, outcome = threading.Event(), []
    with writer.burst(lambda failed: (outcome.append(failed), done.set())):
        for work in works:
            writer.submit(work)
    assert done.wait(10)
    return outcome == [False]


def test_the_committers_connections_come_from_the_pool_and_one_the_server_dropped_is_replaced(db_path):
    """The writer's connections are its pool's (COMMITTERS + 1 for the probe, opened in the
    background), and the texts run on them; the server ending every one of them (a restart,
    pg_terminate_backend) fails no text: the group and the lone text run on new ones, and the
    pool opens new ones in place of every dropped one."""
    from smsbatch.writer_pool import COMMITTERS

    writer = PgWriter(db_path, 4.0)
    try:
        pid, result = writer.submit(pid_and(add("SM1")))
        assert result.duplicate is False
        assert burst_of(writer, [add(f"SM{i}", phone=f"+1555000{i:04d}") for i in range(2, 12)])
        assert wait_for(lambda: len(sessions(db_path)) == COMMITTERS + 1, 5), sessions(db_path)
        old = sessions(db_path)
        assert pid in old and all(state == "idle" for state in old.values())  # lent per group, given back

        terminate(old)
        assert wait_for(lambda: not set(sessions(db_path)) & set(old), 5)
        assert burst_of(writer, [add(f"SM{i}", phone=f"+1555000{i:04d}") for i in range(12, 16)])
        pid, result = writer.submit(pid_and(add("SM16")))
        assert result.duplicate is False and pid not in old
        assert writer.trouble() is None
        assert wait_for(lambda: len(sessions(db_path)) == COMMITTERS + 1, 5), sessions(db_path)
        assert not set(sessions(db_path)) & set(old)
    finally:
        writer.close()
    assert sids(db_path) == {f"SM{i}" for i in range(1, 17)}


def test_closing_the_writer_closes_its_pool(db_path):
    """close(): no connection of the writer is left on the server, the probe's included."""
    writer = PgWriter(db_path, 4.0)
    assert writer.submit(add("SM1")).duplicate is False
    assert writer._reachable()  # the probe borrows one too
    assert wait_for(lambda: len(sessions(db_path)) > 0, 5)
    writer.close()
    assert wait_for(lambda: sessions(db_path) == {}, 5), sessions(db_path)
