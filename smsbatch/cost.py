"""What replies cost: SMS segments and Twilio's prices, AI tokens at the configured prices.
Shaped from the store's rows for `stats` and `status`; no SQL here, no rich.

Money is a {currency: amount} mapping (Twilio bills each account in its own currency; the AI
prices are US dollars), amounts positive for a charge: Twilio's prices are negative numbers.
"""

import datetime

from smsbatch import segments

AI_CURRENCY = "USD"  # the unit of SMSBATCH_AI_PRICE_*_PER_MTOK, as OpenAI bills


def day_of(epoch):
    """The UTC day ('2026-01-31') holding `epoch`."""
    return datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).date().isoformat()


def day_start(epoch):
    """The epoch seconds at which the UTC day holding `epoch` began."""
    day = datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).date()
    return datetime.datetime(day.year, day.month, day.day, tzinfo=datetime.timezone.utc).timestamp()


def sms_spend(rows):
    """What a set of sent SMS (store.reply_costs rows) cost: their segments (counted from
    the body where none is stored), how many Twilio has priced, and those prices' sum."""
    money, priced, total = {}, 0, 0
    for row in rows:
        total += row["segments"] if row["segments"] is not None else segments.count(row["body"]).segments
        if row["price"] is not None and row["price_unit"]:
            priced += 1
            money[row["price_unit"]] = money.get(row["price_unit"], 0.0) - row["price"]
    return {"sms_segments": total, "sms_priced": priced, "sms_cost": _rounded(money)}


def ai_spend(prompt_tokens, completion_tokens, prices):
    """What the tokens cost at `prices` (USD per million input and output tokens), or None when
    the prices are not known (or the tokens were not counted)."""
    if prices is None or prompt_tokens is None or completion_tokens is None:
        return None
    return _rounded({AI_CURRENCY: (prompt_tokens * prices[0] + completion_tokens * prices[1]) / 1e6})


def by_day(rows):
    """store.reply_costs rows grouped by the UTC day they were sent on."""
    days = {}
    for row in rows:
        days.setdefault(day_of(row["sent_at"]), []).append(row)
    return days


def today(store, prices, now):
    """`status`: today's (UTC) SMS segments and prices, and the AI tokens and their cost."""
    start = day_start(now)
    replies = store.reply_costs(start, now + 1)
    prompt, completion = store.tokens_between(start, now + 1)
    return {"day": day_of(now), "replies": len(replies), **sms_spend(replies), "prompt_tokens": prompt,
            "completion_tokens": completion, "ai_cost": ai_spend(prompt, completion, prices)}


def add_money(*amounts):
    """The sum of several {currency: amount} (None counts as nothing)."""
    total = {}
    for money in amounts:
        for unit, value in (money or {}).items():
            total[unit] = total.get(unit, 0.0) + value
    return _rounded(total)


def _rounded(money):
    return {unit: round(value, 6) for unit, value in sorted(money.items())}
