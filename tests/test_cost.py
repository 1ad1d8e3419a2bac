"""What replies cost, through the real openai and twilio clients against the stand-ins: the
reply budget told to the AI and kept, smart encoding, segments and Twilio's price stored,
and shown by show, stats and status."""

import json

import pytest

from conftest import T0, add, invoke, real_processor
from fakes import provider_env
from smsbatch import segments
from smsbatch.ai import budget_note
from smsbatch.config import Settings
from smsbatch.delivery import CHECK_AFTER_SECONDS
from smsbatch.sms import read_price

A = "+15553330001"
# A long answer: 24 sentences of 54 characters (1,300 in all), one curly quote in the first.
LONG = " ".join(f"Sentence {n:02d} of the answer, with what you asked for." for n in range(24)).replace(
    "what you", "what you\u2019ve", 1)


@pytest.fixture
def env(db_path, openai_standin, twilio_standin):
    return provider_env(openai_standin, twilio_standin, SMSBATCH_DB=db_path, SMSBATCH_AI_CLIENT_RETRIES=0,
                        SMSBATCH_AI_TIMEOUT_SECONDS=2, SMSBATCH_SMS_TIMEOUT_SECONDS=2)


def answer(env, store, clock, openai_standin, text=LONG, **extra):
    """One text from A, answered by the AI with `text`: the processor's run report."""
    openai_standin.script.append(("say", text))
    add(store, A, "tell me everything", T0)
    clock.now = T0 + 30
    return real_processor(Settings.from_env(env | {k: str(v) for k, v in extra.items()}), clock).run()


def reply_row(store):
    return store.conn.execute("SELECT * FROM outbound WHERE phone = ?", (A,)).fetchone()


def test_a_long_answer_with_a_curly_quote_is_smart_encoded_and_cut_to_the_budget(
        env, store, clock, openai_standin, twilio_standin):
    assert answer(env, store, clock, openai_standin).counts["sent"] == 1
    assert openai_standin.calls[0][1] == {"role": "system", "content": budget_note(3)}
    assert "at most 459 characters" in openai_standin.calls[0][1]["content"]
    [sms] = twilio_standin.sent
    body = sms["body"]
    assert "\u2019" not in body and "what you've" in body  # the look-alike, not the quote
    assert segments.count(body) == segments.Size("GSM-7", 3, len(body))
    assert body.endswith("asked for.") and 400 < len(body) <= 459 and LONG.replace("\u2019", "'").startswith(body)
    row = reply_row(store)
    assert (row["body"], row["segments"], row["encoding"], row["source"]) == (body, 3, "GSM-7", "ai")
    assert store.conn.execute("SELECT response_text FROM batches").fetchone()[0] == body


def test_without_smart_encoding_the_quote_stays_and_the_reply_is_counted_as_ucs2(
        env, store, clock, openai_standin, twilio_standin):
    answer(env, store, clock, openai_standin, SMSBATCH_SMART_ENCODING=0)
    body = twilio_standin.sent[0]["body"]
    assert "\u2019" in body and body.endswith("asked for.") and len(body) <= 201  # 3 x 67 UCS-2 units
    row = reply_row(store)
    assert (row["segments"], row["encoding"]) == (3, "UCS-2")


def test_a_budget_of_one_segment(env, store, clock, openai_standin, twilio_standin):
    answer(env, store, clock, openai_standin, SMSBATCH_MAX_SEGMENTS=1)
    assert "one text message: at most 160 characters" in openai_standin.calls[0][1]["content"]
    body = twilio_standin.sent[0]["body"]
    assert len(body) <= 160 and body.endswith(".") and reply_row(store)["segments"] == 1


def test_emoji_are_kept_and_counted_in_utf16_units(env, store, clock, openai_standin, twilio_standin):
    answer(env, store, clock, openai_standin, text="Thanks \U0001F600 we\u2019re on it.")
    assert twilio_standin.sent[0]["body"] == "Thanks \U0001F600 we\u2019re on it."
    row = reply_row(store)
    assert (row["segments"], row["encoding"]) == (1, "UCS-2")


def deliver(twilio_standin, price="-0.02370", unit="USD", status="delivered"):
    with twilio_standin.lock:
        for message in twilio_standin.sent:
            message.update(status=status, price=price, price_unit=unit)


def check_deliveries(env, clock):
    clock.now = T0 + 30 + CHECK_AFTER_SECONDS + 1
    real_processor(Settings.from_env(env), clock).run()


def test_twilios_price_is_stored_by_the_delivery_check_and_shown(env, store, clock, openai_standin, twilio_standin,
                                                                 db_path):
    answer(env, store, clock, openai_standin)
    assert reply_row(store)["price"] is None  # not priced yet
    deliver(twilio_standin)
    check_deliveries(env, clock)
    assert twilio_standin.fetched == [twilio_standin.sent[0]["sid"]]
    row = reply_row(store)
    assert (row["status"], row["price"], row["price_unit"]) == ("delivered", -0.0237, "USD")

    prompt, completion = store.conn.execute("SELECT prompt_tokens, completion_tokens FROM batches").fetchone()
    ai_cost = round((prompt * 0.15 + completion * 0.60) / 1e6, 6)  # gpt-4o-mini's list price
    stats = json.loads(invoke(["stats", "--now", str(T0 + 3600), "--json"], env).output)
    totals, [day] = stats["totals"], [d for d in stats["days"] if d["replies"]]
    for figures in (totals, day):
        assert (figures["sms_segments"], figures["sms_priced"], figures["sms_cost"]) == (3, 1, {"USD": 0.0237})
        assert figures["ai_cost"] == {"USD": ai_cost} and figures["ai_calls_saved"] == 0
    status = json.loads(invoke(["status", "--now", str(T0 + 3600), "--json"], env).output)
    assert status["today"] == {"day": "2027-01-15", "replies": 1, "sms_segments": 3, "sms_priced": 1,
                               "sms_cost": {"USD": 0.0237}, "prompt_tokens": prompt,
                               "completion_tokens": completion, "ai_cost": {"USD": ai_cost}}

    human = invoke(["status", "--now", str(T0 + 3600)], env | {"COLUMNS": "80", "LINES": "24"}).output
    assert any(line.startswith("today: 1 reply, 3 SMS segments $0.0237 · AI $") for line in human.splitlines())
    assert all(len(line) <= 80 for line in human.splitlines())
    shown = invoke(["show", row["batch_id"]], env | {"COLUMNS": "200"}).output
    assert "3 SMS segments, GSM-7, price $0.0237" in shown
    assert "(AI, delivered, 3 SMS)" in invoke(["show", A], env | {"COLUMNS": "200"}).output


def test_stats_shows_cost_per_day_within_80_columns(env, store, clock, openai_standin, twilio_standin):
    answer(env, store, clock, openai_standin)
    deliver(twilio_standin)
    check_deliveries(env, clock)
    out = invoke(["stats", "--now", str(T0 + 3600)], env | {"COLUMNS": "80"}).output
    assert "SMS segments 3, cost $0.0237" in out and "AI cost $0.0" in out
    row = next(line for line in out.splitlines() if line.startswith("2027-01-15") and "$0.0237" in line)
    assert row.split()[:3] == ["2027-01-15", "3", "$0.0237"]
    assert all(len(line) <= 80 for line in out.splitlines())


def test_a_price_a_status_callback_could_not_give_is_fetched_once(env, store, clock, openai_standin,
                                                                    twilio_standin):
    answer(env, store, clock, openai_standin)
    sid = twilio_standin.sent[0]["sid"]
    store.record_delivery(sid, "delivered", None, T0 + 40)  # the callback: final, but no price
    deliver(twilio_standin, price="-0.01000")
    check_deliveries(env, clock)
    assert reply_row(store)["price"] == -0.01
    clock.now += 600
    real_processor(Settings.from_env(env), clock).run()
    assert twilio_standin.fetched == [sid]  # asked once, not every run


@pytest.mark.parametrize("price, unit", [("abc", "USD"), ("NaN", "USD"), ("-1e999", "USD"), ("-0.0079", "dollars"),
                                         (None, "USD"), ("-0.0079", None)])
def test_a_price_that_is_no_price_is_stored_as_null(env, store, clock, openai_standin, twilio_standin, price, unit):
    answer(env, store, clock, openai_standin)
    deliver(twilio_standin, price=price, unit=unit)
    check_deliveries(env, clock)
    row = reply_row(store)
    assert row["status"] == "delivered" and (row["price"], row["price_unit"]) == (None, None)
    stats = json.loads(invoke(["stats", "--now", str(T0 + 3600), "--json"], env).output)
    assert stats["totals"]["sms_cost"] == {} and stats["totals"]["sms_priced"] == 0


def test_read_price():
    assert read_price("-0.00790", "USD") == (-0.0079, "USD")
    assert read_price(" -0.05 ", "eur") == (-0.05, "EUR")
    assert read_price("-5000", "USD") == (None, None) and read_price("", "USD") == (None, None)


def test_no_ai_cost_without_prices_for_the_model(env, store, clock, openai_standin, twilio_standin):
    answer(env, store, clock, openai_standin)
    other = env | {"SMSBATCH_AI_MODEL": "some-local-model"}
    totals = json.loads(invoke(["stats", "--now", str(T0 + 3600), "--json"], other).output)["totals"]
    assert totals["ai_cost"] is None and totals["prompt_tokens"] > 0
    priced = other | {"SMSBATCH_AI_PRICE_INPUT_PER_MTOK": "1000000", "SMSBATCH_AI_PRICE_OUTPUT_PER_MTOK": "0"}
    totals = json.loads(invoke(["stats", "--now", str(T0 + 3600), "--json"], priced).output)["totals"]
    assert totals["ai_cost"] == {"USD": float(totals["prompt_tokens"])}


def test_a_reply_by_hand_is_smart_encoded_and_its_segments_recorded(env, store, twilio_standin):
    result = invoke(["send", A, "It\u2019s ready \u2014 come by\u2026", "--from", "+15550000000"], env)
    assert result.exit_code == 0, result.output
    assert twilio_standin.sent[0]["body"] == "It's ready - come by..."
    assert "billed as 1 SMS segment, GSM-7" in result.output
    row = reply_row(store)
    assert (row["source"], row["segments"], row["encoding"]) == ("manual", 1, "GSM-7")


@pytest.mark.parametrize("name, value, said", [
    ("SMSBATCH_MAX_SEGMENTS", "11", "SMSBATCH_MAX_SEGMENTS must be 1 to 10"),
    ("SMSBATCH_MAX_SEGMENTS", "three", "SMSBATCH_MAX_SEGMENTS must be a whole number"),
    ("SMSBATCH_SMART_ENCODING", "maybe", "SMSBATCH_SMART_ENCODING must be true or false"),
    ("SMSBATCH_AI_PRICE_INPUT_PER_MTOK", "0.15", "set both SMSBATCH_AI_PRICE_INPUT_PER_MTOK"),
    ("SMSBATCH_AI_PRICE_INPUT_PER_MTOK", "-1", "must be at least 0"),
])
def test_bad_cost_settings_are_refused_in_one_line(env, name, value, said):
    result = invoke(["stats", "--json"], env | {name: value})
    assert result.exit_code == 1 and said in result.output and "Traceback" not in result.output
