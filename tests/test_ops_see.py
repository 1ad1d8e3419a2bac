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

pytestmark = pytest.mark.engines  # on SQLite and PostgreSQL (conftest.ENGINES)

A, B = "+15554440001", "+15554440002"
ISO = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"


def env_for(db_path, **extra):
    return {"SMSBATCH_DB": db_path, **{k: str(v) for k, v in extra.items()}}


# -- durations -------------------------------------------------------------------


@pytest.mark.parametrize("text, seconds", [("7d", 604800), ("24h", 86400), ("90m", 5400), ("30s", 30),
                                           ("1.5h", 5400), ("2w", 1209600), (" 3D ", 259200)])
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


def test_health_says_a_person_is_needed_during_an_outage_without_its_details(db_path, store):
    app = make_app(Settings(db_path=db_path, twilio_auth_token="t", public_url="https://h.example/sms"),
                   clock=lambda: T0)
    assert json.loads(call(app, method="GET", path="/health")[2])["person_needed"] is False
    store.record_provider("sms", T0, "Twilio unreachable at http://10.0.0.7:8443 (ConnectionError)", 300)
    store.record_provider("sms", T0 + 300, "Twilio unreachable at http://10.0.0.7:8443 (ConnectionError)", 300)
    status, _, out = call(app, method="GET", path="/health")
    assert status == 200 and json.loads(out) == {"ok": True, "can_store": True, "person_needed": True}
    assert b"10.0.0.7" not in out and b"unreachable" not in out  # the details stay in `status`


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


# -- stats -----------------------------------------------------------------------

DAY2 = T0 + 86400


@pytest.fixture
def two_days(store, settings, clock):
    """A: three texts on day 1, answered 15 s after the last; B: two texts and a STOP on day 2,
    answered 25 s after its last text."""
    from conftest import offline_processor

    for n in range(3):
        add(store, A, f"question {n}", T0 + n)
    clock.now = T0 + 2 + 15
    assert offline_processor(settings, clock).run().counts["sent"] == 1
    add(store, B, "hi", DAY2)
    add(store, B, "are you there", DAY2 + 5)
    clock.now = DAY2 + 5 + 25
    assert offline_processor(settings, clock).run().counts["sent"] == 1
    add(store, B, "STOP", DAY2 + 60)
    return store


def test_stats_counts_texts_calls_saved_replies_and_latency_per_day(two_days, db_path):
    result = invoke(["stats", "--since", "7d", "--now", str(DAY2 + 3600), "--json"], env_for(db_path))
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    t = info["totals"]
    assert (t["texts"], t["answerable"], t["batches"], t["ai_requests"], t["replies"]) == (6, 5, 3, 2, 2)
    assert t["ai_calls_saved"] == 3 and (t["latency_p50"], t["latency_p95"]) == (15, 25)
    days = {d["day"]: d for d in info["days"] if d["texts"]}
    assert len(info["days"]) == 8 and sorted(days) == ["2027-01-15", "2027-01-16"]
    assert days["2027-01-15"]["texts"] == 3 and days["2027-01-15"]["ai_requests"] == 1
    assert days["2027-01-16"]["texts"] == 3 and days["2027-01-16"]["latency_p50"] == 25


def test_stats_window_leaves_older_days_out(two_days, db_path):
    info = json.loads(invoke(["stats", "--since", "90m", "--now", str(DAY2 + 3600), "--json"],
                             env_for(db_path)).output)
    assert info["totals"]["texts"] == 3 and info["totals"]["replies"] == 1
    assert [d["day"] for d in info["days"]] == ["2027-01-16"]


def test_stats_human_output_has_totals_and_a_bar_chart(two_days, db_path):
    result = invoke(["stats", "--now", str(DAY2 + 3600)], env_for(db_path, COLUMNS=80))
    assert result.exit_code == 0
    out = result.output
    assert "texts received 6" in out and "AI calls saved by batching: 3 (5 texts, 2 calls: one per batch)" in out
    assert "extra AI requests from retries: 0" in out
    assert "p50 15s, p95 25s" in out and "texts and AI calls per day" in out
    chart = out.split("texts and AI calls per day")[1].splitlines()
    assert any(line.startswith("01-16 texts █") and line.endswith(" 3") for line in chart), chart
    assert all(len(line) <= 80 for line in out.splitlines())


def test_stats_latency_cells_fit_their_columns(store, settings, clock, db_path):
    from conftest import offline_processor

    for n, wait in enumerate((105.8, 4.3, 1000)):  # one reply a day, answered this long after the text
        at = T0 + n * 86400
        add(store, f"+1555999000{n}", "urgent: hi", at)
        clock.now = at + wait
        assert offline_processor(settings, clock).run().counts["sent"] == 1
    result = invoke(["stats", "--since", "3d", "--now", str(T0 + 3 * 86400)], env_for(db_path, COLUMNS=120))
    table = result.output.split("\n\n")[1].splitlines()
    assert len({len(line) for line in table}) == 1, table  # every row as wide as the header
    assert [row.split()[-2:] for row in table[1:] if "-" not in row.split()[-1]] == [
        ["106s", "106s"], ["4.3s", "4.3s"], ["16m", "16m"]]


@pytest.mark.parametrize("since, said", [("a week", "use a duration before now"), ("500d", "at most 400d"),
                                         ("0d", "more than 0")])
def test_stats_refuses_a_bad_duration_in_one_line(db_path, since, said):
    result = invoke(["stats", "--since", since], env_for(db_path))
    assert result.exit_code == 2 and said in result.output and "Traceback" not in result.output


# -- status ----------------------------------------------------------------------

NOISY = "[bold red]Twilio[/] error 30003: " + "unreachable handset, " * 10


@pytest.fixture
def troubled(store, settings):
    """Twenty batches, one failed with a long error holding rich markup, one waiting to retry,
    and an announced AI outage."""
    for n in range(20):  # the last two written are the troubled ones (not yet due at T0 + 20: the rest)
        add(store, f"+1555444{n:04d}", f"text {n}", T0 + 50 + n if n < 18 else T0 + n - 18)
    [failed, retrying], _ = store.claim_due(T0 + 20, 2, settings.lease, 3600)
    store.finish(failed, "failed", T0 + 101, NOISY)
    store.requeue(retrying, T0 + 130, "AI returned HTTP 503: down", T0 + 101)
    store.record_provider("ai", T0, "AI returned HTTP 503: [b]down[/b]", 300)
    store.record_provider("ai", T0 + 301, "AI returned HTTP 503: [b]down[/b]", 300)
    return failed["id"], retrying["id"]


def test_status_fits_80_by_24_counts_first_errors_cut(troubled, db_path):
    failed, retrying = troubled
    result = invoke(["status", "--now", str(T0 + 120)], env_for(db_path, COLUMNS=80, LINES=24))
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert len(lines) <= 23 and all(len(line) <= 80 for line in lines), lines
    assert lines[1].startswith("pending 19: open 18 · queued 1 ·") and lines[2].startswith("sent 0 · superseded 0")
    assert "next retry in 10s (" + retrying + ")" in result.output
    assert "OUTAGE: AI calls failing for" in result.output and "[b]down[/b]" in result.output
    header = next(line for line in lines if line.startswith("batch"))
    assert header.split() == ["batch", "phone", "texts", "state", "age", "tries", "error"]
    row = next(line for line in lines if line.startswith(failed))
    # cut in the middle: the start (its source, markup printed as written) and the reason at its end
    assert "[bold red" in row and "…" in row and row.endswith("…handset,") and len(row) == 80


@pytest.mark.parametrize("extra, said", [({"ENABLE_AI_SMS_AGENT": "false"}, "agent PAUSED"),
                                         ({"AI_SMS_TEST_NUMBER": "+15550009999"},
                                          "test-number mode: only +15550009999")])
def test_status_says_when_the_agent_is_paused_or_in_test_number_mode(db_path, extra, said):
    result = invoke(["status"], env_for(db_path, COLUMNS=80, **extra))
    assert result.exit_code == 0 and said in result.output.splitlines()[0]


def test_status_json_has_agent_next_retry_and_outages(troubled, db_path):
    info = json.loads(invoke(["status", "--json", "--now", str(T0 + 120)], env_for(db_path)).output)
    assert info["agent"] == {"enabled": True, "test_number": None}
    assert info["next_retry"] == {"retry_at": T0 + 130, "batch_id": troubled[1]}
    assert [o["provider"] for o in info["outages"]] == ["ai"] and info["outages"][0]["since"] == T0


def test_status_watch_and_json_do_not_mix(db_path):
    result = invoke(["status", "--watch", "--json"], env_for(db_path))
    assert result.exit_code == 2 and "--watch" in result.output


def test_status_watch_refuses_in_one_line_when_stdout_is_not_a_terminal(db_path):
    result = invoke(["status", "--watch"], env_for(db_path))  # the CLI runner's stdout is no terminal
    assert result.exit_code == 1 and result.output == (
        "Error: --watch redraws a terminal, and stdout is not one: drop --watch to print the status once\n")


# -- status --watch in a real terminal --------------------------------------------


# The waits below only bound a hang (a redraw, Ctrl-C ending the session): generous, so a loaded
# machine (the full suite beside other work) is not taken for a hang.
HANG = 60


def tmux(sock, *args):
    return subprocess.run(["tmux", "-L", sock, *args], capture_output=True, text=True, timeout=HANG)


@pytest.mark.sqlite_only  # reads SQLite itself (PRAGMA, trace callback, a shell line)
def test_status_watch_in_a_real_80x24_terminal(troubled, db_path, store, tmp_path):
    """tmux gives `status --watch` a real 80x24 terminal: counts on screen, whole headers, no
    wrapped lines; it redraws when a text arrives and ends on Ctrl-C."""
    import shutil

    from conftest import wait_for

    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed: apt-get install -y tmux (the --watch terminal test needs it)")
    sock = f"smsbatch-test-{tmp_path.name}"
    command = (f"env -i PATH=/usr/bin:/bin TERM=xterm-256color SMSBATCH_DB={db_path} "
               f"{sys.executable} -m smsbatch status --watch --interval 0.2")
    tmux(sock, "new-session", "-d", "-x", "80", "-y", "24", command)
    try:
        def screen():
            return tmux(sock, "capture-pane", "-p").stdout.splitlines()

        assert wait_for(lambda: any(ln.startswith("pending 19:") for ln in screen()), HANG), screen()
        lines = screen()
        assert lines[0].startswith("smsbatch ") and "agent on" in lines[0]
        assert "OUTAGE: AI calls failing for" in "\n".join(lines)
        header = next(ln for ln in lines if ln.startswith("batch"))
        assert header.split() == ["batch", "phone", "texts", "state", "age", "tries", "error"]
        rows = [ln for ln in lines[lines.index(header) + 1:] if ln.strip()]
        assert rows and all(re.match(r"[a-z0-9]{10} \+1555444", ln) for ln in rows), rows  # nothing wrapped
        assert len(lines) <= 24 and troubled[0] in "\n".join(lines)
        add(store, "+15559990000", "one more", T0 + 200)
        assert wait_for(lambda: any(ln.startswith("pending 20:") for ln in screen()), HANG), screen()
        tmux(sock, "send-keys", "C-c")
        assert wait_for(lambda: tmux(sock, "has-session").returncode != 0, HANG), screen()
    finally:
        tmux(sock, "kill-server")


# -- show ------------------------------------------------------------------------


def test_show_batch_tells_its_whole_life_and_a_retry_extends_it(db_path, store, real_settings, openai_standin,
                                                                twilio_standin):
    from conftest import Clock, real_processor

    settings = real_settings.replace(ai_client_retries=0)
    batch = add(store, A, "where is my order?", T0).batch_id
    add(store, A, "it's [bold]late[/]", T0 + 3)
    openai_standin.script = [400]
    assert real_processor(settings, Clock(T0 + 20)).run().counts["failed"] == 1
    assert invoke(["retry", batch, "--now", str(T0 + 100)], env_for(db_path)).exit_code == 0
    assert real_processor(settings, Clock(T0 + 101)).run().counts["sent"] == 1

    result = invoke(["show", batch, "--json", "--prompt"], env_for(db_path))
    assert result.exit_code == 0, result.output
    life = json.loads(result.output)
    assert [t["body"] for t in life["texts"]] == ["where is my order?", "it's [bold]late[/]"]
    moves = [(e["from_state"], e["to_state"]) for e in life["events"]]
    assert moves == [(None, "open"), ("open", "processing"), ("processing", "failed"), ("failed", "queued"),
                     ("queued", "processing"), ("processing", "sending"), ("sending", "sent")]
    assert "AI returned HTTP 400" in life["events"][2]["reason"] and life["events"][2]["at"] == T0 + 20
    assert [(a["state"], a["at"]) for a in life["attempts"]] == [("failed", T0 + 20), ("sent", T0 + 101)]
    assert "HTTP 400" in life["attempts"][0]["outcome"]
    [sms] = twilio_standin.sent
    assert [(o["sid"], o["body"], o["source"]) for o in life["outbound"]] == [(sms["sid"], sms["body"], "ai")]
    assert life["prompt"] == openai_standin.calls[-1]  # exactly what the AI was sent
    assert life["batch"]["ai_requests"] is None or life["batch"]["ai_requests"] >= 2

    human = invoke(["show", batch], env_for(db_path, COLUMNS=100)).output
    assert "it's [bold]late[/]" in human and f"SID {sms['sid']}" in human  # markup printed as it is
    assert "requeued by an operator" in human and "prompt sent to the AI" not in human
    with_prompt = invoke(["show", batch, "--prompt"], env_for(db_path, COLUMNS=100)).output
    assert "prompt sent to the AI" in with_prompt and "[system]" in with_prompt


def test_show_phone_is_the_conversation_as_a_chat_newest_last(db_path, store, settings, clock):
    from conftest import offline_processor

    add(store, A, "hi", T0)
    clock.now = T0 + 15
    offline_processor(settings, clock).run()
    store.conn.execute("INSERT INTO outbound (sid, phone, our_number, body, source, sent_at, status)"
                       " VALUES ('SMmanual1', ?, '+15550000000', 'Call you at 5 - Ann', 'manual', ?, 'delivered')",
                       (A, T0 + 60))
    store.hold(A, "angry customer", T0 + 70)
    add(store, A, "STOP", T0 + 80)
    add(store, B, "someone else", T0 + 90)
    add(store, "+15554440003", "red \x1b[31malert\x1b[0m [link=http://x]click[/link]", T0 + 95)
    result = invoke(["show", "+1 (555) 444-0001", "--json"], env_for(db_path))
    assert result.exit_code == 0, result.output
    convo = json.loads(result.output)
    kinds = [(i["kind"], i.get("detail")) for i in convo["items"]]
    assert kinds == [("in", "text"), ("out", "ai"), ("out", "manual"), ("hold", None), ("in", "opt_out"),
                     ("opt_out", None)]
    assert convo["hold"]["reason"] == "angry customer" and convo["opt_outs"][0]["keyword"] == "STOP"
    last_two = json.loads(invoke(["show", A, "--json", "--limit", "2"], env_for(db_path)).output)["items"]
    assert [i["kind"] for i in last_two] == ["in", "opt_out"]
    human = [line.rstrip() for line in invoke(["show", A], env_for(db_path, COLUMNS=100)).output.splitlines()]
    assert "ON HOLD" in human[0] and "OPTED OUT" in human[0]
    assert human[1].split()[1:] == [">", "hi"] and "Call you at 5 - Ann  (by hand, delivered)" in human[3]
    assert "someone else" not in "\n".join(human)
    add(store, B, "and to our other number", T0 + 96, to="+15550000001")
    two = invoke(["show", B], env_for(db_path, COLUMNS=100)).output
    assert "someone else (to +15550000000)" in two and "and to our other number (to +15550000001)" in two
    shown = invoke(["show", "+15554440003"], env_for(db_path, COLUMNS=100)).output
    assert "red \\x1b[31malert\\x1b[0m [link=http://x]click[/link]" in shown and "\x1b" not in shown


def test_show_tells_a_batch_id_from_a_phone_by_shape(db_path, store):
    batch = add(store, A, "hi", T0).batch_id
    assert invoke(["show", batch, "--json"], env_for(db_path)).output.count(batch) >= 1
    ten_digits = json.loads(invoke(["show", "5552345678", "--json"], env_for(db_path)).output)
    assert ten_digits["phone"] == "+15552345678" and ten_digits["items"] == []  # normalised as E.164
    missing = invoke(["show", "zzzzzzzzzz"], env_for(db_path))
    assert missing.exit_code == 1 and "no batch with id" in missing.output
    neither = invoke(["show", "hello there"], env_for(db_path))
    assert neither.exit_code == 1 and "neither a batch id" in neither.output and "Traceback" not in neither.output
    both = invoke(["show", A, "--prompt"], env_for(db_path))
    assert both.exit_code == 2 and "--prompt is for a batch" in both.output


def test_an_upgraded_version_1_database_can_be_shown_and_counted(tmp_path):
    """Migration step 3 on a database of the first release: old batches have no prompt, and
    provider_health starts empty."""
    from legacy import SENT, T, make_v1_database

    path = str(tmp_path / "v1.db")
    make_v1_database(path)
    assert "upgraded from schema version 1" in invoke(["--db", path, "migrate"]).output
    life = json.loads(invoke(["--db", path, "show", SENT, "--json", "--prompt"]).output)
    assert life["prompt"] is None and life["outbound"][0]["body"] == "Sure, 9 to 5."
    assert life["events"][0]["reason"] == "state when upgraded to schema version 2"
    info = json.loads(invoke(["--db", path, "stats", "--now", str(T + 3600), "--since", "2h", "--json"]).output)
    assert info["totals"]["texts"] == 7 and info["totals"]["replies"] == 1
    assert json.loads(invoke(["--db", path, "status", "--json"]).output)["outages"] == []


@pytest.mark.sqlite_only  # reads SQLite itself (PRAGMA, trace callback, a shell line)
def test_stats_counts_deliveries_and_reads_recorded_ai_usage_when_present(two_days, db_path):
    """Delivery reports land in outbound.status; AI usage columns (added by another step) are
    read when the database has them: then the AI requests are exact, retries included."""
    conn = two_days.conn
    conn.execute("UPDATE outbound SET status = 'delivered' WHERE phone = ?", (A,))
    have = {r[1] for r in conn.execute("PRAGMA table_info(batches)")}
    for column in ("ai_requests", "prompt_tokens", "completion_tokens"):
        if column not in have:  # schema step 6 (issue 9) adds them
            conn.execute(f"ALTER TABLE batches ADD COLUMN {column} INTEGER NOT NULL DEFAULT 0")
    conn.execute("UPDATE batches SET ai_requests = 0, prompt_tokens = 0, completion_tokens = 0")  # B: none
    conn.execute("UPDATE batches SET ai_requests = 3, prompt_tokens = 100, completion_tokens = 20 WHERE phone = ?",
                 (A,))
    info = json.loads(invoke(["stats", "--now", str(DAY2 + 3600), "--json"], env_for(db_path)).output)
    t = info["totals"]
    # A: 3 texts, one batch, 3 requests (2 of them retries). B's answer counted no request: it
    # looks answered before counting began, and is left out rather than counted as saved.
    assert not info["ai_requests_exact"] and t["ai_requests"] == 3 and t["ai_calls_saved"] == 2
    assert (t["retry_requests"], t["uncounted_batches"]) == (2, 1)
    assert (t["prompt_tokens"], t["completion_tokens"], t["replies"], t["delivered"]) == (100, 20, 2, 1)


def test_process_lines_carry_an_iso_time_with_the_stand_ins_too(db_path, store):
    add(store, A, "hi", T0)
    result = invoke(["process", "--ai", "offline", "--sms", "console", "--now", str(T0 + 30)], env_for(db_path))
    assert result.exit_code == 0
    assert re.fullmatch(ISO + r" claimed 1, sent 1, skipped 0, failed 0\n", result.stdout)
    assert re.fullmatch(ISO + r" \[console sms from \+15550000000 to \+15554440001\] Thanks for your message\. You said: hi\n",
                        result.stderr)


def test_a_refusal_for_one_recipient_is_not_a_failing_provider(db_path, store, real_settings, clock, twilio_standin):
    from conftest import real_processor

    add(store, A, "hi", T0)
    twilio_standin.script = [(400, 21211)]  # Twilio answered: that number is invalid
    clock.now = T0 + 15
    assert real_processor(real_settings, clock).run().counts["failed"] == 1
    assert [r["failing_since"] for r in store.provider_health()] == [None, None]
    assert store.outages() == []
