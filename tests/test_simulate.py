"""`simulate`, `export` and traces: hand-built traces with known answers, and the CLI."""

import json
import sqlite3

import pytest

from conftest import T0, invoke
from smsbatch import batching
from smsbatch.config import Settings
from smsbatch.errors import InvalidInput
from smsbatch.inputs import check_phone, parse_time
from smsbatch.simulate import Setup, measure, parse_sweep, replay, replay_seed, simulate
from smsbatch.tracegen import Anonymizer, generate, read_trace, trace_line

A, B, C, D, E = "+15557770001", "+15557770002", "+15557770003", "+15557770004", "+15557770005"
US = "+15550000000"
LATER = str(T0 + 86400)  # `ingest --now`: the traces here lie after the wall clock
assert T0 % 60 == 0  # the seed design's slots and cron minutes start at T0


def trace(*texts):
    """(offset seconds, phone, body) -> JSONL lines with sids SM0, SM1, ..."""
    return [trace_line(phone, US, body, f"SM{i}", T0 + offset) for i, (offset, phone, body) in enumerate(texts)]


def records(*texts):
    return read_trace(trace(*texts))[0]


def reply_sets(outcome):
    return sorted((round(at - T0, 3), set(sids)) for _, at, sids in outcome.replies)


def test_burst_across_a_15_second_boundary_gets_one_reply_from_us_and_two_from_the_seed():
    burst = records((12, A, "hi"), (14, A, "quick question"), (17, A, "about my claim"))
    ours = replay(burst, Setup())
    assert reply_sets(ours) == [(27, {"SM0", "SM1", "SM2"})]  # quiet period after the last text
    seed = replay_seed(burst)
    assert reply_sets(seed) == [(60, {"SM0", "SM1"}), (60, {"SM2"})]  # two slots, both at the next cron run
    assert measure(ours)["split_texts"] == 0 and measure(seed)["split_texts"] == 3
    assert measure(seed)["ai_calls"] == 2 and measure(ours)["ai_calls"] == 1


def test_text_arriving_while_the_ai_answers_supersedes_and_one_reply_covers_both():
    texts = records((0, A, "hi"), (13, A, "and one more thing"))
    outcome = replay(texts, Setup(ai_latency=5))
    # due at 10, the AI answers until 15; the text at 13 folds the batch into the next one
    assert outcome.superseded == 1 and outcome.ai_calls == 2
    assert reply_sets(outcome) == [(28, {"SM0", "SM1"})]  # due 23, answered 5 s later
    without = replay(texts, Setup(ai_latency=5, settings=Settings(supersede=False)))
    assert reply_sets(without) == [(15, {"SM0"}), (28, {"SM1"})]
    assert measure(without)["replies_while_typing"] == 1 and measure(outcome)["replies_while_typing"] == 0


def test_a_person_who_never_stops_typing_is_answered_at_the_maximum_wait():
    texts = records(*[(i * 5, A, f"text {i}") for i in range(25)])  # every 5 s for 2 minutes
    outcome = replay(texts, Setup(settings=Settings(max_messages=100, adaptive=False)))
    first_at, first = reply_sets(outcome)[0]
    assert first_at == 45 and first == {f"SM{i}" for i in range(10)}  # the text at 45 s made it in
    assert [at for at, _ in reply_sets(outcome)] == [45, 95, 130]  # max wait, max wait, quiet after 120


def test_cron_tick_and_concurrency_delay_replies_to_the_grid_and_the_next_wave():
    texts = records((0, A, "a"), (1, B, "b"), (2, C, "c"))
    assert [at for at, _ in reply_sets(replay(texts, Setup(tick=60)))] == [60, 60, 60]
    together = records((0, A, "a"), (0, B, "b"), (0, C, "c"))
    waves = replay(together, Setup(ai_latency=2, concurrency=2))
    assert [at for at, _ in reply_sets(waves)] == [12, 12, 14]  # the third waits for a free slot
    assert measure(waves)["latency"]["max"] == 14


def test_keywords_get_no_reply_and_an_opted_out_phone_none_later():
    texts = records((0, A, "hi"), (20, A, "STOP"), (40, A, "hello?"), (0, B, "URGENT help"))
    outcome = replay(texts, Setup())
    assert reply_sets(outcome) == [(0, {"SM3"}), (10, {"SM0"})]  # urgent: due at once
    metrics = measure(outcome)
    assert metrics["texts"] == 4 and metrics["never_answered"] == 1  # "hello?" after STOP


def test_seed_never_answers_a_text_landing_in_a_slot_it_already_answered():
    texts = records((0, A, "hi"), (13, A, "one more"))
    seed = replay_seed(texts, offset=12)  # its cron fires 12 s after the minute
    assert reply_sets(seed) == [(12, {"SM0"})]
    assert measure(seed)["never_answered"] == 1


def test_seed_answers_at_most_five_slots_a_minute():
    phones = [f"+1555888{i:04d}" for i in range(12)]
    seed = replay_seed(records(*[(0, p, "hi") for p in phones]))
    assert [at for at, _ in reply_sets(seed)] == [60] * 5 + [120] * 5 + [180] * 2


def test_metrics_on_a_hand_built_outcome():
    texts = records((0, A, "a"), (4, A, "b"), (30, A, "c"), (0, B, "d"))
    outcome = replay(texts, Setup())
    metrics = measure(outcome, burst_gap=10)
    assert metrics["replies"] == 3 and metrics["ai_calls_per_text"] == 0.75
    assert metrics["latency"]["p50"] == 10 and metrics["latency"]["max"] == 10
    assert sum(b["replies"] for b in metrics["latency"]["histogram"]) == 3
    assert [b["replies"] for b in metrics["latency"]["histogram"] if b["from"] == 10] == [3]


def test_simulate_matches_a_real_ingest_and_process_run(tmp_path, db_path):
    """The same trace through `ingest --jsonl` + `process --now T` every 5 s makes the same batches."""
    lines = trace(
        (0, A, "hi"), (2.5, A, "quick question"), (6, A, "about my claim"),
        (1, B, "hello"), (12.2, B, "still there?"), (13, B, "ok"),
        (3, C, "my pipe burst"), (4, C, "EMERGENCY"), (5, C, "please come"),
        *[(10 + i * 4, D, f"typing {i}") for i in range(15)],
        (20, E, "hi"), (22, E, "STOP"), (24, E, "sorry"), (40, E, "START"), (41, E, "hi again"),
    )
    ordered = sorted(lines, key=lambda ln: json.loads(ln)["at"])
    env = {"SMSBATCH_DB": db_path}
    sent = 0
    for now in range(int(T0), int(T0) + 200, 5):
        chunk = [ln for ln in ordered if now - 5 < json.loads(ln)["at"] <= now]
        if chunk:
            assert invoke(["ingest", "--jsonl", "-", "--now", str(now)], env, input="\n".join(chunk)).exit_code == 0
        result = invoke(["process", "--now", str(now), "--ai", "offline", "--sms", "console", "--json"], env)
        sent += json.loads(result.stdout)["sent"]
    conn = sqlite3.connect(db_path)
    real = {}
    for batch, sid in conn.execute("SELECT batch_id, sid FROM messages"):
        real.setdefault(batch, set()).add(sid)
    real_replies = sorted((at - T0, real[batch]) for batch, at in
                          conn.execute("SELECT id, sent_at FROM batches WHERE state = 'sent'"))
    outcome = replay(read_trace(lines)[0], Setup(tick=5))
    assert sorted(map(sorted, real.values())) == sorted(map(sorted, outcome.groups))
    assert real_replies == reply_sets(outcome) and sent == len(outcome.replies) >= 5
    cli = json.loads(invoke(["simulate", "--tick", "5", "--json", "-"], input="\n".join(lines)).stdout)
    assert cli["results"][0]["replies"] == sent


def test_sweep_gives_one_row_per_value_and_compare_adds_the_seed():
    texts = records(*[(i * 7, A, f"t{i}") for i in range(5)], (100, B, "hi"))
    report = simulate(texts, Setup(settings=Settings(adaptive=False)), compare=True, sweep=parse_sweep("quiet=4,8"))
    assert [r["label"] for r in report["results"]] == ["quiet=4", "quiet=8", "seed design"]
    assert [r["settings"].get("quiet") for r in report["results"]] == [4, 8, None]
    assert [r["replies"] for r in report["results"][:2]] == [6, 2]  # 7 s gaps: split by 4 s, kept by 8 s


@pytest.mark.parametrize("text", ["quiet", "speed=1", "quiet=", "quiet=a", "max-messages=2.5", "tick=0"])
def test_bad_sweep_is_refused(text):
    with pytest.raises(InvalidInput):
        parse_sweep(text)


def test_generate_is_deterministic_and_follows_the_burst_model():
    one = list(generate(30, 60, seed=5, start=T0))
    assert one == list(generate(30, 60, seed=5, start=T0)) and one != list(generate(30, 60, seed=6, start=T0))
    texts, repeats = read_trace(one)
    assert repeats == 0 and {t["our_number"] for t in texts} == {US} and len({t["phone"] for t in texts}) <= 30
    assert all(T0 <= t["at"] < T0 + 3600 for t in texts)
    assert all(batching.keyword_kind(t["body"]) is None for t in texts)
    single = read_trace(list(generate(20, 60, seed=1, burst_mean=1, start=T0)))[0]
    by_phone = {}
    for t in single:
        by_phone.setdefault(t["phone"], []).append(t["at"])
    gaps = [b - a for times in by_phone.values() for a, b in zip(times, times[1:])]
    assert min(gaps) > 1 and sum(gaps) / len(gaps) > 200  # bursts of one: only the long pauses


def test_read_trace_names_the_bad_line():
    lines = trace((0, A, "hi")) + ["", '{"from": "abc", "to": "+15550000000", "at": 1}', "not json"]
    with pytest.raises(InvalidInput, match=r"t.jsonl line 3: bad 'from'"):
        read_trace(lines, "t.jsonl")
    assert read_trace(trace((0, A, "hi")) * 2)[1] == 1  # a repeated sid is kept once


# -- the command line ------------------------------------------------------------------


def write(tmp_path, lines, name="trace.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_simulate_json_is_one_document_with_every_metric(tmp_path):
    path = write(tmp_path, trace((12, A, "hi"), (14, A, "quick"), (17, A, "claim")))
    result = invoke(["simulate", path, "--compare", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    ours, seed = report["results"]
    assert report["trace"]["texts"] == 3 and ours["replies"] == 1 and seed["replies"] == 2
    for key in ("texts", "batches", "ai_calls", "ai_calls_per_text", "replies", "replies_while_typing",
                "split_texts", "never_answered"):
        assert key in ours and key in seed
    assert set(ours["latency"]) == {"p50", "p95", "max", "histogram"}


def test_simulate_human_output_shows_the_table_and_histogram(tmp_path):
    path = write(tmp_path, trace((12, A, "hi"), (14, A, "quick"), (17, A, "claim")))
    result = invoke(["simulate", path, "--compare"])
    assert result.exit_code == 0 and "seed design" in result.output and "replies by latency" in result.output
    sweep = invoke(["simulate", path, "--sweep", "quiet=2,4", "--quiet", "9"])
    assert sweep.exit_code == 0 and "max wait 45 s" in sweep.output


def test_simulate_settings_come_from_options_then_the_environment(tmp_path):
    path = write(tmp_path, trace((0, A, "hi")))
    report = json.loads(invoke(["simulate", path, "--json"], {"SMSBATCH_QUIET_SECONDS": "7"}).stdout)
    assert report["results"][0]["settings"]["quiet"] == 7
    report = json.loads(invoke(["simulate", path, "--json", "--quiet", "3"], {"SMSBATCH_QUIET_SECONDS": "7"}).stdout)
    assert report["results"][0]["latency"]["max"] == 3


def test_bad_trace_line_is_one_error_line_with_its_number(tmp_path):
    path = write(tmp_path, trace((0, A, "hi")) + ['{"from": "+15557770001", "to": "+15550000000"}'])
    result = invoke(["simulate", path])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip().splitlines() == [f"Error: {path} line 2: missing 'at'"]


@pytest.mark.parametrize("args,message", [
    ([], "give a TRACE"), (["--sweep", "speed=1", "x"], "bad sweep"),
    (["--generate", "--compare"], "--generate writes a trace"),
])
def test_simulate_usage_errors(args, message):
    result = invoke(["simulate", *args])
    assert result.exit_code == 2 and message in result.output


def test_generate_then_simulate_round_trip(tmp_path):
    result = invoke(["simulate", "--generate", "--phones", "5", "--minutes", "20", "--seed", "3"])
    assert result.exit_code == 0 and "generated" in result.stderr
    lines = result.stdout.splitlines()
    assert lines == list(generate(5, 20, 3, start=parse_time("2026-01-05T09:00:00Z")))
    report = json.loads(invoke(["simulate", write(tmp_path, lines), "--json"]).stdout)
    assert report["trace"]["texts"] == len(lines) > 0


def test_export_round_trip_gives_the_same_texts(tmp_path, db_path):
    lines = trace((0, A, "hi"), (2, A, "ünïcode ✓"), (3, B, "STOP"), (4, C, ""), (5.125, D, "urgent: help"))
    env = {"SMSBATCH_DB": db_path}
    invoke(["ingest", "--jsonl", "-", "--now", LATER], env, input="\n".join(lines))
    result = invoke(["export", "--jsonl"], env)
    assert result.exit_code == 0 and "exported 5 texts" in result.stderr
    fresh = str(tmp_path / "fresh.db")
    invoke(["--db", fresh, "migrate"])
    assert invoke(["--db", fresh, "ingest", "--jsonl", "-", "--now", LATER], input=result.stdout).exit_code == 0
    query = "SELECT sid, phone, our_number, body, received_at, kind FROM messages ORDER BY received_at"
    assert sqlite3.connect(fresh).execute(query).fetchall() == sqlite3.connect(db_path).execute(query).fetchall()
    later = invoke(["export", "--since", str(T0 + 3)], env).stdout.splitlines()
    assert [json.loads(ln)["sid"] for ln in later] == ["SM2", "SM3", "SM4"]


def test_export_anonymize_hides_numbers_and_bodies_but_keeps_lengths_times_and_keywords(tmp_path, db_path):
    lines = trace((0, A, "my card is 4111"), (1, A, "call me"), (2, B, "STOP"), (3, C, "URGENT pipe"),
                  (4, "whatsapp:+15557770009", "hi"))
    env = {"SMSBATCH_DB": db_path}
    invoke(["ingest", "--jsonl", "-", "--now", LATER], env, input="\n".join(lines))
    out = invoke(["export", "--anonymize", "--key", "k1"], env).stdout
    assert out == invoke(["export", "--anonymize", "--key", "k1"], env).stdout  # stable for a key
    assert out != invoke(["export", "--anonymize", "--key", "k2"], env).stdout
    assert all(secret not in out for secret in ("7770001", "7770002", "4111", "call me", "pipe", "SM0"))
    rows, original = [json.loads(ln) for ln in out.splitlines()], [json.loads(ln) for ln in lines]
    assert [len(r["body"]) for r in rows] == [len(o["body"]) for o in original]
    assert [r["at"] for r in rows] == [o["at"] for o in original]
    assert rows[0]["from"] == rows[1]["from"] != rows[2]["from"] and rows[0]["to"] == rows[4]["to"]
    assert all(check_phone(r["from"]) and check_phone(r["to"]) for r in rows)
    assert rows[2]["body"] == "STOP" and batching.is_urgent(rows[3]["body"], ("urgent",))
    assert rows[4]["from"].startswith("whatsapp:+1555") and len({r["sid"] for r in rows}) == 5
    assert read_trace(out.splitlines())[1] == 0  # a valid trace, every sid distinct


def test_an_anonymized_trace_simulates_exactly_like_the_original(db_path):
    lines = list(generate(8, 30, seed=2, start=T0)) + trace((5, A, "STOP"), (7, B, "urgent!! call me"))
    env = {"SMSBATCH_DB": db_path}
    invoke(["ingest", "--jsonl", "-", "--now", LATER], env, input="\n".join(lines))
    anonymized = invoke(["export", "--anonymize"], env).stdout.splitlines()
    results = [simulate(read_trace(t)[0], Setup(), compare=True)["results"] for t in (lines, anonymized)]
    assert results[0] == results[1]


def test_anonymizer_pseudonyms_are_unique_even_when_the_hash_collides():
    anonymizer = Anonymizer("key")
    numbers = [f"+1444{i:07d}" for i in range(20000)]
    assert len({anonymizer.phone(n) for n in numbers}) == len(numbers)
    assert anonymizer.phone(numbers[0]) == Anonymizer("key").phone(numbers[0])


def test_export_key_needs_anonymize(db_path):
    result = invoke(["export", "--key", "k"], {"SMSBATCH_DB": db_path})
    assert result.exit_code == 2 and "--key only" in result.output


def test_generate_pace_spread_gives_each_person_their_own_pace():
    alike = read_trace(list(generate(20, 120, 4)))[0]
    paced = read_trace(list(generate(20, 120, 4, pace_spread=3.0)))[0]
    assert list(generate(20, 120, 4, pace_spread=1.0)) == list(generate(20, 120, 4))  # 1: as before

    def mean_gaps(recs):
        by_phone = {}
        for r in recs:
            by_phone.setdefault(r["phone"], []).append(r["at"])
        gaps = {p: [g for g in batching.gaps_between(t) if g < 60] for p, t in by_phone.items()}
        return sorted(sum(g) / len(g) for g in gaps.values() if len(g) >= 5)

    assert mean_gaps(alike)[-1] / mean_gaps(alike)[0] < 2.5
    assert mean_gaps(paced)[-1] / mean_gaps(paced)[0] > 4  # some type 1-2 s apart, others 10 s or more
    with pytest.raises(InvalidInput, match="pace-spread"):
        list(generate(2, 10, 1, pace_spread=0.5))
    result = invoke(["simulate", "--generate", "--phones", "5", "--minutes", "20", "--seed", "3", "--pace-spread", "3"])
    assert result.stdout.splitlines() == list(generate(5, 20, 3, start=parse_time("2026-01-05T09:00:00Z"),
                                                       pace_spread=3.0))


def test_sweep_adaptive_and_its_bounds_run_the_production_rule(tmp_path):
    # a slow typer: 13 s gaps, bursts two minutes apart
    path = write(tmp_path, trace(*[(b * 120 + i * 13, A, f"t{b}{i}") for b in range(4) for i in range(4)]))
    report = json.loads(invoke(["simulate", path, "--json", "--sweep", "adaptive=0,1"]).stdout)
    fixed, adaptive = report["results"]
    assert [r["label"] for r in report["results"]] == ["adaptive=0", "adaptive=1"]
    assert (fixed["settings"]["adaptive"], adaptive["settings"]["adaptive"]) == (False, True)
    assert fixed["replies"] == 16 and adaptive["replies"] < 8  # fixed 10 s answers every text alone
    bounds = json.loads(invoke(["simulate", path, "--json", "--sweep", "adaptive-max=10,20"]).stdout)
    assert [r["replies"] for r in bounds["results"]] == [16, adaptive["replies"]]
    off = json.loads(invoke(["simulate", path, "--json", "--adaptive", "0"]).stdout)["results"][0]
    env_off = json.loads(invoke(["simulate", path, "--json"], {"SMSBATCH_ADAPTIVE": "0"}).stdout)["results"][0]
    assert off["replies"] == env_off["replies"] == 16
    human = invoke(["simulate", path, "--sweep", "adaptive=0,1", "--burst-gap", "30"])
    assert human.exit_code == 0 and "adaptive quiet 4-20 s when on" in human.output
    assert "adaptive quiet 4-20 s" in invoke(["simulate", path]).output
    assert invoke(["simulate", path, "--adaptive", "2"]).exit_code == 2
