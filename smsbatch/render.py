"""Human output: the only module that imports rich."""

import datetime
import re

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from smsbatch.errors import BIDI

STATE_STYLE = {
    "sent": "green", "failed": "bold red", "unknown": "bold yellow", "expired": "yellow",
    "skipped": "dim", "superseded": "dim", "processing": "cyan", "sending": "cyan",
    "open": "blue", "queued": "blue",
}


# Control characters a terminal would act on (escape sequences, carriage returns) and bidi
# controls that reorder the line: shown, not obeyed.
CONTROL = re.compile(f"[\\x00-\\x08\\x0b-\\x1f\\x7f-\\x9f{BIDI}]")


def console(stderr=False):
    return Console(stderr=stderr, highlight=False)


def plain(value, style=""):
    """Stored text (a body, a reply, an error, a number) as rich Text: printed as written,
    never read as markup ([bold], [link=...]) or emoji codes, control characters made visible."""
    return Text(clean(value), style=style)


def clean(value):
    """Stored text as a plain string for click.echo: control characters made visible (\\x1b,
    \\u202e), so nothing a terminal would obey (escape sequences, carriage returns, bidi
    overrides) is printed raw."""
    text = "" if value is None else str(value)
    return CONTROL.sub(_visible, text)


def _visible(match):
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def age(seconds):
    if seconds is None:
        return "-"
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    if seconds < 172800:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"


def state(text):
    return plain(text, STATE_STYLE.get(text, ""))


def status(info, fit=True):
    """`smsbatch status`: see render_ops (sized to the terminal, counts first)."""
    from smsbatch import render_ops

    render_ops.status(info, fit)


def demo(result):
    """The demo's table: what was batched and how it was answered."""
    out = console()
    table = Table(box=box.ROUNDED, title="smsbatch demo: texts in, one reply per burst", show_lines=True)
    for column in ("batch", "phone", "texts in", "state", "reply out"):
        table.add_column(column, overflow="fold")
    for row in result["batches"]:
        table.add_row(
            plain(row["id"]), plain(row["phone"]), plain("\n".join(row["texts"])), state(row["state"]),
            plain(row["reply"] or row["note"]),
        )
    out.print(table)
    totals = result["totals"]
    out.print(
        f"texts in: [bold]{totals['texts']}[/]   batches: {totals['batches']}   "
        f"AI calls made: [bold]{totals['ai_calls']}[/]   replies out: [bold]{totals['replies']}[/]"
    )
    where = result["db_path"] or "a temporary folder, now removed (--keep DIR keeps it)"
    out.print(plain(f"database: {where}", "dim"))


def when(epoch):
    return datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


SIMULATION_ROWS = (
    ("texts", "texts"), ("batches", "batches"), ("AI calls", "ai_calls"),
    ("AI calls per text", "ai_calls_per_text"), ("replies", "replies"),
    ("AI answers superseded (not sent)", "superseded"),
    ("replies sent while still typing", "replies_while_typing"),
    ("texts whose burst got 2+ replies", "split_texts"), ("texts never answered", "never_answered"),
)
LATENCY_ROWS = (("latency p50", "p50"), ("latency p95", "p95"), ("latency max", "max"))


def simulation(report):
    """`smsbatch simulate`: one column per run (or one row per sweep value) and latency histograms."""
    out = console()
    t = report["trace"]
    repeats = f", {t['repeats']} repeated sids ignored" if t["repeats"] else ""
    out.print(f"trace: [bold]{t['texts']}[/] texts from {t['phones']} phones over {t['minutes']:g} minutes"
              f" ({when(t['first'])} to {when(t['last'])}{repeats})")
    results, swept = report["results"], report["sweep"]
    # A sweep's rows share every setting but the swept one: describe them once.
    described = results[:1] + [r for r in results if r["model"] == "seed"] if swept else results
    for result in described:
        name = f"smsbatch ({swept}: one row each)" if swept and result["model"] != "seed" else result["label"]
        out.print(Text.assemble("  ", plain(name, "bold"), ": ", plain(_simulated_settings(result, skip=swept))))
    out.print(_sweep_table(report) if report["sweep"] else _simulation_table(results))
    if not report["sweep"]:
        out.print(_latency_histogram(results))
    gap = f"{report['burst_gap']:g} s"
    out.print(f"[dim]burst: a phone's texts less than {gap} apart. typing: a reply with a newer text less "
              f"than {gap} before it. split: texts whose burst got 2+ replies. latency: last text to reply.[/]")


def _simulated_settings(result, skip=None):
    s = result["settings"]
    if result["model"] == "seed":
        return (f"{s['slot']:g} s slots, cron every {s['cron']:g} s (+{s['offset']:g} s), answered "
                f"{s['min_age']:g} s after a slot's first text, {s['per_run']} per run, AI {s['ai_latency']:g} s")
    parts = {"quiet": f"quiet {s['quiet']:g} s", "max-wait": f"max wait {s['max_wait']:g} s",
             "max-messages": f"max {s['max_messages']} texts", "tick": f"tick {s['tick']:g} s",
             "ai-latency": f"AI {s['ai_latency']:g} s", "concurrency": f"concurrency {s['concurrency']}"}
    parts.update(_adaptive_settings(s, skip))
    return ", ".join(text for name, text in parts.items() if name != skip)


def _adaptive_settings(s, skip):
    """The adaptive quiet period's part of a simulation's settings line."""
    if "adaptive" not in s:
        return {}
    lo, hi = s["adaptive_min"], s["adaptive_max"]
    if skip == "adaptive":
        return {"bounds": f"adaptive quiet {lo:g}-{hi:g} s when on"}
    if not s["adaptive"]:
        return {"adaptive": "fixed quiet period"}
    text = {"adaptive-min": f"up to {hi:g} s", "adaptive-max": f"from {lo:g} s"}.get(skip, f"{lo:g}-{hi:g} s")
    return {"adaptive": f"adaptive quiet {text}"}


def _cell(value, seconds=False):
    if value is None:
        return "-"
    return f"{value:g} s" if seconds else f"{value:g}"


def _simulation_table(results):
    table = Table(box=box.SIMPLE_HEAD)
    table.add_column("")
    for result in results:
        table.add_column(plain(result["label"]), justify="right")
    for name, key in SIMULATION_ROWS:
        table.add_row(name, *[_cell(r[key]) for r in results])
    for name, key in LATENCY_ROWS:
        table.add_row(name, *[_cell(r["latency"][key], seconds=True) for r in results])
    return table


def _sweep_table(report):
    seed = any(r["model"] == "seed" for r in report["results"])
    caption = ("seed: the seed design. " if seed else "") + "latency in seconds, last text to reply."
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, padding=0, caption=caption,
                  caption_justify="left")
    keys = ("ai_calls", "ai_calls_per_text", "replies", "superseded", "replies_while_typing", "split_texts",
            "never_answered")
    columns = (report["sweep"], "AI\ncalls", "per\ntext", "replies", "super-\nseded", "while\ntyping",
               "split\ntexts", "not\nanswered", "p50", "p95", "max")
    for i, column in enumerate(columns):
        table.add_column(column, justify="right" if i else "left")
    for r in report["results"]:
        value = "seed" if r["model"] == "seed" else r["label"].partition("=")[2]
        table.add_row(plain(value), *[_cell(r[k]) for k in keys], *[_cell(r["latency"][k]) for k in ("p50", "p95", "max")])
    return table


def _latency_histogram(results, width=20):
    table = Table(box=box.SIMPLE_HEAD, title="replies by latency", title_justify="left")
    table.add_column("seconds", justify="right")
    for result in results:
        table.add_column(plain(result["label"]))
    top = max([b["replies"] for r in results for b in r["latency"]["histogram"]] + [1])
    for i, bucket in enumerate(results[0]["latency"]["histogram"]):
        span = f"{bucket['from']}-{bucket['to']}" if bucket["to"] is not None else f"{bucket['from']}+"
        cells = []
        for result in results:
            n = result["latency"]["histogram"][i]["replies"]
            bar = "█" * max(1, round(n * width / top)) if n else ""
            cells.append(f"{n:>6} [cyan]{bar}[/]")
        table.add_row(span, *cells)
    return table


def check(settings, results):
    """`smsbatch check`: the settings in force, then one line per check (and its fix)."""
    out = console()
    out.print(Text("settings", style="bold") + Text(" (this shell's environment: `process` reads its own at each "
                                                  "start, `serve` only when started)", style="dim"), soft_wrap=True)
    width = max(len(name) for name, _ in settings)
    for name, value in settings:
        out.print(Text.assemble(f"  {name:<{width}}  ", plain(value)), soft_wrap=True)
    out.print("checks", style="bold")
    for result in results:
        mark = plain("ok  ", "green") if result.ok else plain("FAIL", "bold red")
        line = Text.assemble("  ", mark, "  ", plain(f"{result.name}: {result.detail}"))
        if not result.ok and result.fix:
            line.append_text(plain(f"  fix: {result.fix}", "yellow"))
        out.print(line, soft_wrap=True)
    failed = sum(1 for r in results if not r.ok)
    out.print(plain("all checks passed", "green") if not failed else plain(f"{failed} failed", "bold red"))
