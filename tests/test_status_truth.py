"""Issue 16: status tells the truth, honest figures, durations everywhere, prune gives space back.

Everything through the real CLI, on real SQLite files, with the stand-ins where a provider is involved.
"""

import json
import os
import re

import pytest

from conftest import T0, add, invoke
from fakes import provider_env
from smsbatch import attention, report

A, B, C = "+15554440001", "+15554440002", "+15554440003"
SALES, SUPPORT = "+15550000000", "+15550001111"
OFFLINE = ["--ai", "offline", "--sms", "console"]


def env_for(db_path, **extra):
    return {"SMSBATCH_DB": db_path, **{k: str(v) for k, v in extra.items()}}


def status_json(db_path, now, **extra):
    result = invoke(["status", "--json", "--now", repr(now)], env_for(db_path, **extra))
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def process(db_path, now, *args, env=None):
    result = invoke(["process", "--now", repr(now), "--json", *args], env or env_for(db_path))
    assert result.exit_code in (0, 3), result.output
    return json.loads(result.stdout)


# -- status: when the last text came, when a processor last ran ---------------------


def test_status_says_when_the_last_text_came_and_a_processor_ran_and_warns_when_none_runs(db_path):
    """The webhook stores texts with `serve` up; nothing answers them while no processor runs
    (cron not installed, or stopped): status says so, and stops saying so once one runs."""
    ingest = ["ingest", "--from", A, "--to", SALES, "--body", "hello?", "--at", repr(T0), "--now", repr(T0)]
    assert invoke(ingest, env_for(db_path)).exit_code == 0
    info = status_json(db_path, T0 + 10)
    assert (info["last_text_at"], info["last_run_at"]) == (T0, None)
    assert info["processor_stalled"] and "no processor has ever run while 1 batch waits" in info["warnings"][0]

    process(db_path, T0 + 30, *OFFLINE)  # answers it: nothing waits
    info = status_json(db_path, T0 + 600)
    assert info["last_run_at"] == T0 + 30 and info["pending"] == 0
    assert not info["processor_stalled"] and info["warnings"] == []

    add_text = ["ingest", "--from", B, "--to", SALES, "--body", "anyone?", "--at", repr(T0 + 700),
                "--now", repr(T0 + 700)]
    assert invoke(add_text, env_for(db_path)).exit_code == 0
    assert not status_json(db_path, T0 + 30 + 179)["processor_stalled"]  # within 3 minutes of the run
    late = status_json(db_path, T0 + 30 + 900)
    assert late["processor_stalled"] and late["last_text_at"] == T0 + 700
    assert late["warnings"] == ["no processor has run for 15 min while 1 batch waits: is cron or "
                                "smsbatch-process.timer running `smsbatch process`?"]
    human = invoke(["status", "--now", repr(T0 + 930)], env_for(db_path, COLUMNS=80, LINES=24)).output
    lines = human.splitlines()
    assert "last text stored 3m ago · last processor run 15m ago" in human
    warning = next(i for i, line in enumerate(lines) if line.startswith("WARNING: no processor has run for 15 min"))
    assert lines[warning + 1].startswith("  ") and lines[warning + 1].endswith("running `smsbatch process`?")
    assert all(len(line) <= 80 for line in lines)  # wrapped, not cut


@pytest.mark.parametrize("pending, last_run, now, expected", [
    (0, None, T0, False),            # nothing waits: no processor needed
    (3, None, T0, True),             # batches wait and none ever ran
    (3, T0 - 179, T0, False),        # ran within 3 minutes
    (3, T0 - 180, T0, True),         # 3 minutes without one
    (0, T0 - 9999, T0, False),
])
def test_stalled_is_a_pure_decision_on_pending_batches_and_the_last_run(pending, last_run, now, expected):
    assert attention.idle(pending, last_run, now) is expected


def test_a_long_stall_is_said_in_days():
    info = {"pending": 3, "last_run_at": T0 - 5 * 86400}
    assert report.warnings(info, T0) == ["no processor has run for 5 days while 3 batches wait: is cron or "
                                         "smsbatch-process.timer running `smsbatch process`?"]


# -- status: 80x24 with its header always on screen --------------------------------


@pytest.fixture
def busy(db_path, store, settings):
    """Forty batches to two of our numbers, two of them in flight; 21 answered, replies with and without
    receipts, two undelivered and one failed; a batch failed with a long Twilio error."""
    for n in range(40):
        add(store, f"+1555444{n:04d}", f"text {n}", T0 + n, to=SALES if n % 2 else SUPPORT)
    process(db_path, T0 + 30, *OFFLINE)  # the first twenty are due and answered
    sids = [r[0] for r in store.conn.execute("SELECT sid FROM outbound ORDER BY sent_at, sid")]
    for sid, (status, code) in zip(sids, [("delivered", None)] * 10 + [("undelivered", 30007), ("undelivered", 30003),
                                                                        ("failed", 30005)]):
        store.record_delivery(sid, status, code, T0 + 40)
    claimed, _ = store.claim_due(T0 + 60, 3, 60, 3600, holder="web1:4242")
    store.finish(claimed[0], "failed", T0 + 61, "Twilio error 21211: Unable to create record: The 'To' number "
                 "+15554440020 is not a valid phone number. (after 3 attempts)")
    return claimed


def test_plain_status_fits_80x24_with_its_header_first_however_many_batches(busy, db_path):
    result = invoke(["status", "--now", repr(T0 + 62)], env_for(db_path, COLUMNS=80, LINES=24))
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert len(lines) <= 23 and all(len(line) <= 80 for line in lines), lines  # a line spare for the prompt
    assert lines[0].startswith("smsbatch ") and lines[1].startswith("pending ")
    assert "last processor run 32s ago" in result.output
    # the delivery counts on a line of their own, none cut off; no receipt yet said as such
    replies = next(line for line in lines if line.startswith("replies:"))
    assert "delivered 10" in replies and "undelivered 2" in replies and "· failed 1" in replies
    assert "console (no receipts) 8" in replies and "queued" not in replies  # console sends: none will come
    header = next(line for line in lines if line.startswith("batch "))
    assert header.split() == ["batch", "phone", "to", "texts", "state", "age", "tries", "error"]
    rows = lines[lines.index(header) + 1:]
    assert len(rows) >= 3 and all(re.match(r"[a-z0-9]{10} \+1555444\d{4} …(0000|1111) ", row) for row in rows), rows
    for columns, cut in ((80, "Twilio …phone number."), (100, "Twilio error 21211: …valid phone number.")):
        everything = invoke(["status", "--latest", "40", "--now", repr(T0 + 62)], env_for(db_path, COLUMNS=columns))
        failed = next(row for row in everything.output.splitlines() if row.startswith(busy[0]["id"]))
        assert failed.endswith(" " + cut) and len(failed) <= columns  # the middle cut, its reason kept


def test_status_with_latest_prints_that_many_batches(busy, db_path):
    result = invoke(["status", "--latest", "30", "--now", repr(T0 + 62)], env_for(db_path, COLUMNS=80, LINES=24))
    lines = result.output.splitlines()
    header = next(line for line in lines if line.startswith("batch "))
    assert len(lines[lines.index(header) + 1:]) == 30


def test_status_shows_one_number_column_only_when_there_are_several(db_path, store):
    add(store, A, "hi", T0)
    result = invoke(["status", "--now", repr(T0 + 5)], env_for(db_path, COLUMNS=80, LINES=24))
    header = next(line for line in result.output.splitlines() if line.startswith("batch "))
    assert header.split() == ["batch", "phone", "texts", "state", "age", "tries", "error"]


# -- deliveries for a period ---------------------------------------------------------


def test_deliveries_lists_undelivered_and_failed_replies_for_a_period(busy, db_path, store):
    store.record_manual("SMbyhand" + "0" * 24, C, SALES, "sorry!", T0 - 30 * 86400)
    store.record_delivery("SMbyhand" + "0" * 24, "failed", 30004, T0 - 30 * 86400)  # long before the period
    result = invoke(["deliveries", "--since", "2h", "--now", repr(T0 + 3600), "--json"], env_for(db_path))
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["since"] == T0 + 3600 - 7200 and info["statuses"] == ["undelivered", "failed"]
    replies = info["replies"]
    assert sorted(r["status"] for r in replies) == ["failed", "undelivered", "undelivered"]
    assert all(r["batch_id"] and r["sid"] and r["phone"].startswith("+1555444") and r["our_number"] in (SALES, SUPPORT)
               for r in replies)
    assert {r["error"] for r in replies} >= {"undelivered: 30007 carrier filtered (spam)",
                                             "failed: 30005 unknown number (does not exist)"}
    human = invoke(["deliveries", "--since", "2h", "--now", repr(T0 + 3600)], env_for(db_path)).output.splitlines()
    assert human[0].startswith("3 replies (undelivered or failed) sent ") and len(human) == 4
    assert all(re.match(r"  \d{4}-\d\d-\d\dT\S+Z  batch [a-z0-9]{10}  SM\w+  to \+1555444\d{4} from \+1555000", line)
               for line in human[1:]), human
    older = json.loads(invoke(["deliveries", "--since", "60d", "--now", repr(T0 + 3600), "--json"],
                              env_for(db_path)).output)["replies"]
    assert len(older) == 4 and older[-1]["batch_id"] is None  # the one sent by hand, 30 days ago
    waiting = json.loads(invoke(["deliveries", "--since", "2h", "--status", "no_receipt", "--now", repr(T0 + 3600),
                                 "--json"], env_for(db_path)).output)["replies"]
    assert len(waiting) == 8 and {r["error"] for r in waiting} == {"console (no receipts)"}  # console sends


@pytest.mark.parametrize("args, said", [(["--status", "lost"], "'lost': choose from"),
                                        (["--since", "last week"], "bad time 'last week'"),
                                        (["--since", "1h", "--until", "2h"], "must not be before --since")])
def test_deliveries_refuses_bad_input_in_one_line(db_path, args, said):
    result = invoke(["deliveries", *args], env_for(db_path))
    assert result.exit_code == 2 and said in result.output and "Traceback" not in result.output


# -- honest figures ------------------------------------------------------------------


def test_stats_keeps_the_saving_from_batching_apart_from_retries(db_path, openai_standin, twilio_standin, store):
    """Three texts from A in one burst, one each from B and C; every batch's AI call fails twice
    (HTTP 500) before it answers. One call per text would have made 5 calls; batching made 3:
    2 saved. The 6 extra requests are retries', not a negative saving."""
    for n in range(3):
        add(store, A, f"part {n}", T0 + n)
    add(store, B, "hi", T0)
    add(store, C, "hello", T0)
    env = provider_env(openai_standin, twilio_standin, SMSBATCH_DB=db_path, SMSBATCH_AI_CLIENT_RETRIES=0,
                       SMSBATCH_RETRY_BASE_SECONDS=1, SMSBATCH_AI_TIMEOUT_SECONDS=2, SMSBATCH_SMS_TIMEOUT_SECONDS=2,
                       SMSBATCH_BACKFILL=0)
    openai_standin.script = [500] * 6
    for at in (T0 + 60, T0 + 120, T0 + 180):
        process(db_path, at, "--concurrency", "1", env=env)
    assert len(twilio_standin.sent) == 3
    info = json.loads(invoke(["stats", "--since", "1d", "--now", repr(T0 + 3600), "--json"], env_for(db_path)).output)
    t = info["totals"]
    assert (t["ai_requests"], t["ai_calls_saved"], t["retry_requests"], t["uncounted_batches"]) == (9, 2, 6, 0)
    human = invoke(["stats", "--since", "1d", "--now", repr(T0 + 3600)], env_for(db_path, COLUMNS=80)).output
    assert "AI calls saved by batching: 2 (5 texts, 3 calls: one per batch)" in human
    assert "extra AI requests from retries: 6" in human and "-4" not in human


def test_stats_on_an_upgraded_database_does_not_count_uncounted_batches_as_saved(tmp_path):
    """A first-release database: its answered batch made AI calls nobody counted (ai_requests 0
    after the upgrade). It is left out and said so, not counted as 2 calls saved."""
    from legacy import T, make_v1_database

    path = str(tmp_path / "v1.db")
    make_v1_database(path)
    assert invoke(["--db", path, "migrate"]).exit_code == 0
    process(path, T + 100, *OFFLINE, env={"SMSBATCH_DB": path})  # answers the queued 2-text and open 1-text batches
    info = json.loads(invoke(["--db", path, "stats", "--since", "1d", "--now", repr(T + 3600), "--json"]).output)
    t = info["totals"]
    assert (t["answerable"], t["ai_requests"], t["ai_calls_saved"], t["uncounted_batches"]) == (6, 2, 1, 1)
    assert not info["ai_requests_exact"]
    human = invoke(["--db", path, "stats", "--since", "1d", "--now", repr(T + 3600)], {"COLUMNS": "80"}).output
    assert "AI calls saved by batching: 1 (3 texts, 2 calls: one per batch)" in human
    assert "note: 1 batch answered before AI calls were counted (schema 7) is left out" in human


def test_stats_chart_spends_one_line_on_a_run_of_empty_days(db_path, store):
    add(store, A, "early", T0)
    add(store, A, "late", T0 + 20 * 86400)
    result = invoke(["stats", "--since", "30d", "--now", repr(T0 + 20 * 86400 + 60)], env_for(db_path, COLUMNS=80))
    chart = result.output.split("texts and AI calls per day\n")[1].splitlines()
    empty = [line for line in chart if "no texts, no AI calls" in line]
    assert len(empty) == 2 and len(chart) == 2 + 2 * 2, chart  # before and between; two lines a busy day
    assert empty[1] == "01-16 to 02-03  no texts, no AI calls", empty
    table = result.output.split("\n\n")[1].splitlines()
    assert len(table) == 1 + 4, table  # the header, two busy days, two runs of empty days
    assert table[1] == "2027-01-05 to 01-14: nothing (10 days)" and table[3] == "2027-01-16 to 02-03: nothing (19 days)"


def test_show_phone_says_fitted_only_when_the_quiet_period_was_fitted(db_path, store):
    env = env_for(db_path, SMSBATCH_ADAPTIVE=1, COLUMNS=120)
    add(store, A, "hi", T0)
    new = invoke(["show", A, "--now", repr(T0 + 5)], env)
    assert "fitted to their pace" not in new.output
    assert "(default: too few recent texts to fit)" in new.output
    for n in range(1, 8):  # a quick typer: 3 s between texts
        add(store, A, f"part {n}", T0 + 3 * n)
    known = json.loads(invoke(["show", A, "--json", "--now", repr(T0 + 25)], env).output)["quiet_period"]
    assert known["fitted"] and known["adaptive"]
    assert "fitted to their pace" in invoke(["show", A, "--now", repr(T0 + 25)], env).output


# -- durations wherever a time is taken ----------------------------------------------


def test_backfill_takes_a_duration_or_a_time(db_path, openai_standin, twilio_standin):
    env = provider_env(openai_standin, twilio_standin, SMSBATCH_DB=db_path)
    sid = twilio_standin.deliver_inbound(A, SALES, "did you get this?", T0 - 3600)
    hours = json.loads(invoke(["backfill", "--since", "2h", "--now", repr(T0), "--dry-run", "--json"], env).output)
    assert hours["since"] == T0 - 7200 and hours["until"] == T0 and [f["sid"] for f in hours["found"]] == [sid]
    recent = json.loads(invoke(["backfill", "--since", "30m", "--now", repr(T0), "--dry-run", "--json"], env).output)
    assert recent["found"] == []
    iso = json.loads(invoke(["backfill", "--since", "2027-01-15T06:00:00Z", "--until", "30m", "--now", repr(T0),
                             "--dry-run", "--json"], env).output)
    assert iso["until"] == T0 - 1800 and [f["sid"] for f in iso["found"]] == [sid]
    before = json.loads(invoke(["backfill", "--since", "3h", "--until", "90m", "--now", repr(T0),
                                "--dry-run", "--json"], env).output)
    assert before["found"] == []  # it came an hour ago: after --until


def test_stats_export_and_retry_take_a_duration_or_a_time(db_path, store):
    import time

    add(store, A, "old", T0 - 3 * 86400)
    add(store, A, "new", T0 - 3600)
    add(store, B, "days ago", time.time() - 3 * 86400)  # export has no --now: it counts from the clock
    add(store, B, "just now", time.time() - 60)
    iso = "2027-01-14T00:00:00Z"
    stats = json.loads(invoke(["stats", "--since", iso, "--now", repr(T0), "--json"], env_for(db_path)).output)
    assert stats["since"] == 1799884800.0 and stats["totals"]["texts"] == 1
    exported = invoke(["export", "--since", "2d"], env_for(db_path))
    assert exported.exit_code == 0, exported.output
    assert [json.loads(line)["body"] for line in exported.stdout.splitlines()] == ["just now", "old", "new"]
    since_epoch = invoke(["export", "--since", repr(T0 - 7200)], env_for(db_path)).stdout
    assert [json.loads(line)["body"] for line in since_epoch.splitlines()] == ["new"]
    retried = invoke(["retry", "--failed", "--since", iso, "--now", repr(T0), "--json"], env_for(db_path))
    assert retried.exit_code == 0, retried.output
    bad = invoke(["retry", "--failed", "--since", "yesterday"], env_for(db_path))
    assert bad.exit_code == 2 and "bad time 'yesterday'" in bad.output


# -- prune gives the space back ------------------------------------------------------


def sizes(path):
    return sum(os.path.getsize(p) for p in (path, path + "-wal") if os.path.exists(p))


def test_a_large_prune_gives_the_space_back_and_says_how_much(db_path, store):
    for n in range(600):
        add(store, f"+1555333{n:04d}", "x" * 1500, T0 - 200 * 86400 + n)
    store.conn.execute("UPDATE batches SET state = 'skipped', completed_at = first_at, closes_at = NULL")
    store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    before = sizes(db_path)
    result = invoke(["prune", "--older-than", "90d", "--now", repr(T0), "--json"], env_for(db_path))
    assert result.exit_code == 0, result.output
    space = json.loads(result.output)["space"]
    assert space["vacuumed"] and space["bytes_after"] < space["bytes_before"] / 4
    assert sizes(db_path) < before / 4  # the file itself shrank
    assert store.conn.execute("SELECT count(*) FROM messages").fetchone()[0] == 0


def test_a_small_prune_leaves_the_file_and_says_how_to_shrink_it(db_path, store):
    for n in range(200):
        add(store, f"+1555333{n:04d}", "x" * 1500, T0 - (200 if n < 20 else 1) * 86400 + n)
    store.conn.execute("UPDATE batches SET state = 'skipped', completed_at = first_at, closes_at = NULL")
    result = invoke(["prune", "--older-than", "90d", "--now", repr(T0)], env_for(db_path))
    assert result.exit_code == 0 and "deleted 20 batches" in result.output
    assert "free for new texts; `smsbatch prune --vacuum` gives it back to the disk" in result.output
    forced = invoke(["prune", "--older-than", "90d", "--now", repr(T0), "--vacuum"], env_for(db_path))
    assert "MiB back to the disk: the database is now" in forced.output


# -- when settings take effect ---------------------------------------------------------


def test_status_and_check_say_their_settings_are_this_shells(db_path):
    """`status` and `check` read the settings of the shell they run in; the processor reads its
    own at each start and `serve` when started: neither command claims to show theirs."""
    top = invoke(["status"], env_for(db_path, COLUMNS=80)).output.splitlines()[0]
    assert top.endswith("agent on (this shell's settings)")
    paused = invoke(["status"], env_for(db_path, COLUMNS=80, ENABLE_AI_SMS_AGENT="false")).output.splitlines()[0]
    assert "agent PAUSED (ENABLE_AI_SMS_AGENT off)" in paused and len(paused) <= 80
    checked = invoke(["check"], env_for(db_path, COLUMNS=200)).output
    assert checked.splitlines()[0] == ("settings (this shell's environment: `process` reads its own at each start, "
                                       "`serve` only when started)")


@pytest.mark.parametrize("error, width, shown", [
    ("AI returned HTTP 503: Service Unavailable (after 5 attempts)", 41, "AI returned HTTP 503: Service Unavailable"),
    ("send outcome unknown: Twilio call timed out (ReadTimeout); outcome unknown; check, then retry", 40,
     "send outcome unknown: …outcome unknown"),
    ("Twilio error 21610: Unable to create record: Attempt to send to unsubscribed recipient", 45,
     "Twilio error 21610: …unsubscribed recipient"),
    ("gave up after 5 attempts", 27, "gave up after 5 attempts"),
])
def test_a_long_error_loses_its_boilerplate_and_middle_not_its_reason(error, width, shown):
    from smsbatch.render_ops import brief_error

    assert brief_error(error, width) == shown and len(shown) <= width
