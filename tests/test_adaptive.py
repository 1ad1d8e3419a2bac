"""Adaptive quiet periods: the rule (batching.quiet_for), the store using it, schema 2, and
replays showing what it changes. Times are given, never waited for."""

import hashlib
import json
import os
import sqlite3

import pytest

from conftest import T0, add, invoke
from smsbatch import batching
from smsbatch.batching import Rules
from smsbatch.config import Settings
from smsbatch.db import SCHEMA_VERSION, Store
from smsbatch.errors import ConfigError
from smsbatch.simulate import Setup, replay
from smsbatch.tracegen import generate, read_trace, trace_line

pytestmark = pytest.mark.engines  # on SQLite and PostgreSQL (conftest.ENGINES)

DATA = os.path.join(os.path.dirname(__file__), "data")
ON = Rules(adaptive=True)
FAST, SLOW, NEW = "+15554440001", "+15554440002", "+15554440003"
US = "+15550000000"


def quiet(gaps, rules=ON):
    return batching.quiet_for(gaps, rules)


# -- the rule ---------------------------------------------------------------------


def test_someone_new_gets_the_fixed_quiet_period():
    assert quiet([]) == quiet([2.0]) == quiet([2.0, 2.0]) == 10.0  # fewer than 3 typing gaps
    assert quiet([2.0, 600.0, 2.0, 3600.0]) == 10.0  # pauses between conversations are not typing
    assert quiet([2.0, 2.0, 2.0], Rules(adaptive=True, quiet_seconds=7)) != 7  # three gaps are enough


def test_a_fast_typer_waits_less_and_a_slow_one_longer():
    fast = quiet([1.5, 2.0, 1.2, 1.8, 2.5, 1.4, 1.6, 2.2, 1.9])
    slow = quiet([12.0, 14.0, 11.0, 13.0, 16.0, 12.5, 15.0, 13.5])
    assert 4.0 <= fast < 6.0  # well past their gaps, far below 10 s
    assert slow == 20.0  # their gaps are longer than the fixed 10 s: the longest allowed
    middling = quiet([3.0, 5.0, 4.0, 2.5, 6.0, 3.5, 4.5, 3.0, 5.5, 4.0])
    assert 8.0 < middling < 11.0  # a 4 s typer is whom the fixed 10 s suits


def test_bounds_are_settings():
    rules = Rules(adaptive=True, adaptive_min_seconds=6.0, adaptive_max_seconds=15.0)
    assert quiet([1.0] * 10, rules) == 6.0
    assert quiet([25.0] * 10, rules) == 15.0
    assert quiet([25.0] * 10, Rules(adaptive=True, adaptive_pause_seconds=20.0)) == 10.0  # all pauses now


def test_a_person_whose_pace_changes_is_followed_as_their_new_gaps_fill_the_window():
    window = Rules().adaptive_window - 1  # gaps between the latest 20 texts
    slowing = [quiet(([1.5] * 19 + [13.0] * n)[-window:]) for n in range(20)]
    assert slowing[0] == 4.0 and slowing == sorted(slowing)
    assert slowing[4] < 10.0 < slowing[5] and slowing[12] < 20.0 == slowing[13]
    speeding = [quiet(([13.0] * 19 + [1.5] * n)[-window:]) for n in range(20)]
    assert speeding[0] == 20.0 and speeding == sorted(speeding, reverse=True) and speeding[-1] == 4.0


def test_adaptation_off_is_the_fixed_quiet_period_whatever_the_gaps():
    for gaps in ([], [1.0] * 19, [19.0] * 19):
        assert batching.quiet_for(gaps, Rules()) == 10.0
    off = Rules.from_settings(Settings.from_env({"SMSBATCH_ADAPTIVE": "0"}))
    assert off == Rules()  # the Rules() of the existing batching tests are exactly adaptation off


def test_due_at_keeps_max_wait_max_messages_and_urgent():
    rules = Rules(adaptive=True)
    assert batching.due_at(rules, T0, T0 + 30, 3, False, quiet=20.0) == T0 + 45  # max wait wins
    assert batching.due_at(rules, T0, T0 + 5, 3, False, quiet=20.0) == T0 + 25
    assert batching.due_at(rules, T0, T0 + 5, 10, False, quiet=20.0) == T0 + 5  # full
    assert batching.due_at(rules, T0, T0 + 5, 2, True, quiet=20.0) == T0 + 5  # urgent
    assert batching.due_at(rules, T0, T0 + 5, 2, False) == T0 + 15  # no quiet given: the fixed one


def test_settings_from_the_environment():
    s = Settings.from_env({"SMSBATCH_ADAPTIVE": "0", "SMSBATCH_ADAPTIVE_MIN_SECONDS": "3",
                           "SMSBATCH_ADAPTIVE_MAX_SECONDS": "30", "SMSBATCH_ADAPTIVE_PAUSE_SECONDS": "40"})
    assert (s.adaptive, s.adaptive_min_seconds, s.adaptive_max_seconds, s.adaptive_pause_seconds) == (
        False, 3.0, 30.0, 40.0)
    assert Settings.from_env({}).adaptive is True
    with pytest.raises(ConfigError, match="SMSBATCH_ADAPTIVE_MIN_SECONDS=25 is more than"):
        Settings.from_env({"SMSBATCH_ADAPTIVE_MIN_SECONDS": "25"})
    with pytest.raises(ConfigError, match="SMSBATCH_ADAPTIVE must be true or false"):
        Settings.from_env({"SMSBATCH_ADAPTIVE": "maybe"})
    with pytest.raises(ConfigError, match="SMSBATCH_ADAPTIVE_MIN_GAPS=5 needs more texts"):
        Settings.from_env({"SMSBATCH_ADAPTIVE_WINDOW": "5", "SMSBATCH_ADAPTIVE_MIN_GAPS": "5"})
    with pytest.raises(ConfigError, match="finite"):
        Settings.from_env({"SMSBATCH_ADAPTIVE_MAX_SECONDS": "inf"})


# -- the store, with given times -------------------------------------------------------


def texts(store, phone, offsets, rules=ON, start=T0):
    return [add(store, phone, f"t{i}", start + o, rules=rules) for i, o in enumerate(offsets)]


def test_store_gives_each_person_their_own_quiet_period_and_records_it(store):
    texts(store, FAST, [0, 1.5, 3, 4.5, 6])  # 4 gaps of 1.5 s
    texts(store, SLOW, [0, 13, 26, 39])  # 3 gaps of 13 s, the last ending in the open batch
    add(store, NEW, "hi", T0, rules=ON)
    by_phone = {r["phone"]: r for r in store.conn.execute(
        "SELECT phone, last_at, closes_at, quiet_seconds, state FROM batches WHERE state = 'open'")}
    fast, slow, new = by_phone[FAST], by_phone[SLOW], by_phone[NEW]
    assert fast["quiet_seconds"] == quiet([1.5] * 4) < 10 and fast["closes_at"] == fast["last_at"] + fast["quiet_seconds"]
    assert new["quiet_seconds"] == 10.0 and new["closes_at"] == T0 + 10
    assert slow["quiet_seconds"] > 10
    latest = {r["phone"]: r for r in store.status(T0 + 40, latest=10)["latest"]}
    assert latest[FAST]["quiet_seconds"] == fast["quiet_seconds"]  # status --json shows it


def test_a_slow_typer_is_not_cut_off_once_their_pace_is_known(store):
    rules = Rules(adaptive=True, max_messages=100)
    texts(store, SLOW, [0, 13, 26, 39], rules)  # first burst (split under a fixed 10 s)
    store.claim_due(T0 + 100, 10, 300, 3600)
    later = texts(store, SLOW, [0, 14], rules, start=T0 + 200)
    batch = store.get_batch(later[-1].batch_id)
    assert batch["quiet_seconds"] == 20.0 and batch["closes_at"] == T0 + 214 + 20
    assert store.claim_due(T0 + 214 + 13, 10, 300, 3600)[0] == []  # 13 s after: still waiting
    third = add(store, SLOW, "and", T0 + 227, rules=rules)
    assert {a.batch_id for a in later} == {third.batch_id}


def test_a_burst_that_crosses_max_wait_closes_at_max_wait(store):
    rules = Rules(adaptive=True, max_messages=100)
    texts(store, SLOW, [0, 15, 30, 45], rules, start=T0 - 600)  # history: 15 s gaps
    store.claim_due(T0, 10, 300, 3600)
    burst = texts(store, SLOW, [0, 15, 30, 40], rules)
    batch = store.get_batch(burst[-1].batch_id)
    assert batch["message_count"] == 4 and batch["quiet_seconds"] == 20.0
    assert batch["closes_at"] == T0 + 45  # first text + max wait, not last + 20


@pytest.mark.sqlite_only  # reads SQLite itself (PRAGMA, trace callback, a shell line)
def test_only_texts_up_to_this_one_count_and_the_history_is_read_through_the_index(store):
    texts(store, FAST, [100, 101.5, 103, 104.5, 106])  # stored, but later than the next text
    statements = []
    store.conn.set_trace_callback(statements.append)
    early = add(store, FAST, "early", T0, rules=ON)
    store.conn.set_trace_callback(None)
    assert store.get_batch(early.batch_id)["quiet_seconds"] == 10.0  # later texts do not count: none before it
    history = [sql for sql in statements if "received_at <=" in sql]
    assert len(history) == 1
    plan = " ".join(r[-1] for r in store.conn.execute("EXPLAIN QUERY PLAN " + history[0]))
    assert "SEARCH messages USING COVERING INDEX messages_phone (phone=? AND received_at<?)" in plan
    assert "SCAN messages" not in plan
    assert "TEMP B-TREE" not in plan  # read in index order, at most the window, never sorted

# -- adaptation off is today's behaviour ----------------------------------------------


def test_generator_output_without_pace_spread_is_unchanged():
    """Digests of `generate` at 9ea5d1f, before --pace-spread existed."""
    for args, digest in (((30, 60, 1), "57192af23b5fe794"), ((7, 20, 5, 3.0, 6.0, 120.0, 1000.0), "d7d22db57ef39974")):
        assert hashlib.sha256("\n".join(generate(*args)).encode()).hexdigest()[:16] == digest


def test_adaptation_off_reproduces_the_replies_of_before():
    """tests/data/fixed_replies_seed1.json: every reply (time, texts) smsbatch made on a
    generated trace before adaptive quiet periods existed, with and without AI latency."""
    with open(os.path.join(DATA, "fixed_replies_seed1.json")) as f:
        before = json.load(f)["replies"]
    records = read_trace(list(generate(30, 60, 1)))[0]
    off = Settings(adaptive=False)
    for name, setup in {"default": Setup(settings=off), "ai3_tick1": Setup(settings=off, ai_latency=3)}.items():
        now = sorted([round(at, 3), sorted(sids)] for _, at, sids in replay(records, setup).replies)
        assert now == before[name]
    on = sorted([round(at, 3), sorted(sids)] for _, at, sids in replay(records, Setup()).replies)
    assert on != before["default"]  # the comparison can fail: adaptation does change replies


# -- schema 2 -------------------------------------------------------------------------


def test_a_version_1_database_upgrades_with_every_text_batch_and_opt_out_intact(tmp_path):
    path = str(tmp_path / "v1.db")
    conn = sqlite3.connect(path)
    with open(os.path.join(DATA, "schema_v1.sql")) as f:
        conn.executescript(f.read())
    conn.executescript(f"""
        INSERT INTO batches (id, phone, our_number, state, message_count, first_at, last_at, due_at,
                             created_at, provider_sid, response_text, sent_at)
            VALUES ('sentbatch1', '{SLOW}', '{US}', 'sent', 2, {T0}, {T0 + 13}, NULL, {T0}, 'SMreply1', 'hi!', {T0 + 30});
        INSERT INTO batches (id, phone, our_number, state, message_count, first_at, last_at, due_at, created_at)
            VALUES ('openbatch1', '{SLOW}', '{US}', 'open', 1, {T0 + 100}, {T0 + 100}, {T0 + 110}, {T0 + 100});
        INSERT INTO phones (phone, open_batch) VALUES ('{SLOW}', 'openbatch1');
        INSERT INTO messages (sid, phone, our_number, body, kind, received_at, batch_id) VALUES
            ('SMv1a', '{SLOW}', '{US}', 'hello', 'text', {T0}, 'sentbatch1'),
            ('SMv1b', '{SLOW}', '{US}', 'are you there', 'text', {T0 + 13}, 'sentbatch1'),
            ('SMv1c', '{SLOW}', '{US}', 'one more', 'text', {T0 + 100}, 'openbatch1');
        INSERT INTO opt_outs (phone, since, keyword) VALUES ('+15554449999', {T0}, 'STOP');
        PRAGMA user_version = 1;
    """)
    v1_columns = [r[1] for r in conn.execute("PRAGMA table_info(batches)")]
    before = {"batches": conn.execute(f"SELECT {', '.join(v1_columns)} FROM batches ORDER BY 1").fetchall(),
              "messages": conn.execute("SELECT * FROM messages ORDER BY 1").fetchall()}
    conn.close()
    result = invoke(["--db", path, "migrate"])
    assert result.exit_code == 0, result.output
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    # step 11: the sent batch had no due_at, the open one's was its closing time
    kept = ["closes_at" if c == "due_at" else c for c in v1_columns]
    assert conn.execute(f"SELECT {', '.join(kept)} FROM batches ORDER BY 1").fetchall() == before["batches"]
    assert {r[0] for r in conn.execute("SELECT quiet_seconds FROM batches")} == {None}
    assert conn.execute("SELECT * FROM messages ORDER BY 1").fetchall() == before["messages"]
    assert conn.execute("SELECT phone FROM opt_outs").fetchall() == [("+15554449999",)]
    conn.close()
    # the old open batch takes a new text (its quiet period was never recorded) and is answered
    store = Store(path)
    joined = add(store, SLOW, "and another", T0 + 105, rules=ON)
    assert joined.batch_id == "openbatch1"
    assert store.get_batch("openbatch1")["quiet_seconds"] is not None
    store.close()
    env = {"SMSBATCH_DB": path}
    out = invoke(["process", "--now", str(T0 + 200), "--ai", "offline", "--sms", "console", "--json"], env)
    assert json.loads(out.stdout)["sent"] == 1
    status = json.loads(invoke(["status", "--json", "--now", str(T0 + 200)], env).stdout)
    assert {r["id"]: r["quiet_seconds"] for r in status["latest"]}["sentbatch1"] is None


# -- replays ----------------------------------------------------------------------------

# Two people, three bursts each, a minute and a half apart: one types fast (2 s gaps), one
# slowly (12-14 s gaps: longer than a fixed 10 s quiet period).
PACED = [(b * 90 + o, FAST) for b in range(3) for o in (0, 2, 4, 6)] + \
        [(b * 90 + o, SLOW) for b in range(3) for o in (1, 13, 27, 40)]


def paced_trace():
    return [trace_line(phone, US, f"text {i}", f"SMp{i:03d}", T0 + at) for i, (at, phone) in enumerate(PACED)]


def burst_of(sid):
    at, phone = PACED[int(sid[3:])]
    return phone, int(at // 90)


def run_through_cli(db_path, adaptive):
    """The paced trace through `ingest --jsonl` and `process --now` every second, as cron and
    `process --for` would see it. Returns {batch id: set of bursts} and the latencies."""
    env = {"SMSBATCH_DB": db_path, "SMSBATCH_ADAPTIVE": str(adaptive)}
    lines = sorted(paced_trace(), key=lambda ln: json.loads(ln)["at"])
    for now in range(int(T0), int(T0) + 3 * 90 + 30):
        chunk = [ln for ln in lines if now - 1 < json.loads(ln)["at"] <= now]
        if chunk:
            assert invoke(["ingest", "--jsonl", "-", "--now", str(now)], env, input="\n".join(chunk)).exit_code == 0
        result = invoke(["process", "--now", str(now), "--ai", "offline", "--sms", "console", "--json"], env)
        assert result.exit_code == 0, result.output
    conn = sqlite3.connect(db_path)
    bursts = {}
    for batch, sid in conn.execute("SELECT batch_id, sid FROM messages"):
        bursts.setdefault(batch, set()).add(burst_of(sid))
    sent = {r[0]: (r[1], r[2], r[3]) for r in conn.execute(
        "SELECT id, phone, sent_at - last_at, quiet_seconds FROM batches WHERE state = 'sent'")}
    conn.close()
    return bursts, sent


def split_bursts(bursts, sent):
    """Bursts whose texts were answered by more than one reply."""
    replies = {}
    for batch, keys in bursts.items():
        if batch in sent:
            for key in keys:
                replies[key] = replies.get(key, 0) + 1
    return sorted(k for k, n in replies.items() if n > 1)


@pytest.mark.parametrize("adaptive", [0, 1])
def test_replay_through_ingest_and_process(tmp_path, adaptive):
    path = str(tmp_path / f"adaptive{adaptive}.db")
    Store(path).migrate()
    bursts, sent = run_through_cli(path, adaptive)
    split = split_bursts(bursts, sent)
    fast_latency = [lat for phone, lat, _ in sent.values() if phone == FAST]
    if not adaptive:  # a fixed 10 s cuts every one of the slow typer's bursts
        assert split == [(SLOW, 0), (SLOW, 1), (SLOW, 2)]
        assert all(lat >= 10 for lat in fast_latency)
    else:  # only the first, before their pace is known; the fast typer is answered sooner
        assert split == [(SLOW, 0)]
        assert sorted(fast_latency) == [6.0, 6.0, 7.0]  # even the first burst: its own gaps count
        assert {q for phone, _, q in sent.values() if phone == SLOW} >= {20.0}


def test_show_phone_tells_the_quiet_period_a_person_gets_now(tmp_path):
    path = str(tmp_path / "show.db")
    Store(path).migrate()
    store = Store(path)
    for i in range(8):  # a slow typer: 13 s between texts
        add(store, SLOW, f"part {i}", T0 + 13 * i, rules=ON)
    store.close()
    env = {"SMSBATCH_DB": path}
    later = str(T0 + 300)
    adaptive = json.loads(invoke(["show", SLOW, "--json", "--now", later], env).stdout)["quiet_period"]
    fixed = json.loads(invoke(["show", SLOW, "--json", "--now", later], env | {"SMSBATCH_ADAPTIVE": "0"}).stdout)
    assert adaptive["adaptive"] and adaptive["fitted"] and adaptive["seconds"] > 10
    assert fixed["quiet_period"] == {"seconds": 10.0, "adaptive": False, "fitted": False}
    human = invoke(["show", SLOW, "--now", later], env).stdout
    assert f"quiet period for their next text: {adaptive['seconds']:g} s (fitted to their pace)" in human
