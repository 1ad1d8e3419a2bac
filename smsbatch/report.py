"""What operators look at, shaped from the store's rows: `stats` totals and days, `show`'s
batch life and conversation. No SQL here (db.py) and no rich (render_ops.py)."""

import datetime
import math

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
    from smsbatch.processor import PROVIDER_NAMES

    info = store.status(now, latest)
    retry = store.next_retry()
    providers = [row | {"name": PROVIDER_NAMES.get(row["provider"], row["provider"])}
                 for row in store.provider_health()]
    return info | {
        "now": now,
        "agent": {"enabled": settings.enabled, "test_number": settings.test_number or None},
        "next_retry": None if retry is None else {"due_at": retry[0], "batch_id": retry[1]},
        "providers": providers,
        "outages": store.outages(),
    }
