"""Issue 15's attacks on the backfill and the delivery fetch: a hostile Twilio stand-in lists
odd records, links pages to themselves or to another host, and answers with bad fields."""

import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from conftest import T0, add, invoke, wait_for
from fakes import Bystander, FakeTwilio, provider_env
from smsbatch import delivery
from smsbatch.backfill import backfill
from smsbatch.config import Settings
from smsbatch.sms import TwilioSender

US, PERSON, OTHER = "+15550000000", "+15557770001", "+15557770002"
HEX = "0123456789abcdef" * 2


@pytest.fixture
def env(db_path, openai_standin, twilio_standin):
    twilio_standin.clock = lambda: T0  # our replies are created at the run's `now`
    return provider_env(openai_standin, twilio_standin, SMSBATCH_DB=db_path, SMSBATCH_AI_TIMEOUT_SECONDS=2,
                        SMSBATCH_SMS_TIMEOUT_SECONDS=2)


def process(env, now):
    result = invoke(["process", "--now", repr(now), "--json"], env=env)
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def checked_until(db_path):
    row = sqlite3.connect(db_path).execute("SELECT checked_until FROM backfill").fetchone()
    return None if row is None else row[0]


def backfill_lines(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "smsbatch.backfill"]


def run_process(env, now, timeout=30):
    """`smsbatch process` as a real OS process (a hostile Twilio may keep it busy)."""
    return subprocess.run([sys.executable, "-m", "smsbatch", "process", "--now", repr(now), "--json"],
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout)


# -- H1 and L2: records the backfill cannot read, or that break the webhook's limits -----------

ODD = {
    "date that does not parse": {"date_sent": "yesterday-ish"},
    "year 99999": {"date_sent": "Mon, 01 Jan 99999 00:00:00 +0000"},
    "from null": {"from": None},
    "num_media x": {"num_media": "x"},
    "escape in its SID": {"sid": "SM\x1b[31mred\x1b]52;c;aGk=\x07" + "0" * 20},
}


def test_records_that_cannot_be_read_are_named_skipped_and_the_run_goes_on(env, db_path, store, twilio_standin,
                                                                           caplog):
    caplog.set_level(logging.WARNING, "smsbatch")
    for raw in ODD.values():
        twilio_standin.deliver_inbound(OTHER, US, "odd", T0 - 40, raw=raw)
    good = twilio_standin.deliver_inbound(PERSON, US, "is my order ready?", T0 - 30)
    add(store, "+15557770009", "via the webhook", T0 - 60)  # a batch waiting anyway
    report = process(env, T0)
    assert report["backfilled"] == 1 and report["sent"] == 2  # processing went on: both answered
    assert store.has_message(good) and checked_until(db_path) == T0  # the window advanced
    skipped = [line for line in backfill_lines(caplog) if "skipped record" in line]
    assert len(skipped) == len(ODD)
    assert any("bad date_sent" in line for line in skipped) and any("no from" in line for line in skipped)
    assert any("bad num_media" in line for line in skipped)
    [escaped] = [line for line in skipped if "red" in line]
    assert "\x1b" not in escaped and "\x07" not in escaped and "\\x1b[31mred" in escaped
    assert store.conn.execute("SELECT count(*) FROM messages WHERE phone = ?", (OTHER,)).fetchone()[0] == 0


def test_backfilled_texts_meet_the_webhooks_limits(env, db_path, store, twilio_standin, caplog):
    caplog.set_level(logging.WARNING, "smsbatch")
    twilio_standin.deliver_inbound(OTHER, US, "x" * (2 * 1024 * 1024), T0 - 40)  # a 2 MB body
    twilio_standin.deliver_inbound(OTHER, US, "long sid", T0 - 40, raw={"sid": "SM" + "a" * 300})
    twilio_standin.deliver_inbound("+1" + "5" * 300, US, "long number", T0 - 40)
    twilio_standin.deliver_inbound(OTHER, US, "upper-case sid", T0 - 40, raw={"sid": "SM" + HEX.upper()})
    good = twilio_standin.deliver_inbound(PERSON, US, "hello", T0 - 30)
    report = process(env, T0)
    assert report["backfilled"] == 1 and store.has_message(good)
    assert [r[0] for r in store.conn.execute("SELECT sid FROM messages")] == [good]
    assert len([line for line in backfill_lines(caplog) if "skipped record" in line]) == 4


# -- M1 and M2: paging ------------------------------------------------------------------------

def test_a_next_page_link_to_the_same_page_stops_the_reading(env, db_path, twilio_standin):
    twilio_standin.next_link = "self"
    sid = twilio_standin.deliver_inbound(PERSON, US, "hello", T0 - 30)
    done = run_process(env, T0)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["sent"] == 1 and twilio_standin.bodies_to(PERSON)
    assert len([q for q in twilio_standin.listed if q.get("To") == US]) == 1
    assert "repeats an earlier page" in done.stderr and "Traceback" not in done.stderr
    assert checked_until(db_path) is None  # cut short: the next turn reads this window again
    assert sqlite3.connect(db_path).execute("SELECT sid FROM messages").fetchall() == [(sid,)]


def test_paging_stops_at_the_page_cap(env, db_path, twilio_standin):
    from smsbatch.twilio_log import MAX_PAGES

    twilio_standin.next_link = "endless"  # ever new page numbers, never an end
    twilio_standin.deliver_inbound(PERSON, US, "hello", T0 - 30)
    done = run_process(env, T0)
    assert done.returncode == 0, done.stderr
    assert len([q for q in twilio_standin.listed if q.get("To") == US]) == MAX_PAGES
    assert f"more than {MAX_PAGES} pages" in done.stderr


def test_paging_stops_at_the_time_cap(env, db_path, store, twilio_standin):
    from smsbatch.twilio_log import Paging, TwilioLog

    twilio_standin.next_link, twilio_standin.page_delay = "endless", 0.2
    settings = Settings.from_env(env)
    started = time.monotonic()
    report = backfill(store, TwilioLog(TwilioSender(settings), Paging(max_seconds=1.0)), settings, T0 - 600, T0, T0)
    assert time.monotonic() - started < 3 and "took longer than 1 s" in report.cut
    assert len(twilio_standin.listed) < 10


def test_sigterm_ends_a_process_run_stuck_in_endless_pages(env, db_path, twilio_standin):
    twilio_standin.next_link, twilio_standin.page_delay = "endless", 0.2
    twilio_standin.deliver_inbound(PERSON, US, "hello", T0 - 30)
    run = subprocess.Popen([sys.executable, "-m", "smsbatch", "process", "--now", repr(T0), "--json"],
                           env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: len(twilio_standin.listed) >= 3), "the backfill never paged"
        started = time.monotonic()
        run.send_signal(signal.SIGTERM)
        out, err = run.communicate(timeout=15)
    finally:
        run.kill()
    assert time.monotonic() - started < 3, "SIGTERM must end the reading between two pages"
    assert run.returncode == 0, err
    assert "stopped (SIGTERM or Ctrl-C)" in err and len(twilio_standin.listed) < 20
    assert checked_until(db_path) is None


@pytest.mark.parametrize("form", ["meta", "absolute", "scheme-relative"])
def test_a_next_page_link_to_another_host_is_not_followed(env, db_path, twilio_standin, form):
    with Bystander() as elsewhere:
        path = f"/2010-04-01/Accounts/{FakeTwilio.ACCOUNT}/Messages.json?To=%2B15550000000&Page=1"
        link = {"meta": ("meta", elsewhere.url + path), "absolute": elsewhere.url + path,
                "scheme-relative": "//" + elsewhere.url.removeprefix("http://") + path}[form]
        twilio_standin.next_link = link
        twilio_standin.deliver_inbound(PERSON, US, "hello", T0 - 30)
        result = invoke(["process", "--now", repr(T0), "--json"], env=env)
        assert result.exit_code == 0, result.output
        assert elsewhere.requests == []  # no request at all: the credentials never went there
    assert checked_until(db_path) is None


def test_the_backfill_command_does_not_follow_a_foreign_link_either(env, twilio_standin):
    with Bystander() as elsewhere:
        twilio_standin.next_link = ("meta", elsewhere.url + "/steal")
        result = invoke(["backfill", "--since", repr(T0 - 600), "--now", repr(T0), "--json"], env=env)
        assert result.exit_code == 0 and elsewhere.requests == []
    assert "leads off Twilio" in json.loads(result.output)["stopped_early"]


# -- M3: fields of the delivery fetch ---------------------------------------------------------

def test_a_bad_error_code_from_the_delivery_fetch_is_recorded_as_unknown(env, db_path, store, twilio_standin,
                                                                         caplog):
    caplog.set_level(logging.WARNING, "smsbatch")
    add(store, PERSON, "hi", T0 - 30)
    process(env, T0)
    [message] = twilio_standin.sent
    message["status"], message["error_code"] = "failed", "abc"
    message["raw"] = {"date_updated": "Mon, 01 Jan 99999 00:00:00 +0000"}  # the twilio package chokes on it
    process(env, T0 + delivery.CHECK_AFTER_SECONDS + 10)
    row = store.conn.execute("SELECT status, error_code, checked_at FROM outbound").fetchone()
    assert tuple(row) == ("failed", None, T0 + delivery.CHECK_AFTER_SECONDS + 10)
    assert any("error_code 'abc'" in r.getMessage() and "recorded as unknown" in r.getMessage()
               for r in caplog.records)
    for args in (["status"], ["status", "--json"]):
        shown = invoke(["--db", db_path, *args, "--now", repr(T0 + 400)])
        assert shown.exit_code == 0, shown.output
    assert json.loads(invoke(["--db", db_path, "status", "--json"]).output)["delivery"] == {"failed": 1}


def test_an_unknown_status_is_not_recorded(env, store, twilio_standin):
    add(store, PERSON, "hi", T0 - 30)
    process(env, T0)
    twilio_standin.sent[0]["status"] = "\x1b[2Jexploded"
    process(env, T0 + delivery.CHECK_AFTER_SECONDS + 10)
    assert tuple(store.conn.execute("SELECT status, error_code FROM outbound").fetchone()) == (None, None)


def test_a_bad_code_stored_before_the_fix_does_not_break_status(env, db_path, store):
    add(store, PERSON, "hi", T0 - 30)
    process(env, T0)
    store.conn.execute("UPDATE outbound SET status = 'failed', error_code = 'abc'")
    store.conn.commit()
    info = invoke(["--db", db_path, "status", "--json"])
    assert info.exit_code == 0 and "unreadable code" in info.output
    assert invoke(["--db", db_path, "status"]).exit_code == 0
    assert process(env, T0 + 60)["undelivered"] == 1


# -- L4: prune and the backfill's look-back ---------------------------------------------------

def test_prune_refuses_an_age_inside_the_backfills_look_back(env, db_path, store):
    add(store, PERSON, "hi", T0 - 30)
    process(env, T0)
    result = invoke(["prune", "--older-than", "0s", "--now", repr(T0 + 60)], env=env)
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [result.output.strip()]  # one line
    assert "the smallest allowed age is 65m" in result.output
    assert store.conn.execute("SELECT count(*) FROM messages").fetchone()[0] == 1
    wider = invoke(["prune", "--older-than", "30m", "--now", repr(T0 + 60)],
                   env=dict(env, SMSBATCH_MAX_AGE_SECONDS="7200"))
    assert wider.exit_code == 1 and "smallest allowed age is 125m" in wider.output
    assert invoke(["prune", "--older-than", "65m", "--now", repr(T0 + 60)], env=env).exit_code == 0


def test_retention_never_prunes_a_text_the_backfill_would_find_again(env, db_path, store, twilio_standin):
    sid = twilio_standin.deliver_inbound(PERSON, US, "hi", T0 - 30)
    add(store, PERSON, "hi", T0 - 30, sid=sid)  # the webhook got it
    tiny = dict(env, SMSBATCH_RETENTION_DAYS="0.0001")  # 8.6 s
    process(tiny, T0)
    process(tiny, T0 + 120)
    assert store.has_message(sid) and len(twilio_standin.bodies_to(PERSON)) == 1


# -- M3: what Twilio answers to a send and a reconcile ------------------------------------------

def test_a_send_answered_with_a_malformed_sid_is_checked_not_stored(env, db_path, store, twilio_standin):
    """Twilio accepted the reply but its answer's SID is garbage: nothing is recorded as
    sent with it; the next run finds the reply in the log by its real SID, sent once."""
    twilio_standin.script = [("accept-as", {"sid": "SM\x1b[2J" + "z" * 300})]
    add(store, PERSON, "hi", T0 - 30)
    assert process(env, T0)["retrying"] == 1
    assert store.conn.execute("SELECT count(*) FROM outbound").fetchone()[0] == 0
    process(env, T0 + 600)
    [message] = twilio_standin.sent
    assert [r[0] for r in store.conn.execute("SELECT provider_sid FROM batches")] == [message["sid"]]


def test_an_unreadable_record_is_named_once_not_every_minute(env, store, twilio_standin, caplog):
    caplog.set_level(logging.WARNING, "smsbatch")
    twilio_standin.deliver_inbound(OTHER, US, "odd", T0 - 40, raw={"from": None})
    process(env, T0)
    process(env, T0 + 61)  # reads from T0 - 300 again (the overlap): the record is listed again
    assert len([line for line in backfill_lines(caplog) if "skipped record" in line]) == 1


def test_no_twilio_request_of_ours_leaves_twilios_origin(twilio_standin):
    """Reconcile, check and the service's numbers page with the twilio package, which follows a
    meta.next_page_url to any host with the account's credentials: our client refuses."""
    from requests.exceptions import InvalidURL

    from smsbatch.sms import twilio_client

    settings = Settings(twilio_account_sid=FakeTwilio.ACCOUNT, twilio_auth_token=FakeTwilio.TOKEN,
                        twilio_base_url=twilio_standin.url)
    with Bystander() as elsewhere:
        twilio_standin.next_link = ("meta", elsewhere.url + "/2010-04-01/steal.json")
        twilio_standin.deliver_inbound(PERSON, US, "hello", T0 - 30)
        client = twilio_client(settings, 5)
        with pytest.raises(InvalidURL, match="outside Twilio's API"):
            list(client.messages.stream(to=US, page_size=1))
        assert elsewhere.requests == []


# -- round 3: a listing cut short, a Media listing that fails, `send` without --from, fetch errors --


def test_a_cut_replies_listing_stores_the_texts_it_covers_and_says_what_waits(env, db_path, store, twilio_standin,
                                                                               caplog):
    """Our replies are listed one a page, and the second page links to itself: the replies
    read cover only the last moments. The text after them is stored and answered; the older
    one, whose reply may be in the part not read, is left for the next turn and the log line
    says so (not "what was read is stored" alone); the window does not move past it."""
    caplog.set_level(logging.WARNING, "smsbatch")
    standin = twilio_standin
    standin.page_cap, standin.replies_link = 1, "self"
    older = standin.deliver_inbound(PERSON, US, "is my order ready?", T0 - 200)
    standin.record({"To": "+15557770009", "From": US, "Body": "an answer to someone else"}, at=T0 - 20)
    newer = standin.deliver_inbound(OTHER, US, "hello?", T0 - 10)
    report = process(env, T0)
    assert store.has_message(newer) and not store.has_message(older)
    assert report["backfilled"] == 1 and standin.bodies_to(OTHER) and not standin.bodies_to(PERSON)
    [line] = [line for line in backfill_lines(caplog) if "stopped early" in line]
    assert "repeats an earlier page" in line and "1 found text(s) left for it" in line
    assert checked_until(db_path) is None


def test_a_media_listing_answering_500_stores_the_text_without_pictures(env, db_path, store, twilio_standin, caplog):
    """Twilio answers 500 to one text's Media listing, every time: the text is stored without
    its pictures (one log line) and answered, and the window advances."""
    caplog.set_level(logging.WARNING, "smsbatch")
    standin = twilio_standin
    standin.media_list = lambda handler, sid: standin.reply(handler, 500, {"code": 20500, "message": "oops",
                                                                           "status": 500})
    sid = standin.deliver_inbound(PERSON, US, "a picture", T0 - 30, media=("image/jpeg",))
    report = process(env, T0)
    assert report["backfilled"] == 1 and store.has_message(sid) and standin.bodies_to(PERSON)
    assert checked_until(db_path) == T0
    assert any("pictures could not be listed" in line for line in backfill_lines(caplog))


def test_send_without_from_refuses_a_number_only_the_database_names(env, db_path, store, twilio_standin):
    """PERSON last wrote to another app's number (an imported trace): `send` without --from
    does not send from it; it asks for --from in one line."""
    add(store, PERSON, "old", T0 - 86400, to="+15558880000")
    result = invoke(["send", PERSON, "hello from us"], env=dict(env, SMSBATCH_NUMBERS=US))
    assert result.exit_code == 1 and "give --from NUMBER" in result.output and "Traceback" not in result.output
    assert twilio_standin.sent == []
    sent = invoke(["send", PERSON, "hello from us", "--from", US], env=dict(env, SMSBATCH_NUMBERS=US))
    assert sent.exit_code == 0 and [m["from"] for m in twilio_standin.sent] == [US]


def test_a_fetch_answered_429_is_tried_again_next_run(env, store, twilio_standin):
    """A 429 says nothing about the reply (slow down): the loop stops there and the next run
    asks again; unlike a 5xx about that reply, it is not final."""
    standin = twilio_standin
    add(store, PERSON, "hi", T0 - 30)
    process(env, T0)
    fetch = standin.fetch
    answers = iter([429])

    def busy_once(handler, sid):
        status = next(answers, None)
        if status is None:
            return fetch(handler, sid)
        with standin.lock:
            standin.fetched.append(sid)
        return standin.reply(handler, status, {"code": 20429, "message": "Too Many Requests", "status": status})

    standin.fetch = busy_once
    [sid] = [m["sid"] for m in standin.sent]
    for run in range(2):
        process(env, T0 + delivery.CHECK_AFTER_SECONDS + 60 + 60 * run)
    assert standin.fetched.count(sid) == 2


def test_a_send_answered_with_a_5001_digit_number_is_an_unknown_outcome_not_a_traceback(env, store,
                                                                                       twilio_standin):
    """Twilio accepts the reply and its answer holds an integer of 5,001 digits: the twilio
    package's json.loads raises ValueError. That is Twilio's unreadable answer (maybe sent):
    no traceback, and the next run finds the reply in Twilio's log instead of sending again."""
    standin = twilio_standin
    plain_reply = standin.reply

    def reply(handler, status, payload):
        if status == 201:
            return standin.raw(handler, status, json.dumps(payload | {"num_segments": "__ODD__"})
                               .replace('"__ODD__"', "9" * 5001).encode())
        return plain_reply(handler, status, payload)

    standin.reply = reply
    add(store, PERSON, "hi", T0 - 30)
    done = run_process(env, T0)
    assert "Traceback" not in done.stderr, done.stderr[-800:]
    assert done.returncode == 0 and json.loads(done.stdout)["retrying"] == 1
    standin.reply = plain_reply
    run_process(env, T0 + 120)
    assert len(standin.bodies_to(PERSON)) == 1
