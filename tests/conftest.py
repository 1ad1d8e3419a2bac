import os
import sys
import time

import pytest
from click.testing import CliRunner

sys.path.insert(0, os.path.dirname(__file__))

from fakes import FakeOpenAI, FakeTwilio, provider_env  # noqa: E402
from smsbatch.ai import OfflineResponder, OpenAIResponder  # noqa: E402
from smsbatch.batching import Rules  # noqa: E402
from smsbatch.cli import cli  # noqa: E402
from smsbatch.config import Settings  # noqa: E402
from smsbatch.db import Store  # noqa: E402
from smsbatch.processor import Processor  # noqa: E402
from smsbatch.sms import ConsoleSender, TwilioSender  # noqa: E402

T0 = 1_800_000_000.0  # a fixed "now" for tests
# PostgreSQL tests run when this names a server (e.g. postgresql://postgres@127.0.0.1:5432/postgres);
# each test gets a schema of its own there, dropped afterwards.
POSTGRES_URL = os.environ.get("SMSBATCH_TEST_POSTGRES_URL", "")
# Mark a test (or a module: pytestmark = pytest.mark.engines) to run it on both engines:
# every test using db_path/store/settings then runs once per engine.
ENGINES = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


def pytest_configure(config):
    config.addinivalue_line("markers", "postgres: needs SMSBATCH_TEST_POSTGRES_URL (a PostgreSQL server)")
    config.addinivalue_line("markers", "engines: run on SQLite and on PostgreSQL (the engine_name fixture)")
    config.addinivalue_line("markers", "sqlite_only: in an `engines` module, a test of SQLite itself")


def pytest_generate_tests(metafunc):
    if metafunc.definition.get_closest_marker("engines") and "engine_name" in metafunc.fixturenames:
        sqlite_only = metafunc.definition.get_closest_marker("sqlite_only")
        metafunc.parametrize("engine_name", ENGINES[:1] if sqlite_only else ENGINES)


def postgres_line():
    if POSTGRES_URL:
        return f"postgresql: tests also ran on {POSTGRES_URL.split('@')[-1]} (SMSBATCH_TEST_POSTGRES_URL)"
    return "postgresql: SMSBATCH_TEST_POSTGRES_URL is not set: the PostgreSQL tests were skipped (deselected)"


def pytest_terminal_summary(terminalreporter):
    """One line, shown with -q too, saying whether the PostgreSQL half ran."""
    terminalreporter.write_line(postgres_line())


def pytest_collection_modifyitems(config, items):
    """Without a server the PostgreSQL tests are deselected: one line in the header, not one per test."""
    if POSTGRES_URL:
        return
    keep = [item for item in items if item.get_closest_marker("postgres") is None]
    if len(keep) != len(items):
        config.hook.pytest_deselected(items=[item for item in items if item.get_closest_marker("postgres")])
        items[:] = keep


def with_search_path(url, schema):
    """The URL with every session's search_path set to `schema` (and named after it, so a
    test can find its own sessions in pg_stat_activity)."""
    return f"{url}{'&' if '?' in url else '?'}application_name={schema}&options=-csearch_path%3D{schema}"


@pytest.fixture
def pg_url():
    """A PostgreSQL URL whose connections see a fresh, empty schema of their own (dropped after)."""
    import secrets

    import psycopg

    schema = f"smsbatch_test_{secrets.token_hex(6)}"
    with psycopg.connect(POSTGRES_URL, autocommit=True) as admin:
        admin.execute(f"CREATE SCHEMA {schema}")
    yield with_search_path(POSTGRES_URL, schema)
    with psycopg.connect(POSTGRES_URL, autocommit=True) as admin:
        admin.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture
def engine_name():
    """Which engine `db_path` is on: SQLite unless a test is parametrized with ENGINES."""
    return "sqlite"


@pytest.fixture
def db_path(request, tmp_path, engine_name):
    """A migrated database: an SQLite file in tmp_path, or (engine_name "postgres") a URL."""
    path = request.getfixturevalue("pg_url") if engine_name == "postgres" else str(tmp_path / "smsbatch.db")
    store = Store(path)
    store.migrate()
    store.close()
    return path


@pytest.fixture
def store(db_path):
    s = Store(db_path)
    yield s
    s.close()


@pytest.fixture
def settings(db_path):
    return Settings(db_path=db_path, ai="offline", sms="console")


@pytest.fixture
def rules():
    return Rules()


@pytest.fixture
def openai_standin():
    with FakeOpenAI() as server:
        yield server


@pytest.fixture
def twilio_standin():
    with FakeTwilio() as server:
        yield server


@pytest.fixture
def real_settings(db_path, openai_standin, twilio_standin):
    """Settings whose real openai/twilio clients talk to the stand-ins."""
    env = provider_env(openai_standin, twilio_standin, SMSBATCH_DB=db_path,
                       SMSBATCH_AI_TIMEOUT_SECONDS=2, SMSBATCH_SMS_TIMEOUT_SECONDS=2)
    return Settings.from_env(env)


class Clock:
    def __init__(self, now=T0):
        self.now = now

    def __call__(self):
        return self.now


@pytest.fixture
def clock():
    return Clock()


def offline_processor(settings, clock, responder=None, sender=None):
    return Processor(settings.db_path, settings, responder or OfflineResponder(),
                     sender or ConsoleSender(quiet=True), clock=clock)


def real_processor(settings, clock):
    return Processor(settings.db_path, settings, OpenAIResponder(settings), TwilioSender(settings), clock=clock)


def add(store, phone, body, at, sid=None, rules=Rules(), to="+15550000000", media=()):
    add.counter += 1
    return store.add_message(sid or f"SMt{add.counter:030d}", phone, to, body, at, rules, media)


add.counter = 0


def invoke(args, env=None, input=None):
    """Run the CLI in-process with a clean environment (plus `env`)."""
    clean = {k: None for k in os.environ if k.startswith(("SMSBATCH_", "TWILIO_", "OPENAI_", "ENABLE_AI", "AI_SMS"))}
    clean.update(env or {})
    return CliRunner().invoke(cli, args, env=clean, input=input, catch_exceptions=False)


def wait_for(predicate, timeout=10.0):
    """Poll for an outside event (a stand-in got a request), bounded in time."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.005)
    return False


class TextMeanwhile:
    """A responder during whose answer the person writes again (or sends STOP).

    `at` is the new text's time: a number, or a callable of the call number.
    """

    def __init__(self, db_path, phone, body, at, reply="ok"):
        self.db_path, self.phone, self.body, self.at, self.reply = db_path, phone, body, at, reply
        self.calls = 0
        self.prompts = []

    def answer(self, messages):
        self.calls += 1
        at = self.at(self.calls) if callable(self.at) else self.at
        body = self.body(self.calls) if callable(self.body) else self.body
        if body is not None:
            add(Store(self.db_path), self.phone, body, at)
        self.prompts.append(messages[-1]["content"])
        return self.reply
