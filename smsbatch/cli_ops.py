"""Operators' commands: check, backup, hold, release, send, prune, backfill and copy-to."""

import time

import click

from smsbatch.cli_common import PHONE, TEXT, TIME, InputParam, emit_json, open_store, settings_from
from smsbatch.inputs import iso_time


@click.command()
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
        click.echo(f"  {sid} from {phone} to {to} at {iso_time(at)}")


@click.command()
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


@click.command()
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


@click.command()
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
    click.echo(f"{phone} on hold since {iso_time(held['since'])}{why}: no AI replies until `smsbatch release {phone}`")


@click.command()
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


@click.command()
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


@click.command()
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
    verb = "would delete" if dry_run else "deleted"
    click.echo(f"{verb} {count(gone['batches'], 'batch', 'batches')}, {count(gone['texts'], 'text')}, "
               f"{count(gone['events'], 'history entry', 'history entries')}, "
               f"{count(gone['replies'], 'AI reply', 'AI replies')} and "
               f"{count(gone['manual_replies'], 'reply', 'replies')} sent by hand, older than {iso_time(cutoff)}")


def count(n, one, many=None):
    """'1 text', '3 texts'."""
    return f"{n} {one if n == 1 else many or one + 's'}"


@click.command("copy-to")
@click.argument("url", metavar="POSTGRESQL_URL")
@click.option("--json", "as_json", is_flag=True, help="Print the rows copied per table as JSON.")
@click.pass_context
def copy_to(ctx, url, as_json):
    """Copy the --db SQLite database into the empty PostgreSQL database at POSTGRESQL_URL
    (migrated first if it has no schema), then compare every table's row count and look up
    every opt-out and hold there: any difference keeps nothing. Stop serve and process first."""
    from smsbatch.copydb import copy_to as copy_database
    from smsbatch.engine import shown_target

    settings = settings_from(ctx)
    result = copy_database(settings.db_path, url)
    if as_json:
        emit_json(result)
        return
    for table, rows in result["tables"].items():
        click.echo(f"{table}: {count(rows, 'row')}")
    click.echo(f"copied {settings.db_path} to {shown_target(url)} (schema version {result['version']}): "
               f"row counts of {len(result['tables'])} tables equal, every opt-out and hold present")
