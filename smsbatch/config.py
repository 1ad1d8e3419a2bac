"""Settings: the only place the environment is read."""

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field

from smsbatch.errors import ConfigError
from smsbatch.segments import MOST_SEGMENTS

DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful assistant answering customers by SMS. The customer may have "
    "sent several texts in a row; answer all of them in one short, friendly reply. "
    "Plain text only, no markdown."
)
OPENAI_MAX_RETRIES = 2  # the openai client's own retries on 429/5xx/timeouts (its default)
# The openai client's longest pause between those retries: its own backoff stops at 8 s,
# but it honours a server's Retry-After of up to 120 s (openai._constants.MAX_RETRY_AFTER_DELAY).
OPENAI_MAX_BACKOFF = 120.0
LEASE_MARGIN_SECONDS = 15.0
# Heartbeat leases: a processor renews every batch it holds this often, each renewal
# lasting HEARTBEAT_LEASE_SECONDS, so a dead processor's batches are free again within
# that long (and a frozen one stops sending: see lease.Leases.holds).
HEARTBEAT_SECONDS = 1.0
HEARTBEAT_LEASE_SECONDS = 4.0
# A send starts only with at least this much of the heartbeat lease left: room for the
# clocks of two hosts to differ, and for the request to reach Twilio before a taker asks.
FENCE_MARGIN_SECONDS = 1.0
# A test aid for the crash tests: SMSBATCH_FAULT_INJECT=<point> makes `process` kill
# itself with SIGKILL when a batch reaches that point (see processor.fault_point).
FAULT_POINT = os.environ.get("SMSBATCH_FAULT_INJECT", "")


def _flag(value, name):
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"{name} must be true or false (1 or 0), not {value!r}")


def _number(env, name, default, kind=float, minimum=0):
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = kind(raw)
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        raise ConfigError(f"{name} must be {what}, not {raw!r}") from None
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, not {raw!r}")
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, not {raw}")
    return value


@dataclass(frozen=True)
class Settings:
    """Everything smsbatch can be told through the environment.

    Secrets are excluded from repr so a Settings object can be logged safely.
    """

    db_path: str = "smsbatch.db"
    deployment_db: str = ""  # SMSBATCH_DB as set (db_path may be another file: --db)
    quiet_seconds: float = 10.0
    max_wait_seconds: float = 45.0
    max_messages: int = 10
    urgent_keywords: tuple = ("urgent", "emergency")
    adaptive: bool = True
    adaptive_min_seconds: float = 4.0
    adaptive_max_seconds: float = 20.0
    adaptive_pause_seconds: float = 30.0
    adaptive_window: int = 20
    adaptive_min_gaps: int = 3
    supersede: bool = True
    max_supersede: int = 2
    max_age_seconds: float = 3600.0
    enabled: bool = True
    test_number: str = ""
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    history_messages: int = 20
    ai: str = "openai"
    sms: str = "twilio"
    ai_model: str = "gpt-4o-mini"
    openai_api_key: str = field(default="", repr=False)
    openai_base_url: str = ""
    twilio_account_sid: str = ""
    twilio_auth_token: str = field(default="", repr=False)
    twilio_from_number: str = ""
    twilio_messaging_service_sid: str = ""
    twilio_base_url: str = ""
    public_url: str = ""
    retry_base_seconds: float = 30.0
    max_attempts: int = 5
    ai_timeout_seconds: float = 30.0
    ai_client_retries: int = OPENAI_MAX_RETRIES
    sms_timeout_seconds: float = 10.0
    lease_seconds: float = 0.0  # 0 means derived from the timeouts
    alert_after_seconds: float = 300.0  # provider calls failing this long: an outage (process warns)
    max_segments: int = 3  # SMSBATCH_MAX_SEGMENTS: the reply budget, in SMS segments
    smart_encoding: bool = True  # replace curly quotes, dashes, odd spaces... by GSM-7 look-alikes
    ai_price_input_per_mtok: float = None  # None: the model's list price if known (AI_LIST_PRICES)
    ai_price_output_per_mtok: float = None
    retention_days: float = 0.0  # 0: `process` prunes nothing (SMSBATCH_RETENTION_DAYS)
    backfill: bool = True  # look in Twilio's message log for texts the webhook never got
    prompts_dir: str = ""  # one system prompt per number: <dir>/+15550001111.txt
    numbers: tuple = ()  # SMSBATCH_NUMBERS: the business numbers smsbatch answers for (E.164)
    anon_key: str = field(default="", repr=False)  # SMSBATCH_ANON_KEY: `export --anonymize`'s key
    log_format: str = "plain"  # SMSBATCH_LOG_FORMAT: plain lines, or one JSON object a line (smsbatch.logs)
    alert_webhook_url: str = field(default="", repr=False)  # its path is the secret of a Slack webhook
    metrics_token: str = field(default="", repr=False)  # GET /metrics then needs "Authorization: Bearer <it>"

    @classmethod
    def from_env(cls, env=None):
        """Build Settings from a mapping (default os.environ).

        Raises:
            ConfigError: a value cannot be parsed or the lease is too short.
        """
        env = os.environ if env is None else env
        g = env.get
        keywords = g("SMSBATCH_URGENT_KEYWORDS", "urgent,emergency")
        settings = cls(
            db_path=g("SMSBATCH_DB") or "smsbatch.db",
            deployment_db=g("SMSBATCH_DB") or "",
            quiet_seconds=_number(env, "SMSBATCH_QUIET_SECONDS", 10.0),
            max_wait_seconds=_number(env, "SMSBATCH_MAX_WAIT_SECONDS", 45.0),
            max_messages=_number(env, "SMSBATCH_MAX_MESSAGES", 10, int, 1),
            urgent_keywords=tuple(k.strip().lower() for k in keywords.split(",") if k.strip()),
            **_adaptive(env),
            **_cost(env),
            supersede=_flag(g("SMSBATCH_SUPERSEDE", "1"), "SMSBATCH_SUPERSEDE"),
            max_age_seconds=_number(env, "SMSBATCH_MAX_AGE_SECONDS", 3600.0),
            enabled=_flag(g("ENABLE_AI_SMS_AGENT", "true"), "ENABLE_AI_SMS_AGENT"),
            test_number=(g("AI_SMS_TEST_NUMBER") or "").strip(),
            system_prompt=g("SMSBATCH_SYSTEM_PROMPT") or DEFAULT_SYSTEM_PROMPT,
            history_messages=_number(env, "SMSBATCH_HISTORY_MESSAGES", 20, int),
            ai=_choice(env, "SMSBATCH_AI", ("openai", "offline")),
            sms=_choice(env, "SMSBATCH_SMS", ("twilio", "console")),
            ai_model=g("SMSBATCH_AI_MODEL") or "gpt-4o-mini",
            openai_api_key=g("OPENAI_API_KEY", ""),
            openai_base_url=g("OPENAI_BASE_URL", ""),
            twilio_account_sid=g("TWILIO_ACCOUNT_SID", ""),
            twilio_auth_token=g("TWILIO_AUTH_TOKEN", ""),
            twilio_from_number=g("TWILIO_FROM_NUMBER", ""),
            twilio_messaging_service_sid=g("TWILIO_MESSAGING_SERVICE_SID", ""),
            twilio_base_url=g("SMSBATCH_TWILIO_BASE_URL", ""),
            public_url=_public_url(g("SMSBATCH_PUBLIC_URL", "")),
            retry_base_seconds=_number(env, "SMSBATCH_RETRY_BASE_SECONDS", 30.0),
            max_attempts=_number(env, "SMSBATCH_MAX_ATTEMPTS", 5, int, 1),
            ai_timeout_seconds=_number(env, "SMSBATCH_AI_TIMEOUT_SECONDS", 30.0, float, 0.1),
            ai_client_retries=_number(env, "SMSBATCH_AI_CLIENT_RETRIES", OPENAI_MAX_RETRIES, int),
            sms_timeout_seconds=_number(env, "SMSBATCH_SMS_TIMEOUT_SECONDS", 10.0, float, 0.1),
            lease_seconds=_number(env, "SMSBATCH_LEASE_SECONDS", 0.0),
            alert_after_seconds=_number(env, "SMSBATCH_ALERT_AFTER_SECONDS", 300.0),
            retention_days=_number(env, "SMSBATCH_RETENTION_DAYS", 0.0),
            backfill=_flag(g("SMSBATCH_BACKFILL", "1"), "SMSBATCH_BACKFILL"),
            prompts_dir=g("SMSBATCH_PROMPTS_DIR", ""),
            numbers=_numbers(g("SMSBATCH_NUMBERS", "")),
            anon_key=g("SMSBATCH_ANON_KEY", ""),
            log_format=log_format(env),
            alert_webhook_url=_alert_url(g("SMSBATCH_ALERT_WEBHOOK_URL", "")),
            metrics_token=g("SMSBATCH_METRICS_TOKEN", "").strip(),
        )
        return settings.checked()

    def replace(self, **changes):
        """A copy with some fields changed, checked again."""
        return dataclasses.replace(self, **changes).checked()

    @property
    def ai_deadline(self):
        """The total deadline of one AI answer (smsbatch ends it there): every try of the
        openai client timing out, and its longest waits (a server's Retry-After) between them."""
        tries = self.ai_client_retries + 1
        return self.ai_timeout_seconds * tries + OPENAI_MAX_BACKOFF * self.ai_client_retries

    @property
    def sms_deadline(self):
        """The total deadline of one Twilio call: connect and every read (twilio-python does not retry)."""
        return self.sms_timeout_seconds

    @property
    def min_lease_seconds(self):
        """The longest one claimed batch can legitimately take: the AI answer, the send, a check."""
        return self.ai_deadline + 2 * self.sms_deadline + LEASE_MARGIN_SECONDS

    @property
    def lease(self):
        """The most one claim may hold a batch, heartbeats included (SMSBATCH_LEASE_SECONDS,
        or derived from the deadlines). Past it the heartbeat stops and the batch is freed."""
        return self.lease_seconds or round(self.min_lease_seconds + 60)

    def checked(self):
        """Return self if consistent.

        Raises:
            ConfigError: the lease is shorter than the worst case of timeouts times tries.
        """
        if self.adaptive_min_seconds > self.adaptive_max_seconds:
            raise ConfigError(
                f"SMSBATCH_ADAPTIVE_MIN_SECONDS={self.adaptive_min_seconds:g} is more than "
                f"SMSBATCH_ADAPTIVE_MAX_SECONDS={self.adaptive_max_seconds:g}"
            )
        if self.adaptive_min_gaps > self.adaptive_window - 1:
            raise ConfigError(
                f"SMSBATCH_ADAPTIVE_MIN_GAPS={self.adaptive_min_gaps} needs more texts than "
                f"SMSBATCH_ADAPTIVE_WINDOW={self.adaptive_window} holds (at most {self.adaptive_window - 1} gaps)"
            )
        if not 1 <= self.max_segments <= MOST_SEGMENTS:
            raise ConfigError(f"SMSBATCH_MAX_SEGMENTS must be 1 to {MOST_SEGMENTS} (Twilio takes at most 1,600 "
                              f"characters), not {self.max_segments}")
        if (self.ai_price_input_per_mtok is None) != (self.ai_price_output_per_mtok is None):
            raise ConfigError("set both SMSBATCH_AI_PRICE_INPUT_PER_MTOK and SMSBATCH_AI_PRICE_OUTPUT_PER_MTOK, "
                              "or neither")
        if self.lease_seconds and self.lease_seconds < self.min_lease_seconds:
            raise ConfigError(
                f"SMSBATCH_LEASE_SECONDS={self.lease_seconds:g} is shorter than the "
                f"{self.min_lease_seconds:g} s one batch may take with the AI and SMS timeouts "
                "and retries; raise it or lower the timeouts"
            )
        return self

    @property
    def ai_prices(self):
        """(input, output) price in US dollars per million tokens: the configured ones, else the
        model's list price when smsbatch knows it, else None (AI cost is then not shown)."""
        if self.ai_price_input_per_mtok is not None:
            return self.ai_price_input_per_mtok, self.ai_price_output_per_mtok
        return AI_LIST_PRICES.get(self.ai_model) if self.ai == "openai" else None

    @property
    def listed_numbers(self):
        """The business numbers named in the settings: SMSBATCH_NUMBERS, else TWILIO_FROM_NUMBER
        (with a messaging service, its numbers come on top: sms.TwilioSender.our_numbers)."""
        if self.numbers:
            return self.numbers
        return (self.twilio_from_number,) if self.twilio_from_number else ()

    def missing_credentials(self):
        """Names of the environment variables the chosen AI and SMS providers still need."""
        missing = []
        if self.ai == "openai" and not self.openai_api_key:
            missing.append("OPENAI_API_KEY")
        if self.sms == "twilio":
            for name, value in (
                ("TWILIO_ACCOUNT_SID", self.twilio_account_sid),
                ("TWILIO_AUTH_TOKEN", self.twilio_auth_token),
            ):
                if not value:
                    missing.append(name)
            if not (self.twilio_from_number or self.twilio_messaging_service_sid):
                missing.append("TWILIO_FROM_NUMBER or TWILIO_MESSAGING_SERVICE_SID")
        return missing

    def secrets(self):
        """Every configured secret, in each form a provider's error text could echo it:
        the OpenAI key (also inside "Bearer ..."), the Twilio auth token, HTTP Basic auth's
        base64 of sid:token, any password inside a base URL or the database's URL, and
        SMSBATCH_PUBLIC_URL's password and query string (a webhook key Twilio quotes back
        when it refuses the StatusCallback built from it)."""
        import base64
        from urllib.parse import parse_qsl, urlsplit

        found = [self.openai_api_key, self.twilio_auth_token, self.anon_key, self.metrics_token,
                 self.alert_webhook_url]
        if self.twilio_auth_token:
            basic = base64.b64encode(f"{self.twilio_account_sid}:{self.twilio_auth_token}".encode()).decode()
            found += [basic, basic.rstrip("=")]  # unpadded too: where the padding was dropped
        for url in (self.openai_base_url, self.twilio_base_url, self.db_path,  # db_path: a PostgreSQL URL
                    self.public_url):
            try:
                found.append(urlsplit(url or "").password or "")
            except ValueError:
                pass
        if self.alert_webhook_url:  # a chat webhook's path and query are its secret (hooks.slack.com/services/...)
            parts = urlsplit(self.alert_webhook_url)
            found += [parts.path.strip("/"), parts.query, parts.password or ""]
        if self.public_url:  # the whole query, and each value alone (quoted in another order)
            query = urlsplit(self.public_url).query
            found += [query] + [value for _, value in parse_qsl(query)]
        return tuple(s for s in found if s)


def _adaptive(env):
    """The adaptive quiet period's settings (batching.quiet_for), as Settings fields."""
    return {
        "adaptive": _flag(env.get("SMSBATCH_ADAPTIVE", "1"), "SMSBATCH_ADAPTIVE"),
        "adaptive_min_seconds": _number(env, "SMSBATCH_ADAPTIVE_MIN_SECONDS", 4.0),
        "adaptive_max_seconds": _number(env, "SMSBATCH_ADAPTIVE_MAX_SECONDS", 20.0),
        "adaptive_pause_seconds": _number(env, "SMSBATCH_ADAPTIVE_PAUSE_SECONDS", 30.0, float, 1),
        "adaptive_window": _number(env, "SMSBATCH_ADAPTIVE_WINDOW", 20, int, 2),
        "adaptive_min_gaps": _number(env, "SMSBATCH_ADAPTIVE_MIN_GAPS", 3, int, 1),
    }


# OpenAI's list prices (US dollars per million input and output tokens) of the default model, so
# that `stats` shows what the AI cost out of the box. Other models: SMSBATCH_AI_PRICE_*_PER_MTOK.
AI_LIST_PRICES = {"gpt-4o-mini": (0.15, 0.60)}


def _cost(env):
    """The reply budget, smart encoding and AI prices, as Settings fields."""
    return {
        "max_segments": _number(env, "SMSBATCH_MAX_SEGMENTS", 3, int, 1),
        "smart_encoding": _flag(env.get("SMSBATCH_SMART_ENCODING", "1"), "SMSBATCH_SMART_ENCODING"),
        "ai_price_input_per_mtok": _number(env, "SMSBATCH_AI_PRICE_INPUT_PER_MTOK", None),
        "ai_price_output_per_mtok": _number(env, "SMSBATCH_AI_PRICE_OUTPUT_PER_MTOK", None),
    }


E164 = re.compile(r"\+[1-9][0-9]{6,14}")


def _numbers(raw):
    """SMSBATCH_NUMBERS: comma-separated E.164 numbers, in the order given, each once."""
    numbers = tuple(dict.fromkeys(n.strip() for n in raw.split(",") if n.strip()))
    for number in numbers:
        if not E164.fullmatch(number):
            raise ConfigError(f"SMSBATCH_NUMBERS must list E.164 numbers such as +15551234567, not {number!r}")
    return numbers


def log_format(env=None):
    """SMSBATCH_LOG_FORMAT: 'plain' (the default) or 'json'. Read on its own as well, because
    logging is set up before a command reads the rest of the settings.

    Raises:
        ConfigError: another value.
    """
    return _choice(os.environ if env is None else env, "SMSBATCH_LOG_FORMAT", ("plain", "json"))


def _alert_url(raw):
    """SMSBATCH_ALERT_WEBHOOK_URL: an http(s) URL with a host, or empty (no alerts)."""
    from urllib.parse import urlsplit

    url = raw.strip()
    if not url:
        return ""
    try:
        parts = urlsplit(url)
        ok = parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:
        ok = False
    if not ok:
        raise ConfigError(f"SMSBATCH_ALERT_WEBHOOK_URL must be an http(s) URL, not {display_secret_url(url)!r}")
    return url


def _public_url(raw):
    """SMSBATCH_PUBLIC_URL: an http(s) URL with a host, or empty (not set). Checked here so
    that a typo is one error line for every command, never a traceback where it is used."""
    from urllib.parse import urlsplit

    url = raw.strip()
    if not url:
        return ""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError for a port out of range or not a number
    except ValueError as exc:  # the reason, not the URL: its query or password may be a secret
        raise ConfigError(f"SMSBATCH_PUBLIC_URL cannot be read as a URL ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"SMSBATCH_PUBLIC_URL must be the http(s) URL of the webhook, such as "
                          f"https://example.com/sms, not {display_url(url, masked=True)!r}")
    return url


def _choice(env, name, choices):
    value = (env.get(name) or choices[0]).strip().lower()
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, not {value!r}")
    return value


OPENAI_DEFAULT_BASE_URL = "https://api.openai.com/v1"
TWILIO_DEFAULT_BASE_URL = "https://api.twilio.com"


def display_url(url, masked=False):
    """A URL safe to print or store: no user:password@ and no query string (either may hold a
    secret). `masked`: show that they were there, as ***@ and ?***."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "(unparseable URL)"
    host = parts.hostname or ""
    if ":" in host:  # an IPv6 literal
        host = f"[{host}]"
    if port:
        host = f"{host}:{port}"
    if masked and "@" in parts.netloc:
        host = "***@" + host
    return urlunsplit((parts.scheme, host, parts.path, "***" if masked and parts.query else "", ""))


def display_secret_url(url):
    """A URL whose path is itself a secret (a Slack or Discord incoming webhook), as shown:
    scheme and host only, the rest masked."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
    except ValueError:
        return "(unparseable URL)"
    if not parts.scheme or not host:
        return "***"
    return f"{parts.scheme}://{host}/***"
