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
PHONE = InputParam("PHONE", "check_phone")


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
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)


@cli.command()
@click.pass_context
def migrate(ctx):
    """Create or upgrade the database (safe to run again)."""
    settings = settings_from(ctx)
    version = open_store(settings, migrate=True).version()
    click.echo(f"{settings.db_path}: schema version {version}")


@cli.command()
@click.option("--from", "phone", type=PHONE, help="The sender's number.")
@click.option("--to", "our_number", type=PHONE, help="The number they wrote to.")
@click.option("--body", help="The text.")
@click.option("--sid", help="Twilio MessageSid (default: derived from from/to/body/--at, so importing "
              "the same text with the same --at twice stores it once).")
@click.option("--at", type=TIME, help="When it arrived: epoch seconds or ISO-8601 (default now).")
@click.option("--jsonl", type=click.File("rb"),
              help="Store many: one JSON object a line (from, to, at required; body, sid optional); - for stdin.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def ingest(ctx, phone, our_number, body, sid, at, jsonl, as_json):
    """Store inbound texts as the webhook would."""
    from smsbatch.ingest import ingest_lines, ingest_one

    settings = settings_from(ctx)
    store = open_store(settings)
    if jsonl is not None:
        if phone or our_number or body is not None or sid or at is not None:
            raise click.UsageError("--jsonl cannot be combined with --from/--to/--body/--sid/--at")
        result = ingest_lines(store, jsonl, settings)
    else:
        if not (phone and our_number and body is not None):
            raise click.UsageError("give --from, --to and --body (or --jsonl FILE)")
        result = ingest_one(store, settings, phone, our_number, body, sid, at)
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
@click.option("--for", "seconds", type=click.FloatRange(0), default=0, show_default=True,
              help="Keep picking up batches as they fall due for this many seconds (cron: 55).")
@click.option("--concurrency", type=click.IntRange(1, 64), default=4, show_default=True,
              help="Batches answered at once.")
@click.option("--system-prompt-file", type=click.File("r"), help="System prompt (else SMSBATCH_SYSTEM_PROMPT).")
@click.option("--ai", type=click.Choice(["openai", "offline"]), help="AI provider (env SMSBATCH_AI).")
@click.option("--sms", type=click.Choice(["twilio", "console"]), help="SMS provider (env SMSBATCH_SMS).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.pass_context
def process(ctx, now, limit, seconds, concurrency, system_prompt_file, ai, sms, as_json):
    """Answer due batches: one AI reply each, sent by SMS (run by cron every minute)."""
    from smsbatch.processor import Clock, Processor

    changes = {k: v for k, v in (("ai", ai), ("sms", sms)) if v}
    if system_prompt_file is not None:
        changes["system_prompt"] = system_prompt_file.read().strip()
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
    processor = Processor(settings.db_path, settings, make_responder(settings), make_sender(settings), clock=clock)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    report = processor.run(limit=limit, concurrency=concurrency, seconds=seconds, stop=stop)
    if as_json:
        emit_json(report.as_dict())
    else:
        click.echo(summary_line(report))
    if report.need_a_person:
        ctx.exit(EXIT_SOME_FAILED)


def summary_line(report):
    if report.paused:
        return "paused: ENABLE_AI_SMS_AGENT is off; texts are stored, nothing is answered"
    c = report.counts
    parts = [f"claimed {report.claimed}", f"sent {c['sent']}", f"skipped {c['skipped']}", f"failed {c['failed']}"]
    extra = [(n, c[n]) for n in ("superseded", "retrying", "unknown", "lost") if c[n]]
    extra += [("expired", report.expired)] if report.expired else []
    return ", ".join(parts + [f"{name} {n}" for name, n in extra])


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@click.option("--now", type=TIME, help="Measure ages from this time.")
@click.option("--latest", type=click.IntRange(1, 1000), default=15, show_default=True, help="How many recent batches.")
@click.pass_context
def status(ctx, as_json, now, latest):
    """Batches by state, the oldest pending batch, the latest batches, texts in the last hour."""
    settings = settings_from(ctx)
    info = open_store(settings).status(time.time() if now is None else now, latest)
    if as_json:
        emit_json(info)
    else:
        from smsbatch import render

        render.status(info)


@cli.command()
@click.argument("batch_id")
@click.option("--now", type=TIME, help="Requeue as of this time.")
@click.pass_context
def retry(ctx, batch_id, now):
    """Requeue a failed, skipped, expired or unknown batch."""
    settings = settings_from(ctx)
    batch = open_store(settings).retry(batch_id.strip(), time.time() if now is None else now)
    texts = "1 text" if batch["message_count"] == 1 else f"{batch['message_count']} texts"
    click.echo(f"batch {batch['id']} requeued ({texts} from {batch['phone']})")


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
@click.option("--key", help="Secret for --anonymize: the same key gives the same pseudonyms (default: random).")
@click.option("-o", "--output", type=click.File("w"), default="-", help="Write here instead of stdout.")
@click.pass_context
def export(ctx, jsonl, since, anonymize, key, output):
    """Write stored inbound texts as a trace for `simulate` or `ingest --jsonl`."""
    from smsbatch.tracegen import Anonymizer, export_lines

    if key and not anonymize:
        raise click.UsageError("--key only makes sense with --anonymize")
    settings = settings_from(ctx)
    store = open_store(settings)
    anonymizer = Anonymizer(key, settings.urgent_keywords) if anonymize else None
    count = 0
    for line in export_lines(store.messages_since(0 if since is None else since), anonymizer):
        output.write(line + "\n")
        count += 1
    click.echo(f"exported {count} texts", err=True)


@cli.command()
@click.argument("trace", type=click.File("r"), required=False)
@click.option("--quiet", type=click.FloatRange(0), help="Quiet period, seconds (default SMSBATCH_QUIET_SECONDS or 10).")
@click.option("--max-wait", type=click.FloatRange(0), help="Maximum wait, seconds (default SMSBATCH_MAX_WAIT_SECONDS or 45).")
@click.option("--max-messages", type=click.IntRange(1), help="Texts that close a batch (default SMSBATCH_MAX_MESSAGES or 10).")
@click.option("--tick", type=click.FloatRange(0.01, 3600), default=1.0, show_default=True,
              help="Seconds between processing runs: 1 for `process --for`, 60 for plain cron.")
@click.option("--ai-latency", type=click.FloatRange(0, 300), default=0.0, show_default=True,
              help="Virtual seconds per AI answer; texts arriving meanwhile supersede the reply.")
@click.option("--concurrency", type=click.IntRange(1, 64), default=4, show_default=True, help="Batches answered at once.")
@click.option("--compare", is_flag=True, help="Add the seed design (15 s slots, cron each minute, 5 per run) side by side.")
@click.option("--seed-cron-offset", type=click.FloatRange(0, 59.999), default=0.0, show_default=True,
              help="With --compare: seconds after each minute the seed design's cron fires.")
@click.option("--sweep", type=SweepParam(),
              help="One run per value, e.g. quiet=4,6,8,10,15 (also max-wait, max-messages, tick, ai-latency, concurrency).")
@click.option("--burst-gap", type=click.FloatRange(0, min_open=True), default=10.0, show_default=True,
              help="For the metrics: a phone's texts closer together than this are one burst.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--generate", is_flag=True, help="Write a synthetic trace to stdout instead (see the --generate options).")
@click.option("--phones", type=click.IntRange(1, 1_000_000), default=50, show_default=True, help="--generate: people texting.")
@click.option("--minutes", type=click.FloatRange(0, min_open=True), default=60.0, show_default=True,
              help="--generate: length of the trace.")
@click.option("--seed", type=int, default=1, show_default=True, help="--generate: random seed (same seed, same trace).")
@click.option("--burst-mean", type=click.FloatRange(1), default=2.5, show_default=True,
              help="--generate: mean texts per burst (geometric).")
@click.option("--gap-mean", type=click.FloatRange(1), default=4.0, show_default=True,
              help="--generate: mean seconds between texts of a burst (1 s + exponential).")
@click.option("--pause-mean", type=click.FloatRange(1), default=600.0, show_default=True,
              help="--generate: mean seconds between a phone's bursts (exponential).")
@click.option("--start", type=TIME, default="2026-01-05T09:00:00Z", show_default=True, help="--generate: first moment.")
@click.pass_context
def simulate(ctx, trace, generate, as_json, **opts):
    """Replay a trace (JSONL, - for stdin) on a virtual clock through smsbatch's own batching
    and processing: AI calls, replies, replies sent mid-burst, latency. Nothing is sent.

    \b
    smsbatch export --jsonl --anonymize > trace.jsonl     # your traffic, or:
    smsbatch simulate --generate --phones 30 --seed 1 > trace.jsonl
    smsbatch simulate trace.jsonl --compare
    smsbatch simulate trace.jsonl --sweep quiet=4,6,8,10,15
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
    settings = settings_from(ctx, **{names[k]: opts[k] for k in names if opts[k] is not None})
    records, repeats = read_trace(trace, trace.name)
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
                         opts["pause_mean"], opts["start"]):
        click.echo(line)
        count += 1
    click.echo(f"generated {count} texts from {opts['phones']} phones over {opts['minutes']:g} minutes", err=True)
