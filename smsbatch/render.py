"""Human output: the only module that imports rich."""

import datetime

from rich import box
from rich.console import Console
from rich.table import Table

STATE_STYLE = {
    "sent": "green", "failed": "bold red", "unknown": "bold yellow", "expired": "yellow",
    "skipped": "dim", "superseded": "dim", "processing": "cyan", "sending": "cyan",
    "open": "blue", "queued": "blue",
}


def console(stderr=False):
    return Console(stderr=stderr, highlight=False)


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
    style = STATE_STYLE.get(text, "")
    return f"[{style}]{text}[/]" if style else text


def status(info):
    """`smsbatch status` as tables."""
    out = console()
    counts = Table(box=box.SIMPLE, title="Batches by state", title_justify="left")
    for name in info["counts"]:
        counts.add_column(name, justify="right")
    counts.add_row(*[str(n) for n in info["counts"].values()])
    out.print(counts)
    out.print(
        f"pending: {info['pending']}   oldest pending: {age(info['oldest_pending_age_seconds'])}"
        f"   texts received in the last hour: {info['messages_last_hour']}"
    )
    latest = Table(box=box.SIMPLE, title="Latest batches", title_justify="left")
    for column in ("batch", "phone", "texts", "state", "age", "tries", "error"):
        latest.add_column(column)
    for row in info["latest"]:
        latest.add_row(
            row["id"], row["phone"], str(row["message_count"]), state(row["state"]),
            age(row["age_seconds"]), str(row["attempts"]), row["last_error"] or "",
        )
    out.print(latest)


def demo(result):
    """The demo's table: what was batched and how it was answered."""
    out = console()
    table = Table(box=box.ROUNDED, title="smsbatch demo: texts in, one reply per burst", show_lines=True)
    for column in ("batch", "phone", "texts in", "state", "reply out"):
        table.add_column(column, overflow="fold")
    for row in result["batches"]:
        table.add_row(
            row["id"], row["phone"], "\n".join(row["texts"]), state(row["state"]),
            row["reply"] or row["note"] or "",
        )
    out.print(table)
    totals = result["totals"]
    out.print(
        f"texts in: [bold]{totals['texts']}[/]   batches: {totals['batches']}   "
        f"AI calls made: [bold]{totals['ai_calls']}[/]   replies out: [bold]{totals['replies']}[/]"
    )
    where = result["db_path"] or "a temporary folder, now removed (--keep DIR keeps it)"
    out.print(f"[dim]database: {where}[/]")


def when(epoch):
    return datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")
