"""GET /metrics: read with prometheus_client's own parser, from a real `serve` and from the
WSGI app, and checked against the database after a real `process` run with the stand-ins."""

import os
import re
import sqlite3
import subprocess
import sys
import time
import urllib.request
from urllib.error import HTTPError

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import T0, add
from fakes import provider_env
from smsbatch.config import Settings
from smsbatch.db import Store
from smsbatch.errors import PHONE_DIGITS
from smsbatch.web import make_app
from test_web import call, form, signed

OURS = ("+15550000000", "+15550000001")
PEOPLE = [f"+1555330{i:04d}" for i in range(6)]
SECRET_TOKEN = "metrics-Zx9SecretToken4242"


def samples(text):
    """{(name, ((label, value), ...)): value} of an exposition, parsed by prometheus_client."""
    found = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            found[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return found


def value(found, name, **labels):
    return found.get((name, tuple(sorted(labels.items()))))


def scrape(app, headers=None):
    status, hdrs, body = call(app, method="GET", path="/metrics", headers=headers)
    assert status == 200, body
    assert hdrs["Content-Type"].startswith("text/plain")
    return body.decode()


def process_run(db_path, openai, twilio, now):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SMSBATCH_", "TWILIO_", "OPENAI_"))}
    env.update(provider_env(openai, twilio, SMSBATCH_DB=db_path, SMSBATCH_AI_CLIENT_RETRIES=0,
                            SMSBATCH_MAX_ATTEMPTS=1))
    return subprocess.run([sys.executable, "-m", "smsbatch", "process", "--now", str(now)], env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def history(db_path, store, openai_standin, twilio_standin):
    """Texts from six people to two business numbers, then a real `process` run: four
    answered, one AI failure (failed), one still open; replies billed as the SMS helper records them."""
    now = round(time.time())
    for n, phone in enumerate(PEOPLE[:5]):
        for k in range(n % 3 + 1):
            add(store, phone, f"secret question {n}.{k}", now - 100 + k, to=OURS[n % 2])
    openai_standin.script = ["ok", "ok", "ok", "ok", 400]  # the fifth answer is refused: failed
    run = process_run(db_path, openai_standin, twilio_standin, now)
    assert run.returncode == 3, run.stderr  # finished, one failed
    add(store, PEOPLE[5], "still typing", now - 1, to=OURS[0])
    conn = sqlite3.connect(db_path)  # what the SMS-cost code records for each reply (schema step 9 columns)
    with conn:
        conn.execute("UPDATE outbound SET segments = 2, encoding = 'GSM-7', price = -0.0158, price_unit = 'USD'")
        conn.execute("UPDATE outbound SET segments = 3, encoding = 'UCS-2', price = -0.0237, status = 'delivered'"
                     " WHERE rowid = (SELECT min(rowid) FROM outbound)")
    return now, conn


def test_metrics_agree_with_the_database_after_a_real_process_run(db_path, history):
    now, conn = history
    app = make_app(Settings(db_path=db_path, twilio_auth_token="t", public_url="https://sms.example.com/sms"), clock=lambda: now)
    found = samples(scrape(app))
    q = lambda sql: conn.execute(sql).fetchall()  # noqa: E731
    assert value(found, "smsbatch_database_readable") == 1
    for number, count in q("SELECT our_number, count(*) FROM messages GROUP BY our_number"):
        assert value(found, "smsbatch_texts_stored", our_number=number) == count
    states = dict(q("SELECT state, count(*) FROM batches GROUP BY state"))
    assert states == {"sent": 4, "failed": 1, "open": 1}
    for state in ("sent", "failed", "open", "queued", "expired"):
        assert value(found, "smsbatch_batches", state=state) == states.get(state, 0)
    requests, prompt, completion = q("SELECT sum(ai_requests), sum(prompt_tokens), sum(completion_tokens)"
                                     " FROM batches")[0]
    assert requests == 5 and prompt > 0
    assert value(found, "smsbatch_ai_requests") == requests
    assert value(found, "smsbatch_ai_tokens", kind="prompt") == prompt
    assert value(found, "smsbatch_ai_tokens", kind="completion") == completion
    replies = dict(q("SELECT coalesce(status, 'no_receipt'), count(*) FROM outbound GROUP BY 1"))
    assert replies["delivered"] == 1 and sum(replies.values()) == 4
    for status in ("no_receipt", "queued", "sent", "delivered", "undelivered", "failed"):
        assert value(found, "smsbatch_replies", status=status) == replies.get(status, 0)
    assert value(found, "smsbatch_sms_segments", encoding="GSM-7") == 6
    assert value(found, "smsbatch_sms_segments", encoding="UCS-2") == 3
    assert value(found, "smsbatch_sms_cost", currency="USD") == pytest.approx(3 * 0.0158 + 0.0237)
    oldest = q("SELECT min(first_at) FROM batches WHERE state = 'open'")[0][0]
    assert value(found, "smsbatch_oldest_pending_age_seconds") == pytest.approx(now - oldest, abs=0.1)
    started, finished = q("SELECT started_at, finished_at FROM processors")[0]
    assert value(found, "smsbatch_last_processor_run_timestamp_seconds") == max(started, finished)
    assert value(found, "smsbatch_last_text_timestamp_seconds") == q("SELECT max(received_at) FROM messages")[0][0]
    # The AI's refusal (a 400) is an answer, not an outage.
    assert value(found, "smsbatch_provider_failing", provider="ai") == 0
    assert value(found, "smsbatch_provider_outage", provider="sms") == 0


def label_values(text):
    return {v for family in text_string_to_metric_families(text) for s in family.samples for v in s.labels.values()}


def test_no_label_holds_a_persons_number_or_any_text(db_path, history):
    now, conn = history
    # Unsigned requests (--insecure-no-signature) can claim any To: a person's number, or words.
    app = make_app(Settings(db_path=db_path), clock=lambda: now, insecure=True)
    for n, to in enumerate(["+15553330002", "hello there friend", "+1 (555) 333-0003", "x" * 300]):
        body, _ = signed(form(MessageSid=f"SM{n:032x}", To=to, From=PEOPLE[n]))
        assert call(app, body=body)[0] == 200
    call(app, method="GET", path="/+15553330004")  # a path holding a number is counted as "other"
    text = scrape(app)
    labels = label_values(text)
    bodies = [r[0] for r in conn.execute("SELECT body FROM messages")] + [r[0] for r in conn.execute(
        "SELECT body FROM outbound")]
    for label in labels:
        assert label not in PEOPLE and not any(b in label for b in bodies if len(b) > 3), label
        if PHONE_DIGITS.search(label):
            assert label in OURS, label  # business numbers only
    assert value(samples(text), "smsbatch_webhook_requests_total", route="other", code="404") == 1
    # Listed numbers (SMSBATCH_NUMBERS, else TWILIO_FROM_NUMBER) are labels; the forged ones are summed as "other".
    total = conn.execute("SELECT count(*) FROM messages").fetchone()[0]
    for listed in (Settings(db_path=db_path, numbers=(OURS[0],)), Settings(db_path=db_path, twilio_from_number=OURS[0])):
        found = samples(scrape(make_app(listed, clock=lambda: now, insecure=True)))
        numbers = {dict(k[1])["our_number"] for k in found if k[0] == "smsbatch_texts_stored"}
        assert numbers == {OURS[0], "other"}
        assert sum(v for k, v in found.items() if k[0] == "smsbatch_texts_stored") == total


def test_webhook_requests_and_latency_are_counted_per_process(db_path):
    app = make_app(Settings(db_path=db_path, twilio_auth_token="webhook-test-token",
                            public_url="https://hooks.example.com/sms"), clock=lambda: T0)
    for n in range(3):
        body, headers = signed(form(MessageSid=f"SM{n:032d}"))
        assert call(app, body=body, headers=headers)[0] == 200
    assert call(app, body=signed(form())[0], headers={"HTTP_X_TWILIO_SIGNATURE": "forged"})[0] == 403
    assert call(app, method="GET", path="/health")[0] == 200
    found = samples(scrape(app))
    assert value(found, "smsbatch_webhook_requests_total", route="/sms", code="200") == 3
    assert value(found, "smsbatch_webhook_requests_total", route="/sms", code="403") == 1
    assert value(found, "smsbatch_webhook_requests_total", route="/health", code="200") == 1
    assert value(found, "smsbatch_webhook_request_duration_seconds_count", route="/sms") == 4
    assert value(found, "smsbatch_webhook_request_duration_seconds_bucket", route="/sms", le="+Inf") == 4
    assert value(found, "smsbatch_rejected_signatures_last_hour") == 1  # counted, though not yet written
    # Another app (another process) has counts of its own; the database's are the same for both.
    other = samples(scrape(make_app(Settings(db_path=db_path, twilio_auth_token="t", public_url="https://sms.example.com/sms"), clock=lambda: T0)))
    assert value(other, "smsbatch_webhook_requests_total", route="/sms", code="200") is None
    assert value(other, "smsbatch_texts_stored", our_number="+15550000000") == 3


def test_a_scrape_never_waits_for_the_write_lock(db_path, store):
    add(store, PEOPLE[0], "hello", T0 - 5)
    holder = sqlite3.connect(db_path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process is writing
    try:
        app = make_app(Settings(db_path=db_path, twilio_auth_token="t", public_url="https://sms.example.com/sms"), clock=lambda: T0)
        started = time.monotonic()
        found = samples(scrape(app))
        assert time.monotonic() - started < 1.0
        assert value(found, "smsbatch_texts_stored", our_number="+15550000000") == 1
    finally:
        holder.execute("ROLLBACK")


def test_an_unreadable_database_is_a_metric_not_an_error(tmp_path):
    path = str(tmp_path / "gone.db")
    Store(path).migrate()
    app = make_app(Settings(db_path=path, twilio_auth_token="t", public_url="https://sms.example.com/sms"), clock=lambda: T0)
    os.remove(path)
    found = samples(scrape(app))
    assert value(found, "smsbatch_database_readable") == 0
    assert not any(k[0] == "smsbatch_batches" for k in found)


def test_metrics_refuses_other_methods(db_path):
    app = make_app(Settings(db_path=db_path, twilio_auth_token="t", public_url="https://sms.example.com/sms"), clock=lambda: T0)
    status, headers, _ = call(app, method="POST", path="/metrics")
    assert status == 405 and headers["Allow"] == "GET, HEAD"


# -- a real `serve`, with the bearer token ---------------------------------------------


def start_serve(db_path, log_path, host="127.0.0.1", **env_extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SMSBATCH_", "TWILIO_"))}
    env.update(SMSBATCH_DB=db_path, TWILIO_AUTH_TOKEN="t", SMSBATCH_PUBLIC_URL="https://sms.example.com/sms", **env_extra)
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "smsbatch", "serve", "--port", "0", "--host", host], env=env,
                                stdout=subprocess.DEVNULL, stderr=log)
    end = time.monotonic() + 20
    while time.monotonic() < end:
        text = open(log_path).read()
        match = re.search(r"listening on http://[0-9.]+:(\d+)/sms", text)
        if match:
            return proc, int(match.group(1))
        assert proc.poll() is None, text
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("serve did not start: " + open(log_path).read())


def get(port, path, headers=None):
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, dict(answer.headers), answer.read().decode()
    except HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read().decode()


@pytest.mark.parametrize("given", [None, "Bearer wrong-token", f"Basic {SECRET_TOKEN}", f"Bearer {SECRET_TOKEN}x",
                                   "Bearer"])
def test_the_bearer_token_is_enforced_by_a_real_serve(db_path, store, tmp_path, given):
    add(store, PEOPLE[0], "hello", time.time() - 5)
    proc, port = start_serve(db_path, tmp_path / "serve.log", SMSBATCH_METRICS_TOKEN=SECRET_TOKEN)
    try:
        status, headers, body = get(port, "/metrics", {"Authorization": given} if given else {})
        assert status == 401 and "bearer token" in body and headers["WWW-Authenticate"].startswith("Bearer")
        status, headers, body = get(port, "/metrics", {"Authorization": f"Bearer {SECRET_TOKEN}"})
        assert status == 200 and headers["Content-Type"].startswith("text/plain")
        found = samples(body)
        assert value(found, "smsbatch_texts_stored", our_number="+15550000000") == 1
        # The refused scrape was counted, and nothing of what it sent shows.
        assert value(found, "smsbatch_webhook_requests_total", route="/metrics", code="401") == 1
        assert SECRET_TOKEN not in body and "wrong-token" not in body
        assert get(port, "/health")[0] == 200  # the webhook's own paths need no token
    finally:
        proc.terminate()
        proc.wait(10)
    assert SECRET_TOKEN not in open(tmp_path / "serve.log").read()


@pytest.mark.parametrize("host, warned", [("127.0.0.1", False), ("0.0.0.0", True)])
def test_without_a_token_a_real_serve_answers_metrics_and_warns_off_loopback(db_path, tmp_path, host, warned):
    proc, port = start_serve(db_path, tmp_path / "serve.log", host=host)
    try:
        status, _, body = get(port, "/metrics")
        assert status == 200 and value(samples(body), "smsbatch_database_readable") == 1
    finally:
        proc.terminate()
        proc.wait(10)
    log = open(tmp_path / "serve.log").read()
    assert ("GET /metrics answers anyone who reaches" in log) == warned, log


@pytest.mark.postgres
@pytest.mark.parametrize("engine_name", ["postgres", "sqlite"])
def test_the_postgresql_webhook_counts_its_guessed_groups(db_path, engine_name):
    """smsbatch_webhook_guessed_groups_total{outcome}: a person's texts stored in one round
    trip each (a new conversation, then its open batch) count as right; SQLite has no such groups."""
    app = make_app(Settings(db_path=db_path, twilio_auth_token="webhook-test-token",
                            public_url="https://hooks.example.com/sms"), clock=lambda: T0)
    try:
        for n in range(3):
            body, headers = signed(form(MessageSid=f"SM{n:032d}"))
            assert call(app, body=body, headers=headers)[0] == 200
        found = samples(scrape(app))
    finally:
        app.drain()
    right = value(found, "smsbatch_webhook_guessed_groups_total", outcome="right")
    assert right == (3 if engine_name == "postgres" else None)
