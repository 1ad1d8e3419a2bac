"""Pure batching rules: no I/O, no clock. Every function takes the times it needs."""

import random
import re
from dataclasses import dataclass

OPT_OUT_WORDS = frozenset({"STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT"})
OPT_IN_WORDS = frozenset({"START", "UNSTOP", "YES"})
SMS_LIMIT = 1600  # Twilio's maximum body length for one message
# The longest inbound text body stored, in UTF-8 bytes, by every way in (webhook and ingest):
# the webhook's whole form limit, far above any real SMS or WhatsApp text.
MAX_TEXT_BYTES = 64 * 1024
ELLIPSIS = "…"


@dataclass(frozen=True)
class Rules:
    """When an open batch closes."""

    quiet_seconds: float = 10.0
    max_wait_seconds: float = 45.0
    max_messages: int = 10
    urgent_keywords: tuple = ("urgent", "emergency")

    @classmethod
    def from_settings(cls, settings):
        return cls(
            settings.quiet_seconds,
            settings.max_wait_seconds,
            settings.max_messages,
            settings.urgent_keywords,
        )


def keyword_kind(body):
    """'opt_out', 'opt_in' or None: carrier keywords count only as the whole text."""
    word = (body or "").strip().strip(".!").upper()
    if word in OPT_OUT_WORDS:
        return "opt_out"
    if word in OPT_IN_WORDS:
        return "opt_in"
    return None


def is_urgent(body, keywords):
    """True if any urgent keyword appears in the text as a whole word, in any case."""
    words = set(re.findall(r"[a-z0-9']+", (body or "").lower()))
    return any(k in words for k in keywords)


def opt_out_scope(our_number, messaging_service_sid=""):
    """What a STOP to `our_number` opts the person out of: with a messaging service, the
    whole service (as Twilio does); else that one number."""
    return messaging_service_sid or our_number


def due_at(rules, first_at, last_at, count, urgent):
    """When an open batch becomes due: quiet period, max wait, max count or urgency."""
    if urgent or count >= rules.max_messages:
        return last_at
    return min(last_at + rules.quiet_seconds, first_at + rules.max_wait_seconds)


def backoff_seconds(attempt, base, rng=random):
    """Exponential backoff with full jitter in [base*2^(n-1)/2, base*2^(n-1)], capped at an hour."""
    ceiling = min(base * 2 ** max(attempt - 1, 0), 3600.0)
    return ceiling / 2 + rng.random() * ceiling / 2


def shorten(text, limit=SMS_LIMIT):
    """Cut a reply to at most `limit` characters at a sentence or word boundary."""
    text = (text or "").strip()
    if len(text) <= limit:
        return text
    cut = text[: limit - len(ELLIPSIS)]
    for mark in (". ", "! ", "? ", "\n"):
        end = cut.rfind(mark)
        if end >= limit // 2:
            return cut[: end + 1].rstrip()
    space = cut.rfind(" ")
    if space >= limit // 2:
        cut = cut[:space]
    return cut.rstrip(" ,;:-") + ELLIPSIS
