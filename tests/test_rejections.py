"""Rejected webhooks are visible: logged (rate-limited), bad signatures counted in the
database for /health and status, the checked URL printed at start; a webhook URL with a
prefix or a trailing slash works. And the migration that adds the counts, from version 1."""

import json
import logging
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlencode

from twilio.request_validator import RequestValidator

from conftest import T0, invoke
from smsbatch.config import Settings
from smsbatch.db import SCHEMA_VERSION, Store
from smsbatch.web import make_app
from test_web import call, form

TOKEN = "rejections-test-token"
URL = "https://hooks.example.com/sms"


def signed(params, url=URL):
    return urlencode(params).encode(), {"HTTP_X_TWILIO_SIGNATURE": RequestValidator(TOKEN).compute_signature(url, params)}


def webhook(db_path, public_url=URL):
    return make_app(Settings(db_path=db_path, twilio_auth_token=TOKEN, public_url=public_url), clock=lambda: T0)


def test_a_bad_signature_is_logged_with_the_url_and_counted_for_status(db_path, caplog):
    app = webhook(db_path)
    body, headers = signed(form(), url="https://old-host.example.com/sms")  # Twilio has another URL
    with caplog.at_level(logging.WARNING, logger="smsbatch.web"):
        assert call(app, body=body, headers=headers)[0] == 403
    line = caplog.records[-1].getMessage()
    assert "403 /sms" in line and URL in line and "SMSBATCH_PUBLIC_URL" in line
    assert app.rejections.flush()
    store = Store(db_path)
    assert store.rejected_signatures(T0 + 60) == {"rejected_signatures": 1, "last_rejected_signature_at": T0,
                                                  "last_rejected_signature_url": URL}
    assert store.rejected_signatures(T0 + 3700)["rejected_signatures"] == 0  # only the last hour counts
    assert json.loads(call(app, method="GET", path="/health")[2])["ok"] is True


def test_other_rejections_are_logged_with_status_path_and_reason(db_path, caplog):
    app = webhook(db_path)
    with caplog.at_level(logging.WARNING, logger="smsbatch.web"):
        assert call(app, method="GET", path="/wp-login.php")[0] == 404
        assert call(app, body=b"{}", ctype="application/json")[0] == 415
    lines = [r.getMessage() for r in caplog.records]
    assert any("404 /wp-login.php: not found" in ln for ln in lines)
    assert any("415 /sms:" in ln and "form-urlencoded" in ln for ln in lines)
    app.rejections.flush()
    assert Store(db_path).rejected_signatures(T0)["rejected_signatures"] == 0


def test_a_flood_of_bad_requests_logs_a_bounded_number_of_lines(db_path, caplog):
    from smsbatch.rejections import LINES_PER_MINUTE

    app = webhook(db_path)
    with caplog.at_level(logging.WARNING, logger="smsbatch.web"):
        for _ in range(500):
            call(app, body=urlencode(form()).encode())
    assert len(caplog.records) == LINES_PER_MINUTE
    assert app.rejections.flush() and Store(db_path).rejected_signatures(T0)["rejected_signatures"] == 500


def test_credentials_in_the_public_url_never_reach_the_log_or_the_database(db_path, caplog):
    secret_url = "https://twilio:s3cret-pass@hooks.example.com/sms"
    app = webhook(db_path, secret_url)
    with caplog.at_level(logging.WARNING, logger="smsbatch.web"):
        call(app, body=urlencode(form()).encode(), headers={"HTTP_X_TWILIO_SIGNATURE": "bad"})
    app.rejections.flush()
    assert "s3cret-pass" not in caplog.text and "***@hooks.example.com" in caplog.text
    assert "s3cret-pass" not in json.dumps(Store(db_path).rejected_signatures(T0))
    assert "s3cret-pass" not in app.signature_note()


def test_a_webhook_url_with_a_prefix_and_a_trailing_slash_works(db_path):
    url = "https://shop.example.com/smsbatch/sms/"
    app = webhook(db_path, url)
    body, headers = signed(form(), url=url)
    assert call(app, path="/smsbatch/sms/", body=body, headers=headers)[0] == 200
    assert call(app, path="/sms", body=body, headers=headers)[0] == 200  # a proxy that strips the prefix
    assert call(app, method="GET", path="/smsbatch/health")[0] == 200
    assert sqlite3.connect(db_path).execute("SELECT count(*) FROM messages").fetchone()[0] == 1


def test_serve_prints_the_url_signatures_are_checked_against(db_path, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SMSBATCH_", "TWILIO_"))}
    env.update(SMSBATCH_DB=db_path, TWILIO_AUTH_TOKEN=TOKEN, SMSBATCH_PUBLIC_URL=URL)
    proc = subprocess.Popen([sys.executable, "-m", "smsbatch", "serve", "--port", "0"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stderr.readline()
    finally:
        proc.terminate()
        rest = proc.stderr.read()  # the same buffered file: readline() may hold the next line already
        proc.wait(timeout=10)
    assert "listening on" in first and f"signatures are checked against {URL}" in rest.splitlines()[0]


def test_a_version_1_database_is_upgraded_with_everything_intact(tmp_path):
    path = str(tmp_path / "v1.db")
    conn = sqlite3.connect(path)
    conn.executescript((Path(__file__).parent / "data" / "schema_v1.sql").read_text())
    conn.execute("PRAGMA user_version = 1")
    conn.execute("INSERT INTO batches (id, phone, our_number, state, message_count, first_at, last_at, created_at)"
                 " VALUES ('b1', '+15551110000', '+15550000000', 'sent', 1, ?, ?, ?)", (T0, T0, T0))
    conn.execute("INSERT INTO messages (sid, phone, our_number, body, kind, received_at, batch_id)"
                 " VALUES ('SM1', '+15551110000', '+15550000000', 'hello', 'text', ?, 'b1')", (T0,))
    conn.execute("INSERT INTO opt_outs (phone, since, keyword) VALUES ('+15552220000', ?, 'STOP')", (T0,))
    conn.commit()
    conn.close()
    store = Store(path)
    assert store.migrate() == (1, SCHEMA_VERSION)
    store.conn.row_factory = None
    assert store.conn.execute("SELECT id, state FROM batches").fetchall() == [("b1", "sent")]
    assert store.conn.execute("SELECT sid, body, batch_id FROM messages").fetchall() == [("SM1", "hello", "b1")]
    assert store.conn.execute("SELECT phone FROM opt_outs").fetchall() == [("+15552220000",)]
    store.record_rejections([(int(T0 // 60), 2, T0, URL)], T0)
    assert store.rejected_signatures(T0)["rejected_signatures"] == 2
    assert store.migrate() == (SCHEMA_VERSION, SCHEMA_VERSION)  # again: nothing to do


def test_a_path_cannot_forge_log_lines(db_path, caplog):
    app = webhook(db_path)
    with caplog.at_level(logging.WARNING, logger="smsbatch.web"):
        call(app, method="GET", path="/x\n2026-01-01 ERROR forged line")
    assert "\n" not in caplog.records[-1].getMessage() and "\\n2026" in caplog.records[-1].getMessage()


def test_status_json_counts_rejected_signatures(db_path):
    store = Store(db_path)
    store.record_rejections([(int(T0 // 60), 3, T0, URL)], T0)
    store.close()
    info = json.loads(invoke(["--db", db_path, "status", "--json", "--now", repr(T0 + 60)]).output)
    assert info["rejected_signatures"] == 3 and info["last_rejected_signature_at"] == T0
    later = json.loads(invoke(["--db", db_path, "status", "--json", "--now", repr(T0 + 7200)]).output)
    assert later["rejected_signatures"] == 0  # the last hour only
