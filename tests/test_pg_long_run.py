"""A long `process --for` run outlives a PostgreSQL server that is away for a moment, wherever
the run is when it goes: its start (the CLI's first connection, its preparation, the run's
clock calibration and still-running note), its rounds (claims), its end (the prune); a
connection the server drops as it opens, or while a read is asked again, is the database
away (StoreUnavailable), never a psycopg error that escapes as a bug. A cron run (no --for)
still ends with the one line.

The outage is made at an exact moment by a TCP relay to the real server (test_postgres.Proxy):
it refuses a chosen connection, or drops one at its first query; the run's own warning line
brings the server back, so nothing is timed.
"""

import logging
import threading

import pytest

from conftest import T0, Clock, add, invoke, offline_processor
from smsbatch import processor as processor_module
from smsbatch.cli import prune_after_run
from smsbatch.config import Settings
from smsbatch.db import Store
from smsbatch.engine import StoreError, StoreUnavailable
from test_postgres import Proxy, terminate_all

pytestmark = pytest.mark.postgres
ME = "+15553330002"


@pytest.fixture
def engine_name():
    return "postgres"


Relay = Proxy  # with its `refuse` and `drop`: connections spoiled one by one


def through(relay, db_path):
    port = db_path.split("@", 1)[1].split("/", 1)[0].rsplit(":", 1)[1]
    return db_path.replace(f":{port}/", f":{relay.port}/", 1)


@pytest.fixture
def relay(db_path):
    port = int(db_path.split("@", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])
    r = Relay(port)
    yield r
    r.close()


@pytest.fixture
def fast_polls(monkeypatch):
    monkeypatch.setattr(processor_module, "POLL_SECONDS", 0.05)


class WhenWarned(logging.Handler):
    """Runs `action` at each 'database unavailable' warning of the processor: the run has met the
    outage, so the test can end it (or note how often it was told)."""

    def __init__(self, action=lambda: None):
        super().__init__(logging.WARNING)
        self.action, self.lines = action, []

    def emit(self, record):
        line = record.getMessage()
        if line.startswith("database unavailable"):
            self.lines.append(line)
            self.action()


@pytest.fixture
def warned():
    handlers = []

    def install(action=lambda: None):
        handler = WhenWarned(action)
        logging.getLogger("smsbatch.processor").addHandler(handler)
        handlers.append(handler)
        return handler

    yield install
    for handler in handlers:
        logging.getLogger("smsbatch.processor").removeHandler(handler)


# -- the engine: a dropped connection is StoreUnavailable, never a psycopg error ---------------

def test_a_connection_dropped_as_it_is_set_up_is_the_database_unavailable(relay, db_path):
    relay.drop = {1: 1}  # made, then cut at its first query (configure's settings)
    with pytest.raises(StoreUnavailable, match="cannot connect"):
        Store(through(relay, db_path))
    store = Store(through(relay, db_path))  # the next one is fine
    assert store.conn.execute("SELECT 1").fetchone()[0] == 1
    store.close()


def test_a_read_asked_again_on_a_connection_dropped_as_it_is_set_up_is_the_database_unavailable(relay, db_path):
    store = Store(through(relay, db_path))  # connection 1
    try:
        relay.drop = {2: 2}  # the one the read is asked again on: dropped at the read, once set up
        assert terminate_all(db_path) >= 1
        with pytest.raises(StoreUnavailable, match="closed the connection"):
            store.conn.execute("SELECT count(*) FROM batches").fetchone()
        assert store.conn.execute("SELECT count(*) FROM batches").fetchone()[0] == 0  # connection 3
    finally:
        store.close()


def test_a_read_asked_again_that_fails_again_says_why_as_a_store_error(db_path):
    store = Store(db_path)
    try:
        terminate_all(db_path)
        with pytest.raises(StoreError, match="no_such_table"):  # not psycopg's UndefinedTable
            store.conn.execute("SELECT * FROM no_such_table")
    finally:
        store.close()


def test_a_begin_the_server_refuses_is_a_store_error(db_path):
    store = Store(db_path)
    try:
        with pytest.raises(StoreError, match="lock_timeout"):  # not psycopg's InvalidParameterValue
            with store.db.transaction("BEGIN; SET LOCAL lock_timeout = 'soon'"):
                pass
        assert store.conn.execute("SELECT 1").fetchone()[0] == 1
    finally:
        store.close()


# -- the processor: a long run waits the outage out, a cron run ends --------------------------

def test_a_long_run_whose_database_is_away_at_its_start_waits_for_it(relay, db_path, fast_polls, warned):
    store = Store(db_path)
    add(store, ME, "hello", T0)
    settings = Settings(db_path=through(relay, db_path), ai="offline", sms="console")
    proc = offline_processor(settings, Clock(T0 + 3600))
    relay.cut()  # away: every connection refused, the run's first (calibrate, note_run) too
    told = warned(lambda: setattr(relay, "up", True))  # back once the run has said so
    stop = StopWhenAnswered(store)
    report = proc.run(seconds=30, stop=stop)
    assert report.counts["sent"] == 1 and len(told.lines) == 1, (report.counts, told.lines)
    assert "starting the run" in told.lines[0]
    assert store.conn.execute("SELECT started_at FROM processors").fetchone()[0] == T0 + 3600
    store.close()


def test_a_cron_run_whose_database_is_away_ends(relay, db_path, fast_polls, warned):
    settings = Settings(db_path=through(relay, db_path), ai="offline", sms="console")
    relay.cut()
    told = warned()
    with pytest.raises(StoreUnavailable):
        offline_processor(settings, Clock(T0)).run()
    assert told.lines == []


class StopWhenAnswered(threading.Event):
    """A run's `stop` that is set once every batch is answered (each round asks is_set), and that
    runs `script[n]` at the run's n-th look: the outage comes at an exact round."""

    def __init__(self, store, script=None):
        super().__init__()
        self.store, self.script, self.looks = store, dict(script or {}), 0

    def is_set(self):
        self.looks += 1
        self.script.pop(self.looks, lambda: None)()
        if not super().is_set() and self.store.conn.execute(
                "SELECT count(*) FROM batches WHERE state != 'sent'").fetchone()[0] == 0:
            self.set()
        return super().is_set()


def test_a_long_run_waits_out_a_database_away_between_its_rounds_and_says_so_once(relay, db_path, fast_polls,
                                                                                   warned):
    store = Store(db_path)
    add(store, ME, "hello", T0)
    clock = Clock(T0)  # the batch is not due yet: the run idles, a round every POLL_SECONDS
    proc = offline_processor(Settings(db_path=through(relay, db_path), ai="offline", sms="console"), clock)

    def back():  # several rounds later: the server is back, and the batch is due
        relay.up = True
        clock.now = T0 + 3600

    told = warned()
    stop = StopWhenAnswered(store, {2: relay.cut, 8: back})
    report = proc.run(seconds=30, stop=stop)
    assert report.counts["sent"] == 1, report.counts
    assert len(told.lines) == 1 and "claiming batches" in told.lines[0], told.lines  # one line, not one a round
    store.close()


# -- the command: its start and its end ------------------------------------------------------

@pytest.mark.parametrize("spoiled", [{"refuse": {1}}, {"drop": {1: 1}}, {"refuse": {2}}, {"drop": {2: 1}}],
                         ids=["refused-at-open", "dropped-at-open", "refused-at-prepare", "dropped-at-prepare"])
def test_process_for_waits_out_a_database_away_at_its_start(relay, db_path, fast_polls, warned, spoiled):
    """Connection 1 is the check that the database is there and migrated; connection 2 the
    processor's own, first used to prepare the run (the stall alert, calibration, the backfill)."""
    store = Store(db_path)
    add(store, ME, "hello", T0)
    for name, numbers in spoiled.items():
        setattr(relay, name, numbers)
    told = warned()
    result = invoke(["--db", through(relay, db_path), "process", "--for", "1", "--now", str(T0 + 600),
                     "--ai", "offline", "--sms", "console", "--json"])
    assert result.exit_code == 0, result.output
    assert '"sent": 1' in result.output
    assert len(told.lines) == 1, told.lines
    store.close()


def test_process_without_for_ends_with_one_line_when_the_database_is_away_at_its_start(relay, db_path):
    relay.refuse = {2}
    result = invoke(["--db", through(relay, db_path), "process", "--now", str(T0 + 600),
                     "--ai", "offline", "--sms", "console"])
    assert result.exit_code == 1 and result.output.startswith("Error: database unavailable"), result.output


def test_a_long_run_leaves_the_prune_to_the_next_run_when_the_database_is_away_at_its_end(relay, db_path, warned):
    settings = Settings(db_path=through(relay, db_path), ai="offline", sms="console", retention_days=30)
    relay.cut()
    caught = []
    handler = WhenWarned()
    handler.emit = lambda record: caught.append(record.getMessage())
    logging.getLogger("smsbatch.processor").addHandler(handler)
    try:
        prune_after_run(settings, T0, long_run=True)
        assert len(caught) == 1 and caught[0].startswith("could not prune"), caught
        with pytest.raises(StoreUnavailable):
            prune_after_run(settings, T0)  # a cron run: the one-line error
    finally:
        logging.getLogger("smsbatch.processor").removeHandler(handler)
