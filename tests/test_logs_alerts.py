"""SMSBATCH_LOG_FORMAT=json (every line of a real `process` and `serve` parses) and
SMSBATCH_ALERT_WEBHOOK_URL (a chat webhook stand-in receives each alert once; a hung or
failing one never holds up the run beyond its bounded wait)."""

import json
import logging
import os
import re
import subprocess
import sys
import time

import pytest

from conftest import T0, add, invoke, wait_for
from fakes import ChatHook, provider_env
from smsbatch import alerts
from smsbatch.alerts import Alerter, notice_stall
from smsbatch.config import Settings
from smsbatch.db import Store
from smsbatch.logs import JsonFormatter
from test_metrics import start_serve

A, B = "+15554440001", "+15554440002"
HOOK_SECRET = "B0SECRETPATH4242xyz"
KEYS = {"time", "level", "logger", "message"}
ISO_MS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


@pytest.fixture
def chat():
    with ChatHook() as server:
        yield server


def hook_url(chat):
    return f"{chat.url}/services/T000/{HOOK_SECRET}"


def run_process(db_path, openai, twilio, now, args=(), **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SMSBATCH_", "TWILIO_", "OPENAI_"))}
    env.update(provider_env(openai, twilio, SMSBATCH_DB=db_path, SMSBATCH_AI_CLIENT_RETRIES=0,
                            SMSBATCH_AI_TIMEOUT_SECONDS=2, SMSBATCH_SMS_TIMEOUT_SECONDS=2,
                            SMSBATCH_RETRY_BASE_SECONDS=1, SMSBATCH_MAX_ATTEMPTS=20,
                            SMSBATCH_ALERT_AFTER_SECONDS=300, **extra))
    started = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "smsbatch", "process", "--now", str(now), *args], env=env,
                         capture_output=True, text=True, timeout=60)
    run.seconds = time.monotonic() - started
    return run


def json_lines(text):
    """Every line as a JSON object with the common keys (fails on any line that is not)."""
    entries = [json.loads(line) for line in text.splitlines()]
    for entry in entries:
        assert KEYS <= entry.keys(), entry
        assert ISO_MS.fullmatch(entry["time"]), entry
    return entries


# -- JSON logs ---------------------------------------------------------------------


def test_every_line_of_a_real_process_run_is_json_with_its_context(db_path, store, openai_standin, twilio_standin):
    """An outage announced, a batch failed for good: every stderr line and the summary on
    stdout are JSON objects; the batch's lines carry batch_id and our_number, never the phone."""
    add(store, A, "is the shop open?", T0 - 20)
    add(store, B, "hello", T0 - 20, to="+15550000001")
    openai_standin.script = [503, 400]  # an outage for one, a refusal (failed at once) for the other
    store.record_provider("ai", T0 - 400, "AI returned HTTP 503", 300)  # failing for a while already
    # One batch at a time: the 400 is an answer, so the provider is up again. Side by side, the
    # 400's batch could note that before the 503's batch noted its failure (under load it did):
    # the outage then starts afresh at T0 and, rightly, is not announced.
    run = run_process(db_path, openai_standin, twilio_standin, T0, args=("--concurrency", "1"),
                      SMSBATCH_LOG_FORMAT="json")
    assert run.returncode == 3, run.stderr
    entries = json_lines(run.stderr)
    assert any(e["message"].startswith("OUTAGE: AI calls failing") and e["level"] == "WARNING" for e in entries)
    failed = [e for e in entries if " failed: " in e["message"]]
    assert len(failed) == 1 and failed[0]["logger"] == "smsbatch.processor"
    batch = store.conn.execute("SELECT id, our_number FROM batches WHERE state = 'failed'").fetchone()
    assert failed[0]["batch_id"] == batch["id"] and failed[0]["our_number"] == batch["our_number"]
    [summary] = json_lines(run.stdout)
    assert summary["logger"] == "smsbatch.process" and summary["message"].startswith("claimed 2")
    assert summary["report"]["failed"] == 1 and summary["report"]["retrying"] == 1
    for phone in (A, B):
        assert phone not in run.stderr + run.stdout and phone[2:] not in run.stderr


def test_json_formatter_escapes_control_and_bidi_characters_and_masks_numbers():
    record = logging.LogRecord("smsbatch.web", logging.WARNING, __file__, 1, "from %s: %s", None, None)
    record.args = ("+15554440001", "evil\x1b[31m\u202eline\nbreak\x85")
    record.batch_id, record.reply_sid = "b7k2mq9xza", "SM" + "0" * 32
    line = JsonFormatter().format(record)
    assert "\n" not in line and "\x1b" not in line and "\u202e" not in line and "\x85" not in line
    entry = json.loads(line)
    assert entry["message"] == "from [number]: evil\x1b[31m\u202eline\nbreak\x85"  # JSON escaped it, losslessly
    assert entry["batch_id"] == "b7k2mq9xza" and entry["reply_sid"] == "SM" + "0" * 32
    assert "our_number" not in entry  # only the keys that apply


def test_an_uncaught_exception_and_a_warning_are_json_lines_too():
    """What would reach stderr outside logging (a bug's traceback, in any thread; a Python warning)."""
    code = ("import logging, sys, threading, warnings\n"
            "from smsbatch.logs import use_json\n"
            "handler = logging.StreamHandler(sys.stderr); use_json(handler)\n"
            "logging.basicConfig(level=logging.WARNING, handlers=[handler])\n"
            "warnings.warn('old API used')\n"
            "t = threading.Thread(target=lambda: 1 / 0); t.start(); t.join()\n"
            "raise RuntimeError('bug while texting +15554440001')\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert run.returncode == 1
    entries = json_lines(run.stderr)
    assert [e["level"] for e in entries] == ["WARNING", "CRITICAL", "CRITICAL"]
    assert "ZeroDivisionError" in entries[1]["exception"] and "RuntimeError" in entries[2]["exception"]
    assert "+15554440001" not in run.stderr and "[number]" in entries[2]["message"]


def test_every_line_of_a_real_serve_is_json(db_path, tmp_path):
    import urllib.request
    from urllib.error import HTTPError

    log_path = tmp_path / "serve.log"
    proc, port = start_serve(db_path, log_path, SMSBATCH_LOG_FORMAT="json")
    try:
        for path in ("/nothing\x1b[2J", "/sms"):
            request = urllib.request.Request(f"http://127.0.0.1:{port}{path.replace(chr(27), '%1b')}", data=b"x=1",
                                             headers={"Content-Type": "application/x-www-form-urlencoded"})
            with pytest.raises(HTTPError):
                urllib.request.urlopen(request, timeout=10)
    finally:
        proc.terminate()
        proc.wait(10)
    entries = json_lines(open(log_path).read())
    messages = [e["message"] for e in entries]
    assert any(m.startswith("listening on http://127.0.0.1:") for m in messages)
    assert any("rejected 404" in m for m in messages) and any("rejected 403" in m for m in messages)


def test_a_command_that_cannot_run_says_why_in_one_json_line(tmp_path, openai_standin, twilio_standin):
    run = run_process(str(tmp_path / "missing.db"), openai_standin, twilio_standin, T0, SMSBATCH_LOG_FORMAT="json")
    assert run.returncode == 1 and run.stdout == ""
    [entry] = json_lines(run.stderr)
    assert entry["level"] == "ERROR" and "does not exist: run `smsbatch migrate` first" in entry["message"]


def test_a_bad_log_format_is_one_line_error():
    result = invoke(["status"], {"SMSBATCH_LOG_FORMAT": "xml"})
    assert result.exit_code == 1 and "SMSBATCH_LOG_FORMAT must be one of plain, json" in result.output


# -- alerts ------------------------------------------------------------------------


def test_an_outage_and_its_recovery_are_posted_once_each(db_path, store, openai_standin, twilio_standin, chat):
    """Each cron run is a new process; the AI stand-in fails for longer than
    SMSBATCH_ALERT_AFTER_SECONDS (time injected with --now), then answers."""
    add(store, A, "is the shop open?", T0 - 20)
    openai_standin.script = [503] * 4
    texts = []
    for t in (0, 200, 320, 400, 500):
        run = run_process(db_path, openai_standin, twilio_standin, T0 + t, SMSBATCH_ALERT_WEBHOOK_URL=hook_url(chat))
        assert run.returncode == 0, run.stderr
        texts.append(list(chat.texts))
    assert [len(t) for t in texts] == [0, 0, 1, 1, 2]
    outage, recovery = texts[-1]
    assert outage.startswith("smsbatch OUTAGE: AI calls failing since ") and "(5m20s): AI returned HTTP 503" in outage
    assert recovery.startswith("smsbatch RECOVERED: AI calls work again after failing for 8m20s")
    assert A not in "".join(texts[-1]) and A[2:] not in "".join(texts[-1])
    assert store.get_batch(store.conn.execute("SELECT id FROM batches").fetchone()[0])["state"] == "sent"


@pytest.mark.parametrize("script", [["hang"] * 4, [500] * 4])
def test_a_hung_or_failing_alert_endpoint_does_not_hold_up_the_run(db_path, store, openai_standin, twilio_standin,
                                                                   chat, script):
    add(store, A, "is the shop open?", T0 - 20)
    store.record_provider("ai", T0 - 400, "AI returned HTTP 503", 300)
    openai_standin.script = [503]
    chat.script = list(script)
    run = run_process(db_path, openai_standin, twilio_standin, T0, SMSBATCH_ALERT_WEBHOOK_URL=hook_url(chat))
    assert run.returncode == 0, run.stderr
    assert "retrying 1" in run.stdout
    # Two tries, then given up within the bounded wait: the run is not held up longer.
    assert len(chat.requests) == alerts.ALERT_TRIES
    assert run.seconds < alerts.WAIT_AT_END + 10, run.seconds
    assert "alert not delivered to http://127.0.0.1:" in run.stderr
    assert HOOK_SECRET not in run.stderr and "/services/" not in run.stderr


def test_a_stalled_processor_is_announced_once_per_episode(db_path, store, chat):
    add(store, A, "anyone there?", T0 - 20)  # due at T0 - 10 (10 s quiet), never processed
    alerter = Alerter(hook_url(chat))
    assert not notice_stall(store, alerter, T0 + 200, 300)  # not waiting long enough yet
    assert notice_stall(store, alerter, T0 + 400, 300)
    other = Store(db_path)  # another process noticing the same stall (serve on another host)
    assert not notice_stall(other, alerter, T0 + 460, 300)
    assert not notice_stall(store, alerter, T0 + 900, 300)
    assert alerter.wait(10) and len(chat.texts) == 1
    assert chat.texts[0].startswith("smsbatch STALLED: no processor has run ever while 1 batch wait")
    assert A not in chat.texts[0]
    store.note_run("host-a", T0 + 990)  # a processor ran (and then stopped again)...
    store.note_run("host-a", T0 + 1000, finished=True)
    add(store, B, "hello?", T0 + 1000)
    assert not notice_stall(store, alerter, T0 + 1200, 300)  # ...recently
    assert notice_stall(store, alerter, T0 + 1400, 300)  # a new episode
    assert alerter.wait(10) and len(chat.texts) == 2 and "since " in chat.texts[1]


def test_serve_watches_for_a_stalled_processor(db_path, store, chat):
    """`serve`'s watcher (alerts.watch_stalls) on its own thread and connection, time injected."""
    import threading

    add(store, A, "anyone there?", T0 - 20)
    settings = Settings(db_path=db_path, alert_webhook_url=hook_url(chat))
    clock = [T0]
    stop = threading.Event()
    thread = alerts.watch_stalls(settings, Alerter.for_settings(settings), stop, every=0.02, clock=lambda: clock[0])
    try:
        time.sleep(0.2)  # a few rounds: nothing has waited long enough yet
        assert chat.texts == []
        clock[0] = T0 + 400
        assert wait_for(lambda: len(chat.texts) == 1)
        time.sleep(0.2)  # more rounds: the same episode is not announced again
        assert len(chat.texts) == 1 and "STALLED" in chat.texts[0]
    finally:
        stop.set()
        thread.join(5)


def test_process_announces_a_stall_it_finds_then_answers(db_path, store, openai_standin, twilio_standin, chat):
    add(store, A, "anyone there?", T0 - 900)
    env = {"SMSBATCH_ALERT_WEBHOOK_URL": hook_url(chat)}
    run = run_process(db_path, openai_standin, twilio_standin, T0, **env)
    assert run.returncode == 0 and "sent 1" in run.stdout, run.stderr
    assert [t.split(":")[0] for t in chat.texts] == ["smsbatch STALLED"]
    add(store, A, "thanks", T0 + 600)  # due at T0 + 610; the last run was at T0
    run = run_process(db_path, openai_standin, twilio_standin, T0 + 1000, **env)
    assert run.returncode == 0 and len(chat.texts) == 2 and "has run since " in chat.texts[1]  # a new episode
    add(store, A, "one more", T0 + 1001)
    run = run_process(db_path, openai_standin, twilio_standin, T0 + 1060, **env)
    assert run.returncode == 0 and "sent 1" in run.stdout and len(chat.texts) == 2  # cron runs again: no alert


def test_an_undelivered_reply_is_posted_once_without_the_number(db_path, store, openai_standin, twilio_standin,
                                                                chat):
    add(store, A, "hello", T0 - 20)
    env = {"SMSBATCH_ALERT_WEBHOOK_URL": hook_url(chat)}
    assert run_process(db_path, openai_standin, twilio_standin, T0, **env).returncode == 0
    row = store.conn.execute("SELECT sid, batch_id FROM outbound").fetchone()
    store.record_delivery(row["sid"], "undelivered", 30003, T0 + 5)
    for at in (T0 + 10, T0 + 20):
        run = run_process(db_path, openai_standin, twilio_standin, at, **env)
        assert run.returncode == 0, run.stderr
    [text] = chat.texts
    assert text.startswith("smsbatch UNDELIVERED:\nbatch " + row["batch_id"] + ": reply undelivered")
    assert "30003" in text and A not in text and A[2:] not in text


def test_the_alert_url_and_metrics_token_are_masked_in_check(db_path):
    env = {"SMSBATCH_DB": db_path, "SMSBATCH_AI": "offline", "SMSBATCH_SMS": "console",
           "SMSBATCH_ALERT_WEBHOOK_URL": f"https://hooks.slack.com/services/T000/{HOOK_SECRET}",
           "SMSBATCH_METRICS_TOKEN": "metrics-Zx9SecretToken4242"}
    for args in (["check"], ["check", "--json"]):
        result = invoke(args, env)
        assert "hooks.slack.com/***" in result.output, result.output
        assert HOOK_SECRET not in result.output and "/services/" not in result.output
        assert "metrics-Zx9SecretToken4242" not in result.output
    settings = Settings.from_env(env)
    assert HOOK_SECRET not in repr(settings)
    assert HOOK_SECRET not in Alerter.for_settings(settings).safe(f"POST {settings.alert_webhook_url} failed")


@pytest.mark.parametrize("url", ["ftp://hooks.example.com/x", "hooks.slack.com/services/T/B/SECRET", "https://"])
def test_a_bad_alert_url_is_refused_without_showing_it(url):
    result = invoke(["status"], {"SMSBATCH_ALERT_WEBHOOK_URL": url})
    assert result.exit_code == 1 and "SMSBATCH_ALERT_WEBHOOK_URL must be an http(s) URL" in result.output
    assert "SECRET" not in result.output
