"""What operators look at, shaped from the store's rows: `stats` totals and days, `show`'s
batch life and conversation. No SQL here (db.py) and no rich (render_ops.py)."""

import datetime
import math

MAX_STATS_DAYS = 400
COUNTS = ("texts", "answerable", "batches", "ai_requests", "replies")
TOKENS = ("prompt_tokens", "completion_tokens")


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
        day += datetime.timedelta(days=1)
    return days


def stats(store, since, until):
    """`smsbatch stats`: totals over [since, until) and the same figures per UTC day.

    AI requests are the calls actually made, retries included, where the store counts them
    (batches.ai_requests); otherwise the replies the AI wrote (`ai_requests_exact` false).
    """
    rows = store.stats_rows(since, until)
    known = {"tokens": rows["tokens_known"], "delivered": rows["delivery_known"]}
    days = {d: _empty(d, known) for d in utc_days(since, until)}
    for row in rows["texts"] + rows["batches"]:
        day = days.setdefault(row["day"], _empty(row["day"], known))
        for key, value in row.items():
            if key != "day" and value is not None:
                day[key] += value
    latencies = {d: [] for d in days}
    for reply in rows["replies"]:
        day = days.setdefault(reply["day"], _empty(reply["day"], known))
        day["replies"] += 1
        if known["delivered"]:
            day["delivered"] += int(bool(reply["delivered"]))
        if reply["latency"] is not None:
            latencies.setdefault(reply["day"], []).append(reply["latency"])
    ordered = [days[d] | _latency(latencies.get(d, [])) for d in sorted(days)]
    every = [x for values in latencies.values() for x in values]
    return {"since": since, "until": until, "ai_requests_exact": rows["ai_requests_exact"],
            "totals": _totals(ordered, known) | _latency(every), "days": ordered}


def _empty(day, known):
    row = {"day": day} | dict.fromkeys(COUNTS, 0)
    row |= dict.fromkeys(TOKENS, 0 if known["tokens"] else None)
    row["delivered"] = 0 if known["delivered"] else None
    return row


def _latency(values):
    p50, p95 = percentile(values, 50), percentile(values, 95)
    return {"latency_p50": None if p50 is None else round(p50, 1),
            "latency_p95": None if p95 is None else round(p95, 1)}


def _totals(days, known):
    totals = {key: sum(d[key] for d in days) for key in COUNTS}
    for key in TOKENS:
        totals[key] = sum(d[key] for d in days) if known["tokens"] else None
    totals["delivered"] = sum(d["delivered"] for d in days) if known["delivered"] else None
    # Against one AI call per text (what answering each text on its own would cost).
    totals["ai_calls_saved"] = totals["answerable"] - totals["ai_requests"]
    return totals


def status(store, settings, now, latest):
    """`smsbatch status`: the store's counts and latest batches, whether the agent answers at
    all, the next retry, and each provider's health (failing since, announced outage)."""
    from smsbatch.config import display_url
    from smsbatch.processor import PROVIDER_NAMES

    info = store.status(now, latest)
    retry = store.next_retry()
    rejected = store.rejected_signatures(now)  # a wrong SMSBATCH_PUBLIC_URL shows up here
    if rejected["last_rejected_signature_url"]:  # stored masked; rows from older versions were not
        rejected["last_rejected_signature_url"] = display_url(rejected["last_rejected_signature_url"], masked=True)
    providers = [row | {"name": PROVIDER_NAMES.get(row["provider"], row["provider"])}
                 for row in store.provider_health()]
    return info | {
        "now": now,
        "agent": {"enabled": settings.enabled, "test_number": settings.test_number or None},
        "next_retry": None if retry is None else {"due_at": retry[0], "batch_id": retry[1]},
        "providers": providers,
        "outages": store.outages(),
        **rejected,
    }


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
        quiet = {"seconds": round(store.quiet_now(phone, now, rules), 1), "adaptive": rules.adaptive}
    return {"phone": phone, "items": store.conversation(phone, limit), "quiet_period": quiet, **flags}
