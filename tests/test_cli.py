"""The command line, through click's CliRunner, asserting on exit codes, JSON and the database."""

import json
import os
import sqlite3
import subprocess
import sys

import pytest

from conftest import T0, add, invoke
from fakes import provider_env
from smsbatch.cli import cli
from smsbatch.db import SCHEMA_VERSION, Store

A = "+15554440001"


def db_env(db_path, **extra):
    return {"SMSBATCH_DB": db_path, **{k: str(v) for k, v in extra.items()}}


@pytest.mark.parametrize("command", sorted(cli.commands))
def test_every_command_has_help(command):
    result = invoke([command, "--help"])
    assert result.exit_code == 0 and "Usage:" in result.output
    assert cli.commands[command].help and len(cli.commands[command].help) > 10


def test_migrate_is_safe_to_run_again(tmp_path):
    from smsbatch.db import SCHEMA_VERSION

    path = str(tmp_path / "x.db")
    for said in ("created at schema version", "already at schema version"):
        result = invoke(["--db", path, "migrate"])
        assert result.exit_code == 0 and said in result.output
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_migrate_works_from_another_directory_after_a_real_install(tmp_path):
    """The schema ships inside the package: run from a folder with no schema.sql."""
    result = subprocess.run([sys.executable, "-m", "smsbatch", "--db", str(tmp_path / "y.db"), "migrate"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_commands_refuse_an_unmigrated_database(tmp_path):
    result = invoke(["--db", str(tmp_path / "new.db"), "status"])
    assert result.exit_code == 1 and "smsbatch migrate" in result.output and "Traceback" not in result.output


def test_ingest_one_then_status_json(db_path):
    result = invoke(["ingest", "--from", "+1 555 444 0001", "--to", "+15550000000", "--body", "hi",
                     "--at", "2027-01-15T08:00:00Z", "--now", str(T0)], db_env(db_path))
    assert result.exit_code == 0 and "stored 1" in result.output
    info = json.loads(invoke(["status", "--json", "--now", "2027-01-15T08:00:05Z"], db_env(db_path)).output)
    assert info["counts"]["open"] == 1 and info["oldest_pending_age_seconds"] == 5.0
    assert info["latest"][0]["phone"] == A and info["latest"][0]["message_count"] == 1


def test_ingest_same_sid_twice_is_stored_once(db_path):
    args = ["ingest", "--from", A, "--to", "+15550000000", "--body", "hi", "--sid", "SM1", "--at", str(T0), "--now", str(T0)]
    invoke(args, db_env(db_path))
    result = invoke(args + ["--json"], db_env(db_path))
    assert json.loads(result.output)["duplicates"] == 1


def test_ingest_jsonl_keeps_good_lines_and_reports_bad_ones(db_path, tmp_path):
    lines = [
        json.dumps({"from": A, "to": "+15550000000", "body": "one", "at": T0}),
        "{not json",
        json.dumps({"from": "call me", "to": "+15550000000", "body": "x", "at": T0}),
        json.dumps({"from": A, "to": "+15550000000", "body": "two", "at": "yesterday"}),
        json.dumps({"from": A, "to": "+15550000000", "body": "three", "sid": "SMx", "at": T0 + 2}),
    ]
    result = invoke(["ingest", "--jsonl", "-", "--now", str(T0)], db_env(db_path), input="\n".join(lines) + "\n")
    assert result.exit_code == 1
    assert "line 2: not JSON" in result.output and "line 3: bad 'from'" in result.output
    assert "line 4: bad time" in result.output and "Traceback" not in result.output
    bodies = [r[0] for r in sqlite3.connect(db_path).execute("SELECT body FROM messages ORDER BY id")]
    assert bodies == ["one", "three"]
    again = invoke(["ingest", "--jsonl", "-", "--json", "--now", str(T0)], db_env(db_path), input=lines[0] + "\n" + lines[4] + "\n")
    assert json.loads(again.stdout)["duplicates"] == 2


@pytest.mark.parametrize("args,message", [
    (["--from", "abc", "--to", "+15550000000", "--body", "x"], "bad phone number"),
    (["--from", A, "--to", "+15550000000", "--body", "x", "--at", "noon"], "bad time"),
    (["--from", A], "give --from, --to and --body"),
])
def test_ingest_bad_input_is_one_clear_line(db_path, args, message):
    result = invoke(["ingest"] + args, db_env(db_path))
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_process_without_credentials_names_what_is_missing(db_path):
    result = invoke(["process"], db_env(db_path))
    assert result.exit_code == 1
    assert "OPENAI_API_KEY" in result.output and "TWILIO_ACCOUNT_SID" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_process_with_stand_ins_and_now(db_path):
    store = Store(db_path)
    add(store, A, "hi", T0)
    add(store, A, "there", T0 + 1)
    env = db_env(db_path, SMSBATCH_AI="offline", SMSBATCH_SMS="console")
    early = invoke(["process", "--now", str(T0 + 5), "--json"], env)
    assert json.loads(early.stdout)["claimed"] == 0
    result = invoke(["process", "--now", str(T0 + 11)], env)
    assert result.exit_code == 0 and "claimed 1, sent 1" in result.stdout
    assert "[console sms from +15550000000 to +15554440001] Thanks for your messages" in result.stderr


def test_process_exits_3_when_a_batch_failed(db_path, openai_standin, twilio_standin):
    openai_standin.script = [400]
    add(Store(db_path), A, "hi", T0)
    env = provider_env(openai_standin, twilio_standin, SMSBATCH_DB=db_path, SMSBATCH_AI_CLIENT_RETRIES=0)
    result = invoke(["process", "--now", str(T0 + 20)], env)
    assert result.exit_code == 3 and "failed 1" in result.output


def test_process_limit(db_path):
    store = Store(db_path)
    for i in range(5):
        add(store, f"+1555444100{i}", "hi", T0)
    env = db_env(db_path, SMSBATCH_AI="offline", SMSBATCH_SMS="console")
    result = invoke(["process", "--now", str(T0 + 60), "--limit", "2", "--json"], env)
    assert json.loads(result.stdout)["claimed"] == 2


def test_system_prompt_file(db_path, tmp_path, openai_standin, twilio_standin):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("You are Claims Bot.\n")
    add(Store(db_path), A, "hi", T0)
    env = provider_env(openai_standin, twilio_standin, SMSBATCH_DB=db_path)
    invoke(["process", "--now", str(T0 + 20), "--system-prompt-file", str(prompt)], env)
    assert openai_standin.calls[0][0] == {"role": "system", "content": "You are Claims Bot."}


def test_retry_failed_batch_and_refusals(db_path):
    store = Store(db_path)
    batch = add(store, A, "hi", T0).batch_id
    rows, _ = store.claim_due(T0 + 10, 1, 300, 3600)
    store.finish(rows[0], "failed", T0 + 11, "AI returned HTTP 400")
    env = db_env(db_path)
    assert invoke(["retry", "nope"], env).output.strip() == "Error: no batch with id 'nope'"
    result = invoke(["retry", batch], env)
    assert result.exit_code == 0 and store.get_batch(batch)["state"] == "queued"
    again = invoke(["retry", batch], env)
    assert again.exit_code == 1 and "already waiting" in again.output
    rows, _ = store.claim_due(T0 + 3600 * 2, 1, 300, 3600 * 10)
    store.begin_send(rows[0], "r", T0 + 1, __import__("smsbatch.config").config.Settings())
    store.mark_sent(rows[0], "SMdone", T0 + 2)
    sent = invoke(["retry", batch], env)
    assert sent.exit_code == 1 and "already sent" in sent.output


def test_status_human_output(db_path):
    add(Store(db_path), A, "hi", T0)
    result = invoke(["status", "--now", str(T0 + 30)], db_env(db_path))
    assert result.exit_code == 0 and "pending 1: open 1" in result.output and A in result.output


def test_bad_setting_is_one_line(db_path):
    result = invoke(["status"], db_env(db_path, SMSBATCH_QUIET_SECONDS="soon"))
    assert result.exit_code == 1 and "SMSBATCH_QUIET_SECONDS must be a number" in result.output


def test_demo_runs_offline_and_answers_each_burst_once():
    result = invoke(["demo", "--json"])
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    totals = data["totals"]
    assert totals["texts"] == 8 and totals["ai_calls"] == totals["replies"] == 3
    burst = next(b for b in data["batches"] if b["phone"] == "+15550101001")
    assert burst["state"] == "sent" and len(burst["texts"]) == 3
    assert all(t in burst["reply"] for t in burst["texts"])
    assert {b["state"] for b in data["batches"] if b["phone"] == "+15550101004"} == {"skipped"}


def test_database_file_is_private(tmp_path):
    path = tmp_path / "p.db"
    invoke(["--db", str(path), "migrate"])
    assert os.stat(path).st_mode & 0o777 == 0o600


def test_serve_refuses_to_start_without_a_token(db_path):
    result = invoke(["serve", "--port", "0"], db_env(db_path))
    assert result.exit_code == 1 and "TWILIO_AUTH_TOKEN" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_serve_answers_health_as_a_real_process(db_path):
    env = {**os.environ, "SMSBATCH_DB": db_path}
    server = subprocess.Popen([sys.executable, "-m", "smsbatch", "serve", "--port", "0", "--insecure-no-signature"],
                              env=env, stderr=subprocess.PIPE, text=True)
    try:
        warning = server.stderr.readline()
        listening = server.stderr.readline()
        assert "WARNING" in warning and "listening on http://127.0.0.1:" in listening
        url = listening.split()[-1].replace("/sms", "/health")
        import urllib.request

        with urllib.request.urlopen(url, timeout=5) as response:
            assert json.loads(response.read())["can_store"] is True
    finally:
        server.terminate()
        assert server.wait(timeout=10) == 0


def test_retry_answers_an_expired_batch_however_old(db_path):
    store = Store(db_path)
    batch = add(store, A, "hi", T0).batch_id
    env = db_env(db_path, SMSBATCH_AI="offline", SMSBATCH_SMS="console")
    late = str(T0 + 7200)
    assert "expired 1" in invoke(["process", "--now", late], env).stdout
    assert invoke(["retry", batch, "--now", late], env).exit_code == 0
    assert "sent 1" in invoke(["process", "--now", late], env).stdout
    row = store.get_batch(batch)
    assert row["state"] == "sent" and row["last_at"] == T0  # the text's own time is kept


def test_jsonl_line_that_is_not_utf8_is_reported(db_path, tmp_path):
    trace = tmp_path / "t.jsonl"
    good = json.dumps({"from": A, "to": "+15550000000", "body": "ok", "at": T0}).encode()
    trace.write_bytes(good + b"\n" + b'{"body": "\xff\xfe"}\n')
    result = invoke(["ingest", "--jsonl", str(trace), "--now", str(T0)], db_env(db_path))
    assert result.exit_code == 1 and "line 2: not UTF-8" in result.output and "Traceback" not in result.output
    assert sqlite3.connect(db_path).execute("SELECT count(*) FROM messages").fetchone()[0] == 1


@pytest.mark.parametrize("content,message", [(None, "does not exist"), (b"not a database" * 300, "not an SQLite")])
def test_missing_or_broken_database_is_one_line(tmp_path, content, message):
    path = tmp_path / "x.db"
    if content:
        path.write_bytes(content)
    result = invoke(["--db", str(path), "status"])
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output
    assert path.exists() == bool(content)


@pytest.mark.parametrize("at", ["NaN", "1e400", "-5", "inf"])
def test_jsonl_times_out_of_range_are_bad_lines_and_later_lines_are_kept(db_path, at):
    lines = [json.dumps({"from": A, "to": "+15550000000", "body": "x", "at": at}),
             '{"from": "%s", "to": "+15550000000", "body": "\\udcff", "at": 1}' % A,
             json.dumps({"from": A, "to": "+15550000000", "body": "kept", "at": T0})]
    result = invoke(["ingest", "--jsonl", "-", "--now", str(T0)], db_env(db_path), input="\n".join(lines) + "\n")
    assert result.exit_code == 1 and "line 1: bad time" in result.output and "line 2: body is not valid" in result.output
    assert [r[0] for r in sqlite3.connect(db_path).execute("SELECT body FROM messages")] == ["kept"]


def test_non_finite_setting_is_refused(db_path):
    result = invoke(["status"], db_env(db_path, SMSBATCH_QUIET_SECONDS="nan"))
    assert result.exit_code == 1 and "finite" in result.output


def test_serve_on_a_port_in_use_is_one_line(db_path):
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        port = taken.getsockname()[1]
        result = invoke(["serve", "--port", str(port)], db_env(db_path, TWILIO_AUTH_TOKEN="t",
                                                                  SMSBATCH_PUBLIC_URL="https://h.example/sms"))
    finally:
        taken.close()
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1 and f"cannot listen on 127.0.0.1:{port}" in result.output
