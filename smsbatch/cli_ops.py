"""Operators' commands: check, backup, hold, release, send, prune, backfill and copy-to."""

import time

import click

from smsbatch.cli_common import PHONE, TEXT, TIME, WHEN, InputParam, emit_json, open_store, settings_from
from smsbatch.inputs import iso_time


@click.command()
@click.option("--since", type=WHEN, required=True,
              help="From then: a duration before --now (2h, 7d) or a time (epoch seconds or ISO-8601).")
@click.option("--until", type=WHEN, help="Up to then, given the same way (default now).")
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
    from smsbatch.sms import TwilioSender
    from smsbatch.twilio_log import TwilioLog

    settings = settings_from(ctx)
    missing = [m for m in settings.missing_credentials() if m.startswith("TWILIO_ACCOUNT") or m == "TWILIO_AUTH_TOKEN"]
    if missing:
        raise click.ClickException("missing " + ", ".join(missing))
    now = time.time() if now is None else now
    since, until = since.resolve(now), now if until is None else until.resolve(now)
    if until < since:
        raise click.BadParameter("must not be before --since", param_hint="--until")
    store = open_store(settings)
    report = run_backfill(store, TwilioLog(TwilioSender(settings)), settings, since, until, now, dry_run)
    if as_json:
        emit_json(report.as_dict() | {"dry_run": dry_run})
        return
    from smsbatch.render import clean

    verb = "would store" if dry_run else "stored"
    count = len(report.found) if dry_run else report.stored
    click.echo(f"looked at {report.seen} texts to {len(report.numbers)} number(s); {report.already} already stored; "
               f"{verb} {count}" + ("" if dry_run else f" ({report.expired} too old to answer, stored as expired)"))
    for sid, phone, to, at in report.found:
        click.echo(clean(f"  {sid} from {phone} to {to} at {iso_time(at)}"))  # as Twilio's log gave them
    if report.answered:
        click.echo(f"{report.answered} of them answered already (Twilio's log shows our reply after it): "
                   "stored as skipped, not answered again")
    if report.unreadable:
        click.echo(f"{report.unreadable} record(s) could not be read and were skipped (named on stderr)")
    if report.cut:
        from smsbatch.errors import visible

        click.echo(f"stopped early: {visible(report.cut, 200)}; run it again for the rest", err=True)


@click.command()
@click.option("--fix-webhook", is_flag=True,
              help="Set the incoming-message webhook of each listed number (SMSBATCH_NUMBERS, else "
              "TWILIO_FROM_NUMBER, plus the messaging service's) to SMSBATCH_PUBLIC_URL (POST) where it "
              "differs, saying what it changes first. Never touches another number.")
@click.option("--dry-run", is_flag=True, help="With --fix-webhook: say what would change; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the settings and results as JSON.")
@click.pass_context
def check(ctx, fix_webhook, dry_run, as_json):
    """Show the effective settings (secrets masked), then check the database, Twilio's
    credentials, every listed number and its webhook, and OpenAI, each failure with its fix;
    the account's other numbers are listed for information. Exit status 0 when every check
    passes, 1 otherwise."""
    from smsbatch import checks
    from smsbatch.render import clean

    if dry_run and not fix_webhook:
        raise click.UsageError("--dry-run goes with --fix-webhook")
    settings = settings_from(ctx)
    shown = checks.effective_settings(settings)
    planned = []

    def announce(changes, dry):
        planned.extend(changes)
        verb = "would set" if dry else "setting"
        for c in changes:  # before any change is made (on stderr with --json: one document on stdout)
            click.echo(clean(f"{verb} the webhook of {c['number']}: {c['was']} -> {c['becomes']}"), err=as_json)

    results = checks.run_checks(settings, fix_webhook=fix_webhook, dry_run=dry_run, announce=announce)
    ok = all(r.ok for r in results)
    if as_json:
        emit_json({"settings": dict(shown), "checks": [r.as_dict() for r in results], "ok": ok,
                   "webhook_changes": planned, "dry_run": dry_run})
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
@click.argument("phone", type=PHONE, required=False)
@click.option("--number", type=PHONE,
              help="Pause one of our numbers instead (support overnight, say): texts to it are stored and shown, "
              "their batches end *held*, the other numbers are answered as usual.")
@click.option("--reason", type=TEXT, help="Why (shown with the held batches).")
@click.option("--now", type=TIME, help="Act as if it were this time.")
@click.pass_context
def hold(ctx, phone, number, reason, now):
    """Stop AI replies to PHONE until `smsbatch release`. Their texts are still stored and
    shown, their batches end *held*, and their START does not undo it. Reply by hand with
    `smsbatch send`. With --number, stop AI replies from one of our numbers instead."""
    from smsbatch import render

    _one_of(phone, number)
    settings = settings_from(ctx)
    store = open_store(settings)
    now = time.time() if now is None else now
    held = store.hold(phone, reason, now) if phone else store.hold_number(number, reason, now)
    why = f" ({render.clean(' '.join(held['reason'].split()))})" if held["reason"] else ""
    if phone:
        click.echo(f"{phone} on hold since {iso_time(held['since'])}{why}: no AI replies until "
                   f"`smsbatch release {phone}`")
        return
    click.echo(f"our number {number} paused since {iso_time(held['since'])}{why}: texts to it are stored, "
               f"no AI replies from it until `smsbatch release --number {number}`")
    if settings.listed_numbers and number not in settings.listed_numbers:
        click.echo(f"note: {number} is not in SMSBATCH_NUMBERS (listed: {', '.join(settings.listed_numbers)})",
                   err=True)


def _one_of(phone, number):
    """hold/release take a person's PHONE or --number, exactly one."""
    if bool(phone) == bool(number):
        raise click.UsageError("give a PHONE (a person) or --number (one of our numbers), not both"
                               if phone else "give a PHONE (a person) or --number NUMBER (one of our numbers)")


@click.command()
@click.argument("phone", type=PHONE, required=False)
@click.option("--number", type=PHONE, help="End the pause of one of our numbers (`hold --number`) instead.")
@click.option("--answer-pending", is_flag=True,
              help="Answer the texts that came while on hold (one reply per conversation); by default they are not answered late.")
@click.option("--now", type=TIME, help="Act as if it were this time.")
@click.pass_context
def release(ctx, phone, number, answer_pending, now):
    """End the hold on PHONE (or the pause of our --number): AI replies resume with their next text."""
    _one_of(phone, number)
    store = open_store(settings_from(ctx))
    now = time.time() if now is None else now
    if phone:
        hold_, requeued = store.release(phone, now, answer_pending)
    else:
        hold_, requeued = store.release_number(number, now, answer_pending)
    texts = hold_["held_texts"]
    said = f"{texts} text{'' if texts == 1 else 's'} came while {'on hold' if phone else 'paused'}"
    if answer_pending:
        said += f": requeued for one reply ({', '.join(requeued)})" if requeued else ""
    elif hold_["held_ids"]:  # the hold is gone now: `release --answer-pending` would say "not on hold"
        said += f", not answered (to answer them: smsbatch retry {' '.join(hold_['held_ids'])})"
    elif texts:
        said += ", not answered"
    click.echo(f"{phone} released; {said}" if phone else f"our number {number} released; {said}")


@click.command()
@click.argument("phone", type=PHONE)
@click.argument("text", type=TEXT)
@click.option("--from", "our_number", type=PHONE,
              help="Our number to send from, one of SMSBATCH_NUMBERS or the messaging service's (default: the "
              "one they last wrote to when it is ours, else TWILIO_FROM_NUMBER).")
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
    from smsbatch.render import clean

    click.echo(clean(f"sent to {sent['to']} from {sent['from']} ({sent['sid']})"))  # the SID is Twilio's
    if store.find_hold(phone) is None:
        click.echo(f"note: {phone} is not on hold, so the AI still answers their next texts "
                   f"(`smsbatch hold {phone}` to take over)", err=True)
    n = sent["segments"]
    click.echo(f"billed as {n} SMS segment{'s' * (n != 1)}, {sent['encoding']}")


class DeliveryStatuses(click.ParamType):
    """A comma-separated list of delivery statuses (Twilio's MessageStatus, or no_receipt)."""

    name = "STATUS[,STATUS...]"

    def convert(self, value, param, ctx):
        from smsbatch import delivery
        from smsbatch.db_report import NO_RECEIPT

        if isinstance(value, tuple):
            return value
        known = sorted(delivery.RANK) + [NO_RECEIPT]
        wanted = tuple(dict.fromkeys(part.strip().lower() for part in str(value).split(",") if part.strip()))
        bad = [w for w in wanted if w not in known]
        if bad or not wanted:
            self.fail(f"{', '.join(map(repr, bad)) or 'nothing'}: choose from {', '.join(known)}", param, ctx)
        return wanted


@click.command()
@click.option("--since", type=WHEN, default="7d", show_default=True,
              help="Replies sent since then: a duration before --now (2h, 7d, 2w) or a time (epoch or ISO-8601).")
@click.option("--until", type=WHEN, help="...and before then, given the same way (default now).")
@click.option("--status", "statuses", type=DeliveryStatuses(), default="undelivered,failed", show_default=True,
              help="Which delivery statuses to list, comma-separated (no_receipt: none reported yet).")
@click.option("--now", type=TIME, help="Measure durations from this time.")
@click.option("--json", "as_json", is_flag=True, help="Print the replies as JSON.")
@click.pass_context
def deliveries(ctx, since, until, statuses, now, as_json):
    """List the replies that were not delivered (by default: undelivered or failed) sent in a
    period, newest first: when, the batch, the reply's SID, to whom and from which of our
    numbers, and the error in words."""
    from smsbatch.db_report import NO_RECEIPT
    from smsbatch.render import clean

    now = time.time() if now is None else now
    since, until = since.resolve(now), now if until is None else until.resolve(now)
    if until < since:
        raise click.BadParameter("must not be before --since", param_hint="--until")
    rows = open_store(settings_from(ctx)).delivery_problems(since, until, statuses)
    if as_json:
        emit_json({"since": since, "until": until, "statuses": list(statuses), "replies": rows})
        return
    which = " or ".join("no receipt yet" if s == NO_RECEIPT else s for s in statuses)
    click.echo(f"{count(len(rows), 'reply', 'replies')} ({which}) sent {iso_time(since)} to {iso_time(until)}"
               + (":" if rows else ""))
    for row in rows:
        batch = row["batch_id"] or "(by hand)"
        click.echo(clean(f"  {iso_time(row['sent_at'])}  batch {batch}  {row['sid']}  to {row['phone']} "
                         f"from {row['our_number']}  {row['error']}"))


VACUUM_SHARE = 0.25  # prune rewrites the file when at least this share of it is free after deleting


@click.command()
@click.option("--older-than", "age", type=InputParam("DURATION", "parse_duration"), required=True,
              help="Delete what is older than this: 90d, 12w, 36h.")
@click.option("--dry-run", is_flag=True, help="Count what would be deleted; delete nothing.")
@click.option("--vacuum/--no-vacuum", default=None,
              help="After deleting, give the freed space back to the disk (rewrites the database: needs free disk "
                   "of its size and makes incoming texts wait meanwhile). Default: when a quarter of the file or "
                   "more is free.")
@click.option("--now", type=TIME, help="Measure ages from this time.")
@click.option("--json", "as_json", is_flag=True, help="Print the counts as JSON.")
@click.pass_context
def prune(ctx, age, dry_run, vacuum, now, as_json):
    """Delete old, finished conversation history: batches whose texts and outcome are all older
    than --older-than, with their texts, state history and replies, and replies sent by hand
    before then. Never a pending batch, nor anything of a person on hold or opted out.
    Refused for an age inside the backfill's look-back (SMSBATCH_MAX_AGE_SECONDS plus 5
    minutes): a text deleted there would be found in Twilio's log and answered again. Then,
    after a large prune, give the space back to the disk (see --vacuum)."""
    from smsbatch.backfill import min_prune_age

    settings = settings_from(ctx)
    if settings.backfill and age < min_prune_age(settings):
        given = span(age) if age % 60 == 0 else f"{age:g}s"
        raise click.ClickException(
            f"--older-than {given} is inside the backfill's look-back (SMSBATCH_MAX_AGE_SECONDS plus 5 minutes: "
            f"a text deleted there is found in Twilio's log and answered again); the smallest allowed age is "
            f"{span(min_prune_age(settings))}")
    store = open_store(settings)
    cutoff = (time.time() if now is None else now) - age
    gone = store.prune(cutoff, dry_run=dry_run)
    if as_json:
        space = {} if dry_run else {"space": _reclaim(store, vacuum)}
        emit_json(gone | {"dry_run": dry_run, "cutoff": cutoff} | space)
        return
    verb = "would delete" if dry_run else "deleted"
    click.echo(f"{verb} {count(gone['batches'], 'batch', 'batches')}, {count(gone['texts'], 'text')}, "
               f"{count(gone['events'], 'history entry', 'history entries')}, "
               f"{count(gone['replies'], 'AI reply', 'AI replies')} and "
               f"{count(gone['manual_replies'], 'reply', 'replies')} sent by hand, older than {iso_time(cutoff)}")
    if not dry_run:  # said after the deletion line: a VACUUM that fails (disk, lock) leaves the deletion done
        click.echo(_space_line(_reclaim(store, vacuum)))


def _reclaim(store, vacuum):
    """The database's size before and after; rewritten (store.reclaim_space) when asked, or by
    default when at least VACUUM_SHARE of it is free."""
    before = store.space()
    if vacuum is None:
        vacuum = before["bytes"] > 0 and before["free_bytes"] >= VACUUM_SHARE * before["bytes"]
    after = store.reclaim_space() if vacuum else before
    return {"vacuumed": vacuum, "bytes_before": before["bytes"], "bytes_after": after["bytes"],
            "free_bytes": after["free_bytes"]}


def _space_line(space):
    mib = 1024 * 1024
    if space["vacuumed"]:
        return (f"gave {(space['bytes_before'] - space['bytes_after']) / mib:.1f} MiB back to the disk: the database "
                f"is now {space['bytes_after'] / mib:.1f} MiB")
    return (f"{space['free_bytes'] / mib:.1f} MiB of the {space['bytes_after'] / mib:.1f} MiB database is free for "
            "new texts; `smsbatch prune --vacuum` gives it back to the disk")


def span(seconds):
    """'65m', '2h', '3d': an age as `prune --older-than` takes it, in whole minutes (rounded up)."""
    minutes = -(-int(seconds) // 60)
    for unit, size in (("d", 1440), ("h", 60)):
        if minutes >= size and minutes % size == 0:
            return f"{minutes // size}{unit}"
    return f"{minutes}m"


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
