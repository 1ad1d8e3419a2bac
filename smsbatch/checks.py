"""`smsbatch check`: is this installation set up right? Each check says what it found and,
when it fails, the one thing to do about it.

The checks make real, cheap, read-only requests (one GET of the Twilio account, a filtered
list of incoming numbers, one model lookup at OpenAI); only `fix_webhook` writes, and only
the SmsUrl/SmsMethod of numbers whose webhook is wrong.
"""

import os
import stat
from dataclasses import asdict, dataclass

from smsbatch.config import OPENAI_DEFAULT_BASE_URL, TWILIO_DEFAULT_BASE_URL, display_url
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

    def as_dict(self):
        return asdict(self)


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
        ("SMSBATCH_TWILIO_BASE_URL", display_url(s.twilio_base_url) if s.twilio_base_url
         else f"(not set: {TWILIO_DEFAULT_BASE_URL})"),
        ("SMSBATCH_PUBLIC_URL", display_url(s.public_url) if s.public_url else "(not set: the request's own URL)"),
        ("batching", f"quiet {s.quiet_seconds:g} s, max wait {s.max_wait_seconds:g} s, "
                     f"max {s.max_messages} texts, max age {s.max_age_seconds:g} s"),
        ("retries", f"{s.max_attempts} attempts, base {s.retry_base_seconds:g} s, lease {s.lease:g} s"),
        ("SMSBATCH_PROMPTS_DIR", s.prompts_dir or "(not set: one system prompt for every number)"),
        ("SMSBATCH_BACKFILL", "on" if s.backfill else "off"),
        ("SMSBATCH_RETENTION_DAYS", f"{s.retention_days:g}" if s.retention_days else "(not set: keep everything)"),
    ]


def run_checks(settings, fix_webhook=False):
    """Every check, in order: database, Twilio account, reply numbers and their webhook, OpenAI."""
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
            results += check_numbers(client, settings, reply_numbers(settings), fix_webhook)
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
    """A twilio Client for the checks: the configured base URL, a timeout on every request."""
    from twilio.http.http_client import TwilioHttpClient
    from twilio.rest import Client

    client = Client(settings.twilio_account_sid or "AC-not-set", settings.twilio_auth_token or "not-set",
                    http_client=TwilioHttpClient(timeout=min(settings.sms_timeout_seconds, CHECK_TIMEOUT_SECONDS)))
    if settings.twilio_base_url:
        client.api.base_url = settings.twilio_base_url.rstrip("/")
    return client


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


def reply_numbers(settings):
    """The numbers replies go from: TWILIO_FROM_NUMBER and every number people have written to."""
    numbers = [settings.twilio_from_number] if settings.twilio_from_number else []
    if is_postgres(settings.db_path) or os.path.exists(settings.db_path):
        try:
            store = Store.open_ready(settings.db_path)
        except SmsbatchError:
            return numbers
        try:
            numbers += [n for n in sorted(store.known_numbers()) if n not in numbers]
        finally:
            store.close()
    return numbers


def check_numbers(client, settings, numbers, fix_webhook=False):
    """Each reply number belongs to the account and its incoming-message webhook is ours."""
    if not numbers:
        service = settings.twilio_messaging_service_sid
        detail = f"no reply number to check (messaging service {service}: set its numbers' webhook in " \
                 "the console)" if service else "no TWILIO_FROM_NUMBER and no texts received yet"
        return [Check("reply numbers", bool(service), detail, "" if service else "set TWILIO_FROM_NUMBER")]
    return [check_number(client, settings, number, fix_webhook) for number in numbers]


def check_number(client, settings, number, fix_webhook):
    name = f"number {number}"
    try:
        found = client.incoming_phone_numbers.list(phone_number=number, page_size=50)
    except Exception as exc:
        return twilio_failure(name, exc, settings)
    found = [n for n in found if n.phone_number == number]
    if not found:
        return Check(name, False, f"not a number of account {settings.twilio_account_sid}",
                     "use a number this account owns (Phone Numbers > Active numbers), or the right account")
    resource, want = found[0], settings.public_url
    if not want:
        return Check(name, False, f"webhook is {_url(resource.sms_url)} ({resource.sms_method}); "
                     "SMSBATCH_PUBLIC_URL is not set, so it cannot be compared",
                     "set SMSBATCH_PUBLIC_URL to the exact URL Twilio posts to (e.g. https://sms.example.com/sms)")
    if resource.sms_url == want and (resource.sms_method or "POST").upper() == "POST":
        return Check(name, True, f"belongs to the account; webhook {display_url(want)} (POST)")
    if fix_webhook:
        return fix_number(name, resource, want, settings)
    hidden = " (they differ in the password or query, not shown)" if resource.sms_url and \
        display_url(resource.sms_url) == display_url(want) else ""
    return Check(name, False, f"webhook is {_url(resource.sms_url)} ({resource.sms_method}), "
                 f"not {display_url(want)} (POST){hidden}: Twilio's texts would be rejected or go elsewhere",
                 "smsbatch check --fix-webhook (sets it to SMSBATCH_PUBLIC_URL, POST)")


def fix_number(name, resource, want, settings):
    try:
        updated = resource.update(sms_url=want, sms_method="POST")
    except Exception as exc:
        return twilio_failure(name, exc, settings)
    return Check(name, updated.sms_url == want,
                 f"webhook set to {_url(updated.sms_url)} (POST); was {_url(resource.sms_url)}",
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
