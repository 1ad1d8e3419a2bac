"""The forms of PostgreSQL URL libpq takes, as smsbatch shows and opens them: several hosts
(a failover's), a password in the user part or as a parameter, a URL libpq cannot parse.
No password reaches a message, and each failure is the store's error, not a Python one."""

import time

import pytest

from smsbatch.engine import StoreError, StoreUnavailable, hide_secrets, shown_target


@pytest.mark.parametrize("url, shown", [
    ("postgresql://postgres:s3cretpw@10.0.0.1:5432,10.0.0.2:5432/db", "postgresql://postgres:***@10.0.0.1:5432,10.0.0.2:5432/db"),
    ("postgresql://u:s3cretpw@h1:abc/db", "postgresql://u:***@h1:abc/db"),
    ("postgresql://u:s3cretpw@[::1]:5432/db", "postgresql://u:***@[::1]:5432/db"),
    ("postgresql://u@h/db?password=s3cretpw&sslmode=disable", "postgresql://u@h/db?password=***&sslmode=disable"),
    ("postgresql://u@h/db?sslpassword=s3cretpw", "postgresql://u@h/db?sslpassword=***"),
    ("postgresql://u@h:5432,h2/db?sslmode=disable", "postgresql://u@h:5432,h2/db?sslmode=disable"),
])
def test_every_url_libpq_takes_is_shown_without_its_password(url, shown):
    assert shown_target(url) == shown


def test_a_url_libpq_cannot_parse_is_quoted_without_its_password():
    url = "POSTGRESQL://postgres:s3cretpw@127.0.0.1:5432/postgres"  # smsbatch's scheme test ignores case; libpq's not
    said = f'missing "=" after "{url}" in connection info string'
    assert "s3cretpw" not in hide_secrets(said, url) and "postgres:***@" in hide_secrets(said, url)
    assert hide_secrets('invalid percent-encoded token: "s3c%zzpw"', "postgresql://u:s3c%zzpw@h/db").endswith('"***"')


@pytest.mark.parametrize("url", ["POSTGRESQL://postgres:s3cretpw@127.0.0.1:1/postgres",
                                 "postgresql://postgres:s3c%zzpw@127.0.0.1:1/postgres"])
def test_opening_a_url_libpq_cannot_parse_says_so_without_the_password(url):
    pytest.importorskip("psycopg_pool")
    from smsbatch.engine_pg import Database
    from smsbatch.engine_pg_pool import Pool

    with pytest.raises(StoreUnavailable) as opened:
        Database(url, 1.0)
    assert "s3c" not in str(opened.value)
    pool = Pool(url, 1, 1.0)  # was: psycopg.ProgrammingError from Pool() itself, the URL in its text
    try:
        with pytest.raises(StoreError) as lent:
            pool.getconn(time.monotonic() + 0.5)
        assert "s3c" not in str(lent.value)
    finally:
        pool.close()


@pytest.mark.postgres
def test_several_hosts_with_a_password_reconnect_and_fail_as_the_store_does():
    """A failover's URL (host:port,host:port) with a password: a dropped connection is opened
    again, and a server that cannot be reached is StoreUnavailable (was: ValueError from
    urllib, raised by the log line before every reconnect)."""
    from urllib.parse import urlsplit, urlunsplit

    import psycopg

    from conftest import POSTGRES_URL
    from smsbatch.engine_pg import Database

    parts = urlsplit(POSTGRES_URL)  # trust auth, as in test_postgres: the password is not checked
    server = parts.netloc.rpartition("@")[2]
    url = urlunsplit((parts.scheme, f"{parts.username}:s3cretpw@{server},{server}", parts.path, parts.query, ""))
    database = Database(url, 1.0)
    try:
        pid = database.conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        with psycopg.connect(POSTGRES_URL, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        time.sleep(0.2)
        answers = []
        for _ in range(2):  # the first may find it dropped (a read: asked again on a new one)
            try:
                answers.append(database.conn.execute("SELECT 1").fetchone()[0])
            except StoreUnavailable:
                answers.append(None)
        assert answers[-1] == 1
    finally:
        database.close()
    with pytest.raises(StoreUnavailable) as down:
        Database("postgresql://postgres:s3cretpw@127.0.0.1:1,127.0.0.1:2/postgres", 1.0)
    assert "s3cretpw" not in str(down.value)
