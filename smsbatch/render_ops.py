"""Human output for the operator views (status, status --watch, show; stats: render_stats). Rich stays in the
render modules; customer and provider text is always rich.text.Text, never markup."""

import re
import time

from rich.console import Console, Group
from rich.live import Live
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from smsbatch import delivery
from smsbatch.inputs import iso_time
from smsbatch.render import STATE_STYLE, age, plain

PENDING = ("open", "queued", "processing", "sending")


def console():
    return Console(highlight=False)


def _fit(text, width):
    """One line, never wrapped: cut with … at the width."""
    line = text if isinstance(text, Text) else plain(text)
    line.no_wrap, line.overflow = True, "ellipsis"
    line.truncate(width, overflow="ellipsis")
    return line


def _padded(value, width, right=False, style=""):
    """A fixed-width cell: cut with … or padded with spaces."""
    cell = plain(value, style)
    cell.truncate(width, overflow="ellipsis")
    pad = Text(" " * (width - cell.cell_len))
    return pad + cell if right else cell + pad


def _counts_lines(label, counts, states, width):
    """'label name n · name n ...', carried over to a further line (indented) rather than cut."""
    lines, line = [], Text(label, style="bold")
    for i, name in enumerate(states):
        n = counts.get(name, 0)
        item = Text(f"{name} ") + Text(str(n), style=STATE_STYLE.get(name, "") if n else "dim")
        sep = " · " if i else ""
        if i and line.cell_len + len(sep) + item.cell_len > width:
            lines.append(line)
            line, sep = Text("  "), ""
        line += Text(sep) + item
    return lines + [line]


def _wrapped(text, width):
    """A Text as lines of at most `width` cells, broken between words, later lines indented."""
    lines, line = [], Text("", style=text.style)
    for word in text.plain.split(" "):
        sep = " " if line.plain.strip() else ""
        if line.plain.strip() and line.cell_len + len(sep) + len(word) > width:
            lines.append(line)
            line, sep = Text("  ", style=text.style), ""
        line.append(sep + word)
    return lines + [line]


def _agent(info):
    agent = info["agent"]
    if not agent["enabled"]:
        return Text("agent PAUSED (ENABLE_AI_SMS_AGENT off)", style="bold yellow")
    if agent["test_number"]:
        return Text("agent on, test-number mode: only ", style="yellow") + plain(agent["test_number"], "yellow")
    return Text("agent on", style="green")


def _paused(info):
    """['paused numbers: +1555... (reason), ...'] when our numbers are on hold (`hold --number`), else []."""
    paused = info.get("paused_numbers") or ()
    if not paused:
        return []
    line = Text("paused numbers (not answered): ", style="bold yellow")
    for i, p in enumerate(paused):
        why = f" ({' '.join(p['reason'].split())})" if p["reason"] else ""
        line += plain(("" if i == 0 else ", ") + p["number"] + why, "yellow")
    return [line]


SETTINGS_HERE = " (this shell's settings)"


def _ago(epoch, now):
    return "never" if epoch is None else f"{age(now - epoch)} ago"


def _header(info, width):
    """The lines above the batches that are always shown: counts, activity, warnings, outages, cost."""
    counts, now = info["counts"], info["now"]
    finished = [s for s in counts if s not in PENDING]
    retry = info["next_retry"]
    nxt = "none" if retry is None else f"in {age(retry['retry_at'] - now)} ({retry['batch_id']})"
    top = Text(f"smsbatch {iso_time(now)}  ") + _agent(info)
    if top.cell_len + len(SETTINGS_HERE) <= width:  # the mode is this shell's settings, not a running process's
        top += Text(SETTINGS_HERE, style="dim")
    lines = [top, *_paused(info),
             *_counts_lines(f"pending {info['pending']}: ", counts, PENDING, width),
             *_counts_lines("", counts, finished, width),
             Text(f"oldest pending {age(info['oldest_pending_age_seconds'])} · texts last hour "
                  f"{info['messages_last_hour']} · next retry {nxt}"),
             Text(f"last text stored {_ago(info.get('last_text_at'), now)} · last processor run "
                  f"{_ago(info.get('last_run_at'), now)}")]
    for said in info.get("warnings", ()):  # wrapped, never cut: what to check is at the end
        lines += _wrapped(Text(f"WARNING: {said}", style="bold red"), width)
    for p in info["providers"]:
        if p["failing_since"] is None:
            continue
        kind = "OUTAGE" if p["alerted_at"] is not None else "failing"
        line = Text(f"{kind}: {p['name']} calls failing for {age(now - p['failing_since'])}"
                    f" (last {age(now - p['last_failure_at'])} ago): ",
                    style="bold red" if kind == "OUTAGE" else "yellow")
        lines.append(line + plain(p["last_error"]))
    lines += _cost_and_delivery(info, width)
    return [_fit(line, width) for line in lines]


def _cost_and_delivery(info, width):
    """What the AI cost, and how replies fared (each on its own line, when there is anything to say)."""
    cost, counts = info.get("ai") or {}, info.get("delivery") or {}
    lines = []
    if cost.get("requests"):
        lines.append(Text(f"AI requests {cost.get('requests', 0):,} · tokens {cost.get('prompt_tokens', 0):,} prompt"
                          f" + {cost.get('completion_tokens', 0):,} completion"))
    today = info.get("today") or {}
    if today.get("sms_segments") or today.get("prompt_tokens") or today.get("completion_tokens"):
        lines.append(Text(_today(today)))
    if counts:
        names = sorted(counts, key=lambda s: (s in DELIVERY_PROBLEMS, s))  # problems last, never cut off
        lines += _counts_lines("replies: ", {DELIVERY_NAMES.get(k, k): v for k, v in counts.items()},
                               [DELIVERY_NAMES.get(k, k) for k in names], width)
    return lines


def _today(t):
    """'today: 5 replies, 12 SMS segments $0.0948 (4 priced) · AI $0.0021': what today cost so far."""
    n = t["replies"]
    line = f"today: {n} repl{'y' if n == 1 else 'ies'}, {t['sms_segments']:,} SMS segments"
    if t["sms_cost"]:
        line += f" {_money(t['sms_cost'])}" + ("" if t["sms_priced"] == n else f" ({t['sms_priced']} priced)")
    if t["ai_cost"] is not None and (t["prompt_tokens"] or t["completion_tokens"]):
        line += f" · AI {_money(t['ai_cost'])}"
    return line


def _money(money):
    """{currency: amount} as '$0.0948' or '0.0948 EUR' (several joined with +); '-' for none."""
    if not money:
        return "-"
    parts = []
    for unit, value in money.items():
        text = f"{value:,.4f}" if abs(value) < 10 else f"{value:,.2f}"
        parts.append(f"${text}" if unit == "USD" else f"{text} {unit}")
    return " + ".join(parts)


DELIVERY_NAMES = {"no_receipt": "no receipt yet", "console": "console (no receipts)"}
DELIVERY_PROBLEMS = ("undelivered", "failed")


def _details(info, width, room):
    """At most `room` lines on the batches in flight (who holds each, when it last renewed)
    and the latest failed deliveries; what does not fit is summed up in one line."""
    flights = []
    for row in info.get("in_flight", ()):
        renewed = "never" if row["renewed_seconds_ago"] is None else f"{row['renewed_seconds_ago']:g}s ago"
        flights.append(Text(f"in flight {row['id']} {row['state']}: held by ") + plain(row["holder"] or "?")
                       + Text(f", renewed {renewed}, {row['lease_left_seconds']:g}s left"))
    # status and error come from Twilio's receipts: plain text, never obeyed
    problems = [plain(f"{row['status']}: batch {row['batch_id'] or '(by hand)'} to ", "yellow")
                + plain(row["phone"]) + plain(f": {row['error'].split(': ', 1)[-1]}", "yellow")
                for row in info.get("delivery_problems", ())[:2]]
    lines = flights + problems
    if room is not None and len(lines) > room:
        keep = max(0, room - 1)
        lines = lines[:keep] + [Text(f"… {len(lines) - keep} more: batches in flight, failed deliveries "
                                     "(status --json; smsbatch deliveries --since 7d)", style="dim")]
    return [_fit(line, width) for line in lines[:room] if room is None or room > 0]


def brief_error(text, width):
    """An error in at most `width` characters, keeping its reason: the boilerplate the state and
    tries columns already say goes first, then the middle (the start names the source and code,
    the end most often the reason)."""
    text = " ".join((text or "").split())
    for noise in BOILERPLATE:
        text = noise.sub("", text)
    if len(text) <= width:
        return text
    if width < 8:
        return text[:max(0, width - 1)] + "…"
    label, sep, _ = text.partition(": ")
    head = label + ": " if sep and len(label) <= width // 2 else text[:width // 3]
    tail = text[len(text) - (width - len(head) - 1):]
    if " " in tail[:-1] and text[len(text) - len(tail) - 1] != " ":
        tail = tail[tail.index(" ") + 1:]  # from a word's start
    if head.endswith(": "):
        return head + "…" + tail
    return text[:width - 1 - len(tail)] + "…" + tail  # no label: the start takes what the word freed


BOILERPLATE = tuple(re.compile(p) for p in (
    r" ?\(after \d+ attempts?\)", r"Unable to (?:create|fetch|update|delete) record: ", r"; check, then retry$",
    r" \(next run tries again\)"))


def _columns(rows, width):
    """The batch columns for these rows: the phone as wide as the widest shown, and our number
    (its last digits) when the rows hold several of ours. Returns (columns, labels for ours)."""
    phone = min(16, max([5] + [len(row["phone"]) for row in rows]))
    columns = [("batch", 10, False), ("phone", phone, False)]
    ours = _our_labels({row["our_number"] for row in rows})
    if len(ours) > 1:
        columns.append(("to", max(len(v) for v in ours.values()), False))
    return columns + [("texts", 5, True), ("state", 10, False), ("age", 5, True), ("tries", 5, True)], ours


def _our_labels(numbers):
    """Our numbers by their shortest distinct last digits (at least 4), as people name lines: …4567."""
    for size in range(4, 17):
        labels = {n: "…" + n[-size:] if len(n) > size else n for n in numbers}
        if len(set(labels.values())) == len(labels):
            return labels
    return {n: n for n in numbers}


def _batch_line(row, columns, ours, width):
    cells = {"batch": row["id"], "phone": row["phone"], "to": ours.get(row["our_number"], ""),
             "texts": row["message_count"], "state": row["state"], "age": age(row["age_seconds"]),
             "tries": row["attempts"]}
    line = Text()
    for name, size, right in columns:
        value = cells[name]
        line += _padded(value, size, right, STATE_STYLE.get(value, "") if name == "state" else "") + " "
    line += plain(brief_error(row["last_error"], max(0, width - line.cell_len)), "red")
    return _fit(line, width)


MIN_ROWS = 3  # batches shown however tall the header: the header gives up detail lines first


def status_view(info, width=80, height=None):
    """`status` as lines that fit `width` (and `height`, if given, with a line to spare for the
    shell's prompt): the header always, then as many of the latest batches as fit."""
    header = _header(info, width)
    room = None if height is None else height - 1 - len(header) - 2 - min(MIN_ROWS, len(info["latest"]))
    lines = header + _details(info, width, room) + [Text("")]
    rows = info["latest"]
    if height is not None:
        rows = rows[:max(0, height - 1 - len(lines) - 1)]
    columns, ours = _columns(rows, width)
    head = Text(" ".join(_padded(n, w, r).plain for n, w, r in columns) + " error", style="bold")
    lines.append(_fit(head, width))
    lines += [_batch_line(row, columns, ours, width) for row in rows]
    return Group(*lines)


def status(info, fit=True):
    """`smsbatch status`, sized to the terminal: with `fit`, as many batches as its height allows."""
    out = console()
    out.print(status_view(info, out.width, out.height if fit else None))


def watch(fetch, interval):
    """`smsbatch status --watch`: redraw the status every `interval` seconds until Ctrl-C."""
    out = console()
    with Live(console=out, screen=True, auto_refresh=False, redirect_stderr=False) as live:
        try:
            while True:
                live.update(status_view(fetch(), out.width, out.height + 1), refresh=True)
                time.sleep(interval)
        except KeyboardInterrupt:
            pass


def _n(value, unit=""):
    return "-" if value is None else f"{value:,g}{unit}"


def _seconds(value):
    return "-" if value is None else age(value) if value >= 120 else f"{value:g}s"


def _t(epoch):
    return "-" if epoch is None else iso_time(epoch)


def _line(*parts):
    """A Text from (text, style) pairs and plain strings: data never parsed as markup."""
    line = Text()
    for part in parts:
        line += plain(*part) if isinstance(part, tuple) else plain(part)
    return line


def _grid(rows, indent=2):
    """Rows of cells; the last cell wraps under itself (a hanging indent), the others never wrap."""
    grid = Table.grid(padding=(0, 1))
    for _ in range(len(rows[0]) - 1 if rows else 0):
        grid.add_column(no_wrap=True)
    grid.add_column(overflow="fold")
    for row in rows:
        grid.add_row(*[cell if isinstance(cell, Text) else _line(cell) for cell in row])
    return Padding(grid, (0, 0, 0, indent), expand=False)


def show_batch(life):
    """`smsbatch show BATCH_ID`: texts, every state change, attempts, the reply and its delivery."""
    out, b = console(), life["batch"]
    out.print(_line(("batch ", "bold"), (b["id"], "bold"), "  ", (b["state"], STATE_STYLE.get(b["state"], "")),
                    f"  from {b['phone']} to {b['our_number']}"))
    out.print(Text(f"attempts {b['attempts']}   AI requests {_n(b['ai_requests'])}   tokens "
                   f"{_n(b['prompt_tokens'])} prompt + {_n(b['completion_tokens'])} completion"))
    if life["folded"]:
        out.print(Text(f"took the texts of: {', '.join(life['folded'])}"))
    if b.get("superseded_by"):
        out.print(Text(f"folded into batch {b['superseded_by']} (smsbatch show {b['superseded_by']})"))
    out.print(Text(f"texts ({len(life['texts'])})", style="bold"))
    out.print(_grid([(_t(t["received_at"]), _line("" if t["kind"] == "text" else f"[{t['kind']}] ", t["body"],
                                                   _media(t["media"]))) for t in life["texts"]]))
    out.print(Text("history", style="bold"))
    out.print(_grid([(_t(e["at"]), Text(e["to_state"], style=STATE_STYLE.get(e["to_state"], "")),
                      plain(e["reason"])) for e in life["events"]]))
    failed = [(n, a) for n, a in enumerate(life["attempts"], 1) if a["state"] not in ("sent", "superseded")]
    if failed:
        out.print(Text("attempts that did not end in a reply", style="bold"))
        out.print(_grid([(f"{n}.", _t(a["at"]), a["state"], plain(a["outcome"] or "-", "red"))
                         for n, a in failed]))
    _show_reply(out, b, life["outbound"])
    if "prompt" in life:
        _show_prompt(out, life["prompt"])


def _media(media):
    import json

    urls = json.loads(media) if media else []
    return f"  [+{len(urls)} attachment{'s' if len(urls) != 1 else ''}]" if urls else ""


def _show_reply(out, batch, outbound):
    out.print(Text("reply", style="bold"))
    if not outbound:
        written = batch["response_text"]
        out.print(plain("  " + (f"written, not sent: {written}" if written else "none")))
        return
    for sms in outbound:
        out.print(Padding(plain(sms["body"]), (0, 0, 0, 2), expand=False))
        status = sms["status"] or ("console (no receipts)" if delivery.is_console_sid(sms["sid"]) else "not reported yet")
        error = f"  error {sms['error_code']}" if sms["error_code"] else ""
        out.print(Padding(plain(f"SID {sms['sid']}  sent {_t(sms['sent_at'])}  delivery {status}"
                               f"{'' if sms['status_at'] is None else ' at ' + _t(sms['status_at'])}{error}"
                               f"{_billed(sms)}", style="dim"), (0, 0, 0, 2), expand=False))


def _billed(sms):
    """'  2 SMS segments, GSM-7, price $0.0158': what a reply is billed as (when known)."""
    if sms.get("segments") is None:
        return ""
    n = sms["segments"]
    text = f"  {n} SMS segment{'s' * (n != 1)}, {sms['encoding']}"
    if sms.get("price") is not None and sms.get("price_unit"):
        text += f", price {_money({sms['price_unit']: -sms['price']})}"
    return text


def _show_prompt(out, prompt):
    out.print(Text("prompt sent to the AI", style="bold"))
    if prompt is None:
        out.print(Text("  none recorded (never sent to the AI, or answered before prompts were kept)"))
        return
    for message in prompt:
        out.print(Text(f"  [{message['role']}]", style="cyan"))
        out.print(Padding(plain(message["content"]), (0, 0, 0, 4), expand=False))


def show_phone(convo):
    """`smsbatch show PHONE`: the conversation as a chat, newest last."""
    out = console()
    head = _line(("conversation with ", "bold"), (convo["phone"], "bold"))
    if convo["hold"]:
        head += Text(f"   ON HOLD since {_t(convo['hold']['since'])}", style="bold yellow")
    for o in convo["opt_outs"]:
        scope = "every number" if o["scope"] == "*" else o["scope"]
        head += Text(f"   OPTED OUT of {scope}", style="bold red")
    out.print(head)
    if not convo["items"]:
        out.print(Text("  nothing yet"))
    # With several business numbers, say which one each text went to and each reply came from.
    several = len({i["our_number"] for i in convo["items"] if i["kind"] in ("in", "out")}) > 1
    out.print(_grid([_chat_line(item, several) for item in convo["items"]], indent=0))
    quiet = convo.get("quiet_period")
    if quiet:
        if quiet.get("fitted"):
            how = "fitted to their pace"
        else:
            how = "default: too few recent texts to fit" if quiet["adaptive"] else \
                "default: SMSBATCH_ADAPTIVE=0"
        out.print(Text(f"quiet period for their next text: {quiet['seconds']:g} s ({how})", style="dim"))


def _chat_line(item, several=False):
    """(time, marker, what was said): '>' a text in, '<' an SMS out, '!' a hold, opt-out or note."""
    at, kind = _t(item["at"]), item["kind"]
    if kind == "in":
        keyword = "" if item["detail"] == "text" else f" [{item['detail']}]"
        to = f" (to {item['our_number']})" if several else ""
        return at, Text(">", style="bold cyan"), _line(item["body"], _media(item["media"]), (keyword + to, "dim"))
    if kind == "out":
        who = "AI" if item["detail"] == "ai" else "by hand"
        sender = f", from {item['our_number']}" if several else ""
        n = item.get("segments")
        size = "" if n is None else f", {n} SMS"
        return at, Text("  <", style="bold green"), _line(
            item["body"], (f"  ({who}, {item['status'] or 'sent'}{size}{sender})", "dim"))
    if kind == "opt_out":
        scope = "every number" if item["our_number"] == "*" else item["our_number"]
        return at, Text("  !", style="bold red"), plain(f"opted out of {scope} ({item['body']})")
    if kind == "hold":
        return at, Text("  !", style="bold yellow"), _line("put on hold", f": {item['body']}" if item["body"] else "")
    if kind == "release":
        return at, Text("  !", style="bold yellow"), _line("released from hold", f": {item['body']}" if item["body"] else "")
    return at, Text("  !", style="yellow"), _line(f"batch {item['batch_id']} {item['detail']}: ", item["body"] or "")
