"""Error types. Library code raises these; the CLI turns them into one-line messages.

Also the one place provider and error text is made safe to store, log and print (`redact`).
"""

import json
import re

# Providers echo part of a rejected key ("Incorrect API key provided: sk-ab***yz"), and not
# every OpenAI-compatible provider's key starts with sk-: both the pattern and the configured
# secrets go.
KEY_SHAPE = re.compile(r"sk-[\w*.-]+")
# Unicode bidi controls (embeddings, overrides, isolates, marks): invisible, they reorder what
# follows on the line, so a text or a provider's error could make a terminal or log lie.
BIDI = "\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069"
CONTROL = re.compile(f"[\\x00-\\x1f\\x7f-\\x9f{BIDI}]")
# A phone number: + and 7-15 digits, or 10-15 digits, with space ( ) - between them. Never
# part of a word, a path or a dotted address (digits after / . : or joined by dots), nor a
# number followed by :digits (a port) or .digits (a decimal): "http://127.0.0.1:8000/v1" stays.
PHONE_DIGITS = re.compile(r"(?<![\w/.+])(?<!\d:)(?:\+\(?\d(?:[ ()-]{0,2}\d){6,14}|\(?\d(?:[ ()-]{0,2}\d){9,14})"
                          r"(?![\d]|[.:]\d)")
MIN_SECRET = 4  # a shorter "secret" would blank out ordinary words; real ones are 32+ characters


class SmsbatchError(Exception):
    """Base class for every error smsbatch reports to a person."""


class ConfigError(SmsbatchError):
    """A setting is missing or out of range."""


class NotFound(SmsbatchError):
    """A batch (or other record) does not exist."""


class InvalidTransition(SmsbatchError):
    """A batch cannot move from its current state to the one asked for."""


class InvalidInput(SmsbatchError):
    """An inbound text, time or phone number cannot be accepted."""


class DeliveryError(SmsbatchError):
    """An outbound call (AI or SMS) failed.

    `transient` says whether trying again later may succeed; `opted_out` marks
    Twilio's 21610 ("recipient has unsubscribed"); `ambiguous` means the request
    may have reached the provider (a timeout after sending), so the outcome is unknown.
    """

    def __init__(self, message, *, transient, opted_out=False, ambiguous=False):
        super().__init__(message)
        self.transient = transient
        self.opted_out = opted_out
        self.ambiguous = ambiguous


class CannotReconcile(SmsbatchError):
    """The sender cannot be asked whether an earlier send went out."""


def redact(text, secrets=(), limit=None):
    """`text` with every secret in `secrets` (see Settings.secrets) and anything shaped like an
    OpenAI key replaced by ***. With `limit`: also on one line, control characters replaced by ?,
    cut to that many characters (for provider error text, before it is stored or logged)."""
    text = str(text)
    if limit is not None:  # one line, and nothing a terminal would obey (escape sequences)
        text = CONTROL.sub("?", " ".join(text.split()))
    for secret in sorted(secrets, key=len, reverse=True):  # longest first: one may contain another
        if len(secret) >= MIN_SECRET:
            text = text.replace(secret, "***")
    text = KEY_SHAPE.sub("sk-***", text)
    if limit is not None and len(text) > limit:
        text = text[: limit - 1] + "…"
    return text


class LeaseLost(SmsbatchError):
    """This processor can no longer prove it holds a batch's lease: it must not act on it."""


def hide_numbers(text):
    """`text` with every phone number replaced by [number]: for log lines (cron mail) and the
    provider errors kept in provider_health, which need no customer's number."""
    return PHONE_DIGITS.sub("[number]", str(text))


# Control characters (C0, DEL, C1) and the Unicode bidi controls that reorder what is read.
UNSEEN = re.compile(r"[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def visible(value, limit=80):
    """Provider- or client-written text for a log line: on one line, control characters, escape
    sequences and bidi controls shown as \\x1b or \\u202e, cut to `limit` characters."""
    text = "" if value is None else str(value)
    shown = UNSEEN.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100
                       else f"\\u{ord(m.group()):04x}", text)
    return shown if len(shown) <= limit else shown[: limit - 1] + "…"


class UnreadableJSON(json.JSONDecodeError):
    """Valid JSON Python will not decode (read_json)."""


def read_json(text):
    """A provider's JSON answer, parsed. Python refuses some valid JSON with errors other than
    JSONDecodeError (an integer of over 4,300 digits: ValueError; nesting deeper than it
    recurses: RecursionError); those are a provider's unreadable answer too.

    Raises: json.JSONDecodeError for every answer that cannot be read (UnreadableJSON for
    those two).
    """
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise
    except (ValueError, RecursionError) as exc:
        raise UnreadableJSON(f"unreadable ({type(exc).__name__})", "", 0) from None
