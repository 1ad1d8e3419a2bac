"""What every command shares: click types for checked input, settings, the store, JSON output."""

import json

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
        except SmsbatchError as exc:
            raise click.ClickException(str(exc)) from None
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


DURATION = InputParam("DURATION", "parse_duration")  # 7d, 24h, 90m
