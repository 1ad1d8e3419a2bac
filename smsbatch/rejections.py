"""Rejected webhook requests, made visible: a rate-limited log line each, and bad
signatures counted per minute in the database (for `status --json`).

A wrong SMSBATCH_PUBLIC_URL makes Twilio's every text a 403; without this, nothing on
our side would show it. The counts are written at most once a second, from a thread
of their own, so a flood of bad requests neither waits on nor fills the database.
"""

import logging
import threading
import time

log = logging.getLogger("smsbatch.web")
LINES_PER_MINUTE = 20  # log lines about rejected requests; the rest are counted in one summary line
FLUSH_EVERY = 1.0  # seconds between writes of the signature counts
FLUSH_WAIT = 1.0  # longest a flush waits for the database lock (it tries again next time)
IDLE_ROUNDS = 30  # the flushing thread ends after this many rounds with nothing to write
SIGNATURE_HINT = ("if these are Twilio's texts, set SMSBATCH_PUBLIC_URL to exactly the URL configured "
                  "in the Twilio console (scheme, host, path, trailing slash)")


def printable(text, limit=200):
    """Client-sent text (a path, a Host header, a field name) safe for one log line: control
    characters (ESC, bare CR, OSC 52's BEL), bidi controls and all other non-ASCII escaped
    as \\x1b, \\r, \\u202e."""
    return ascii(str(text)[:limit])[1:-1]


class RateLimitedLog:
    """log.warning at most LINES_PER_MINUTE times a minute; then one line says how many were left out."""

    def __init__(self, clock=time.monotonic, per_minute=LINES_PER_MINUTE):
        self.clock, self.per_minute = clock, per_minute
        self._minute, self._lines, self._dropped = None, 0, 0
        self._lock = threading.Lock()

    def warning(self, message, *args):
        """Log this line unless this minute's lines are used up (then count it)."""
        minute = int(self.clock() // 60)
        with self._lock:
            if minute != self._minute:
                dropped, self._dropped = self._dropped, 0
                self._minute, self._lines = minute, 0
                if dropped:
                    log.warning("webhook: %d more rejected requests were not logged in the last minute", dropped)
            if self._lines >= self.per_minute:
                self._dropped += 1
                return
            self._lines += 1
        log.warning(message, *args)


class Rejections:
    """Logs each rejected request (rate-limited) and counts bad signatures per minute,
    written through `submit(work, deadline)` (the webhook's Writer) by a thread of its own."""

    def __init__(self, submit, clock=time.time):
        self.submit, self.clock = submit, clock
        self.log = RateLimitedLog()
        self._pending = {}  # minute -> [count, last_at, last_url] not yet written
        self._lock = threading.Lock()
        self._thread = None

    def rejected(self, status, path, reason, signed_url=None):
        """Log a rejected request; a bad signature (signed_url given, secrets masked) is counted
        too. Everything in the line that a client could have written is escaped (printable)."""
        path, reason = printable(path), printable(reason)
        if signed_url is None:
            self.log.warning("webhook: rejected %s %s: %s", status[:3], path, reason)
            return
        signed_url = printable(signed_url, 500)
        self.log.warning("webhook: rejected %s %s: %s; checked against %s (%s)", status[:3], path, reason,
                         signed_url, SIGNATURE_HINT)
        now = self.clock()
        with self._lock:
            entry = self._pending.setdefault(int(now // 60), [0, now, signed_url])
            entry[0] += 1
            entry[1], entry[2] = now, signed_url
            self._start_locked()

    def unwritten(self, since):
        """(count, last time) of bad signatures at or after `since` not yet in the database
        (/metrics adds them to the stored counts)."""
        with self._lock:
            entries = [e for minute, e in self._pending.items() if (minute + 1) * 60 > since]
        return sum(e[0] for e in entries), max((e[1] for e in entries), default=None)

    def flush(self):
        """Write the pending counts now; on failure they stay pending. Returns True if written."""
        with self._lock:
            pending, self._pending = self._pending, {}
        if not pending:
            return True
        rows = [(minute, count, last_at, url) for minute, (count, last_at, url) in pending.items()]
        try:
            self.submit(lambda store: store.record_rejections(rows, self.clock()), time.monotonic() + FLUSH_WAIT)
            return True
        except Exception as exc:  # the database is busy or broken: keep the counts, try again
            log.debug("webhook: could not write rejection counts yet: %s", exc)
            with self._lock:
                for minute, count, last_at, url in rows:
                    entry = self._pending.setdefault(minute, [0, last_at, url])
                    entry[0] += count
                    if last_at >= entry[1]:
                        entry[1], entry[2] = last_at, url
            return False

    def _run(self):
        idle = 0
        while True:
            time.sleep(FLUSH_EVERY)
            with self._lock:
                busy = bool(self._pending)
            self.flush()
            idle = 0 if busy else idle + 1
            with self._lock:
                if idle >= IDLE_ROUNDS and not self._pending:
                    self._thread = None
                    return

    def _start_locked(self):
        """Start the flushing thread unless it runs (self._lock held)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="smsbatch-rejections", daemon=True)
            self._thread.start()
