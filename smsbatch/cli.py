"""The command line: parse, build, call one library function, render. The only module importing click."""

import json
import logging
import signal
import sys
import threading
import time

import click

from smsbatch.config import Settings
from smsbatch.errors import SmsbatchError

EXIT_SOME_FAILED = 3


class InputParam(click.ParamType):
    """A click type around one of smsbatch.inputs' checks, so bad input is click's usage error."""

    def __init__(self, name, check):
        self.name, self.check = name, check

    def convert(self, value, param, ctx):
        from smsbatch import inputs

        try:
            return getattr(inputs, self.check)(value)
        except SmsbatchError as exc:
            self.fail(str(exc), param, ctx)


TIME = InputParam("TIME", "parse_time")  # epoch seconds or ISO-8601
PHONE = InputParam("PHONE", "check_phone")  # normalised to E.164
SID = InputParam("SID", "check_sid")
TEXT = InputParam("TEXT", "check_text")  # any text, as long as it is UTF-8


class Finite(click.FloatRange):
    """click.FloatRange that also refuses nan and inf (which pass any range check, or never end)."""

    def convert(self, value, param, ctx):
        import math

        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return super().convert(number, param, ctx)


def read_text_file(file, option):
    """The text of a file opened in binary mode, or one usage error naming `option`."""
    from smsbatch.inputs import decode_text

    try:
        return decode_text(file.read(), file.name)
    except SmsbatchError as exc:
        raise click.BadParameter(str(exc), param_hint=option) from None


class Group(click.Group):
    """Turns smsbatch and database errors into one line and exit status 1, never a traceback."""

    def invoke(self, ctx):
        import sqlite3

        try:
            return super().invoke(ctx)
        except SmsbatchError as exc:
            raise click.ClickException(str(exc)) from None
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                raise click.ClickException("database is busy: another writer held it too long; try again") from None
            raise click.ClickException(f"database error: {exc}") from None
        except sqlite3.DatabaseError as exc:
            raise click.ClickException(f"database error: {exc}") from None
        except UnicodeEncodeError as exc:  # a setting with bytes that are not UTF-8, or a terminal that is not
            raise click.ClickException(f"cannot encode text as {exc.encoding}: a setting holds bytes that are "
                                       "not UTF-8, or the terminal cannot show a character") from None


def settings_from(ctx, **changes):
    """Settings from the environment, with --db and any command options applied."""
    try:
        settings = Settings.from_env()
        return settings.replace(db_path=ctx.obj["db"], **changes)
    except SmsbatchError as exc:
        raise click.ClickException(str(exc)) from None


def open_store(settings, migrate=False):
    from smsbatch.db import Store

    if not migrate:
        return Store.open_ready(settings.db_path)
    store = Store(settings.db_path)
    store.migrate()
    return store


def emit_json(data):
    click.echo(json.dumps(data, indent=2, default=str))


@click.group(cls=Group)
@click.option("--db", envvar="SMSBATCH_DB", default="smsbatch.db", show_default=True,
              type=click.Path(dir_okay=False), help="SQLite database file (env SMSBATCH_DB).")
@click.version_option(package_name="smsbatch")
@click.pass_context
def cli(ctx, db):
    """Batch rapid-fire inbound SMS and answer each burst with one AI reply."""
    ctx.obj = {"db": db}
    # Only warnings reach stderr (cron mails it); the twilio and HTTP clients log every
    # request, headers included, at INFO.
    handler = logging.StreamHandler(sys.stderr)
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
    click.echo(f"{settings.db_path}: {said}")


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
    from smsbatch.processor import Clock, Processor

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
    open_store(settings).close()
    from smsbatch.ai import make_responder
    from smsbatch.sms import make_sender

    clock = Clock(now, advancing=bool(seconds)) if now is not None else time.time
    sender = make_sender(settings)
    processor = Processor(settings.db_path, settings, make_responder(settings), sender, clock=clock)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    backfilled = periodic_backfill(processor.store(), sender, settings, clock())
    report = processor.run(limit=limit, concurrency=concurrency, seconds=seconds, stop=stop)
    report.backfilled = backfilled
    prune_after_run(settings, clock())
    if as_json:
        emit_json(report.as_dict())
    else:
        from smsbatch.inputs import iso_time

        click.echo(f"{iso_time(time.time())} {summary_line(report)}")
    if report.need_a_person:  # failed, unknown, or an unexpected error (its traceback is on stderr)
        ctx.exit(EXIT_SOME_FAILED)


def prune_after_run(settings, now):
    """SMSBATCH_RETENTION_DAYS: each run deletes a bounded number of batches older than that."""
    if not settings.retention_days:
        return
    from smsbatch.ops import PRUNE_PER_RUN

    store = open_store(settings)
    try:
        gone = store.prune(now - settings.retention_days * 86400, limit=PRUNE_PER_RUN)
    finally:
        store.close()
    if gone["batches"] or gone["manual_replies"]:
        click.echo(f"pruned {gone['batches']} batches, {gone['texts']} texts, "
                   f"{gone['replies'] + gone['manual_replies']} replies older than {settings.retention_days:g} days",
                   err=True)


def periodic_backfill(store, sender, settings, now):
    """`process`'s look into Twilio's log for texts the webhook never got (see smsbatch.backfill).
    Returns how many it stored; a Twilio failure is logged and processing goes on."""
    if not settings.backfill or settings.sms != "twilio":
        return 0
    from smsbatch.backfill import backfill_if_due
    from smsbatch.errors import DeliveryError
    from smsbatch.sms import TwilioLog

    try:
        report = backfill_if_due(store, TwilioLog(sender), settings, now)
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


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@click.option("--now", type=TIME, help="Measure ages from this time.")
@click.option("--latest", type=click.IntRange(1, 1000), default=15, show_default=True, help="How many recent batches.")
@click.option("--watch", is_flag=True, help="Redraw every --interval seconds until Ctrl-C.")
@click.option("--interval", type=click.FloatRange(0.1, 3600), default=2.0, show_default=True,
              help="Seconds between redraws with --watch.")
@click.pass_context
def status(ctx, as_json, now, latest, watch, interval):
    """Counts by state, the agent's mode, the next retry, outages, and the latest batches
    (fits an 80x24 terminal)."""
    from smsbatch import report

    if watch and as_json:
        raise click.UsageError("--watch redraws the screen; it cannot be combined with --json")
    if watch and not sys.stdout.isatty():  # redrawing a pipe or a file would print nothing readable
        raise click.ClickException("--watch redraws a terminal, and stdout is not one: drop --watch to print "
                                   "the status once")
    settings = settings_from(ctx)
    store = open_store(settings)

    def fetch():
        return report.status(store, settings, time.time() if now is None else now, latest)

    if as_json:
        emit_json(fetch())
    elif watch:
        from smsbatch import render_ops

        render_ops.watch(fetch, interval)
    else:
        from smsbatch import render

        render.status(fetch())


@cli.command()
@click.argument("target", metavar="BATCH_ID|PHONE")
@click.option("--prompt", is_flag=True, help="With a batch: also the exact prompt sent to the AI.")
@click.option("--limit", type=click.IntRange(1, 100000), default=50, show_default=True,
              help="With a phone: how many of the latest texts, replies and notes.")
@click.option("--now", type=TIME, help="With a phone: the quiet period as of this time (default now).")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@click.pass_context
def show(ctx, target, prompt, limit, now, as_json):
    """A batch's whole life (texts, every state change, attempts, the reply and its delivery), or
    the conversation with a phone number as a chat, newest last, with the quiet period the
    person's next text would get."""
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


DURATION = InputParam("DURATION", "parse_duration")  # 7d, 24h, 90m


@cli.command()
@click.option("--since", type=DURATION, default="7d", show_default=True, help="How far back: 7d, 24h, 90m.")
@click.option("--now", type=TIME, help="Count up to this time (default now).")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@click.pass_context
def stats(ctx, since, now, as_json):
    """Texts, batches, AI requests and tokens, replies sent and delivered, AI calls saved and
    latency, in all and per day, with a bar chart of texts and AI calls per day."""
    from smsbatch import report

    if not 0 < since <= report.MAX_STATS_DAYS * 86400:
        raise click.BadParameter(f"more than 0 and at most {report.MAX_STATS_DAYS}d (one row a day)",
                                 param_hint="--since")
    settings = settings_from(ctx)
    until = time.time() if now is None else now
    info = report.stats(open_store(settings), max(0.0, until - since), until)
    if as_json:
        emit_json(info)
    else:
        from smsbatch import render_ops

        render_ops.stats(info)


@cli.command()
@click.argument("batch_ids", nargs=-1, metavar="[BATCH_ID]...", type=TEXT)
@click.option("--failed", is_flag=True, help="Every batch that ended failed since --since.")
@click.option("--unknown", is_flag=True,
              help="Every batch whose send outcome is unknown, since --since (check in Twilio first that it did not go out).")
@click.option("--since", help="With --failed/--unknown: batches that ended since then: 2h, 7d, or a time.")
@click.option("--dry-run", is_flag=True, help="List what would be requeued; change nothing.")
@click.option("--fresh", is_flag=True, help="Ask the AI again even when only the send of its stored reply failed.")
@click.option("--now", type=TIME, help="Requeue as of this time.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def retry(ctx, batch_ids, failed, unknown, since, dry_run, fresh, now, as_json):
    """Requeue failed, skipped, expired or unknown batches: by id (several at once), or every
    --failed / --unknown batch since a time. A batch whose AI reply was stored and only its
    send failed is sent that reply again, with no new AI call, unless --fresh."""
    from smsbatch import inputs, ops

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
    try:
        since_at = None if since is None else inputs.parse_since(since, now)
    except SmsbatchError as exc:
        raise click.BadParameter(str(exc), param_hint="--since") from None
    store = open_store(settings_from(ctx))
    result = ops.retry_batches(store, [b.strip() for b in batch_ids], states, since_at, now, dry_run, fresh)
    if as_json:
        emit_json(result)
    else:
        for line in ops.retry_lines(result):
            click.echo(line)
    for error in result["refused"]:
        click.echo(f"Error: {error}", err=True)
    if result["refused"]:
        ctx.exit(1)


@cli.command()
@click.option("--since", type=TIME, required=True, help="From this time (epoch seconds or ISO-8601).")
@click.option("--until", type=TIME, help="Up to this time (default now).")
@click.option("--dry-run", is_flag=True, help="Only list the texts we do not have; store nothing.")
@click.option("--now", type=TIME, help="Act as if it were this time (what counts as too old to answer).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def backfill(ctx, since, until, dry_run, now, as_json):
    """Find texts in Twilio's message log that the webhook never stored, and store them.

    Texts older than SMSBATCH_MAX_AGE_SECONDS are stored as expired (not answered late);
    the others are answered by the next `process` run.
    """
    from smsbatch.backfill import backfill as run_backfill
    from smsbatch.sms import TwilioLog, TwilioSender

    settings = settings_from(ctx)
    missing = [m for m in settings.missing_credentials() if m.startswith("TWILIO_ACCOUNT") or m == "TWILIO_AUTH_TOKEN"]
    if missing:
        raise click.ClickException("missing " + ", ".join(missing))
    now = time.time() if now is None else now
    until = now if until is None else until
    if until < since:
        raise click.BadParameter("must not be before --since", param_hint="--until")
    store = open_store(settings)
    report = run_backfill(store, TwilioLog(TwilioSender(settings)), settings, since, until, now, dry_run)
    if as_json:
        emit_json(report.as_dict() | {"dry_run": dry_run})
        return
    verb = "would store" if dry_run else "stored"
    count = len(report.found) if dry_run else report.stored
    click.echo(f"looked at {report.seen} texts to {len(report.numbers)} number(s); {report.already} already stored; "
               f"{verb} {count}" + ("" if dry_run else f" ({report.expired} too old to answer, stored as expired)"))
    for sid, phone, to, at in report.found:
        click.echo(f"  {sid} from {phone} to {to} at {_iso(at)}")


def _iso(epoch):
    import datetime

    return datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True, help="Port (0: any free).")
@click.option("--threads", type=click.IntRange(1, 256), default=16, show_default=True, help="Worker threads.")
@click.option("--insecure-no-signature", is_flag=True, help="Accept unsigned requests (testing only).")
@click.pass_context
def serve(ctx, host, port, threads, insecure_no_signature):
    """Run the Twilio webhook (POST /sms, GET /health) on wsgiref."""
    from smsbatch.errors import ConfigError
    from smsbatch.web import make_app, make_server_for

    settings = settings_from(ctx)
    open_store(settings).close()
    if insecure_no_signature and not settings.twilio_auth_token:
        click.echo("WARNING: signatures are NOT checked; anyone can post texts.", err=True)
    try:
        app = make_app(settings, insecure=insecure_no_signature)
    except ConfigError as exc:  # no TWILIO_AUTH_TOKEN: say how this command allows that
        raise click.ClickException(f"{exc} (--insecure-no-signature to allow, for testing)") from None
    try:
        server = make_server_for(app, host, port, threads)
    except OSError as exc:  # port in use, an address this machine does not have, a name that does not resolve
        raise click.ClickException(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    click.echo(f"listening on http://{host}:{server.server_port}/sms", err=True)
    click.echo(app.signature_note(), err=True)
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


# -- traces: export and simulate ------------------------------------------------------


class SweepParam(click.ParamType):
    """NAME=V1,V2,... for `simulate --sweep`."""

    name = "NAME=V1,V2,..."

    def convert(self, value, param, ctx):
        from smsbatch.simulate import parse_sweep

        if isinstance(value, tuple):
            return value
        try:
            return parse_sweep(value)
        except SmsbatchError as exc:
            self.fail(str(exc), param, ctx)


@cli.command()
@click.option("--jsonl", is_flag=True, default=True,
              help="JSON Lines, one text a line: from, to, body, sid, at (the only format, and the default).")
@click.option("--since", type=TIME, help="Only texts received at or after this time.")
@click.option("--anonymize", is_flag=True,
              help="Pseudonyms for numbers and sids, same-length placeholders for bodies (STOP etc. kept).")
@click.option("--key", type=TEXT,
              help="Secret for --anonymize: the same key gives the same pseudonyms (default: random).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, allow_dash=True), default="-",
              help="Write here instead of stdout; a new file is readable by its owner only (0600).")
@click.pass_context
def export(ctx, jsonl, since, anonymize, key, output):
    """Write stored inbound texts as a trace for `simulate` or `ingest --jsonl`."""
    from smsbatch.tracegen import Anonymizer, export_lines

    if key is not None and not key.strip():
        raise click.BadParameter("is empty: anyone could recompute the pseudonyms; leave it out for a "
                                 "random key", param_hint="--key")
    if key and not anonymize:
        raise click.UsageError("--key only makes sense with --anonymize")
    settings = settings_from(ctx)
    store = open_store(settings)
    from smsbatch.files import write_lines

    anonymizer = Anonymizer(key, settings.urgent_keywords) if anonymize else None
    lines = export_lines(store.messages_since(0 if since is None else since), anonymizer)
    try:
        count = write_lines(output, lines)
    except OSError as exc:
        where = "stdout" if output == "-" else output
        raise click.ClickException(f"cannot write {where}: {exc.strerror or exc}") from None
    click.echo(f"exported {count} texts", err=True)


@cli.command()
@click.argument("trace", type=click.File("rb"), required=False)
@click.option("--quiet", type=Finite(0), help="Quiet period, seconds (default SMSBATCH_QUIET_SECONDS or 10).")
@click.option("--max-wait", type=Finite(0), help="Maximum wait, seconds (default SMSBATCH_MAX_WAIT_SECONDS or 45).")
@click.option("--max-messages", type=click.IntRange(1), help="Texts that close a batch (default SMSBATCH_MAX_MESSAGES or 10).")
@click.option("--tick", type=Finite(0.01, 3600), default=1.0, show_default=True,
              help="Seconds between processing runs: 1 for `process --for`, 60 for plain cron.")
@click.option("--ai-latency", type=Finite(0, 300), default=0.0, show_default=True,
              help="Virtual seconds per AI answer; texts arriving meanwhile supersede the reply.")
@click.option("--concurrency", type=click.IntRange(1, 64), default=4, show_default=True, help="Batches answered at once.")
@click.option("--compare", is_flag=True, help="Add the seed design (15 s slots, cron each minute, 5 per run) side by side.")
@click.option("--seed-cron-offset", type=Finite(0, 59.999), default=0.0, show_default=True,
              help="With --compare: seconds after each minute the seed design's cron fires.")
@click.option("--sweep", type=SweepParam(),
              help="One run per value, e.g. quiet=4,6,8,10,15 (also max-wait, max-messages, tick, ai-latency, "
              "concurrency, adaptive, adaptive-min, adaptive-max).")
@click.option("--adaptive", type=click.IntRange(0, 1),
              help="1: quiet period fitted to each person's pace, 0: fixed (default SMSBATCH_ADAPTIVE or 1).")
@click.option("--adaptive-min", type=Finite(0), help="Shortest adaptive quiet period, seconds (default 4).")
@click.option("--adaptive-max", type=Finite(0), help="Longest adaptive quiet period, seconds (default 20).")
@click.option("--burst-gap", type=Finite(0, min_open=True), default=10.0, show_default=True,
              help="For the metrics: a phone's texts closer together than this are one burst.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--generate", is_flag=True, help="Write a synthetic trace to stdout instead (see the --generate options).")
@click.option("--phones", type=click.IntRange(1, 1_000_000), default=50, show_default=True, help="--generate: people texting.")
@click.option("--minutes", type=Finite(0, min_open=True), default=60.0, show_default=True,
              help="--generate: length of the trace.")
@click.option("--seed", type=int, default=1, show_default=True, help="--generate: random seed (same seed, same trace).")
@click.option("--burst-mean", type=Finite(1), default=2.5, show_default=True,
              help="--generate: mean texts per burst (geometric).")
@click.option("--gap-mean", type=Finite(1), default=4.0, show_default=True,
              help="--generate: mean seconds between texts of a burst (1 s + exponential).")
@click.option("--pause-mean", type=Finite(1), default=600.0, show_default=True,
              help="--generate: mean seconds between a phone's bursts (exponential).")
@click.option("--pace-spread", type=click.FloatRange(1), default=1.0, show_default=True,
              help="--generate: each person's own mean gap, log-uniform from gap-mean/S to gap-mean*S (1: all alike).")
@click.option("--start", type=TIME, default="2026-01-05T09:00:00Z", show_default=True, help="--generate: first moment.")
@click.pass_context
def simulate(ctx, trace, generate, as_json, **opts):
    """Replay a trace (JSONL, - for stdin) on a virtual clock through smsbatch's own batching
    and processing: AI calls, replies, replies sent mid-burst, latency. Nothing is sent.

    \b
    smsbatch export --jsonl --anonymize > trace.jsonl     # your traffic, or:
    smsbatch simulate --generate --phones 30 --seed 1 > trace.jsonl
    smsbatch simulate trace.jsonl --compare
    smsbatch simulate trace.jsonl --sweep quiet=4,6,8,10,15 --adaptive 0
    smsbatch simulate --generate --pace-spread 3 --seed 1 > paced.jsonl   # people with their own pace
    smsbatch simulate paced.jsonl --sweep adaptive=0,1 --burst-gap 30
    """
    if generate:
        if trace is not None or as_json or opts["compare"] or opts["sweep"]:
            raise click.UsageError("--generate writes a trace; it takes no TRACE, --json, --compare or --sweep")
        return generate_trace(opts)
    if trace is None:
        raise click.UsageError("give a TRACE file (JSONL, - for stdin), or --generate to make one")
    from smsbatch import simulate as simulation
    from smsbatch.tracegen import read_trace

    names = {"quiet": "quiet_seconds", "max_wait": "max_wait_seconds", "max_messages": "max_messages"}
    names.update({"adaptive_min": "adaptive_min_seconds", "adaptive_max": "adaptive_max_seconds"})
    changes = {names[k]: opts[k] for k in names if opts[k] is not None}
    if opts["adaptive"] is not None:
        changes["adaptive"] = bool(opts["adaptive"])
    settings = settings_from(ctx, **changes)
    records, repeats = read_trace(trace, getattr(trace, "name", "trace"))
    setup = simulation.Setup(settings, opts["tick"], opts["ai_latency"], opts["concurrency"])
    report = simulation.simulate(records, setup, compare=opts["compare"], sweep=opts["sweep"],
                                 burst_gap=opts["burst_gap"], seed_offset=opts["seed_cron_offset"], repeats=repeats)
    if as_json:
        emit_json(report)
    else:
        from smsbatch import render

        render.simulation(report)


def generate_trace(opts):
    """`simulate --generate`: the synthetic trace on stdout, a count on stderr."""
    from smsbatch.tracegen import generate

    count = 0
    for line in generate(opts["phones"], opts["minutes"], opts["seed"], opts["burst_mean"], opts["gap_mean"],
                         opts["pause_mean"], opts["start"], opts["pace_spread"]):
        click.echo(line)
        count += 1
    click.echo(f"generated {count} texts from {opts['phones']} phones over {opts['minutes']:g} minutes", err=True)


# -- operators: check, backup, prune, hold, release, send (issue 10) ------------------


@cli.command()
@click.option("--fix-webhook", is_flag=True,
              help="Set each reply number's incoming-message webhook to SMSBATCH_PUBLIC_URL (POST) where it differs.")
@click.option("--json", "as_json", is_flag=True, help="Print the settings and results as JSON.")
@click.pass_context
def check(ctx, fix_webhook, as_json):
    """Show the effective settings (secrets masked), then check the database, Twilio's
    credentials, the reply numbers' webhook and OpenAI, each failure with its fix.
    Exit status 0 when every check passes, 1 otherwise."""
    from smsbatch import checks

    settings = settings_from(ctx)
    shown = checks.effective_settings(settings)
    results = checks.run_checks(settings, fix_webhook=fix_webhook)
    ok = all(r.ok for r in results)
    if as_json:
        emit_json({"settings": dict(shown), "checks": [r.as_dict() for r in results], "ok": ok})
    else:
        from smsbatch import render

        render.check(shown, results)
    if not ok:
        ctx.exit(1)


@cli.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--force", is_flag=True, help="Overwrite FILE if it exists.")
@click.pass_context
def backup(ctx, file, force):
    """Write a consistent copy of the database to FILE (mode 0600) while serve and process
    keep running. Never copy the .db file with cp: recent texts live in its -wal file."""
    from smsbatch.ops import backup as make_backup

    settings = settings_from(ctx)
    info = make_backup(settings.db_path, file, force=force)
    click.echo(f"backed up {settings.db_path} to {info['path']}: schema version {info['version']}, "
               f"{info['texts']} texts, {info['batches']} batches, {info['bytes']} bytes")


@cli.command()
@click.argument("phone", type=PHONE)
@click.option("--reason", type=TEXT, help="Why (shown with the person's batches).")
@click.option("--now", type=TIME, help="Act as if it were this time.")
@click.pass_context
def hold(ctx, phone, reason, now):
    """Stop AI replies to PHONE until `smsbatch release`. Their texts are still stored and
    shown, their batches end *held*, and their START does not undo it. Reply by hand with
    `smsbatch send`."""
    store = open_store(settings_from(ctx))
    held = store.hold(phone, reason, time.time() if now is None else now)
    from smsbatch import render

    why = f" ({render.clean(' '.join(held['reason'].split()))})" if held["reason"] else ""
    click.echo(f"{phone} on hold since {render.when(held['since'])}{why}: no AI replies until `smsbatch release {phone}`")


@cli.command()
@click.argument("phone", type=PHONE)
@click.option("--answer-pending", is_flag=True,
              help="Answer the texts that came while on hold (one reply per conversation); by default they are not answered late.")
@click.option("--now", type=TIME, help="Act as if it were this time.")
@click.pass_context
def release(ctx, phone, answer_pending, now):
    """End the hold on PHONE: AI replies resume with their next text."""
    store = open_store(settings_from(ctx))
    hold_, requeued = store.release(phone, time.time() if now is None else now, answer_pending)
    texts = hold_["held_texts"]
    said = f"{texts} text{'' if texts == 1 else 's'} came while on hold"
    if answer_pending:
        said += f": requeued for one reply ({', '.join(requeued)})" if requeued else ""
    elif texts:
        said += ", not answered (--answer-pending to answer them)"
    click.echo(f"{phone} released; {said}")


@cli.command()
@click.argument("phone", type=PHONE)
@click.argument("text", type=TEXT)
@click.option("--from", "our_number", type=PHONE,
              help="Our number to send from (default: the one they last wrote to, else TWILIO_FROM_NUMBER).")
@click.option("--now", type=TIME, help="Record it as sent at this time.")
@click.pass_context
def send(ctx, phone, text, our_number, now):
    """Send TEXT to PHONE by hand through Twilio, and record it in the conversation: the AI
    sees it as part of the history next time. Refused for a number that opted out."""
    from smsbatch.ops import send_by_hand
    from smsbatch.sms import make_sender

    if not text.strip():
        raise click.BadParameter("the text is empty", param_hint="TEXT")
    settings = settings_from(ctx)
    missing = [m for m in settings.missing_credentials() if m in ("TWILIO_ACCOUNT_SID", "TWILIO_AUTH_TOKEN")]
    if missing:
        raise click.ClickException("missing " + ", ".join(missing))
    store = open_store(settings)
    sent = send_by_hand(store, settings, make_sender(settings), phone, text,
                        our_number, time.time() if now is None else now)
    click.echo(f"sent to {sent['to']} from {sent['from']} ({sent['sid']})")
    if store.find_hold(phone) is None:
        click.echo(f"note: {phone} is not on hold, so the AI still answers their next texts "
                   f"(`smsbatch hold {phone}` to take over)", err=True)


@cli.command()
@click.option("--older-than", "age", type=InputParam("DURATION", "parse_duration"), required=True,
              help="Delete what is older than this: 90d, 12w, 36h.")
@click.option("--dry-run", is_flag=True, help="Count what would be deleted; delete nothing.")
@click.option("--now", type=TIME, help="Measure ages from this time.")
@click.option("--json", "as_json", is_flag=True, help="Print the counts as JSON.")
@click.pass_context
def prune(ctx, age, dry_run, now, as_json):
    """Delete old, finished conversation history: batches whose texts and outcome are all older
    than --older-than, with their texts, state history and replies, and replies sent by hand
    before then. Never a pending batch, nor anything of a person on hold or opted out."""
    store = open_store(settings_from(ctx))
    cutoff = (time.time() if now is None else now) - age
    gone = store.prune(cutoff, dry_run=dry_run)
    if as_json:
        emit_json(gone | {"dry_run": dry_run, "cutoff": cutoff})
        return
    from smsbatch import render

    verb = "would delete" if dry_run else "deleted"
    click.echo(f"{verb} {count(gone['batches'], 'batch', 'batches')}, {count(gone['texts'], 'text')}, "
               f"{count(gone['events'], 'history entry', 'history entries')}, "
               f"{count(gone['replies'], 'AI reply', 'AI replies')} and "
               f"{count(gone['manual_replies'], 'reply', 'replies')} sent by hand, older than {render.when(cutoff)}")


def count(n, one, many=None):
    """'1 text', '3 texts'."""
    return f"{n} {one if n == 1 else many or one + 's'}"
