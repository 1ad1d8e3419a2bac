"""Issue 10, "See": outages, ISO log times, durations, stats, status, show."""

import json
import re
import subprocess
import sys

import pytest

from conftest import T0, add, invoke
from fakes import provider_env
from smsbatch import inputs
from smsbatch.db import Store
from smsbatch.errors import InvalidInput
from test_web import call
from smsbatch.config import Settings
from smsbatch.web import make_app

A, B = "+15554440001", "+15554440002"
ISO = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"


def env_for(db_path, **extra):
    return {"SMSBATCH_DB": db_path, **{k: str(v) for k, v in extra.items()}}


# -- durations -------------------------------------------------------------------


@pytest.mark.parametrize("text, seconds", [("7d", 604800), ("24h", 86400), ("90m", 5400), ("30s", 30),
                                           ("45", 45), ("1.5h", 5400), ("2w", 1209600), (" 3D ", 259200)])
def test_durations_are_parsed_in_one_place(text, seconds):
    assert inputs.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "7 days", "-1d", "0", "d", "1y", "nan"])
def test_bad_durations_are_refused_with_a_reason(text):
    with pytest.raises(InvalidInput, match="bad duration"):
        inputs.parse_duration(text)


# -- outages ---------------------------------------------------------------------


def test_an_outage_is_announced_once_and_its_end_once(store):
    assert store.record_provider("ai", T0, "AI returned HTTP 503: down", 300) is None
    assert store.record_provider("ai", T0 + 200, "AI returned HTTP 503: down", 300) is None
    assert store.outages() == []  # failing, not yet for long enough
    what, row = store.record_provider("ai", T0 + 301, "AI timed out", 300)
    assert what == "outage" and row["failing_since"] == T0
    assert store.record_provider("ai", T0 + 400, "AI timed out", 300) is None  # announced already
    other = Store(store.path)  # another cron run: a new process, a new connection
    assert other.outages() == [{"provider": "ai", "since": T0, "last_failure_at": T0 + 400,
                                "last_error": "AI timed out"}]
    assert other.record_provider("sms", T0 + 400, None, 300) is None  # Twilio is fine meanwhile
    what, row = other.record_provider("ai", T0 + 500, None, 300)
    assert what == "recovered" and row["failing_since"] == T0
    assert store.record_provider("ai", T0 + 510, None, 300) is None
    assert store.outages() == []
    assert store.record_provider("ai", T0 + 600, "AI timed out", 300) is None  # a new streak starts over


def test_a_success_between_failures_means_no_outage(store):
    for n in range(10):
        store.record_provider("sms", T0 + 100 * n, "Twilio error 30003: unreachable", 300)
        store.record_provider("sms", T0 + 100 * n + 1, None, 300)
    assert store.outages() == [] and store.provider_health()[0]["failing_since"] is None


def test_health_shows_a_current_outage(db_path, store):
    app = make_app(Settings(db_path=db_path, twilio_auth_token="t"), clock=lambda: T0)
    assert json.loads(call(app, method="GET", path="/health")[2])["outages"] == []
    store.record_provider("sms", T0, "Twilio unreachable (ConnectionError)", 300)
    store.record_provider("sms", T0 + 300, "Twilio unreachable (ConnectionError)", 300)
    info = json.loads(call(app, method="GET", path="/health")[2])
    assert info["outages"][0]["provider"] == "sms" and info["outages"][0]["since"] == T0
    assert "unreachable" in info["outages"][0]["last_error"]


def run_process(db_path, openai, twilio, now):
    env = provider_env(openai, twilio, SMSBATCH_DB=db_path, SMSBATCH_AI_CLIENT_RETRIES=0,
                       SMSBATCH_AI_TIMEOUT_SECONDS=2, SMSBATCH_SMS_TIMEOUT_SECONDS=2,
                       SMSBATCH_RETRY_BASE_SECONDS=1, SMSBATCH_MAX_ATTEMPTS=20, SMSBATCH_ALERT_AFTER_SECONDS=300)
    return subprocess.run([sys.executable, "-m", "smsbatch", "process", "--now", str(now)], env=env,
                          capture_output=True, text=True, timeout=60)


def test_process_warns_on_stderr_once_per_outage_and_when_it_ends(db_path, store, openai_standin,
                                                                  twilio_standin):
    """Each cron run is a new process: the outage lives in the database. Every line carries an ISO time."""
    add(store, A, "is the shop open?", T0 - 20)
    openai_standin.script = [503] * 4
    runs = [run_process(db_path, openai_standin, twilio_standin, T0 + t) for t in (0, 200, 320, 400, 500)]
    outage_lines = [[ln for ln in r.stderr.splitlines() if "OUTAGE" in ln or "RECOVERED" in ln] for r in runs]
    assert [len(lines) for lines in outage_lines] == [0, 0, 1, 0, 1], [r.stderr for r in runs]
    assert re.match(ISO + r" WARNING smsbatch.processor: OUTAGE: AI calls failing since " + ISO
                    + r" \(5m20s\): AI returned HTTP 503", outage_lines[2][0])
    assert "RECOVERED: AI calls work again after failing for 8m20s" in outage_lines[4][0]
    for r in runs:
        assert re.fullmatch(ISO + r" claimed 1, .*\n", r.stdout), r.stdout
        assert all(re.match(ISO + " ", ln) for ln in r.stderr.splitlines()), r.stderr
    assert "sent 1" in runs[-1].stdout and twilio_standin.bodies_to(A)
