"""Third hostile run (issue 15, after every row was fixed; issue 16's promises too): each test
is an attack that still works, written against the real CLI, real sockets and processes, and
the stand-ins in tests/fakes.py. Each fails on main as merged (20d97b7)."""

import json
import os
import sqlite3
import subprocess
import sys
from datetime import datetime, timezone
from urllib.parse import urlencode

import pytest
from click.testing import CliRunner
from twilio.request_validator import RequestValidator

from conftest import T0, add, invoke
from fakes import provider_env
from smsbatch import delivery
from smsbatch.cli import cli
from test_hostile_backfill import OTHER, PERSON, US, checked_until, env, process, run_process  # noqa: F401
from test_hostile_web import TOKEN, URL, exchange, form, server, signed_request, stored  # noqa: F401
from test_webhook_attacks import raw_post


# -- M4: a re-split that carries a new MessageSid and From ---------------------------------


def test_a_re_split_through_a_crafted_body_forges_a_new_text_from_any_number(server, db_path):
    """A person texts our number a body that spells out fields. Twilio signs the real request;
    whoever captures it re-splits the signed string (sorted names and values, no separator) so
    that the body ends early and its tail becomes From, MessageSid and To, and every real field
    after it becomes the value of one made-up field `Z`. Every identifier is well formed and no
    field is given twice: the forgery is stored as a new text from a number of the attacker's
    choice (and answered: an SMS to anyone, on our account)."""
    victim, new_sid = "+15557770000", "SM" + "e" * 32
    captured = form(1, Body="hi" + "From" + victim + "MessageSid" + new_sid + "To+15550000000Z")
    signature = RequestValidator(TOKEN).compute_signature(URL, captured)
    signed = "".join(k + captured[k] for k in sorted(captured))
    start = signed.index("BodyhiFrom") + len("Bodyhi")
    tail = signed[signed.index("Z", start) + 1:]
    forged = {"AccountSid": captured["AccountSid"], "Body": "hi", "From": victim, "MessageSid": new_sid,
              "To": "+15550000000", "Z": tail}
    assert "".join(k + forged[k] for k in sorted(forged)) == signed
    assert RequestValidator(TOKEN).validate(URL, forged, signature)  # the forgery is validly signed
    status, _, _ = exchange(server.server_port, [raw_post(urlencode(forged).encode(), signature)])
    phones = {row[0] for row in sqlite3.connect(db_path).execute("SELECT phone FROM messages")}
    assert status >= 400 and new_sid not in stored(db_path) and victim not in phones, (status, phones)


# -- H1: one text whose picture listing is odd stops the backfill for good ---------------------


def test_one_text_whose_media_listing_loops_does_not_stop_the_backfill_for_good(env, db_path, store, twilio_standin):
    """Twilio lists a picture message whose Media listing links back to itself. The backfill
    stops that listing (M1), but the PagingStopped escapes the loop storing the found texts:
    every text after it is never stored, the window never advances, and every run does the
    same, so the person who texted before it is never answered (H1: a record the backfill
    cannot read is skipped and processing goes on; the window still advances)."""
    standin = twilio_standin
    served = standin.media_list

    def looping_media(handler, sid):  # the same page, linking to itself
        if sid != odd:
            return served(handler, sid)
        base = f"/2010-04-01/Accounts/{standin.ACCOUNT}/Messages/{sid}/Media.json"
        standin.reply(handler, 200, {"media_list": [{"sid": "ME" + "1" * 32}], "next_page_uri": base + "?PageSize=10",
                                     "page": 0, "page_size": 10, "uri": base})

    standin.media_list = looping_media
    good = standin.deliver_inbound(PERSON, US, "is my order ready?", T0 - 60)
    odd = standin.deliver_inbound(OTHER, US, "a picture", T0 - 30, media=("image/jpeg",))
    for run in range(2):
        process(env, T0 + 60 * run)
    assert store.has_message(good), "the text before the odd one was never stored"
    assert checked_until(db_path) is not None, "the backfill's window never advanced"


# -- M9/L3: a link planted in a shared folder, one level up ------------------------------------


@pytest.mark.parametrize("command", [["export", "-o"], ["backup", "--force"]])
def test_a_linked_folder_planted_in_a_shared_folder_does_not_redirect_the_write(db_path, store, tmp_path, command):
    """M9's attack with the link one level up: someone who can write the shared folder plants
    `exports` as a link to the operator's private folder. `export -o shared/exports/notes.txt`
    (or `backup`) then replaces private/notes.txt: the refusal of symbolic links looks only at
    the last name of the path."""
    add(store, "+15557770001", "a private text", T0)
    shared, private = tmp_path / "shared", tmp_path / "private"
    shared.mkdir()
    private.mkdir()
    (private / "notes.txt").write_text("precious\n")
    (shared / "exports").symlink_to(private)
    result = invoke(command + [str(shared / "exports" / "notes.txt")], env={"SMSBATCH_DB": db_path})
    assert (private / "notes.txt").read_bytes() == b"precious\n", result.output
    assert result.exit_code == 1 and "symbolic link" in result.output


# -- H1: one record whose JSON Python will not decode ------------------------------------------


@pytest.mark.parametrize("odd", ["1" + "0" * 5000,  # an integer of 5,001 digits: ValueError, not JSONDecodeError
                                 "[" * 100000 + "]" * 100000])  # nested deeper than Python recurses
def test_one_record_whose_json_python_cannot_decode_does_not_crash_process(env, store, twilio_standin, odd):
    """One record of Twilio's log carries a field json.loads refuses with ValueError (int
    digits limit) or RecursionError, neither of them a JSONDecodeError: the error escapes the
    backfill and `process` dies with a traceback before it claims any batch, every run (H1)."""
    standin = twilio_standin
    plain_reply = standin.reply

    def reply(handler, status, payload):
        if isinstance(payload, dict) and "messages" in payload:
            body = json.dumps(payload).replace('"__ODD__"', odd).encode()
            return standin.raw(handler, status, body)
        return plain_reply(handler, status, payload)

    standin.reply = reply
    standin.deliver_inbound(OTHER, US, "odd", T0 - 40, raw={"num_segments": "__ODD__"})
    add(store, PERSON, "hello? (via the webhook)", T0 - 60)
    done = run_process(env, T0)
    assert "Traceback" not in done.stderr, done.stderr[-600:]
    assert done.returncode == 0 and json.loads(done.stdout)["sent"] == 1, (done.returncode, done.stdout)


# -- M3: a delivery fetch whose JSON Python will not decode -------------------------------------


def test_a_delivery_fetch_with_a_5001_digit_number_is_no_traceback(env, store, twilio_standin):
    """Twilio's fetch of one of our replies answers a field as an integer of 5,001 digits:
    the twilio package's json.loads raises ValueError, which is not among the provider errors,
    so `process` prints a traceback and exits 3 (M3: a bad field is recorded as unknown, never
    a traceback in `process`)."""
    add(store, PERSON, "hi", T0 - 30)
    assert run_process(env, T0).returncode == 0
    standin = twilio_standin
    plain_reply = standin.reply

    def reply(handler, status, payload):
        if isinstance(payload, dict) and payload.get("sid") == message["sid"]:
            return standin.raw(handler, status, json.dumps(payload).replace('"__ODD__"', "9" * 5001).encode())
        return plain_reply(handler, status, payload)

    [message] = standin.sent
    message["status"], message["raw"] = "delivered", {"num_segments": "__ODD__"}
    standin.reply = reply
    done = run_process(env, T0 + delivery.CHECK_AFTER_SECONDS + 10)
    assert standin.fetched == [message["sid"]]
    assert "Traceback" not in done.stderr and done.returncode == 0, (done.returncode, done.stderr[-2500:])


# -- M8/L1/L8: `export` prints texts to the terminal with their bidi and C1 controls -----------


def test_export_to_the_terminal_shows_bidi_and_c1_controls_escaped(db_path, store):
    """`smsbatch export` writes to stdout by default, i.e. the operator's terminal. The JSON is
    dumped with ensure_ascii=False: C0 controls are escaped by JSON itself, but a text's bidi
    override (U+202E) and C1 controls (U+009B, the one-byte CSI) come out raw, reordering or
    steering what the operator reads (L8). Escaped, the trace would read back the same."""
    add(store, "+15557770001", "refund \u202e0001$ \u2066ok\u2069 \x9b2J", T0)
    result = invoke(["export"], env={"SMSBATCH_DB": db_path})
    assert result.exit_code == 0
    assert json.loads(result.stdout.splitlines()[0])["body"].startswith("refund \u202e")  # the trace is right
    raw = [ch for ch in result.stdout if ch in "\u202e\u2066\u2069\x9b"]
    assert raw == [], f"raw control characters on the terminal: {raw!r}"


# -- L5/L6: a SMSBATCH_PUBLIC_URL that urlsplit cannot parse --------------------------------------


def test_a_public_url_that_does_not_parse_is_one_error_line_not_a_traceback(env, store):
    """A typo in SMSBATCH_PUBLIC_URL (an unclosed IPv6 bracket) is not checked when settings are
    read: `serve` and `send` die with urlsplit's ValueError traceback, and `process` cannot
    build any reply's StatusCallback. Bad settings must be one `Error: ...` line, exit 1."""
    add(store, PERSON, "hi", T0 - 30)
    bad = dict(env, SMSBATCH_PUBLIC_URL="https://[::1/sms")
    for args in (["serve", "--port", "0"], ["send", PERSON, "hello"], ["process", "--now", repr(T0)]):
        done = subprocess.run([sys.executable, "-m", "smsbatch", *args], env={**os.environ, **bad},
                              capture_output=True, text=True, timeout=20)
        assert "Traceback" not in done.stderr, (args, done.stderr[-300:])
        assert done.returncode == 1 and "SMSBATCH_PUBLIC_URL" in done.stderr, (args, done.returncode, done.stderr)


# -- L5: the StatusCallback's secret echoed back in Twilio's error --------------------------------

KEY = "k3y-0f-the-webhook-9f8e7d"


def test_a_public_url_secret_echoed_in_twilios_error_is_neither_stored_nor_shown(env, db_path, store, twilio_standin):
    """Twilio quotes the StatusCallback it was given when it refuses it (21609). The query string
    of SMSBATCH_PUBLIC_URL is not among Settings.secrets(), so `redact` leaves it: the key
    is stored with the batch's error, printed by `status` and logged by `process` (L5: masked
    wherever a URL is shown or stored)."""
    public = f"https://hooks.example.com/sms?key={KEY}"
    twilio_standin.script = [("error", 400, 21609, f"The StatusCallback URL https://hooks.example.com/sms/status?"
                                                   f"key={KEY} is not a valid URL.")]
    add(store, PERSON, "hi", T0 - 30)
    keyed = dict(env, SMSBATCH_PUBLIC_URL=public)
    done = run_process(keyed, T0)
    status = invoke(["--db", db_path, "status", "--now", repr(T0 + 5)], env=keyed)
    with open(db_path, "rb") as db, open(db_path + "-wal", "rb") as wal:
        stored_bytes = db.read() + wal.read()
    assert "21609" in done.stderr + done.stdout + status.output  # Twilio's refusal is reported...
    leaks = [where for where, text in (("logged by process", done.stderr + done.stdout),
                                       ("shown by status", status.output),
                                       ("stored in the database", stored_bytes.decode("latin-1"))) if KEY in text]
    assert leaks == []  # ...without the key


# -- issue 16: no second reply after a restore, unless our number also sent a scheduled message ----


@pytest.mark.parametrize("scheduled", [False, True])
def test_a_restored_database_does_not_answer_again_after_a_scheduled_message(env, store, twilio_standin, scheduled):
    """A text was answered from a database since lost (a backup restored): Twilio's log has the
    text and our reply after it, and the backfill must store it as answered. The replies are
    read newest first and the reading stops at the first one created before the look-back. Our
    number also sent a message scheduled a week ago (Twilio's Message Scheduling: created when
    scheduled, sent at the time set): it is listed first, by its date sent, and its date created
    stops the reading before our reply is seen, so the person is answered a second time."""
    standin = twilio_standin
    standin.deliver_inbound(PERSON, US, "is my order ready?", T0 - 120)
    standin.record({"To": PERSON, "From": US, "Body": "Yes, it ships today."}, at=T0 - 100)["status"] = "delivered"
    if scheduled:
        reminder = standin.record({"To": OTHER, "From": US, "Body": "Reminder: your appointment"}, at=T0 - 7 * 86400)
        reminder["date_sent"], reminder["status"] = datetime.fromtimestamp(T0 - 10, timezone.utc), "delivered"
    report = process(env, T0)
    assert report["backfilled"] == 1
    assert standin.bodies_to(PERSON) == ["Yes, it ships today."], "answered a second time"


# -- M1: the paging `check` still leaves to the twilio package -------------------------------------


def test_check_stops_at_a_numbers_page_that_links_to_itself(db_path, openai_standin, twilio_standin):
    """`check` lists the account's numbers with the twilio package's stream(), which follows
    next_page_uri with no repeat, page or time limit: a page linking to itself keeps `check`
    asking for ever (M1: paging stops at a repeated link and at a page and time cap)."""
    standin = twilio_standin
    standin.add_number(US, "https://sms.example.com/sms")
    listed = standin.list_numbers

    def looping(handler, base, query):
        plain_reply = standin.reply
        standin.reply = lambda h, status, payload: plain_reply(h, status, payload | {"next_page_uri": h.path})
        try:
            listed(handler, base, query)
        finally:
            standin.reply = plain_reply

    standin.list_numbers = looping
    env = provider_env(openai_standin, standin, SMSBATCH_DB=db_path, SMSBATCH_PUBLIC_URL="https://sms.example.com/sms")
    proc = subprocess.Popen([sys.executable, "-m", "smsbatch", "check"], env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=4)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pages = sum(1 for _, path in standin.account_requests if "IncomingPhoneNumbers.json" in path)
        pytest.fail(f"`check` still paging after 4 s: {pages} requests for the same page")
    assert "Traceback" not in err and "numbers" in out


# -- issue 16 / L7: the backfill answers for a number that only an imported trace named ------------

OTHER_APP = "+15558880000"


def test_the_backfill_does_not_answer_texts_to_a_number_only_an_imported_trace_named(env, db_path, store,
                                                                                     twilio_standin, tmp_path):
    """SMSBATCH_NUMBERS lists the numbers smsbatch answers for. An operator imports a trace
    (`ingest --jsonl`) that holds a text to another app's number on the same account. The
    backfill reads the log of "every number people wrote to", so it finds that app's
    customers' texts in Twilio's log, stores them, and `process` answers them with AI replies
    from the other app's number."""
    trace = tmp_path / "trace.jsonl"
    trace.write_text(json.dumps({"from": "+15557770003", "to": OTHER_APP, "body": "old", "at": T0 - 86400}) + "\n")
    listed = dict(env, SMSBATCH_NUMBERS=US)
    assert invoke(["ingest", "--jsonl", str(trace), "--now", repr(T0 - 3600)], env=listed).exit_code == 0
    twilio_standin.deliver_inbound(PERSON, OTHER_APP, "where is my pizza?", T0 - 30)  # the other app's customer
    process(listed, T0)
    assert twilio_standin.bodies_to(PERSON) == [], "answered from another app's number"


# -- never a traceback: the last day `--now` accepts ------------------------------------------------


def test_stats_on_the_last_day_now_accepts_is_no_traceback(db_path, store):
    """TIME accepts moments up to the end of year 9999; `stats` then steps one day past it
    (report.utc_days) and dies with OverflowError's traceback."""
    result = CliRunner().invoke(cli, ["--db", db_path, "stats", "--now", "9999-12-31T23:59:59Z"])
    assert not isinstance(result.exception, OverflowError), "traceback: OverflowError"
    assert result.exit_code in (0, 1, 2) and "Traceback" not in result.output


# -- M3: a field of the AI provider's answer that SQLite cannot hold -------------------------------


def test_ai_usage_too_large_for_sqlite_is_not_a_traceback_and_the_text_is_answered(env, store, openai_standin,
                                                                                    twilio_standin):
    """An OpenAI-compatible server answers a good reply with usage.prompt_tokens = 10**30:
    usage_of() takes any non-negative int, record_usage() hands it to SQLite, and OverflowError
    ends the batch's handling with a traceback before the reply is sent; every retry asks the
    AI again and dies the same way (M3: every field read from a provider is validated before
    it is stored; a bad one is recorded as unknown, never a traceback in `process`)."""
    body = json.dumps({"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini",
                       "choices": [{"index": 0, "finish_reason": "stop",
                                    "message": {"role": "assistant", "content": "Yes, it ships today."}}],
                       "usage": {"prompt_tokens": 10**30, "completion_tokens": 3, "total_tokens": 10**30 + 3}})
    openai_standin.script = [("200", body)]
    add(store, PERSON, "is my order ready?", T0 - 30)
    done = run_process(env, T0)
    assert "Traceback" not in done.stderr, done.stderr[-400:]
    assert twilio_standin.bodies_to(PERSON) == ["Yes, it ships today."]


# -- issue 16: delivery checks move on, also past a reply Twilio keeps answering 500 about ---------


def test_a_reply_whose_fetch_always_fails_does_not_block_every_later_check(env, store, twilio_standin):
    """Twilio answers 500 to the fetch of one reply, every time. It is transient, so the loop
    stops there (`return False`) and the reply stays unchecked; being the oldest, it is first
    again next run: the other reply is never checked, and every run warns again (issue 16:
    a reply Twilio answers with an error is final for that reply, the loop goes on with the
    other replies, the warning comes once)."""
    standin = twilio_standin
    add(store, PERSON, "hi", T0 - 30)
    process(env, T0)
    add(store, OTHER, "hello", T0 + 1)
    process(env, T0 + 40)
    first, second = (m["sid"] for m in standin.sent)
    fetch = standin.fetch

    def failing(handler, sid):
        if sid == first:
            with standin.lock:
                standin.fetched.append(sid)
            return standin.reply(handler, 500, {"code": 20500, "message": "Internal Server Error", "status": 500})
        return fetch(handler, sid)

    standin.fetch = failing
    for run in range(3):
        process(env, T0 + delivery.CHECK_AFTER_SECONDS + 60 + 60 * run)
    assert second in standin.fetched, f"the other reply was never checked; asked {standin.fetched}"
    assert standin.fetched.count(first) == 1, f"the failing reply was asked {standin.fetched.count(first)} times"


# -- L10: a blank SMSBATCH_ANON_KEY -----------------------------------------------------------------


def test_a_blank_anon_key_in_the_environment_is_refused_like_a_blank_key_option(db_path, store):
    """`--key " "` and a key file with a blank first line are refused ("anyone could recompute
    the pseudonyms"); SMSBATCH_ANON_KEY=" " is taken as the key: the same pseudonyms every run,
    recomputable by anyone who tries the blank key."""
    add(store, "+15557770001", "a private text", T0)
    assert invoke(["export", "--anonymize", "--key", " "], env={"SMSBATCH_DB": db_path}).exit_code == 2
    runs = [invoke(["export", "--anonymize"], env={"SMSBATCH_DB": db_path, "SMSBATCH_ANON_KEY": " "})
            for _ in range(2)]
    assert not (runs[0].exit_code == 0 and runs[0].stdout == runs[1].stdout), "a blank key was used as the key"


# -- M8/L1: Twilio's error `code`, a string, reaches the log raw -----------------------------------


def test_a_twilio_error_code_holding_escape_sequences_reaches_the_log_escaped(env, store, twilio_standin):
    """Twilio's error JSON gives `code` as it likes; the twilio package passes a string through,
    and classify() writes `Twilio error {code}` with only the message redacted. The failed
    batch's warning then carries OSC 52 (a clipboard write), a screen clear and a bidi override
    raw into stderr, i.e. cron mail or the journal (M8/L1: everything from Twilio that reaches a
    log has control characters, escape sequences and bidi controls made visible)."""
    twilio_standin.script = [("error", 400, "\x1b]52;c;aGk=\x07\u202e\x1b[2J", "bad request")]
    add(store, PERSON, "hi", T0 - 30)
    done = run_process(env, T0)
    assert "Twilio error" in done.stderr
    raw = [ch for ch in done.stderr if ch in "\x1b\x07\u202e"]
    assert raw == [], f"raw control characters in the log: {raw!r}"


# -- L4/M4: a captured request replayed after prune is a new text --------------------------------


def test_a_captured_text_replayed_after_prune_is_not_answered_again(server, db_path):
    """Twilio's signature has no timestamp: a captured request stays valid for ever, and only
    the stored MessageSid makes its replay a duplicate. `prune --older-than 2h` (outside the
    backfill's look-back, so allowed) deletes that MessageSid; the same captured bytes sent
    again are then stored as a new text, in a new open batch, and answered a second time
    (L4: nothing is answered twice; M4's attacker holds exactly such a captured request)."""
    captured = signed_request(form(7))
    assert exchange(server.server_port, [captured])[0] == 200
    answered = invoke(["--db", db_path, "process", "--ai", "offline", "--sms", "console", "--now", repr(T0 + 60)])
    assert "sent 1" in answered.output
    pruned = invoke(["--db", db_path, "prune", "--older-than", "2h", "--now", repr(T0 + 3 * 3600)])
    assert pruned.exit_code == 0 and "deleted 1 batch" in pruned.output
    exchange(server.server_port, [captured])
    batches = sqlite3.connect(db_path).execute("SELECT state FROM batches").fetchall()
    assert batches == [], f"the replay opened a batch to be answered again: {batches}"


# -- M7/L9: `smsbatch.web:app` under a WSGI server, without SMSBATCH_PUBLIC_URL --------------------

WSGI_SERVER = """
import sys, threading, http.client
from wsgiref.simple_server import make_server
from smsbatch.web import app
server = make_server("127.0.0.1", 0, app)
threading.Thread(target=server.serve_forever, daemon=True).start()
for _ in range(3):
    conn = http.client.HTTPConnection("127.0.0.1", server.server_port, timeout=5)
    conn.request("POST", "/sms", body="a=b", headers={"Content-Type": "application/x-www-form-urlencoded"})
    print(conn.getresponse().status)
"""


def test_the_wsgi_app_without_a_public_url_refuses_to_start_rather_than_500_every_request(db_path, store):
    """docs/troubleshooting.md: `smsbatch.web:app` under gunicorn and the like refuses to start when
    TWILIO_AUTH_TOKEN is set and SMSBATCH_PUBLIC_URL is not. It is built at the first request
    instead: the server starts, and every request is a 500 with a full traceback in the log,
    not rate-limited (M7's symptom), whose message also says to set TWILIO_AUTH_TOKEN, which is set."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SMSBATCH_", "TWILIO_"))}
    env.update(SMSBATCH_DB=db_path, TWILIO_AUTH_TOKEN="a-token")
    done = subprocess.run([sys.executable, "-c", WSGI_SERVER], env=env, capture_output=True, text=True, timeout=30)
    answers = done.stdout.split()
    assert "500" not in answers, f"answers {answers}; {done.stderr.count('Traceback')} tracebacks in the log"
