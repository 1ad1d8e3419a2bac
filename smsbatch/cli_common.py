"""What every command shares: click types for checked input, settings, the store, JSON output."""

import json
import logging
import os

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
        from smsbatch.engine import StoreBusy, StoreError, StoreUnavailable

        try:
            return super().invoke(ctx)
        except StoreBusy:
            raise click.ClickException("database is busy: another writer held it too long; try again") from None
        except StoreUnavailable as exc:
            raise click.ClickException(f"database unavailable: {exc}") from None
        except StoreError as exc:
            raise click.ClickException(f"database error: {exc}") from None
        except SmsbatchError as exc:  # may quote a provider, a file or a stored text
            from smsbatch.render import clean

            raise click.ClickException(clean(str(exc))) from None
        except UnicodeEncodeError as exc:  # a setting with bytes that are not UTF-8, or a terminal that is not
            raise click.ClickException(f"cannot encode text as {exc.encoding}: a setting holds bytes that are "
                                       "not UTF-8, or the terminal cannot show a character") from None


class LoggedGroup(Group):
    """Group whose one-line `Error: ...` is a JSON log line too under SMSBATCH_LOG_FORMAT=json
    (usage errors, which come before any command runs, stay click's)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.UsageError:
            raise
        except click.ClickException as exc:
            if (ctx.obj or {}).get("log_format") != "json":
                raise
            raise JsonError(exc.format_message()) from None


class JsonError(click.ClickException):
    """A ClickException shown as one JSON log line (level ERROR) instead of `Error: ...`."""

    def show(self, file=None):
        from smsbatch.logs import line

        click.echo(line("smsbatch.cli", self.format_message(), "ERROR"), file=file, err=file is None)


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


def note(message, level="INFO"):
    """A line for the operator on stderr that is not a logging record (`serve` is listening, `process`
    pruned): as it is, or as one JSON log line with SMSBATCH_LOG_FORMAT=json."""
    ctx = click.get_current_context(silent=True)
    if ctx is not None and (ctx.find_root().obj or {}).get("log_format") == "json":
        from smsbatch.logs import line

        message = line("smsbatch.cli", message, level)
    click.echo(message, err=True)


def emit_json(data):
    click.echo(json.dumps(data, indent=2, default=str))


DURATION = InputParam("DURATION", "parse_duration")  # 7d, 24h, 90m


class Moment:
    """A moment as given on the command line: a duration before now (`ago` seconds) or a time
    (`at`, epoch seconds). `resolve(now)` gives epoch seconds, never before 1970."""

    def __init__(self, ago=None, at=None):
        self.ago, self.at = ago, at

    def resolve(self, now):
        return self.at if self.ago is None else max(0.0, now - self.ago)


class MomentParam(click.ParamType):
    """A time option that takes a duration before now (2h, 7d, 90m, 2w) or a time (epoch seconds
    or ISO-8601): one type for every --since/--until, resolved against --now by the command."""

    name = "DURATION|TIME"

    def convert(self, value, param, ctx):
        from smsbatch import inputs

        if isinstance(value, Moment):
            return value
        try:
            if inputs.DURATION.match(str(value).strip().lower()):
                return Moment(ago=inputs.parse_duration(value))
            return Moment(at=inputs.parse_since(value, 0.0))
        except SmsbatchError as exc:
            self.fail(str(exc), param, ctx)


WHEN = MomentParam()


def backfill_runs(settings):
    """Does `process` look into Twilio's message log (SMSBATCH_BACKFILL, with the Twilio sender)?"""
    return settings.backfill and settings.sms == "twilio"


def warn_if_not_the_deployments_db(settings):
    """One warning line when `process` sends real SMS from a database that is not the one
    SMSBATCH_DB names (--db copy.db): what is pending in a copy is answered a second time."""
    configured = settings.deployment_db
    if settings.sms != "twilio" or not configured or same_file(configured, settings.db_path):
        return
    from smsbatch.engine import shown_target
    from smsbatch.errors import visible

    logging.getLogger("smsbatch").warning(  # a PostgreSQL URL's password is masked
        "process sends real SMS from %s, which is not the deployment's database %s (SMSBATCH_DB): texts "
        "pending in it may have been answered from the other one already",
        visible(shown_target(settings.db_path), 200), visible(shown_target(configured), 200))


def same_file(a, b):
    """Are two paths the same file (compared as files when both exist, else as absolute paths)?"""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)
