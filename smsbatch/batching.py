"""Pure batching rules: no I/O, no clock. Every function takes the times it needs."""

import random
import re
from dataclasses import dataclass

OPT_OUT_WORDS = frozenset({"STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT"})
OPT_IN_WORDS = frozenset({"START", "UNSTOP", "YES"})
# The longest inbound text body stored, in UTF-8 bytes, by every way in (webhook and ingest):
# the webhook's whole form limit, far above any real SMS or WhatsApp text.
MAX_TEXT_BYTES = 64 * 1024
# The adaptive quiet period (quiet_for), chosen by simulation (see README, "Choosing your settings"):
TYPING_FLOOR = 1.0  # seconds: nobody sends two texts closer together than this
TAIL = 2.6  # means past the floor: an exponential tail's 93rd percentile (ln(1/0.074))
PRIOR_GAPS = 3  # how many gaps the fixed quiet period's pace counts for
# A batch answered this long after it became due is stale (is_stale): Twilio's log is asked
# for a reply we have no record of before it is answered. Normal batches are answered seconds
# after they become due; restored, copied, retried or long-delayed ones are not.
STALE_AFTER_SECONDS = 120.0


@dataclass(frozen=True)
class Rules:
    """When an open batch closes."""

    quiet_seconds: float = 10.0
    max_wait_seconds: float = 45.0
    max_messages: int = 10
    urgent_keywords: tuple = ("urgent", "emergency")
    # A quiet period fitted to each person's pace (quiet_for). Off in a bare Rules(), which
    # is the fixed rule; production takes SMSBATCH_ADAPTIVE through from_settings.
    adaptive: bool = False
    adaptive_min_seconds: float = 4.0
    adaptive_max_seconds: float = 20.0
    adaptive_pause_seconds: float = 30.0  # a gap this long or longer is a pause, not typing
    adaptive_window: int = 20  # the person's latest texts the pace is learned from
    adaptive_min_gaps: int = 3  # fewer typing gaps than this: the fixed quiet period

    @classmethod
    def from_settings(cls, settings):
        return cls(
            settings.quiet_seconds,
            settings.max_wait_seconds,
            settings.max_messages,
            settings.urgent_keywords,
            settings.adaptive,
            settings.adaptive_min_seconds,
            settings.adaptive_max_seconds,
            settings.adaptive_pause_seconds,
            settings.adaptive_window,
            settings.adaptive_min_gaps,
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


def due_at(rules, first_at, last_at, count, urgent, quiet=None):
    """When an open batch becomes due: quiet period (`quiet`, else the fixed one), max wait,
    max count or urgency."""
    if urgent or count >= rules.max_messages:
        return last_at
    quiet = rules.quiet_seconds if quiet is None else quiet
    return min(last_at + quiet, first_at + rules.max_wait_seconds)


def is_stale(batch, now, after=STALE_AFTER_SECONDS):
    """Is this batch (a dict of its row) being answered more than `after` seconds after it
    became due: its last text plus its quiet period (the latest it can have been due)? Then it
    may have been answered elsewhere meanwhile (a restored backup, a copy of the database, a
    reply by hand in Twilio's console), and Twilio's log is asked first."""
    return now - (batch["last_at"] + (batch["quiet_seconds"] or 0.0)) > after


def gaps_between(times):
    """Seconds between consecutive texts, oldest first, from their times in any order."""
    ordered = sorted(times)
    return [b - a for a, b in zip(ordered, ordered[1:])]


def fitted(gaps, rules):
    """Is the quiet period fitted to these gaps (quiet_for)? Only when adaptive and at least
    `adaptive_min_gaps` of them are typing, not pauses; else it is the fixed quiet period."""
    typing = [g for g in gaps if g < rules.adaptive_pause_seconds]
    return rules.adaptive and len(typing) >= max(rules.adaptive_min_gaps, 1)


def quiet_for(gaps, rules):
    """The quiet period after a person's latest text, fitted to their pace: `gaps` are the
    seconds between their latest texts, oldest first, the last one ending at that text.

    Gaps of `adaptive_pause_seconds` or more are pauses between conversations, not typing,
    and are left out. With fewer than `adaptive_min_gaps` typing gaps (someone new) it is
    the fixed quiet period. Typing gaps look like a floor (nobody sends two texts less than
    TYPING_FLOOR apart) plus a long tail, so the quiet period is that floor plus TAIL times
    the person's mean gap past it: a high percentile of their gaps, so their next text in a
    burst nearly always comes before it. That mean starts at the one the fixed quiet period
    stands for, counted as PRIOR_GAPS gaps, so a few gaps move it only part of the way.
    The result is kept within adaptive_min_seconds..adaptive_max_seconds.
    """
    if not fitted(gaps, rules):
        return rules.quiet_seconds
    typing = [g for g in gaps if g < rules.adaptive_pause_seconds]
    prior = max(rules.quiet_seconds - TYPING_FLOOR, 0.0) / TAIL
    past_floor = (sum(typing) - len(typing) * TYPING_FLOOR + PRIOR_GAPS * prior) / (len(typing) + PRIOR_GAPS)
    quiet = TYPING_FLOOR + TAIL * past_floor
    return min(max(quiet, rules.adaptive_min_seconds), rules.adaptive_max_seconds)


def backoff_seconds(attempt, base, rng=random):
    """Exponential backoff with full jitter in [base*2^(n-1)/2, base*2^(n-1)], capped at an hour."""
    ceiling = min(base * 2 ** max(attempt - 1, 0), 3600.0)
    return ceiling / 2 + rng.random() * ceiling / 2
