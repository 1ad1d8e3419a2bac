"""What operators look at, shaped from the store's rows: `stats` totals and days, `show`'s
batch life and conversation. No SQL here (db.py) and no rich (render_ops.py)."""

import datetime
import math

from smsbatch import cost

MAX_STATS_DAYS = 400
COUNTS = ("texts", "answerable", "batches", "ai_requests", "replies")
TOKENS = ("prompt_tokens", "completion_tokens")
SPENT = ("sms_segments", "sms_priced")


def percentile(values, q):
    """The q-th percentile (0-100) by nearest rank, or None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def utc_days(since, until):
    """Every UTC day ('2026-01-31') from the one holding `since` to the one holding `until`."""
    day = datetime.datetime.fromtimestamp(since, datetime.timezone.utc).date()
    last = datetime.datetime.fromtimestamp(max(since, until - 0.001), datetime.timezone.utc).date()
    days = []
    while day <= last:
        days.append(day.isoformat())
        if day == last:  # never a step past `last`: the day after 9999-12-31 does not exist
            break
        day += datetime.timedelta(days=1)
    return days


def utc_day(epoch):
    """The UTC day ('2026-01-31') holding `epoch`."""
    return datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).date().isoformat()


def stats(store, since, until, prices=None):
    """`smsbatch stats`: totals over [since, until) and the same figures per UTC day.

    Beside them, what replies cost: SMS segments and Twilio's prices, and the AI's tokens at
    `prices` (settings.ai_prices; None: AI cost not shown).

    AI calls saved by batching are the answerable texts of the batches the AI was asked for
    minus those batches (one call each instead of one per text); the extra requests that
    retries made (the client's own and later attempts') are counted apart. A batch the AI
    answered before its calls were counted (schema version 7; ai_requests 0 beside a stored
    reply) is left out of both and counted in `uncounted_batches`.
    """
    rows = store.stats_rows(since, until)
    days = {d: _empty(d) for d in utc_days(since, until)}

    def day(at):
        return days.setdefault(utc_day(at), _empty(utc_day(at)))

    for text in rows["texts"]:
        row = day(text["at"])
        row["texts"] += 1
        row["answerable"] += text["kind"] == "text"
    for batch in rows["batches"]:
        _count_batch(day(batch["at"]), batch)
    latencies = {}
    for reply in rows["replies"]:
        row = day(reply["at"])
        row["replies"] += 1
        row["delivered"] += reply["status"] in DELIVERED
        if reply["latency"] is not None:
            latencies.setdefault(row["day"], []).append(reply["latency"])
    spent = cost.by_day(store.reply_costs(since, until))
    for when in spent:
        days.setdefault(when, _empty(when))
    ordered = [_saving(days[d]) | _latency(latencies.get(d, [])) | _costs(days[d], spent.get(d, []), prices)
               for d in sorted(days)]
    every = [x for values in latencies.values() for x in values]
    totals = _saving({key: sum(d[key] for d in ordered) for key in COUNTS + TOKENS + EXTRA + SPENT})
    totals |= {"sms_cost": cost.add_money(*(d["sms_cost"] for d in ordered)),
               "ai_cost": cost.ai_spend(totals["prompt_tokens"], totals["completion_tokens"], prices)}
    return {"since": since, "until": until, "ai_requests_exact": totals["uncounted_batches"] == 0,
            "totals": totals | _latency(every), "days": ordered}


def _costs(day, replies, prices):
    """A day's SMS segments and money, and its AI money."""
    ai_cost = cost.ai_spend(day["prompt_tokens"], day["completion_tokens"], prices)
    return cost.sms_spend(replies) | {"ai_cost": ai_cost}


DELIVERED = ("delivered", "read")
EXTRA = ("delivered", "asked", "asked_texts", "uncounted_batches")


def _empty(day):
    return {"day": day} | dict.fromkeys(COUNTS + TOKENS + EXTRA, 0)


def _count_batch(row, batch):
    """Add one batch to its day: its AI usage, and whether the AI was asked for it (counted)."""
    row["batches"] += 1
    for key in ("ai_requests",) + TOKENS:
        row[key] += batch[key] or 0
    if batch["ai_requests"]:
        row["asked"] += 1
        row["asked_texts"] += batch["texts"]
    elif batch["answered"]:  # answered, yet no request counted: from before counting began
        row["uncounted_batches"] += 1


def _saving(row):
    """The AI calls batching saved (never negative: a batch whose texts moved on to a newer
    one still cost its call) and the extra requests retries made."""
    return row | {"ai_calls_saved": max(0, row["asked_texts"] - row["asked"]),
                  "retry_requests": max(0, row["ai_requests"] - row["asked"])}


def _latency(values):
    p50, p95 = percentile(values, 50), percentile(values, 95)
    return {"latency_p50": None if p50 is None else round(p50, 1),
            "latency_p95": None if p95 is None else round(p95, 1)}


def warnings(info, now):
    """What `status` must put in front of a person, in words: no processor while batches wait
    (attention.idle: the same verdict as /health?strict=1)."""
    from smsbatch import attention

    if attention.idle(info["pending"], info["last_run_at"], now):
        return [attention.idle_text(info["pending"], info["last_run_at"], now)]
    return []


def status(store, settings, now, latest):
    """`smsbatch status`: the store's counts and latest batches, whether the agent answers at
    all, the next retry, each provider's health (failing since, announced outage), when the
    last text was stored and a processor last ran, and warnings."""
    from smsbatch.config import display_url
    from smsbatch.processor import PROVIDER_NAMES

    info = store.status(now, latest) | store.last_activity()
    retry = store.next_retry()
    rejected = store.rejected_signatures(now)  # a wrong SMSBATCH_PUBLIC_URL shows up here
    if rejected["last_rejected_signature_url"]:  # stored masked; rows from older versions were not
        rejected["last_rejected_signature_url"] = display_url(rejected["last_rejected_signature_url"], masked=True)
    providers = [row | {"name": PROVIDER_NAMES.get(row["provider"], row["provider"])}
                 for row in store.provider_health()]
    info |= {
        "now": now,
        "agent": {"enabled": settings.enabled, "test_number": settings.test_number or None},
        "next_retry": None if retry is None else {"retry_at": retry[0], "batch_id": retry[1]},
        "providers": providers,
        "outages": store.outages(),
        "paused_numbers": store.number_holds(),  # our numbers on hold: texts stored, not answered
        "today": cost.today(store, settings.ai_prices, now),  # what today's replies cost
        **rejected,
    }
    from smsbatch import attention

    return info | {"processor_stalled": attention.idle(info["pending"], info["last_run_at"], now),
                   "warnings": warnings(info, now)}


AI_USAGE = ("ai_requests", "prompt_tokens", "completion_tokens")


def resolve(store, target):
    """What `smsbatch show TARGET` means: ('batch', id) or ('phone', number), by its shape.

    An id is 10 letters and digits of db.ID_ALPHABET; a number goes through inputs.check_phone.
    Ten digits could be either: a batch with that id wins, else it is a number.

    Raises:
        InvalidInput: neither a batch id nor a phone number.
    """
    import re

    from smsbatch import inputs
    from smsbatch.db import ID_ALPHABET
    from smsbatch.errors import InvalidInput, NotFound

    text = str(target).strip()
    if re.fullmatch(f"[{ID_ALPHABET}]{{10}}", text):
        try:
            return "batch", store.get_batch(text)["id"]
        except NotFound:
            if not text.isdigit():
                raise
    try:
        return "phone", inputs.check_phone(text)
    except InvalidInput:
        raise InvalidInput(f"{text!r} is neither a batch id (like b7k2mq9xza) nor a phone number "
                           "(like +15551234567)") from None


def show_batch(store, batch_id, with_prompt=False):
    """`smsbatch show BATCH_ID`: the batch's whole life. AI usage is None where not recorded;
    the prompt is included (parsed) only when asked for."""
    import json
    import re

    life = store.batch_life(batch_id)
    batch = life["batch"]
    prompt = batch.pop("prompt", None)
    batch.pop("claim", None)  # a lease token: nothing an operator can use
    for key in AI_USAGE:
        batch.setdefault(key, None)
    attempts = []
    for event in life["events"]:  # an attempt starts at a claim; its outcome is the processor's last move
        if re.search(r"\(attempt \d+\)$", event["reason"] or ""):
            attempts.append({"at": event["at"], "state": event["to_state"], "outcome": None})
        elif attempts and event["from_state"] in ("processing", "sending"):
            attempts[-1].update(state=event["to_state"], outcome=event["reason"])
    life["attempts"] = attempts
    if with_prompt:
        life["prompt"] = None if prompt is None else json.loads(prompt)
    return life


def show_phone(store, phone, limit, rules=None, now=None):
    """`smsbatch show PHONE`: the last `limit` things in the conversation, oldest first,
    whether the person is on hold or opted out now, and (given `rules` and `now`) the quiet
    period their next text would get."""
    flags = store.person_flags(phone)
    quiet = None
    if rules is not None:
        quiet = {"seconds": round(store.quiet_now(phone, now, rules), 1), "adaptive": rules.adaptive,
                 "fitted": _fitted(store, phone, now, rules)}
    return {"phone": phone, "items": store.conversation(phone, limit), "quiet_period": quiet, **flags}


def _fitted(store, phone, now, rules):
    """Was the quiet period fitted to the person's pace? Only when adaptive and their latest
    texts hold enough typing gaps (batching.quiet_for); else it is the fixed default."""
    from smsbatch import batching

    if not rules.adaptive:
        return False
    times = store.recent_text_times(phone, now, rules.adaptive_window - 1)
    return batching.fitted(batching.gaps_between(times + [now]), rules)
