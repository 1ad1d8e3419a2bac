"""Hostile input on the command line (issue 7): one line and a non-zero exit for what is bad,
the good kept, nothing half-written, private files, and stored text printed as written."""

import json
import os
import sqlite3
import stat

import pytest

from conftest import T0, add, invoke, offline_processor
from smsbatch import render
from smsbatch.batching import MAX_TEXT_BYTES
from smsbatch.db import Store
from smsbatch.errors import DeliveryError, InvalidInput
from smsbatch.simulate import parse_sweep

A, US = "+15556660001", "+15550000000"
PAST = 1_700_000_000.0  # 2023: behind any clock running these tests, so no --now is needed
NESTED = "[" * 100_000 + "]" * 100_000
HUGE_INT = '{"from": "%s", "to": "%s", "body": "x", "at": 1, "n": %s}' % (A, US, "9" * 5000)
HUGE_AT = '{"from": "%s", "to": "%s", "body": "x", "at": 1%s}' % (A, US, "0" * 400)  # too big for a float


def env_of(db_path, **extra):
    return {"SMSBATCH_DB": db_path, **{k: str(v) for k, v in extra.items()}}


def line(body, at=PAST, phone=A, **extra):
    return json.dumps({"from": phone, "to": US, "body": body, "at": at, **extra})


def bodies(db_path):
    return [r[0] for r in sqlite3.connect(db_path).execute("SELECT body FROM messages ORDER BY id")]


def no_traceback(result):
    return "Traceback" not in result.output and "Traceback" not in (result.stderr or "")


# -- ingest --jsonl: every line json.loads cannot take is a bad line --------------------------


def test_jsonl_lines_json_cannot_read_are_bad_lines_and_later_lines_are_kept(db_path):
    lines = [line("first"), NESTED, HUGE_INT, HUGE_AT, line("last", PAST + 1)]
    result = invoke(["ingest", "--jsonl", "-"], env_of(db_path), input="\n".join(lines) + "\n")
    assert result.exit_code == 1 and no_traceback(result)
    errors = result.stderr.splitlines()
    assert [e.split(":")[0] for e in errors] == ["line 2", "line 3", "line 4"]
    assert "nested too deeply" in errors[0] and "4300 digits" in errors[1] and "bad time" in errors[2]
    assert all(len(e) < 200 for e in errors)  # one short line each, not the line echoed back
    assert bodies(db_path) == ["first", "last"]


# -- simulate, process, export: one line, non-zero, no traceback -------------------------------


@pytest.mark.parametrize("content,reason", [(NESTED.encode(), "nested too deeply"),
                                            (HUGE_INT.encode(), "4300 digits"),
                                            (line("ok").encode() + b"\n" + b'{"body": "\xff"}', "line 2: not UTF-8")])
def test_simulate_names_an_unreadable_trace_line(tmp_path, content, reason):
    trace = tmp_path / "t.jsonl"
    trace.write_bytes(content + b"\n")
    result = invoke(["simulate", str(trace)])
    assert result.exit_code == 1 and reason in result.output and no_traceback(result)
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize("args", [
    ["simulate", "EMPTY", "--max-wait", "inf", "--quiet", "inf"],
    ["simulate", "EMPTY", "--quiet", "nan"],
    ["simulate", "EMPTY", "--sweep", "ai-latency=inf"],
    ["simulate", "EMPTY", "--sweep", "tick=inf"],
    ["simulate", "EMPTY", "--sweep", "quiet=4,nan"],
    ["simulate", "EMPTY", "--tick", "nan"],
    ["process", "--ai", "offline", "--sms", "console", "--for", "nan"],
    ["process", "--ai", "offline", "--sms", "console", "--for", "inf"],
])
def test_non_finite_numbers_are_refused_by_the_option(tmp_path, args):
    """An empty trace and an unmigrated database: without the check these stop later, elsewhere
    (before hanging, which is what nan and inf did with real input)."""
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    args = [str(empty) if a == "EMPTY" else a for a in args]
    result = invoke(["--db", str(tmp_path / "none.db")] + args)
    assert result.exit_code == 2 and "finite" in result.output and no_traceback(result)


def test_sweep_values_must_be_finite_and_in_the_options_range():
    for text in ("tick=inf", "tick=1e400", "ai-latency=nan", "tick=7200", "concurrency=1000"):
        with pytest.raises(InvalidInput):
            parse_sweep(text)
    assert parse_sweep("tick=1,60") == ("tick", [1.0, 60.0])


def test_a_binary_system_prompt_file_is_one_line(db_path, tmp_path):
    prompt = tmp_path / "prompt.bin"
    prompt.write_bytes(b"\x7fELF\x02\x01\x01\x00\xff\xfe\x00\x00")
    result = invoke(["process", "--ai", "offline", "--sms", "console", "--system-prompt-file", str(prompt)],
                    env_of(db_path))
    assert result.exit_code == 2 and "not a UTF-8 text file" in result.output and no_traceback(result)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_export_to_a_full_device_fails_in_one_line_without_claiming_success(db_path):
    """stdout on a full device (a real process: the shell's redirection); -o refuses devices."""
    import subprocess
    import sys

    add(Store(db_path), A, "hi", T0)
    with open("/dev/full", "wb") as full:
        done = subprocess.run([sys.executable, "-m", "smsbatch", "--db", db_path, "export"], stdout=full,
                              stderr=subprocess.PIPE, text=True, timeout=60, env=os.environ | {"SMSBATCH_DB": db_path})
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "cannot write stdout: No space left" in done.stderr and "exported 1" not in done.stderr
    result = invoke(["export", "-o", "/dev/full"], env_of(db_path))
    assert result.exit_code == 1 and "/dev/full exists and is not a regular file" in result.output


def test_export_replaces_a_file_whole_and_makes_it_private(db_path, tmp_path):
    for i in range(3):
        add(Store(db_path), A, f"text {i}", T0 + i)
    target = tmp_path / "trace.jsonl"
    target.write_text("old content\n")
    os.chmod(target, 0o644)
    old = os.umask(0)
    try:
        result = invoke(["export", "-o", str(target)], env_of(db_path))
        fresh = tmp_path / "fresh.jsonl"
        invoke(["export", "-o", str(fresh)], env_of(db_path))
    finally:
        os.umask(old)
    assert result.exit_code == 0 and "exported 3 texts" in result.stderr
    assert [json.loads(ln)["body"] for ln in target.read_text().splitlines()] == ["text 0", "text 1", "text 2"]
    for path in (target, fresh):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no temporary file left


# -- ingest: times, body sizes, phone numbers -------------------------------------------------


def test_ingest_refuses_a_time_in_the_future(db_path):
    far = invoke(["ingest", "--from", A, "--to", US, "--body", "hi", "--at", "9999-12-31T00:00:00Z"],
                 env_of(db_path))
    assert far.exit_code == 1 and "in the future" in far.output and no_traceback(far)
    assert len(far.output.strip().splitlines()) == 1
    soon = invoke(["ingest", "--from", A, "--to", US, "--body", "hi", "--at", str(T0 + 60), "--now", str(T0)],
                  env_of(db_path))
    assert soon.exit_code == 0  # clocks differ by a minute: fine
    late = invoke(["ingest", "--from", A, "--to", US, "--body", "x", "--at", str(T0 + 301), "--now", str(T0)],
                  env_of(db_path))
    assert late.exit_code == 1 and "in the future" in late.output
    lines = [line("future", T0 + 3600), line("kept", T0)]
    result = invoke(["ingest", "--jsonl", "-", "--now", str(T0)], env_of(db_path), input="\n".join(lines))
    assert result.exit_code == 1 and "line 1: time" in result.stderr and "in the future" in result.stderr
    assert bodies(db_path) == ["hi", "kept"]


def test_ingest_takes_the_webhooks_body_limit(db_path):
    at = ["--at", str(PAST)]
    top = invoke(["ingest", "--from", A, "--to", US, "--body", "é" * (MAX_TEXT_BYTES // 2)] + at, env_of(db_path))
    assert top.exit_code == 0
    over = invoke(["ingest", "--from", A, "--to", US, "--body", "x" * (MAX_TEXT_BYTES + 1)] + at, env_of(db_path))
    assert over.exit_code == 1 and f"the most a text may hold is {MAX_TEXT_BYTES}" in over.output
    lines = [line("y" * (MAX_TEXT_BYTES + 1)), line("small")]
    result = invoke(["ingest", "--jsonl", "-"], env_of(db_path), input="\n".join(lines))
    assert result.exit_code == 1 and "line 1: body is" in result.stderr
    assert [len(b) for b in bodies(db_path)] == [MAX_TEXT_BYTES // 2, 5]


def test_numbers_are_normalised_so_an_opt_out_carries_over(db_path):
    env = env_of(db_path)
    assert invoke(["ingest", "--from", "5551234567", "--to", "(555) 000-0000", "--body", "STOP",
                   "--at", str(PAST)], env).exit_code == 0
    assert invoke(["ingest", "--from", "+1 555 123 4567", "--to", US, "--body", "hi",
                   "--at", str(PAST + 1)], env).exit_code == 0
    jsonl = line("again", PAST + 2, phone="15551234567")
    assert invoke(["ingest", "--jsonl", "-"], env, input=jsonl).exit_code == 0
    conn = sqlite3.connect(db_path)
    assert set(conn.execute("SELECT phone, our_number FROM messages")) == {("+15551234567", US)}
    report = invoke(["process", "--ai", "offline", "--sms", "console", "--now", str(PAST + 60), "--json"], env)
    assert json.loads(report.stdout)["sent"] == 0
    assert {r[0] for r in conn.execute("SELECT state FROM batches")} == {"skipped"}


@pytest.mark.parametrize("number", ["5551234", "07700900123", "447700900123", "+0123456789", "1555123456",
                                    "+1555abc4567", "whatsapp:"])
def test_ambiguous_numbers_are_refused_with_a_hint(db_path, number):
    result = invoke(["ingest", "--from", number, "--to", US, "--body", "hi"], env_of(db_path))
    assert result.exit_code == 2 and "country code, like +" in result.output and no_traceback(result)
    result = invoke(["ingest", "--jsonl", "-"], env_of(db_path), input=line("hi", 1, phone=number))
    assert result.exit_code == 1 and "line 1: bad 'from'" in result.stderr


@pytest.mark.parametrize("given,stored", [("whatsapp:+447700900123", "whatsapp:+447700900123"),
                                          ("+44 7700 900123", "+447700900123"), ("12345", "12345")])
def test_numbers_with_their_country_code_and_short_codes_are_kept(db_path, given, stored):
    result = invoke(["ingest", "--from", given, "--to", US, "--body", "hi"], env_of(db_path))
    assert result.exit_code == 0
    assert sqlite3.connect(db_path).execute("SELECT phone FROM messages").fetchone()[0] == stored


# -- the terminal: stored text is printed as written ------------------------------------------

HOSTILE = "[/bold] [/] [link=https://evil.example]click[/link] :smile: [red]x"


class Refuses:
    """A responder whose provider error says something rich would read as markup."""

    calls = 0

    def answer(self, messages):
        raise DeliveryError(f"AI returned HTTP 400: {HOSTILE} \x1b[2J", transient=False)


def test_status_prints_errors_as_plain_text(db_path, settings, clock):
    store = Store(db_path)
    add(store, A, HOSTILE, T0)
    clock.now = T0 + 20
    assert offline_processor(settings, clock, responder=Refuses()).run().counts["failed"] == 1
    result = invoke(["status", "--now", str(T0 + 30)], env_of(db_path, COLUMNS=400))
    assert result.exit_code == 0 and no_traceback(result)
    assert HOSTILE in result.output and "\x1b" not in result.output and "\\x1b[2J" in result.output


def test_demo_and_simulation_tables_print_bodies_and_replies_as_plain_text(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")
    row = {"id": "b[/]x", "phone": "+1[/bold]", "texts": [HOSTILE, "[/]"], "state": "sent",
           "reply": "reply " + HOSTILE, "note": None}
    render.demo({"batches": [row], "totals": {"texts": 2, "batches": 1, "ai_calls": 1, "replies": 1},
                 "db_path": "/tmp/[/]db"})
    out = capsys.readouterr().out
    assert HOSTILE in out and "reply " + HOSTILE in out and "/tmp/[/]db" in out and "b[/]x" in out



@pytest.mark.parametrize("args", [
    ["ingest", "--from", A, "--to", US, "--body", "hi", "--sid", "\udcff"],
    ["ingest", "--from", A, "--to", US, "--body", "hi", "--sid", "S" * 65],
    ["export", "--anonymize", "--key", "\udcff"],
    ["retry", "b\udcff"],
])
def test_arguments_that_cannot_be_stored_are_one_line(db_path, args):
    """Bytes that are not UTF-8 on the command line arrive as lone surrogates."""
    add(Store(db_path), A, "hi", PAST)
    result = invoke(args, env_of(db_path))
    assert result.exit_code == 2 and no_traceback(result)
    assert result.output.strip().splitlines()[-1].startswith("Error: Invalid value")


def test_an_empty_anonymizing_key_and_a_used_demo_folder_are_refused(tmp_path, db_path):
    result = invoke(["--db", db_path, "export", "--jsonl", "--anonymize", "--key", ""])
    assert result.exit_code == 2 and "is empty" in result.output
    assert invoke(["demo", "--keep", str(tmp_path / "d")]).exit_code == 0
    again = invoke(["demo", "--keep", str(tmp_path / "d")])
    assert again.exit_code == 2 and "already holds a demo database" in again.output
