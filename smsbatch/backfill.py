"""The backfill: texts Twilio received while our webhook could not store them.

Twilio does not redeliver an inbound-SMS webhook that failed (a restart, a deploy, a
crash, a full disk answered 503): those texts are in its message log and nowhere else.
`process` looks there once a minute (for all processors together: a claimed turn in
the database), from the newest moment already checked minus an overlap, never further
back than SMSBATCH_MAX_AGE_SECONDS, and stores what it does not have exactly as the
webhook would (same batching rules and keywords; a repeated MessageSid is ignored, so
a late webhook delivery of the same text is too). A found text older than the maximum
age is stored, so nothing is lost, in a batch marked *expired*: not answered late.

A found text that Twilio's log shows we already answered (a reply from that number to
that person after it: the database was restored from a backup, or `process` ran on a
copy) is stored in a batch marked *skipped*, with that reply, and is not answered again.

A record that cannot be read (twilio_fields) is skipped with a log line naming it; the
others are stored and the window still advances. Reading stops early at the paging
limits (twilio_log: a repeated or foreign next-page link, a page or time cap, SIGTERM);
then what was read is kept and the next turn reads the same window again. A picture
message whose Media listing cannot be read is stored without its pictures (a log line).
When the listing of our replies is cut short, only the texts it fully covers are stored
(a found text whose reply may lie in the unread part waits for the next turn).

Our numbers are the listed ones and the messaging service's, never one only the database
names. Twilio API calls, per run: for each of our numbers, GET /2010-04-01/Accounts/{sid}/
Messages.json?To={number}&DateSent>={from}&DateSent<={until}&PageSize=1000, following
next_page_uri to the end; when it finds texts we lack, GET Messages.json?From={number}
(our replies, newest first by date sent, back to the window's start); GET .../Messages/{sid}/Media.json
for a found picture message; with a messaging service, GET https://messaging.twilio.com/
v1/Services/{sid}/PhoneNumbers.
"""

import logging
from dataclasses import dataclass, field

from smsbatch.batching import Rules, opt_out_scope
from smsbatch.errors import visible
from smsbatch.inputs import iso_time
from smsbatch.twilio_log import PagingStopped

log = logging.getLogger("smsbatch.backfill")
EVERY_SECONDS = 60.0  # at most one backfill a minute across every processor
OVERLAP_SECONDS = 300.0  # look again this far before the last check: clocks differ, deliveries lag
SKIPS_LOGGED = 20  # unreadable records named one per line, per run; the rest counted in one line


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
    answered: int = 0  # stored as already answered: Twilio's log shows our reply after it
    unreadable: int = 0  # records skipped: a field could not be read
    cut: str = None  # why reading stopped early (the window is read again next turn)
    left: int = 0  # found texts not stored: reading stopped before we knew enough to store them
    fresh_since: float = None  # before this, the previous turn read the log too
    named: int = 0  # unreadable records named in the log
    found: list = field(default_factory=list)  # (sid, phone, to, at) of texts we did not have

    def as_dict(self):
        return {"since": self.since, "until": self.until, "numbers": self.numbers, "seen": self.seen,
                "stored": self.stored, "expired": self.expired, "already_stored": self.already,
                "already_answered": self.answered, "unreadable": self.unreadable, "stopped_early": self.cut,
                "found": [dict(zip(("sid", "from", "to", "at"), f)) for f in self.found]}

    def skip(self, record):
        """Count a record that cannot be read, and name it in the log (the first few a run),
        unless its date says the turn before read it too (the overlap): named once, not each minute."""
        self.unreadable += 1
        if record.at is not None and self.fresh_since is not None and record.at < self.fresh_since:
            return
        self.named += 1
        if self.named <= SKIPS_LOGGED:
            sid = "(no SID)" if record.sid is None else repr(visible(record.sid, 60))
            log.warning("backfill: skipped record %s of Twilio's message log: %s", sid, visible(record.problem))


def our_numbers(settings, twilio_log):
    """Every listed number (SMSBATCH_NUMBERS, else TWILIO_FROM_NUMBER) and the messaging
    service's numbers. Never a number that is only in the database (an imported trace may
    name another app's number on the same account: its customers are not ours to answer).

    Raises: PagingStopped, DeliveryError (the messaging service's numbers).
    """
    return sorted(set(settings.listed_numbers) | twilio_log.service_numbers())


def backfill(store, twilio_log, settings, since, until, now, dry_run=False, fresh_since=None):
    """Store every text of Twilio's log between `since` and `until` that we do not have.
    `fresh_since`: the previous turn read up to there (unreadable records before it were named).

    Raises:
        DeliveryError: Twilio could not be asked (what was stored before stays stored).
    """
    report = BackfillReport(since, until, [], fresh_since=fresh_since)
    try:
        report.numbers = our_numbers(settings, twilio_log)
    except PagingStopped as exc:
        report.cut = f"the messaging service's numbers: {exc}"
        report.numbers = sorted(settings.listed_numbers)
    for number in report.numbers:
        try:
            _read_number(store, twilio_log, settings, number, report, now, dry_run)
        except PagingStopped as exc:
            report.cut = f"{number}: {exc}"
            if exc.everything:
                break
    return report


def _read_number(store, twilio_log, settings, number, report, now, dry_run):
    """Find the texts to `number` we lack, then store them (what was read before a cut too).

    Raises: PagingStopped, DeliveryError.
    """
    found, cut = [], None
    try:
        for record in twilio_log.received(number, report.since, report.until):
            report.seen += 1
            if record.text is None:
                report.skip(record)
            elif store.has_message(record.text["sid"]):
                report.already += 1
            else:
                found.append(record.text)
    except PagingStopped as exc:
        cut = exc
    report.found += [(t["sid"], t["phone"], t["to"], t["at"]) for t in found]
    if found and not dry_run:
        waiting = list(found)  # not stored yet
        try:
            replies, known_since, replies_cut = twilio_log.replies(number, report.since, report.until)
            for text in found:
                if text["at"] >= known_since:  # else a reply to it may be in the part of the listing not read
                    text["media"] = twilio_log.media(text)
                    _store(store, settings, text, answered_by(store, text, replies.get(text["phone"], ())),
                           report, now)
                    waiting.remove(text)
        finally:  # also on a stop or the time cap (PagingStopped, everything): the rest wait
            report.left += len(waiting)
        cut = cut or (replies_cut if waiting else None)
    if cut is not None:
        raise cut


def answered_by(store, text, replies):
    """Our first reply to the text's sender after it that this database has no record of, or
    None. Such a reply was sent from a database we no longer have (a backup was restored, or
    `process` ran on a copy): the text was answered there. A reply this database sent did not
    see the text (the webhook lost it), so it does not count."""
    known = store.reply_sids(text["phone"])
    later = [r for r in replies if r["at"] > text["at"] and r["sid"] not in known]
    return min(later, key=lambda r: r["at"]) if later else None


def _store(store, settings, text, answered, report, now):
    """Store one found text: skipped when `answered` (answered_by), else expired when too old."""
    reason = None
    if answered:
        reason = (f"found in Twilio's message log, already answered by {answered['sid']} at "
                  f"{iso_time(answered['at'])} (a restored database or a copy): not answered again")
    late = text["at"] < now - settings.max_age_seconds
    added = store.add_message(text["sid"], text["phone"], text["to"], text["body"], text["at"],
                              Rules.from_settings(settings), text["media"],
                              scope=opt_out_scope(text["to"], settings.twilio_messaging_service_sid),
                              expired=late, answered=reason)
    if added.duplicate:
        return
    report.stored += 1
    if answered and added.kind == "text":
        report.answered += 1
        store.record_found_reply(answered, added.batch_id, text["phone"], text["to"])
    elif late:
        report.expired += 1


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
    report = backfill(store, twilio_log, settings, max(start, now - settings.max_age_seconds), now, now,
                      fresh_since=checked_until)
    if report.named > SKIPS_LOGGED:
        log.warning("backfill: %d more unreadable records skipped", report.named - SKIPS_LOGGED)
    if report.cut:
        left = f", {report.left} found text(s) left for it" if report.left else ""
        log.warning("backfill: stopped early (%s); what was read is stored, the next turn reads from %s again%s",
                    report.cut, iso_time(report.since), left)
    else:
        store.finish_backfill(now)
    if report.stored:
        log.warning("backfill: stored %d text(s) the webhook never got (%d too old to answer, %d answered already)",
                    report.stored, report.expired, report.answered)
    return report


def min_prune_age(settings):
    """The youngest age `prune` may delete: a finished text younger than this may still be
    inside a later backfill's look-back (SMSBATCH_MAX_AGE_SECONDS, plus the overlap for
    clocks that differ); deleted, it would be found again and answered a second time."""
    return settings.max_age_seconds + OVERLAP_SECONDS
