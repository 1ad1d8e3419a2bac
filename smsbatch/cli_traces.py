"""Trace commands: export stored texts, simulate a trace (or generate one)."""

import click

import time

from smsbatch.cli_common import TEXT, TIME, WHEN, Finite, emit_json, open_store, settings_from
from smsbatch.errors import SmsbatchError


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


@click.command()
@click.option("--jsonl", is_flag=True, default=True,
              help="JSON Lines, one text a line: from, to, body, sid, at (the only format, and the default).")
@click.option("--since", type=WHEN,
              help="Only texts received since then: a duration before now (2h, 7d) or a time (epoch or ISO-8601).")
@click.option("--anonymize", is_flag=True,
              help="Pseudonyms for numbers and sids, same-length placeholders for bodies (STOP etc. kept).")
@click.option("--key", type=TEXT,
              help="Secret for --anonymize, on the command line: avoid it, every local user can read a "
              "command's arguments (ps, /proc) and anyone with the key can recompute every pseudonym; "
              "use SMSBATCH_ANON_KEY or --key-file. The same key gives the same pseudonyms (default: random).")
@click.option("--key-file", type=click.File("rb"),
              help="Read the --anonymize secret from this file (its first line), instead of SMSBATCH_ANON_KEY.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, allow_dash=True), default="-",
              help="Write here instead of stdout: a new or regular file, made readable by its owner only (0600); "
              "never a symbolic link, a device or the database.")
@click.pass_context
def export(ctx, jsonl, since, anonymize, key, key_file, output):
    """Write stored inbound texts as a trace for `simulate` or `ingest --jsonl`.

    With --anonymize, a key kept from run to run (SMSBATCH_ANON_KEY, or --key-file) gives
    the same pseudonyms each time, so traces can be compared."""
    from smsbatch.tracegen import Anonymizer, export_lines

    if key is not None and key_file is not None:
        raise click.UsageError("give --key or --key-file, not both")
    if key is not None:
        click.echo("warning: --key shows the key to every local user (ps, /proc); use SMSBATCH_ANON_KEY "
                   "or --key-file", err=True)
    if key_file is not None:
        key = read_key_file(key_file)
    if key is not None and not key.strip():
        raise click.BadParameter("is empty: anyone could recompute the pseudonyms; leave it out for a "
                                 "random key", param_hint="--key")
    if (key or key_file) and not anonymize:
        raise click.UsageError("--key only makes sense with --anonymize")
    settings = settings_from(ctx)
    store = open_store(settings)
    from smsbatch.files import write_lines

    if anonymize and key is None and settings.anon_key and not settings.anon_key.strip():
        raise click.ClickException("SMSBATCH_ANON_KEY is blank: anyone could recompute the pseudonyms; "
                                   "unset it for a random key")
    key = key if key is not None else settings.anon_key or None  # none: a random key, new each run
    anonymizer = Anonymizer(key, settings.urgent_keywords) if anonymize else None
    lines = export_lines(store.messages_since(0 if since is None else since.resolve(time.time())), anonymizer)
    try:
        count = write_lines(output, lines, database=settings.db_path)
    except OSError as exc:
        where = "stdout" if output == "-" else output
        raise click.ClickException(f"cannot write {where}: {exc.strerror or exc}") from None
    click.echo(f"exported {count} texts", err=True)


def read_key_file(file):
    """The key in a --key-file: its first line, without the line end.

    Raises:
        click.BadParameter: empty, or not UTF-8.
    """
    from smsbatch.inputs import decode_text

    try:
        text = decode_text(file.read(), file.name)
    except SmsbatchError as exc:
        raise click.BadParameter(str(exc), param_hint="--key-file") from None
    key = (text.splitlines() or [""])[0]
    if not key.strip():
        raise click.BadParameter(f"{file.name} holds no key on its first line", param_hint="--key-file")
    return key


@click.command()
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
