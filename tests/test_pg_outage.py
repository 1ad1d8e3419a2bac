"""A PostgreSQL server that drops every connection mid-run, then turns connections away.

Two `smsbatch serve` and two `smsbatch process --for` run on a database of their own while
texts come in. pg_terminate_backend ends every connection of that database, several
times; then the database refuses connections (ALLOW_CONNECTIONS false) for a while, and
lets them in again. Nothing is lost (every text answered 200 is stored; a text answered
503 is stored once Twilio retries it), nothing is sent twice, the webhook answers 503
within 5 s while it cannot store and /health says so, and every process reconnects by
itself: no process dies, every batch is answered.
"""

import secrets
import time
import urllib.request
from urllib.error import HTTPError
from urllib.parse import urlsplit, urlunsplit

import pytest

from conftest import POSTGRES_URL, wait_for
from fakes import FakeTwilio, message_sid
from smsbatch.batching import Rules
from smsbatch.db import Store
from smsbatch.engine import StoreError
from smsbatch.writer_pool import PgWriter
from test_load import base_env, post, start_server, stop
from test_pg_live import check
from test_pg_races import params

pytestmark = pytest.mark.postgres
DROPS = 3


@pytest.fixture
def own_database():
    """(admin connection, URL) of a new database of its own (connections to it can be refused
    without touching anyone else's), dropped afterwards."""
    import psycopg

    name = f"smsbatch_outage_{secrets.token_hex(4)}"
    admin = psycopg.connect(POSTGRES_URL, autocommit=True)
    admin.execute(f"CREATE DATABASE {name}")
    parts = urlsplit(POSTGRES_URL)
    url = urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, parts.fragment))
    try:
        yield admin, name, url
    finally:
        admin.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")
        admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
        admin.close()


def drop_connections(admin, name):
    """End every connection to the database; returns how many there were."""
    return len(admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s"
                             " AND pid <> pg_backend_pid()", (name,)).fetchall())


def health(url):
    try:
        with urllib.request.urlopen(url.rsplit("/", 1)[0] + "/health", timeout=10) as response:
            return response.status, response.read().decode()
    except HTTPError as exc:
        return exc.code, exc.read().decode()


def test_dropped_and_refused_connections_lose_nothing_and_everything_reconnects(own_database, tmp_path):
    admin, name, db_url = own_database
    store = Store(db_url)
    store.migrate()
    with FakeTwilio() as twilio:
        env = base_env(twilio, db_url)
        servers = [start_server(env, tmp_path / f"serve{i}.log") for i in range(2)]
        hosts = [(u.split("//")[1].split(":")[0], int(u.rsplit(":", 1)[1].split("/")[0])) for _, u in servers]
        from test_pg_live import processor

        procs = [processor(env) for _ in range(2)]
        posted, refused, n = [], [], 0

        def text(phone_index, host):
            nonlocal n
            n += 1
            sid, phone = message_sid(f"drop{n:05d}"), f"+1555989{phone_index:04d}"
            status = post(*host, FakeTwilio.TOKEN, params(sid, phone, f"text {n}"))
            (posted if status == 200 else refused).append((sid, phone, f"text {n}", status))
            return status

        try:
            for drop in range(DROPS):
                for i in range(15):
                    text(i % 7, hosts[i % 2])
                assert drop_connections(admin, name) > 0
            for i in range(10):
                text(i % 7, hosts[i % 2])

            # Unreachable: connections refused. A text is answered 503 within 5 s; /health says so.
            admin.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS false")
            drop_connections(admin, name)
            for host in hosts:
                started = time.monotonic()
                assert text(0, host) == 503
                assert time.monotonic() - started < 5.0, f"503 after {time.monotonic() - started:.1f} s"
            status, body = health(servers[0][1])
            assert status == 503 and '"can_store": false' in body, (status, body)  # details stay in `status`
            admin.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")

            # Back: Twilio retries what was refused; new texts are stored; /health is 200 again.
            assert wait_for(lambda: health(servers[1][1])[0] == 200, 15), health(servers[1][1])
            for sid, phone, body_, _ in list(refused):
                assert post(*hosts[1], FakeTwilio.TOKEN, params(sid, phone, body_)) == 200
                posted.append((sid, phone, body_, 200))
            for i in range(10):
                assert text(i % 7, hosts[i % 2]) == 200
            store.close()
            store = Store(db_url)  # this test's own connection was dropped too
            assert wait_for(lambda: store.conn.execute(
                "SELECT count(*) FROM batches WHERE state NOT IN ('sent', 'skipped', 'superseded')"
            ).fetchone()[0] == 0, 30), ["the processors did not answer everything after the outage"] + [
                p.stderr.read()[-3000:] for p in procs if p.poll() is not None]
            # running still, or its `--for 60` ended on its own (a slow machine): never a failure
            assert [p.poll() for p in procs] in ([None, None], [None, 0], [0, None], [0, 0]), (
                ["a processor died"] + [p.stderr.read()[-3000:] for p in procs if p.poll()])
            assert all(s.poll() is None for s, _ in servers), "a webhook died"
        finally:  # every process stopped before any is judged: none is left running after a failure
            errs = [stop(proc)[1] for proc in procs]
            for proc, _ in servers:
                stop(proc)
            for err in errs:
                assert "Traceback" not in err, err[-3000:]
        for i in range(2):
            log = (tmp_path / f"serve{i}.log").read_text()
            assert "Traceback" not in log, log[-3000:]
        assert len(refused) >= 2
        check(store, twilio, posted, twins=[])
    store.close()


def test_a_text_fails_within_its_deadline_while_connections_are_refused_and_the_pool_recovers(own_database):
    """The webhook's writer with the database refusing connections: a text fails (a
    StoreError: a 503) within its deadline and /health's probe says why; once the database
    takes connections again the pool opens new ones by itself and texts are stored; close()
    leaves no connection to the database."""
    admin, name, db_url = own_database
    store = Store(db_url)
    store.migrate()
    store.close()
    writer = PgWriter(db_url, 4.0)

    def text(sid):
        return lambda store: store.add_message(sid, "+15550001111", "+15550000000", "hi", 1.8e9, Rules())

    try:
        assert writer.submit(text("SM1")).duplicate is False
        admin.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS false")
        assert drop_connections(admin, name) > 0
        started = time.monotonic()
        with pytest.raises(StoreError):
            writer.submit(text("SM2"), started + 4.0)
        assert time.monotonic() - started < 4.5, f"failed after {time.monotonic() - started:.1f} s"
        assert "could not be stored" in (writer.trouble() or "")

        admin.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")

        def stored():
            try:
                return writer.submit(text("SM2"), time.monotonic() + 4.0).duplicate is False
            except StoreError:
                return False

        assert wait_for(stored, 20)
        assert writer.trouble() is None
    finally:
        writer.close()
    assert wait_for(lambda: admin.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s",
                                          (name,)).fetchone()[0] == 0, 5)
