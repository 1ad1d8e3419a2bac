"""The command line: parse, build, call one library function, render.

Click is imported only by the command-line modules: this one (the group and the everyday
commands), cli_common (shared types and helpers), cli_ops (operators' tools) and
cli_traces (export and simulate).
"""

import logging
import signal
import sys
import threading
import time

import click

from smsbatch import cli_ops, cli_traces
from smsbatch.cli_common import (EXIT_SOME_FAILED, PHONE, SID, TEXT, TIME, WHEN, Finite, LoggedGroup,
                                 backfill_runs, emit_json, note, open_store, read_text_file, settings_from,
                                 warn_if_not_the_deployments_db)
from smsbatch.engine import StoreBusy, StoreUnavailable, shown_target
from smsbatch.errors import SmsbatchError

@click.group(cls=LoggedGroup)
@click.option("--db", envvar="SMSBATCH_DB", default="smsbatch.db", show_default=True,
              type=click.Path(dir_okay=False),
              help="SQLite database file, or a postgresql:// URL for several hosts on one PostgreSQL "
                   "database (pip install 'smsbatch[postgres]') (env SMSBATCH_DB).")
@click.version_option(package_name="smsbatch")
@click.pass_context
def cli(ctx, db):
    """Batch rapid-fire inbound SMS and answer each burst with one AI reply."""
    from smsbatch.config import log_format

    try:
        fmt = log_format()  # before the other settings: their errors are logged in this format
    except SmsbatchError as exc:
        raise click.ClickException(str(exc)) from None
    ctx.obj = {"db": db, "log_format": fmt}
    # Only warnings reach stderr (cron mails it); the twilio and HTTP clients log every
    # request, headers included, at INFO.
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        from smsbatch.logs import use_json

        use_json(handler)
    else:
        handler.setFormatter(IsoFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler])


class IsoFormatter(logging.Formatter):
    """Log lines start with an ISO-8601 UTC time (2026-01-31T09:30:00Z), as the summary line does."""

    def formatTime(self, record, datefmt=None):
        from smsbatch.inputs import iso_time

        return iso_time(record.created)


@cli.command()
@click.pass_context
def migrate(ctx):
    """Create or upgrade the database (safe to run again)."""
    from smsbatch.db import Store

    settings = settings_from(ctx)
    store = Store(settings.db_path)
    try:
        before, after = store.migrate()
    finally:
        store.close()
    if before == 0:
        said = f"created at schema version {after}"
    elif before < after:
        said = f"upgraded from schema version {before} to {after}"
    else:
        said = f"already at schema version {after}"
    click.echo(f"{shown_target(settings.db_path)}: {said}")


@cli.command()
@click.option("--from", "phone", type=PHONE, help="The sender's number.")
@click.option("--to", "our_number", type=PHONE, help="The number they wrote to.")
@click.option("--body", help="The text.")
@click.option("--sid", type=SID, help="Twilio MessageSid (default: derived from from/to/body/--at, so importing "
              "the same text with the same --at twice stores it once).")
@click.option("--at", type=TIME, help="When it arrived: epoch seconds or ISO-8601 (default now; "
              "at most a few minutes ahead of --now).")
@click.option("--jsonl", type=click.File("rb"),
              help="Store many: one JSON object a line (from, to, at required; body, sid optional); - for stdin.")
@click.option("--now", type=TIME, help="Refuse times more than 5 minutes after this (default: the clock).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def ingest(ctx, phone, our_number, body, sid, at, jsonl, now, as_json):
    """Store inbound texts as the webhook would. Numbers are normalised to E.164 (+15551234567):
    a 10-digit number is taken as North American (+1); others need their country code."""
    from smsbatch.ingest import ingest_lines, ingest_one

    settings = settings_from(ctx)
    store = open_store(settings)
    if jsonl is not None:
        if phone or our_number or body is not None or sid or at is not None:
            raise click.UsageError("--jsonl cannot be combined with --from/--to/--body/--sid/--at")
        result = ingest_lines(store, jsonl, settings, now)
    else:
        if not (phone and our_number and body is not None):
            raise click.UsageError("give --from, --to and --body (or --jsonl FILE)")
        result = ingest_one(store, settings, phone, our_number, body, sid, at, now)
    if as_json:
        emit_json(result)
    else:
        click.echo(f"stored {result['stored']}, duplicates {result['duplicates']}, bad lines {len(result['errors'])}")
    for line_no, error in result["errors"]:
        click.echo(f"line {line_no}: {error}", err=True)
    if result["errors"]:
        ctx.exit(1)


@cli.command()
@click.option("--now", type=TIME, help="Act as if it were this time (epoch seconds or ISO-8601).")
@click.option("--limit", type=click.IntRange(1), default=1000, show_default=True, help="Most batches this run.")
@click.option("--for", "seconds", type=Finite(0), default=0, show_default=True,
              help="Keep picking up batches as they fall due for this many seconds (cron: 55).")
@click.option("--concurrency", type=click.IntRange(1, 64), default=4, show_default=True,
              help="Batches answered at once.")
@click.option("--system-prompt-file", type=click.File("rb"), help="System prompt (else SMSBATCH_SYSTEM_PROMPT).")
@click.option("--ai", type=click.Choice(["openai", "offline"]), help="AI provider (env SMSBATCH_AI).")
@click.option("--sms", type=click.Choice(["twilio", "console"]), help="SMS provider (env SMSBATCH_SMS).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.pass_context
def process(ctx, now, limit, seconds, concurrency, system_prompt_file, ai, sms, as_json):
    """Answer due batches: one AI reply each, sent by SMS (run by cron every minute)."""
    from smsbatch.lease import DatabaseClock, calibrate
    from smsbatch.processor import Clock, DatabaseAway, Processor

    changes = {k: v for k, v in (("ai", ai), ("sms", sms)) if v}
    if system_prompt_file is not None:
        changes["system_prompt"] = read_text_file(system_prompt_file, "--system-prompt-file").strip()
        if not changes["system_prompt"]:
            raise click.BadParameter("the file is empty", param_hint="--system-prompt-file")
    settings = settings_from(ctx, **changes)
    missing = settings.missing_credentials()
    if missing:
        raise click.ClickException(
            "missing " + ", ".join(missing) + " (or use --ai offline --sms console for the stand-ins)"
        )
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    # A long run (--for) waits out a database that is away or busy (a restart, a failover), at its
    # start too, for up to its --for; a cron run ends with one line (exit 1) and cron runs the next.
    away, waits_until = DatabaseAway(), (time.monotonic() + seconds if seconds else None)
    away.wait_out(lambda: open_store(settings).close(), "opening the database", waits_until, stop)
    from smsbatch.ai import make_responder
    from smsbatch.sms import make_sender

    clock = Clock(now, advancing=bool(seconds)) if now is not None else DatabaseClock()
    sender = make_sender(settings)
    processor = Processor(settings.db_path, settings, make_responder(settings), sender, clock=clock, away=away)
    warn_if_not_the_deployments_db(settings)

    def prepare():  # each step may run again: the stall alert is claimed once, backfilled texts stored once
        if processor.alerter.active:  # before this run counts as one: had none run while batches waited?
            from smsbatch.alerts import notice_stall

            notice_stall(processor.store(), processor.alerter, clock(), settings.alert_after_seconds)
        calibrate(clock, processor.store(), force=True)  # the backfill's turn is kept on the database's clock too
        return periodic_backfill(processor.store(), sender, settings, clock(), stop)

    backfilled = away.wait_out(prepare, "starting the run", waits_until, stop)
    report = processor.run(limit=limit, concurrency=concurrency, seconds=seconds, stop=stop)
    report.backfilled = backfilled
    prune_after_run(settings, clock(), long_run=bool(seconds))
    processor.alerter.wait()  # alerts still going out: a few seconds at most (alerts.WAIT_AT_END)
    if as_json:
        emit_json(report.as_dict())
    elif ctx.obj["log_format"] == "json":  # every line a log shipper reads is JSON, this one too
        from smsbatch.logs import line

        click.echo(line("smsbatch.process", summary_line(report), report=report.as_dict()))
    else:
        from smsbatch.inputs import iso_time

        click.echo(f"{iso_time(time.time())} {summary_line(report)}")
    if report.need_a_person:  # failed, unknown, or an unexpected error (its traceback is on stderr)
        ctx.exit(EXIT_SOME_FAILED)


def prune_after_run(settings, now, long_run=False):
    """SMSBATCH_RETENTION_DAYS: each run deletes a bounded number of batches older than that.
    A long run (--for) whose database is away at its end leaves it to the next run (one warning
    line); a cron run ends with the one-line error, as for any other step."""
    if not settings.retention_days:
        return
    try:
        _prune(settings, now)
    except (StoreUnavailable, StoreBusy) as exc:
        if not long_run:
            raise
        logging.getLogger("smsbatch.processor").warning("could not prune old batches now (%s); the next run does",
                                                        exc)


def _prune(settings, now):
    from smsbatch.ops import PRUNE_PER_RUN

    age = settings.retention_days * 86400
    if backfill_runs(settings):  # never inside the backfill's look-back: a pruned text would be answered again
        from smsbatch.backfill import min_prune_age

        age = max(age, min_prune_age(settings))
    store = open_store(settings)
    try:
        gone = store.prune(now - age, limit=PRUNE_PER_RUN)
    finally:
        store.close()
    if gone["batches"] or gone["manual_replies"]:
        note(f"pruned {gone['batches']} batches, {gone['texts']} texts, "
             f"{gone['replies'] + gone['manual_replies']} replies older than {settings.retention_days:g} days")


def periodic_backfill(store, sender, settings, now, stop=None):
    """`process`'s look into Twilio's log for texts the webhook never got (see smsbatch.backfill).
    Returns how many it stored; a Twilio failure is logged and processing goes on. `stop`
    (set by SIGTERM) ends its reading between two pages."""
    if not backfill_runs(settings):
        return 0
    from smsbatch.backfill import backfill_if_due
    from smsbatch.errors import DeliveryError
    from smsbatch.twilio_log import Paging, TwilioLog

    try:
        report = backfill_if_due(store, TwilioLog(sender, Paging(stop)), settings, now)
    except DeliveryError as exc:
        logging.getLogger("smsbatch.backfill").warning("backfill: could not read Twilio's message log: %s", exc)
        return 0
    return report.stored if report else 0


def summary_line(report):
    """The one line `process` prints: claimed, sent, skipped, failed, then any other outcome seen."""
    if report.paused:
        return "paused: ENABLE_AI_SMS_AGENT is off; texts are stored, nothing is answered"
    c = report.counts
    parts = [f"claimed {report.claimed}", f"sent {c['sent']}", f"skipped {c['skipped']}", f"failed {c['failed']}"]
    extra = [(n, c[n]) for n in ("superseded", "retrying", "unknown", "taken_over", "error", "held") if c[n]]
    extra += [("expired", report.expired)] if report.expired else []
    extra += [("undelivered", report.undelivered)] if report.undelivered else []
    extra += [("backfilled", report.backfilled)] if report.backfilled else []
    # What the AI billed, when it billed anything beyond one request per answer (the offline
    # responder bills nothing): tokens, or the openai client's own retries.
    billed = report.prompt_tokens or report.completion_tokens or report.ai_requests > report.ai_calls
    cost = [f"AI requests {report.ai_requests}",
            f"tokens {report.prompt_tokens} prompt + {report.completion_tokens} completion"] if billed else []
    return ", ".join(parts + [f"{name} {n}" for name, n in extra] + cost)


STATUS_ROWS, JSON_ROWS = 100, 15  # plain `status` shows as many of its 100 rows as fit the terminal


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@click.option("--now", type=TIME, help="Measure ages from this time.")
@click.option("--latest", type=click.IntRange(1, 1000),
              help="How many recent batches (default: as many as fit the terminal; 15 with --json).")
@click.option("--watch", is_flag=True, help="Redraw every --interval seconds until Ctrl-C.")
@click.option("--interval", type=click.FloatRange(0.1, 3600), default=2.0, show_default=True,
              help="Seconds between redraws with --watch.")
@click.pass_context
def status(ctx, as_json, now, latest, watch, interval):
    """Counts by state, the agent's mode, the next retry, outages, what today's replies cost
    (SMS segments, Twilio's prices, AI), and the latest batches (fits an 80x24 terminal)."""
    from smsbatch import report

    if watch and as_json:
        raise click.UsageError("--watch redraws the screen; it cannot be combined with --json")
    if watch and not sys.stdout.isatty():  # redrawing a pipe or a file would print nothing readable
        raise click.ClickException("--watch redraws a terminal, and stdout is not one: drop --watch to print "
                                   "the status once")
    settings = settings_from(ctx)
    store = open_store(settings)

    def fetch():
        return report.status(store, settings, time.time() if now is None else now,
                             latest or (JSON_ROWS if as_json else STATUS_ROWS))

    if as_json:
        emit_json(fetch())
    elif watch:
        from smsbatch import render_ops

        render_ops.watch(fetch, interval)
    else:
        from smsbatch import render

        render.status(fetch(), fit=latest is None)


@cli.command()
@click.argument("target", metavar="BATCH_ID|PHONE")
@click.option("--prompt", is_flag=True, help="With a batch: also the exact prompt sent to the AI.")
@click.option("--limit", type=click.IntRange(1, 100000), default=50, show_default=True,
              help="With a phone: how many of the latest texts, replies and notes.")
@click.option("--now", type=TIME, help="With a phone: the quiet period as of this time (default now).")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@click.pass_context
def show(ctx, target, prompt, limit, now, as_json):
    """A batch's whole life (texts, every state change, attempts, the reply, its delivery, SMS
    segments and price), or the conversation with a phone number as a chat, newest last, with
    the quiet period the person's next text would get."""
    from smsbatch import render_ops, report
    from smsbatch.batching import Rules

    settings = settings_from(ctx)
    store = open_store(settings)
    kind, key = report.resolve(store, target)
    if kind == "phone" and prompt:
        raise click.UsageError("--prompt is for a batch; `smsbatch show PHONE` lists its batches")
    if kind == "batch":
        info = report.show_batch(store, key, prompt)
    else:
        info = report.show_phone(store, key, limit, Rules.from_settings(settings), time.time() if now is None else now)
    if as_json:
        emit_json(info)
    elif kind == "batch":
        render_ops.show_batch(info)
    else:
        render_ops.show_phone(info)




@cli.command()
@click.option("--since", type=WHEN, default="7d", show_default=True,
              help="From then: a duration before --now (7d, 24h, 90m, 2w) or a time (epoch or ISO-8601).")
@click.option("--now", type=TIME, help="Count up to this time (default now).")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@click.pass_context
def stats(ctx, since, now, as_json):
    """Texts, batches, AI requests and tokens, replies sent and delivered, AI calls saved,
    latency, and what replies cost (SMS segments, Twilio's prices, AI tokens at
    SMSBATCH_AI_PRICE_*_PER_MTOK), in all and per day, with a bar chart of texts and AI
    calls per day."""
    from smsbatch import report

    until = time.time() if now is None else now
    since = since.resolve(until)
    if not 0 < until - since <= report.MAX_STATS_DAYS * 86400:
        raise click.BadParameter(f"a span more than 0 and at most {report.MAX_STATS_DAYS}d before --now "
                                 "(one row a day)", param_hint="--since")
    settings = settings_from(ctx)
    info = report.stats(open_store(settings), since, until, settings.ai_prices)
    if as_json:
        emit_json(info)
    else:
        from smsbatch import render_stats

        render_stats.stats(info)


@cli.command()
@click.argument("batch_ids", nargs=-1, metavar="[BATCH_ID]...", type=TEXT)
@click.option("--failed", is_flag=True, help="Every batch that ended failed since --since.")
@click.option("--unknown", is_flag=True,
              help="Every batch whose send outcome is unknown, since --since (check in Twilio first that it did not go out).")
@click.option("--since", type=WHEN,
              help="With --failed/--unknown: batches that ended since then: 2h, 7d, or a time (epoch or ISO-8601).")
@click.option("--dry-run", is_flag=True, help="List what would be requeued; change nothing.")
@click.option("--fresh", is_flag=True, help="Ask the AI again even when only the send of its stored reply failed.")
@click.option("--now", type=TIME, help="Requeue as of this time.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def retry(ctx, batch_ids, failed, unknown, since, dry_run, fresh, now, as_json):
    """Requeue failed, skipped, expired or unknown batches: by id (several at once), or every
    --failed / --unknown batch since a time. A batch whose AI reply was stored and only its
    send failed is sent that reply again, with no new AI call, unless --fresh."""
    from smsbatch import ops

    now = time.time() if now is None else now
    states = [name for name, wanted in (("failed", failed), ("unknown", unknown)) if wanted]
    if batch_ids and states:
        raise click.UsageError("give batch ids or --failed/--unknown, not both")
    if not batch_ids and not states:
        raise click.UsageError("give one or more batch ids, or --failed and/or --unknown with --since")
    if states and since is None:
        raise click.UsageError("--failed/--unknown need --since (e.g. --since 2h), so old failures are not "
                               "answered months late by accident")
    if since is not None and not states:
        raise click.UsageError("--since goes with --failed/--unknown")
    since_at = None if since is None else since.resolve(now)
    from smsbatch.render import clean

    store = open_store(settings_from(ctx))
    result = ops.retry_batches(store, [b.strip() for b in batch_ids], states, since_at, now, dry_run, fresh)
    if as_json:
        emit_json(result)
    else:
        for line in ops.retry_lines(result):
            click.echo(clean(line))  # a batch's last error may quote Twilio
    for error in result["refused"]:
        click.echo(f"Error: {clean(error)}", err=True)
    if result["refused"]:
        ctx.exit(1)


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True, help="Port (0: any free).")
@click.option("--threads", type=click.IntRange(1, 256), default=16, show_default=True, help="Worker threads.")
@click.option("--insecure-no-signature", is_flag=True, help="Accept unsigned requests (testing only).")
@click.pass_context
def serve(ctx, host, port, threads, insecure_no_signature):
    """Run the Twilio webhook (POST /sms, POST /status, GET /health, GET /metrics) on wsgiref.

    Needs TWILIO_AUTH_TOKEN and SMSBATCH_PUBLIC_URL (the webhook URL configured in Twilio:
    signatures are checked against it, never against the request's Host header)."""
    from smsbatch.errors import ConfigError
    from smsbatch.web import make_app, make_server_for

    settings = settings_from(ctx)
    open_store(settings).close()
    if insecure_no_signature and not settings.twilio_auth_token:
        note("WARNING: signatures are NOT checked; anyone can post texts.", "WARNING")
    try:
        app = make_app(settings, insecure=insecure_no_signature)
    except ConfigError as exc:  # no TWILIO_AUTH_TOKEN: say how this command allows that
        hint = "" if settings.twilio_auth_token else " (--insecure-no-signature to allow, for testing)"
        raise click.ClickException(f"{exc}{hint}") from None
    try:
        server = make_server_for(app, host, port, threads)
    except OSError as exc:  # port in use, an address this machine does not have, a name that does not resolve
        raise click.ClickException(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    if settings.alert_webhook_url:  # whoever is up notices that no processor runs
        from smsbatch.alerts import Alerter, watch_stalls

        watch_stalls(settings, Alerter.for_settings(settings), threading.Event())
    note(f"listening on http://{host}:{server.server_port}/sms")
    note(app.signature_note())
    if not settings.metrics_token and host not in ("127.0.0.1", "localhost", "::1"):
        note(f"GET /metrics answers anyone who reaches {host}:{server.server_port}: keep the port private "
             "(the proxy forwards only the webhook paths) or set SMSBATCH_METRICS_TOKEN", "WARNING")
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--keep", type=click.Path(file_okay=False), help="Keep the demo database in this folder.")
def demo(as_json, keep):
    """Run the whole job on built-in defaults: no keys, no network."""
    import tempfile

    from smsbatch.demo import run_demo

    if keep:
        import os

        os.makedirs(keep, exist_ok=True)
        if os.path.exists(os.path.join(keep, "demo.db")):
            raise click.BadParameter(f"{keep} already holds a demo database (demo.db): choose an empty folder",
                                     param_hint="--keep")
        result = run_demo(keep)
    else:
        with tempfile.TemporaryDirectory(prefix="smsbatch-demo-") as folder:
            result = run_demo(folder) | {"db_path": None}
    if as_json:
        emit_json(result)
    else:
        from smsbatch import render

        render.demo(result)


for _command in (cli_ops.check, cli_ops.backup, cli_ops.hold, cli_ops.release, cli_ops.send, cli_ops.prune,
                 cli_ops.backfill, cli_ops.copy_to, cli_ops.deliveries, cli_traces.export, cli_traces.simulate):
    cli.add_command(_command)
