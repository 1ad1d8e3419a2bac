"""`smsbatch check`: is this installation set up right? Each check says what it found and,
when it fails, the one thing to do about it.

The checks make real, cheap, read-only requests (one GET of the Twilio account, the list of
its incoming numbers and of the messaging service's, one model lookup at OpenAI); only
`fix_webhook` writes, and only the SmsUrl/SmsMethod of listed numbers (SMSBATCH_NUMBERS)
whose webhook is wrong, never a number that merely appears in the database.
"""

import os
import stat
from dataclasses import asdict, dataclass

from smsbatch.config import OPENAI_DEFAULT_BASE_URL, TWILIO_DEFAULT_BASE_URL, display_secret_url, display_url
from smsbatch.db import SCHEMA_VERSION, Store
from smsbatch.engine import is_postgres, shown_target
from smsbatch.errors import SmsbatchError

MASK = "******"
CHECK_TIMEOUT_SECONDS = 10.0


@dataclass
class Check:
    """One check's result. `fix` is what to do when it failed (empty when it passed)."""

    name: str
    ok: bool
    detail: str
    fix: str = ""
    change: dict = None  # a number's webhook change --fix-webhook would make (check_number)

    def as_dict(self):
        return {k: v for k, v in asdict(self).items() if k != "change" or v}


def effective_settings(settings):
    """The settings in force, as (environment variable, value) pairs, secrets masked."""
    s = settings

    def secret(value):
        return f"{MASK} (set)" if value else "(not set)"

    return [
        ("SMSBATCH_DB", shown_target(s.db_path)),
        ("ENABLE_AI_SMS_AGENT", "true" if s.enabled else "false (replies paused)"),
        ("AI_SMS_TEST_NUMBER", s.test_number or "(not set: everyone is answered)"),
        ("SMSBATCH_AI", s.ai),
        ("SMSBATCH_AI_MODEL", s.ai_model),
        ("OPENAI_BASE_URL", display_url(s.openai_base_url) if s.openai_base_url
         else f"(not set: {OPENAI_DEFAULT_BASE_URL})"),
        ("OPENAI_API_KEY", secret(s.openai_api_key)),
        ("SMSBATCH_SMS", s.sms),
        ("TWILIO_ACCOUNT_SID", s.twilio_account_sid or "(not set)"),
        ("TWILIO_AUTH_TOKEN", secret(s.twilio_auth_token)),
        ("TWILIO_FROM_NUMBER", s.twilio_from_number or "(not set)"),
        ("TWILIO_MESSAGING_SERVICE_SID", s.twilio_messaging_service_sid or "(not set)"),
        ("SMSBATCH_NUMBERS", ", ".join(s.numbers) if s.numbers else
         f"(not set: {s.twilio_from_number or 'no TWILIO_FROM_NUMBER'}"
         f"{' and the messaging service' if s.twilio_messaging_service_sid else ''})"),
        ("SMSBATCH_TWILIO_BASE_URL", display_url(s.twilio_base_url) if s.twilio_base_url
         else f"(not set: {TWILIO_DEFAULT_BASE_URL})"),
        ("SMSBATCH_PUBLIC_URL", display_url(s.public_url) if s.public_url else "(not set: serve refuses to start)"),
        ("batching", f"quiet {s.quiet_seconds:g} s, max wait {s.max_wait_seconds:g} s, "
                     f"max {s.max_messages} texts, max age {s.max_age_seconds:g} s"),
        ("retries", f"{s.max_attempts} attempts, base {s.retry_base_seconds:g} s, lease {s.lease:g} s"),
        ("replies", f"at most {s.max_segments} SMS segments (SMSBATCH_MAX_SEGMENTS), smart encoding "
                    f"{'on' if s.smart_encoding else 'off (SMSBATCH_SMART_ENCODING=0)'}"),
        ("AI prices", "(not known: AI cost not shown; SMSBATCH_AI_PRICE_INPUT_PER_MTOK and _OUTPUT_PER_MTOK)"
         if s.ai_prices is None else f"${s.ai_prices[0]:g} input, ${s.ai_prices[1]:g} output per million tokens"),
        ("SMSBATCH_PROMPTS_DIR", s.prompts_dir or "(not set: one system prompt for every number)"),
        ("SMSBATCH_BACKFILL", "on" if s.backfill else "off"),
        ("SMSBATCH_RETENTION_DAYS", f"{s.retention_days:g}" if s.retention_days else "(not set: keep everything)"),
        ("SMSBATCH_LOG_FORMAT", s.log_format),
        ("SMSBATCH_ALERT_WEBHOOK_URL", display_secret_url(s.alert_webhook_url) if s.alert_webhook_url
         else "(not set: outages are only logged)"),
        ("SMSBATCH_METRICS_TOKEN", secret(s.metrics_token) if s.metrics_token
         else "(not set: /metrics is open to whoever reaches the port)"),
    ]


def run_checks(settings, fix_webhook=False, dry_run=False, announce=None):
    """Every check, in order: database, Twilio account, our numbers and their webhook, OpenAI.

    With `fix_webhook`, the listed numbers whose webhook is wrong are set to SMSBATCH_PUBLIC_URL:
    `announce(changes, dry_run)` is called first with what will change (planned_changes), and
    with `dry_run` nothing is changed."""
    results = [check_database(settings.db_path)]
    if settings.prompts_dir:
        results.append(check_prompts(settings.prompts_dir))
    if settings.sms != "twilio":
        results.append(Check("twilio", True, f"skipped: SMSBATCH_SMS={settings.sms}"))
    else:
        client = twilio_client(settings)
        account = check_twilio_account(client, settings)
        results.append(account)
        if account.ok:
            numbers = check_all_numbers(client, settings)
            changes = planned_changes(numbers)
            if fix_webhook and changes:
                if announce:
                    announce(changes, dry_run)
                if not dry_run:
                    numbers = fix_webhooks(client, settings, numbers)
            results += numbers
    if settings.ai != "openai":
        results.append(Check("openai", True, f"skipped: SMSBATCH_AI={settings.ai}"))
    else:
        results.append(check_openai(settings))
    return results


# -- database -------------------------------------------------------------------


def check_database(path):
    """The database exists, is migrated to this smsbatch's schema, can be written, and is private
    (PostgreSQL: the server answers, the schema is this smsbatch's, and the user has the rights
    smsbatch needs)."""
    name = "database"
    if is_postgres(path):
        return check_postgres(path)
    if not os.path.exists(path):
        return Check(name, False, f"{path} does not exist", f"smsbatch --db {path} migrate")
    try:
        store = Store(path)
    except SmsbatchError as exc:
        return Check(name, False, str(exc), "point SMSBATCH_DB (or --db) at the smsbatch database")
    try:
        version = store.version()
        if version != SCHEMA_VERSION:
            return Check(name, False, f"{path} is at schema version {version}, this smsbatch needs "
                         f"{SCHEMA_VERSION}", f"smsbatch --db {path} backup FILE, then smsbatch --db {path} migrate")
        store.check_writable()
    except Exception as exc:  # StoreError: read-only file or folder, locked
        return Check(name, False, f"{path} cannot be written: {exc}",
                     "run smsbatch as the user that owns the database and its folder")
    finally:
        store.close()
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & 0o077:
        return Check(name, False, f"{path} is readable by others (mode {mode:o}); it holds customer texts",
                     f"chmod 600 {path}")
    return Check(name, True, f"{path}: writable, schema version {version}")


def check_postgres(url):
    """PostgreSQL: connection, schema version, and the rights smsbatch needs (reading and
    writing its tables; `migrate` also needs to create them)."""
    name, shown = "database", shown_target(url)
    try:
        store = Store(url)
    except SmsbatchError as exc:
        return Check(name, False, f"cannot connect to {shown}: {exc}",
                     "check SMSBATCH_DB (host, port, user, database) and that the server runs")
    try:
        version = store.version()
        if version != SCHEMA_VERSION:
            return Check(name, False, f"{shown} is at schema version {version}, this smsbatch needs "
                         f"{SCHEMA_VERSION}", "pg_dump it, then smsbatch --db URL migrate")
        missing = store.db.missing_rights()
        if missing:
            return Check(name, False, f"{shown}: the user lacks {', '.join(missing)}",
                         "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA (and USAGE on "
                         "its sequences) to smsbatch's user")
        store.check_writable()
    except SmsbatchError as exc:
        return Check(name, False, f"{shown}: {exc}", "check the server and the user's rights")
    finally:
        store.close()
    return Check(name, True, f"{shown}: writable, schema version {version}")


def check_prompts(folder):
    """SMSBATCH_PROMPTS_DIR is a folder whose every *.txt is named like a number and reads as UTF-8."""
    from smsbatch.ai import PROMPT_FILE_NAME, SystemPrompts

    name = "prompts"
    if not os.path.isdir(folder):
        return Check(name, False, f"SMSBATCH_PROMPTS_DIR={folder} is not a folder",
                     "create it, or unset SMSBATCH_PROMPTS_DIR for one system prompt for every number")
    files = sorted(f for f in os.listdir(folder) if f.endswith(".txt"))
    for file in files:
        if not PROMPT_FILE_NAME.match(file.removesuffix(".txt")):
            return Check(name, False, f"{os.path.join(folder, file)} is not named like a number, so it is never used",
                         "name each prompt file after the number it is for, e.g. +15550001111.txt")
        try:
            SystemPrompts._read(os.path.join(folder, file))
        except SmsbatchError as exc:
            return Check(name, False, str(exc), "save it as UTF-8 text, readable by the user smsbatch runs as")
    return Check(name, True, f"{folder}: {len(files)} prompt file{'' if len(files) == 1 else 's'}, all readable")


# -- Twilio ---------------------------------------------------------------------


def twilio_client(settings):
    """A twilio Client for the checks: the configured base URL, a timeout on every request,
    never a request outside Twilio's own origins (sms.twilio_client)."""
    from smsbatch import sms

    return sms.twilio_client(settings, min(settings.sms_timeout_seconds, CHECK_TIMEOUT_SECONDS))


def twilio_base(settings):
    return display_url(settings.twilio_base_url.rstrip("/")) if settings.twilio_base_url else TWILIO_DEFAULT_BASE_URL


def check_twilio_account(client, settings):
    """One authenticated request: GET the account."""
    name = "twilio credentials"
    if not (settings.twilio_account_sid and settings.twilio_auth_token):
        return Check(name, False, "TWILIO_ACCOUNT_SID or TWILIO_AUTH_TOKEN is not set",
                     "set both from the Twilio console (Account Info) in the env file")
    try:
        account = client.api.v2010.accounts(settings.twilio_account_sid).fetch()
    except Exception as exc:
        return twilio_failure(name, exc, settings)
    return Check(name, True, f"account {account.sid} ({account.status}) at {twilio_base(settings)}")


def twilio_failure(name, exc, settings):
    """A failed Twilio request as a Check naming the URL and the likely fix."""
    from twilio.base.exceptions import TwilioRestException

    base = twilio_base(settings)
    if isinstance(exc, TwilioRestException):
        # exc.uri is relative to the API version every call here uses
        where = f"{base}/2010-04-01{exc.uri}" if exc.uri and exc.uri.startswith("/") else display_url(exc.uri or base)
        if exc.status in (401, 403):
            return Check(name, False, f"HTTP {exc.status} from {where}: credentials rejected",
                         "copy TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN again from the Twilio console")
        if exc.status == 404:
            return Check(name, False, f"HTTP 404 from {where}",
                         "check TWILIO_ACCOUNT_SID, and that SMSBATCH_TWILIO_BASE_URL is scheme+host only "
                         "(e.g. https://api.twilio.com, no path)")
        return Check(name, False, f"HTTP {exc.status} from {where}: Twilio error {exc.code}",
                     "see https://www.twilio.com/docs/errors/" + str(exc.code or exc.status))
    return Check(name, False, f"cannot reach Twilio at {base} ({type(exc).__name__})",
                 "check SMSBATCH_TWILIO_BASE_URL (unset for Twilio itself), DNS and outbound HTTPS")


OTHERS_SHOWN = 10  # the account's other numbers, named for information (then "and N more")


def check_all_numbers(client, settings):
    """Every listed number belongs to the account and its webhook is SMSBATCH_PUBLIC_URL (POST),
    each named when it is wrong; then, for information, the account's other numbers and any
    number texts came to that is not listed (neither is checked nor ever changed)."""
    from smsbatch.sms import TwilioSender
    from smsbatch.twilio_log import PagingStopped, TwilioLog

    try:
        listed = TwilioSender(settings).our_numbers()  # SMSBATCH_NUMBERS, then the service's
        # Paged under the backfill's limits (a repeated or foreign link, a page and time cap),
        # not by the twilio package's stream(), which follows any next-page link for ever.
        owned = {n.phone_number: n for n in TwilioLog(_Direct(client, settings)).account_numbers()}
    except PagingStopped as exc:
        return [Check("numbers", False, f"the account's numbers could not all be listed: {exc}",
                      "try again later; if it persists, ask Twilio support about the IncomingPhoneNumbers listing")]
    except Exception as exc:
        return [twilio_failure("numbers", exc, settings)]
    if not listed:
        return [Check("numbers", False, "no number to check: SMSBATCH_NUMBERS and TWILIO_FROM_NUMBER are not set"
                      + (" and the messaging service has none" if settings.twilio_messaging_service_sid else ""),
                      "set SMSBATCH_NUMBERS to the numbers smsbatch answers for, e.g. +15551234567,+15557654321")]
    results = [check_number(settings, number, owned.get(number)) for number in listed]
    others = [n for n in owned if n not in listed]
    if others:
        results.append(Check("other numbers", True, f"{_some(others)}: the account's, not in SMSBATCH_NUMBERS, "
                             "so not checked and never changed"))
    texted = [n for n in texted_numbers(settings) if n not in listed]
    if texted:
        results.append(Check("texted numbers", True, f"texts in the database went to {_some(texted)}, not in "
                             "SMSBATCH_NUMBERS: not checked and never changed (list it there if smsbatch answers it)"))
    return results


class _Direct:
    """A sender for TwilioLog over `check`'s client: its calls made as they are, so their
    errors reach twilio_failure() as the twilio package raised them."""

    def __init__(self, client, settings):
        self.client, self.settings = client, settings

    def _get_client(self):
        return self.client

    @staticmethod
    def _call(fn):
        return fn()


def _some(numbers):
    """'+1..., +1... and 12 more': the first OTHERS_SHOWN numbers and a count of the rest."""
    more = len(numbers) - OTHERS_SHOWN
    return ", ".join(numbers[:OTHERS_SHOWN]) + (f" and {more} more" if more > 0 else "")


def texted_numbers(settings):
    """The numbers texts in the database were sent to (none if it cannot be opened)."""
    if not os.path.exists(settings.db_path):
        return []
    try:
        store = Store.open_ready(settings.db_path)
    except SmsbatchError:
        return []
    try:
        return sorted(store.known_numbers())
    finally:
        store.close()


def check_number(settings, number, resource):
    """One listed number: the account's, its webhook ours. A wrong webhook's Check carries
    the change --fix-webhook would make (`change`)."""
    name = f"number {number}"
    if resource is None:
        return Check(name, False, f"not a number of account {settings.twilio_account_sid}",
                     "use a number this account owns (Phone Numbers > Active numbers), or the right account; "
                     "SMSBATCH_NUMBERS lists the numbers smsbatch answers for")
    want = settings.public_url
    if not want:
        return Check(name, False, f"webhook is {_url(resource.sms_url)} ({resource.sms_method}); "
                     "SMSBATCH_PUBLIC_URL is not set, so it cannot be compared",
                     "set SMSBATCH_PUBLIC_URL to the exact URL Twilio posts to (e.g. https://sms.example.com/sms)")
    if resource.sms_url == want and (resource.sms_method or "POST").upper() == "POST":
        return Check(name, True, f"belongs to the account; webhook {display_url(want)} (POST)")
    hidden = " (they differ in the password or query, not shown)" if resource.sms_url and \
        display_url(resource.sms_url) == display_url(want) else ""
    change = {"number": number, "sid": resource.sid, "was": f"{_url(resource.sms_url)} ({resource.sms_method})",
              "becomes": f"{display_url(want)} (POST)"}
    return Check(name, False, f"webhook is {_url(resource.sms_url)} ({resource.sms_method}), "
                 f"not {display_url(want)} (POST){hidden}: Twilio's texts would be rejected or go elsewhere",
                 "smsbatch check --fix-webhook (sets it to SMSBATCH_PUBLIC_URL, POST)", change)


def planned_changes(results):
    """The webhook changes --fix-webhook would make: one dict per listed number whose webhook is wrong."""
    return [r.change for r in results if r.change]


def fix_webhooks(client, settings, results):
    """Set the webhook of every listed number whose Check carries a change; returns the
    results with those Checks replaced by what the update did."""
    fixed = []
    for result in results:
        fixed.append(fix_number(client, result, settings) if result.change else result)
    return fixed


def fix_number(client, result, settings):
    """One number's webhook set to SMSBATCH_PUBLIC_URL (POST)."""
    change, want = result.change, settings.public_url
    try:
        updated = client.incoming_phone_numbers(change["sid"]).update(sms_url=want, sms_method="POST")
    except Exception as exc:
        return twilio_failure(result.name, exc, settings)
    return Check(result.name, updated.sms_url == want,
                 f"webhook set to {_url(updated.sms_url)} (POST); was {change['was']}",
                 "" if updated.sms_url == want else "set it in the Twilio console")


def _url(url):
    """A webhook URL as shown: without password or query (display_url), '(none)' when unset."""
    return display_url(url) if url else "(none)"


# -- OpenAI ---------------------------------------------------------------------


def check_openai(settings):
    """The server answers, the key is accepted and the model exists (one models.retrieve)."""
    import openai

    name = "openai"
    base = display_url(settings.openai_base_url) if settings.openai_base_url else OPENAI_DEFAULT_BASE_URL
    if not settings.openai_api_key:
        return Check(name, False, "OPENAI_API_KEY is not set", "set it in the env file (any value for a local server)")
    client = openai.OpenAI(api_key=settings.openai_api_key, base_url=settings.openai_base_url or None,
                           timeout=min(settings.ai_timeout_seconds, CHECK_TIMEOUT_SECONDS), max_retries=0)
    model = settings.ai_model
    try:
        found = client.models.retrieve(model)
    except openai.APIStatusError as exc:
        url = f"{base}/models/{model}"
        if exc.status_code in (401, 403):
            return Check(name, False, f"HTTP {exc.status_code} from {url}: key rejected", "check OPENAI_API_KEY")
        if exc.status_code == 404:
            return Check(name, False, f"HTTP 404 from {url}: no model {model!r} there",
                         "set SMSBATCH_AI_MODEL to a model the server has, and OPENAI_BASE_URL to end in /v1")
        return Check(name, False, f"HTTP {exc.status_code} from {url}", "try again later, or check OPENAI_BASE_URL")
    except openai.APIConnectionError as exc:
        kind = "timed out" if isinstance(exc, openai.APITimeoutError) else "unreachable"
        return Check(name, False, f"{base} {kind}",
                     "check OPENAI_BASE_URL (e.g. http://127.0.0.1:8000/v1; unset for OpenAI itself)")
    if getattr(found, "id", None) != model:  # a web page or another API answering 200 is not the model
        return Check(name, False, f"{base}/models/{model} answered, but not with model {model!r} "
                     "(not an OpenAI-compatible API?)",
                     "check OPENAI_BASE_URL (it should end in /v1, e.g. http://127.0.0.1:8000/v1)")
    return Check(name, True, f"{base} answers; model {model} exists")
