"""PostgreSQL as the store: every command, the webhook on pooled connections, a server that
is down, and connections the server drops (pg_terminate_backend) — all reconnect by themselves.

Runs when SMSBATCH_TEST_POSTGRES_URL names a server (conftest); each test in a schema of its own.
"""

import json
import socket
import threading
import time
from urllib.parse import urlsplit

import psycopg
import pytest

from conftest import T0, invoke, offline_processor, wait_for
from smsbatch.batching import Rules
from smsbatch.config import Settings
from smsbatch.db import Store
from smsbatch.engine import StoreUnavailable
from test_web import call, form, signed
from smsbatch.web import make_app

pytestmark = pytest.mark.postgres
ME, US = "+15553330001", "+15550000000"
DOWN = "postgresql://postgres@127.0.0.1:1/postgres"  # nothing listens there: a server that is down


@pytest.fixture
def engine_name():
    return "postgres"


def terminate_all(db_path):
    """Drop every connection of this test (its sessions are named after its schema), as a
    server restart or a failover would. Returns how many were dropped."""
    schema = db_path.rsplit("%3D", 1)[1]
    with psycopg.connect(db_path.split("?")[0], autocommit=True) as admin:
        return sum(r[0] for r in admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s", (schema,)))


def test_every_command_works_on_postgresql(db_path, tmp_path):
    env = {"SMSBATCH_DB": db_path}
    assert "already at schema version" in invoke(["migrate"], env).output
    assert invoke(["ingest", "--from", ME, "--to", US, "--body", "hello", "--at", str(T0), "--now", str(T0)], env).exit_code == 0
    assert invoke(["ingest", "--from", ME, "--to", US, "--body", "again", "--at", str(T0 + 1), "--now", str(T0)], env).exit_code == 0
    run = invoke(["process", "--now", str(T0 + 3600), "--ai", "offline", "--sms", "console", "--json"], env)
    assert run.exit_code == 0, run.output
    status = json.loads(invoke(["status", "--json"], env).output)
    assert status["counts"]["sent"] == 1 and status["pending"] == 0
    batch_id = status["latest"][0]["id"]
    shown = invoke(["show", batch_id], env)
    assert shown.exit_code == 0 and "hello" in shown.output
    assert invoke(["show", ME], env).exit_code == 0
    stats = invoke(["stats", "--json", "--since", "2d", "--now", str(T0 + 3600)], env)
    assert stats.exit_code == 0, stats.output
    assert invoke(["hold", ME, "--reason", "checking"], env).exit_code == 0
    assert invoke(["release", ME], env).exit_code == 0
    retry = invoke(["retry", batch_id], env)
    assert retry.exit_code == 1 and "already sent" in retry.output
    exported = invoke(["export", "--since", str(T0 - 10)], env)
    assert exported.exit_code == 0 and "exported 2 texts" in exported.output
    assert invoke(["prune", "--older-than", "1d", "--dry-run"], env).exit_code == 0
    backup = invoke(["backup", str(tmp_path / "copy.db")], env)
    assert backup.exit_code == 1 and "pg_dump" in backup.output and backup.output.count("\n") == 1
    check = invoke(["check", "--json"], env | {"SMSBATCH_AI": "offline", "SMSBATCH_SMS": "console"})
    database = [c for c in json.loads(check.output)["checks"] if c["name"] == "database"][0]
    assert database["ok"] and "schema version" in database["detail"]


def test_a_password_never_reaches_the_output(db_path):
    url = db_path.replace("postgres@", "postgres:s3cretpw@")  # trust auth: the password is not checked
    result = invoke(["--db", url, "migrate"])
    assert "already at schema version" in result.output and "s3cretpw" not in result.output
    check = invoke(["--db", url, "check"], {"SMSBATCH_AI": "offline", "SMSBATCH_SMS": "console"})
    assert "postgres:***@" in check.output and "s3cretpw" not in check.output
    down = invoke(["--db", DOWN.replace("postgres@", "postgres:s3cretpw@"), "status"])
    assert down.exit_code == 1 and "s3cretpw" not in down.output


def test_a_server_that_is_down_is_one_line(tmp_path):
    for args in (["migrate"], ["status"]):
        result = invoke(["--db", DOWN, *args])
        assert result.exit_code == 1 and result.output.startswith("Error: ") and result.output.count("\n") == 1
        assert "cannot connect" in result.output


def test_the_webhook_stores_on_postgresql_and_a_repeated_sid_is_200_twice(db_path):
    app = make_app(Settings(db_path=db_path, twilio_auth_token="t", public_url="https://x.example/sms"),
                   clock=lambda: T0)
    body, headers = signed(form(), url="https://x.example/sms", token="t")
    try:
        assert call(app, body=body, headers=headers)[0] == 200
        assert call(app, body=body, headers=headers)[0] == 200  # Twilio's retry: stored once
        status, _, out = call(app, method="GET", path="/health")
        assert status == 200 and json.loads(out)["can_store"] is True
    finally:
        app.drain()
    store = Store(db_path)
    assert store.conn.execute("SELECT count(*) FROM messages").fetchone()[0] == 1
    store.close()


def test_the_webhook_answers_503_within_its_deadline_while_the_database_is_down():
    app = make_app(Settings(db_path=DOWN, twilio_auth_token="t", public_url="https://x.example/sms"),
                   clock=lambda: T0)
    body, headers = signed(form(), url="https://x.example/sms", token="t")
    try:
        started = time.monotonic()
        status, _, out = call(app, body=body, headers=headers)
        assert status == 503 and time.monotonic() - started < 5
        status, _, out = call(app, method="GET", path="/health")
        info = json.loads(out)
        assert status == 503 and info["ok"] is False
    finally:
        app.drain()


def test_dropped_connections_reopen_by_themselves(db_path, settings, clock):
    """The server drops every connection (a restart): the next statements of a store, a
    processor and the webhook work again without a restart of smsbatch."""
    store = Store(db_path)
    app = make_app(Settings(db_path=db_path, twilio_auth_token="t", public_url="https://x.example/sms"),
                   clock=lambda: T0)
    try:
        store.add_message("SM1", ME, US, "before", T0, Rules())
        body, headers = signed(form(MessageSid="SM" + "b" * 32), url="https://x.example/sms", token="t")
        assert call(app, body=body, headers=headers)[0] == 200
        assert terminate_all(db_path) >= 2
        # a transaction begins on a new connection; a read outside one is asked again
        store.add_message("SM2", ME, US, "after", T0 + 1, Rules())
        assert store.conn.execute("SELECT count(*) FROM messages").fetchone()[0] == 3
        terminate_all(db_path)
        assert store.conn.execute("SELECT count(*) FROM messages").fetchone()[0] == 3
        body, headers = signed(form(MessageSid="SM" + "c" * 32), url="https://x.example/sms", token="t")
        assert call(app, body=body, headers=headers)[0] == 200  # the pool checks before it lends
        processor = offline_processor(settings, clock)
        processor.store().conn.execute("SELECT 1").fetchall()
        terminate_all(db_path)
        clock.now = T0 + 3600
        report = processor.run()
        assert report.counts["sent"] == 1  # one burst of one person: four texts, one reply
        assert store.conn.execute("SELECT sum(message_count) FROM batches WHERE state = 'sent'").fetchone()[0] == 4
    finally:
        app.drain()
        store.close()


def test_a_lost_connection_inside_a_transaction_is_an_error_not_a_silent_retry(db_path):
    store = Store(db_path)
    try:
        with pytest.raises(StoreUnavailable):
            with store.transaction() as conn:
                conn.execute("INSERT INTO holds (phone, since) VALUES (?, ?)", (ME, T0))
                terminate_all(db_path)
                conn.execute("INSERT INTO holds (phone, since) VALUES (?, ?)", ("+1999", T0))
        assert store.find_hold(ME) is None  # nothing of it was committed
    finally:
        store.close()


def test_hosts_with_skewed_clocks_agree_on_leases(db_path):
    """Two processors' hosts are 30 s fast and 30 s slow: on the database's clock the slow
    one does not see the fast one's lease as live for 30 s too long, nor the fast one take
    a live lease of the slow one's."""
    from smsbatch.lease import DatabaseClock

    fast, slow = DatabaseClock(lambda: time.time() + 30), DatabaseClock(lambda: time.time() - 30)
    a, b = Store(db_path), Store(db_path)
    try:
        fast.calibrate(a, force=True)
        slow.calibrate(b, force=True)
        assert abs(fast() - slow()) < 1 and abs(fast() - a.db_now()) < 1
        a.add_message("SMskew", ME, US, "hi", fast() - 120, Rules(quiet_seconds=1, max_wait_seconds=1))
        claimed, _ = a.claim_due(fast(), 1, 4.0, 86400)
        assert len(claimed) == 1
        assert b.claim_due(slow() + 2, 1, 4.0, 86400)[0] == []  # the lease is live for the slow host too
        assert len(b.claim_due(slow() + 5, 1, 4.0, 86400)[0]) == 1  # and over for it when it is over
    finally:
        a.close()
        b.close()


def test_twin_first_texts_on_two_webhooks_land_in_one_batch(db_path):
    """Two webhooks (two pools, as two hosts) get a person's first texts at the same instant,
    for twenty people at once; and the same MessageSid twice (Twilio's retry reaching the other host)."""
    apps = [make_app(Settings(db_path=db_path, twilio_auth_token="t", public_url="https://x.example/sms"),
                     clock=lambda: T0) for _ in range(2)]
    barrier = threading.Barrier(40)
    statuses = []

    def post(app, params):
        body, headers = signed(params, url="https://x.example/sms", token="t")
        barrier.wait()
        statuses.append(call(app, body=body, headers=headers)[0])

    threads = []
    for n in range(10):
        phone = f"+1555444{n:04d}"
        for i, app in enumerate(apps):  # twins: two texts of one person, one on each webhook
            threads.append(threading.Thread(target=post, args=(app, form(From=phone, MessageSid=f"SM{n:02d}{i}" + "d" * 29))))
        sid = f"SM{n:02d}f" + "e" * 29  # one text, delivered to both webhooks
        for app in apps:
            threads.append(threading.Thread(target=post, args=(app, form(From=f"+1555555{n:04d}", MessageSid=sid))))
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    finally:
        for app in apps:
            app.drain()
    assert statuses == [200] * 40
    store = Store(db_path)
    try:
        batches = store.conn.execute("SELECT phone, count(*), sum(message_count) FROM batches GROUP BY phone").fetchall()
        assert sorted(tuple(r)[1:] for r in batches) == [(1, 1)] * 10 + [(1, 2)] * 10
        assert store.conn.execute("SELECT count(*) FROM messages").fetchone()[0] == 30
    finally:
        store.close()


class Proxy:
    """A TCP relay to the PostgreSQL server that can be cut (every connection dropped, new
    ones refused) and restored: the database unreachable for seconds, as in a restart. It can
    also spoil chosen connections (numbered from 1 in the order they are opened): `refuse`
    ones are closed at once (a server turning connections away); `drop` ({connection: n})
    ones are cut at their n-th query, the connection itself made (the server dropping it, as
    pg_terminate_backend or a restart does; query 1 is its setup, configure)."""

    def __init__(self, target_port, host="127.0.0.1"):
        self.target_port = target_port
        self.listener = socket.create_server((host, 0))
        self.port = self.listener.getsockname()[1]
        self.up, self.pairs = True, []
        self.refuse, self.drop, self.opened = set(), {}, 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.opened += 1
            if not self.up or self.opened in self.refuse:
                client.close()
                continue
            server = socket.create_connection(("127.0.0.1", self.target_port))
            self.pairs.append((client, server))
            cut_at = self.drop.get(self.opened)
            threading.Thread(target=self._client_side, args=(client, server, cut_at), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client), daemon=True).start()

    @staticmethod
    def _end(*sockets):
        """Close both ends so that the other side sees it at once: shutdown first, since a close
        alone leaves the connection open while another thread still waits in recv on it."""
        for s in sockets:
            for end in (lambda: s.shutdown(socket.SHUT_RDWR), s.close):
                try:
                    end()
                except OSError:
                    pass

    @classmethod
    def _pipe(cls, source, sink):
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        cls._end(source, sink)

    def _client_side(self, client, server, cut_at):
        """Relay what the client writes; with `cut_at`, close both ends instead of passing on its
        cut_at-th query (a message of type P or Q: the start-up packets begin with their length)."""
        queries = 0
        try:
            while data := client.recv(65536):
                queries += data[:1] in (b"P", b"Q")
                if cut_at is not None and queries >= cut_at:
                    break
                server.sendall(data)
        except OSError:
            pass
        self._end(client, server)

    def cut(self):
        self.up = False
        for pair in self.pairs:
            for s in pair:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        self.pairs = []

    def close(self):
        self.cut()
        self.listener.close()


def test_a_database_away_for_seconds_gets_503s_then_everything_reconnects(db_path, settings, clock):
    proxy = Proxy(urlsplit(db_path).port)
    url = db_path.replace(f":{urlsplit(db_path).port}/", f":{proxy.port}/")
    app = make_app(Settings(db_path=url, twilio_auth_token="t", public_url="https://x.example/sms"), clock=lambda: T0)
    processor = offline_processor(settings.replace(db_path=url), clock)
    try:
        def post(n):
            body, headers = signed(form(MessageSid=f"SM{n:032d}"), url="https://x.example/sms", token="t")
            return call(app, body=body, headers=headers)[0]

        assert post(1) == 200
        proxy.cut()
        started = time.monotonic()
        assert post(2) == 503 and time.monotonic() - started < 5  # within Twilio's patience
        assert json.loads(call(app, method="GET", path="/health")[2])["can_store"] is False
        with pytest.raises(StoreUnavailable):
            processor.store().add_message("SMx", ME, US, "x", T0, Rules())
        proxy.up = True  # back: the webhook stores again by itself, within seconds
        assert wait_for(lambda: post(3) == 200, timeout=10), "the webhook never reconnected"
        clock.now = T0 + 3600
        assert processor.run().counts["sent"] == 1  # its thread's connection reopened by itself
        health = call(app, method="GET", path="/health")
        assert health[0] == 200 and json.loads(health[2])["can_store"] is True
    finally:
        app.drain()
        proxy.close()


def test_through_a_real_server_a_request_waiting_for_a_lock_does_not_hold_up_others(db_path):
    """On PostgreSQL each request writes on its own connection and the server runs them
    side by side: a text waiting for its conversation's lock does not delay another's."""
    import urllib.request
    from urllib.parse import urlencode

    from twilio.request_validator import RequestValidator

    from smsbatch.web import make_server_for

    public = "https://sms.example.com/sms"
    app = make_app(Settings(db_path=db_path, twilio_auth_token="t", public_url=public))
    server = make_server_for(app, "127.0.0.1", 0, threads=4)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/sms"

    def post(phone, sid):
        params = form(From=phone, MessageSid=sid)
        request = urllib.request.Request(url, data=urlencode(params).encode(), headers={
            "X-Twilio-Signature": RequestValidator("t").compute_signature(public, params),
            "Content-Type": "application/x-www-form-urlencoded"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status

    store = Store(db_path)
    try:
        with store.transaction() as conn:  # another host is storing a text of +1555...0001 right now
            conn.execute_all(store.db.lock_conversations([("+15550000001", US)]))
            waiting = threading.Thread(target=post, args=("+15550000001", "SM" + "1" * 32))
            waiting.start()
            time.sleep(0.2)  # it is waiting for the lock now
            started = time.monotonic()
            assert post("+15550000002", "SM" + "2" * 32) == 200
            assert time.monotonic() - started < 1.5
        waiting.join(10)
        assert store.conn.execute("SELECT count(*) FROM messages").fetchone()[0] == 2
    finally:
        store.close()
        server.shutdown()
        server.server_close()
        app.drain()


def test_values_written_into_a_round_trip_come_back_exactly_and_nul_is_refused(db_path):
    """Connection.execute_all writes values into its one query as literals: whatever a
    customer typed (quotes, backslashes, a comment opener, bidi controls) comes back as it
    was, numbers keep their exact value (a negative one cannot start a comment), and a NUL,
    which libpq would silently cut the string at, is refused."""
    from smsbatch.engine import StoreError

    store = Store(db_path)
    try:
        hostile = ["it's", "back\\slash\\", "'; DROP TABLE messages; --", "\u202eevil\u202c", "$$ $x$ ?", "ü✓"]
        numbers = [-1.5, 1800000000.1234567, -7, 0.1 + 0.2, 2 ** 40]
        rows = store.conn.execute_all([("SELECT " + ", ".join(["?"] * len(hostile)), hostile),
                                       ("SELECT 1 - ?, " + ", ".join(["CAST(? AS double precision)"] * 4),
                                        [numbers[0], *numbers[1:]])])
        assert list(rows[0].fetchall()[0]) == hostile
        back = rows[1].fetchall()[0]
        assert float(back[0]) == 2.5 and list(back[1:]) == numbers[1:]
        with pytest.raises(StoreError, match="NUL"):
            store.conn.execute_all([("SELECT ?", ["bad\x00text"])])
        assert store.conn.execute("SELECT count(*) FROM messages").fetchone()[0] == 0
    finally:
        store.close()


def test_a_claim_walks_the_due_batches_in_order_instead_of_sorting_the_backlog(db_path):
    """With thousands due, the claim's candidates come from batches_pending_acts_at in the
    order of the moment to act, stopping at the limit: no sort of the whole backlog (on
    100,000 due batches that sort cost 200-260 ms a claim; bench/bench_claim.py)."""
    from smsbatch.db import CANDIDATES
    from smsbatch.engine_pg import _inline

    store = Store(db_path)
    try:
        rows = [(f"b{i:09d}", f"+1555{i:07d}", "+15550000000", "open", 1, T0 - 60 - i % 50, T0 - 60 - i % 50, 0,
                 T0 - 50 - i % 50, T0 - 60) for i in range(5000)]
        store.conn.executemany(
            "INSERT INTO batches (id, phone, our_number, state, message_count, first_at, last_at, urgent,"
            " closes_at, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
        store.conn.execute("ANALYZE batches")
        raw = store.db.raw()
        plan = "\n".join(r[0] for r in raw.execute(
            "EXPLAIN " + _inline(raw, [(CANDIDATES + store.db.skip_locked, (T0, T0, 4))]).decode()).fetchall())
        assert "batches_pending_acts_at" in plan and "Sort" not in plan, plan
        claimed, _ = store.claim_due(T0, 4, 300, 3600)
        assert [r["closes_at"] for r in claimed] == [T0 - 99] * 4  # the earliest due first
    finally:
        store.close()
