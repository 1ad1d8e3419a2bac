"""The backfill: texts Twilio received while our webhook could not store them.

Twilio does not redeliver an inbound-SMS webhook that failed (a restart, a deploy, a
crash, a full disk answered 503): those texts are in its message log and nowhere else.
`process` looks there once a minute (for all processors together: a claimed turn in
the database), from the newest moment already checked minus an overlap, never further
back than SMSBATCH_MAX_AGE_SECONDS, and stores what it does not have exactly as the
webhook would (same batching rules and keywords; a repeated MessageSid is ignored, so
a late webhook delivery of the same text is too). A found text older than the maximum
age is stored, so nothing is lost, in a batch marked *expired*: not answered late.

Twilio API calls, per run: for each of our numbers, GET /2010-04-01/Accounts/{sid}/
Messages.json?To={number}&DateSent>={from}&DateSent<={until}&PageSize=1000, following
next_page_uri to the end; GET .../Messages/{sid}/Media.json for a found picture message;
with a messaging service, GET https://messaging.twilio.com/v1/Services/{sid}/PhoneNumbers.
"""

import logging
from dataclasses import dataclass, field

from smsbatch.batching import Rules, opt_out_scope

log = logging.getLogger("smsbatch.backfill")
EVERY_SECONDS = 60.0  # at most one backfill a minute across every processor
OVERLAP_SECONDS = 300.0  # look again this far before the last check: clocks differ, deliveries lag


@dataclass
class BackfillReport:
    """What one backfill found: texts in Twilio's log, and what became of them."""

    since: float
    until: float
    numbers: list
    seen: int = 0
    stored: int = 0
    expired: int = 0
    already: int = 0
    found: list = field(default_factory=list)  # (sid, phone, to, at) of texts we did not have

    def as_dict(self):
        return {"since": self.since, "until": self.until, "numbers": self.numbers, "seen": self.seen,
                "stored": self.stored, "expired": self.expired, "already_stored": self.already,
                "found": [dict(zip(("sid", "from", "to", "at"), f)) for f in self.found]}


def our_numbers(store, settings, twilio_log):
    """TWILIO_FROM_NUMBER, the messaging service's numbers, and every number people wrote to."""
    numbers = set(store.known_numbers()) | twilio_log.service_numbers()
    if settings.twilio_from_number:
        numbers.add(settings.twilio_from_number)
    return sorted(numbers)


def backfill(store, twilio_log, settings, since, until, now, dry_run=False):
    """Store every text of Twilio's log between `since` and `until` that we do not have.

    Raises:
        DeliveryError: Twilio could not be asked (what was stored before stays stored).
    """
    report = BackfillReport(since, until, our_numbers(store, settings, twilio_log))
    rules = Rules.from_settings(settings)
    oldest = now - settings.max_age_seconds
    for number in report.numbers:
        for text in twilio_log.received(number, since, until):
            report.seen += 1
            if store.has_message(text["sid"]):
                report.already += 1
                continue
            report.found.append((text["sid"], text["phone"], text["to"], text["at"]))
            if dry_run:
                continue
            late = text["at"] < oldest
            added = store.add_message(text["sid"], text["phone"], text["to"], text["body"], text["at"], rules,
                                      text["media"], scope=opt_out_scope(text["to"],
                                                                         settings.twilio_messaging_service_sid),
                                      expired=late)
            report.stored += not added.duplicate
            report.expired += late and not added.duplicate
    return report


def backfill_if_due(store, twilio_log, settings, now):
    """The periodic backfill `process` runs: at most once a minute for all processors.
    Returns a BackfillReport, or None when another processor had the turn.

    Raises:
        DeliveryError: Twilio could not be asked; the next turn tries the same window.
    """
    ours, checked_until = store.claim_backfill(now, EVERY_SECONDS)
    if not ours:
        return None
    start = now - settings.max_age_seconds if checked_until is None else checked_until - OVERLAP_SECONDS
    report = backfill(store, twilio_log, settings, max(start, now - settings.max_age_seconds), now, now)
    store.finish_backfill(now)
    if report.stored:
        log.warning("backfill: stored %d text(s) the webhook never got (%d too old to answer)",
                    report.stored, report.expired)
    return report
