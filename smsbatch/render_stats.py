"""Human output for `smsbatch stats`: totals in words, a table per day, a bar chart. Rich stays
in the render modules."""

from rich.console import Group
from rich.text import Text

from smsbatch.inputs import iso_time
from smsbatch.render_ops import _money, _n, _seconds, console


def _seconds_cell(value):
    """A latency for a 5-wide table cell: '4.2s', '106s', '3m', '2h', '12d'."""
    if value is None or value >= 120:
        return _seconds(value)
    return f"{value:.1f}s" if value < 9.95 else f"{round(value)}s"


STATS_COLUMNS = (("day", "day", 10), ("texts", "texts", 6), ("batches", "batches", 7), ("AI calls", "ai_requests", 8),
                 ("replies", "replies", 7), ("delivered", "delivered", 9), ("p50", "latency_p50", 5),
                 ("p95", "latency_p95", 5))


def stats(info):
    """`smsbatch stats`: totals, a table per day, and a bar chart of texts and AI calls per day."""
    out = console()
    t = info["totals"]
    out.print(Text(f"stats {iso_time(info['since'])} to {iso_time(info['until'])}", style="bold"))
    for line in _stats_lines(t):
        out.print(Text(line))
    out.print(Text(""))
    out.print(Text("  ".join(f"{h:>{w}}" if i else f"{h:<{w}}" for i, (h, _, w) in enumerate(STATS_COLUMNS)),
                   style="bold"))
    for run in _runs(info["days"], _quiet_day):
        if len(run) > 1:  # a run of days with nothing at all: one line
            out.print(Text(f"{run[0]['day']} to {run[-1]['day'][5:]}: nothing ({len(run)} days)", style="dim"))
            continue
        cells = [run[0]["day"]] + [_seconds_cell(run[0][k]) if k.startswith("latency") else _n(run[0][k])
                                   for _, k, _ in STATS_COLUMNS[1:]]
        out.print(Text("  ".join(f"{c:>{w}}" if i else f"{c:<{w}}"
                                 for i, (c, (_, _, w)) in enumerate(zip(cells, STATS_COLUMNS)))))
    out.print(Text(""))
    out.print(_cost_table(info["days"]))
    out.print(Text(""))
    out.print(_chart(info["days"], out.width))


COST_COLUMNS = (("day", 10), ("SMS segments", 12), ("SMS cost", 10), ("AI cost", 10), ("AI calls saved", 14))


def _cost_table(days):
    """What each day's replies cost, beside the AI calls batching saved; quiet days as one line."""
    lines = [Text("  ".join(f"{h:>{w}}" if i else f"{h:<{w}}" for i, (h, w) in enumerate(COST_COLUMNS)),
                  style="bold")]
    for run in _runs(days, _quiet_day):
        if len(run) > 1:
            lines.append(Text(f"{run[0]['day']} to {run[-1]['day'][5:]}: nothing ({len(run)} days)", style="dim"))
            continue
        day = run[0]
        ai = "-" if day["ai_cost"] is None else _money(day["ai_cost"])
        cells = (day["day"], f"{day['sms_segments']:,}", _money(day["sms_cost"]), ai, f"{day['ai_calls_saved']:,}")
        lines.append(Text("  ".join(f"{c:>{w}}" if i else f"{c:<{w}}"
                                    for i, (c, (_, w)) in enumerate(zip(cells, COST_COLUMNS)))))
    return Group(*lines)


def _stats_lines(t):
    """The totals in words: the saving from batching and the cost of retries kept apart."""
    lines = [
        f"texts received {t['texts']:,}   batches {t['batches']:,}   AI requests {t['ai_requests']:,}",
        f"tokens {_n(t['prompt_tokens'])} prompt + {_n(t['completion_tokens'])} completion",
        f"replies sent {t['replies']:,}, delivered {_n(t['delivered'])}",
        f"AI calls saved by batching: {t['ai_calls_saved']:,} ({t['asked_texts']:,} texts, {t['asked']:,} "
        "calls: one per batch)",
        f"extra AI requests from retries: {t['retry_requests']:,}",
        f"latency, last text to reply: p50 {_seconds(t['latency_p50'])}, p95 {_seconds(t['latency_p95'])}",
    ]
    lines += [
        f"SMS segments {t['sms_segments']:,}, cost {_money(t['sms_cost'])}"
        + ("" if t["sms_priced"] == t["replies"] else f" ({t['sms_priced']:,} of {t['replies']:,} replies priced)"),
        "AI cost " + (_money(t["ai_cost"]) if t["ai_cost"] is not None
                      else "- (no prices: SMSBATCH_AI_PRICE_INPUT_PER_MTOK, _OUTPUT_PER_MTOK)"),
    ]
    if t["uncounted_batches"]:
        n = t["uncounted_batches"]
        lines.append(f"note: {n:,} {'batch' if n == 1 else 'batches'} answered before AI calls were counted "
                     f"(schema 7) {'is' if n == 1 else 'are'} left out")
    return lines


def _chart(days, width):
    """Two bars a day, texts and AI calls, on one scale; a run of days with neither is one line."""
    top = max([d["texts"] for d in days] + [d["ai_requests"] for d in days] + [1])
    room = max(10, width - 24)
    lines = [Text("texts and AI calls per day", style="bold")]
    for run in _runs(days, _empty_day):
        if len(run) > 1 or _empty_day(run[0]):
            span = run[0]["day"][5:] + ("" if len(run) == 1 else f" to {run[-1]['day'][5:]}")
            lines.append(Text(f"{span}  no texts, no AI calls", style="dim"))
            continue
        day = run[0]
        for label, key, style in (("texts", "texts", "cyan"), ("AI", "ai_requests", "magenta")):
            n = day[key]
            bar = "█" * (max(1, round(n * room / top)) if n else 0)
            head = day["day"][5:] if label == "texts" else ""
            lines.append(Text(f"{head:<5} {label:<5} ") + Text(bar, style=style) + Text(f" {n:,}"))
    return Group(*lines)


def _empty_day(day):
    """Nothing to chart: no texts, no AI calls."""
    return not (day["texts"] or day["ai_requests"])


def _quiet_day(day):
    """Nothing for the table: no texts, batches, AI calls or replies."""
    return not (day["texts"] or day["batches"] or day["ai_requests"] or day["replies"])


def _runs(days, empty):
    """Days in order, grouped: each other day alone, each run of `empty` days together."""
    runs = []
    for day in days:
        if empty(day) and runs and empty(runs[-1][-1]):
            runs[-1].append(day)
        else:
            runs.append([day])
    return runs
