"""Alerts to a chat channel: SMSBATCH_ALERT_WEBHOOK_URL receives a POST of `{"text": ...}`
(what Slack, Mattermost and Discord's Slack-compatible incoming webhooks accept).

Four events: a provider outage and its end (announced once among processors by
Store.record_provider), a reply newly known undelivered (reported once by
Store.take_new_problems), and no processor run while batches wait (once per episode,
Store.claim_alert, whoever notices: `serve` every STALL_CHECK_SECONDS, or the next
`process` run). Each alert goes out from a thread of its own, tried ALERT_TRIES times
with ALERT_TIMEOUT each, so it never holds up a batch; `process` waits at most
WAIT_AT_END for those still going out once its batches are done. A person's number never
goes out (errors.hide_numbers), nor a secret (errors.redact).
"""

import json
import logging
import threading
import time
import urllib.error
import urllib.request

from smsbatch import attention
from smsbatch.config import display_secret_url
from smsbatch.errors import hide_numbers, redact
from smsbatch.inputs import iso_time

log = logging.getLogger("smsbatch.alerts")
ALERT_TIMEOUT = 2.0  # seconds per try (connect, and each read)
ALERT_TRIES = 2
ALERT_PAUSE = 0.5  # between tries
WAIT_AT_END = 5.0  # the most `process` waits, after its batches, for alerts still going out
STALL_CHECK_SECONDS = 60.0  # `serve` looks for a stalled processor this often
STALLED = "stalled"  # Store.claim_alert's event: no processor run while batches wait
LINE_LIMIT = 500


def slack_text(text):
    """Slack's three control characters escaped (its docs: &, <, >), so a provider's error
    text cannot become a link or an @channel mention."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


class Alerter:
    """Posts alerts to one URL in the background; does nothing without a URL."""

    def __init__(self, url="", secrets=(), timeout=ALERT_TIMEOUT, tries=ALERT_TRIES):
        self.url, self.secrets, self.timeout, self.tries = url, tuple(secrets), timeout, tries
        self._threads = []
        self._lock = threading.Lock()

    @classmethod
    def for_settings(cls, settings):
        return cls(settings.alert_webhook_url, settings.secrets())

    @property
    def active(self):
        return bool(self.url)

    def safe(self, text):
        """The text as it may leave: each line without control characters, secrets or phone numbers."""
        lines = [redact(line, self.secrets, limit=LINE_LIMIT) for line in str(text).splitlines()]
        return slack_text(hide_numbers("\n".join(line for line in lines if line)))

    def send(self, text):
        """Post `text` from a thread of its own (returns at once)."""
        if not self.url:
            return
        thread = threading.Thread(target=self._post, args=(self.safe(text),), name="smsbatch-alert", daemon=True)
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        thread.start()

    def _post(self, text):
        body = json.dumps({"text": text}).encode()
        why = ""
        for attempt in range(self.tries):
            if attempt:
                time.sleep(ALERT_PAUSE)
            request = urllib.request.Request(self.url, data=body, method="POST", headers={
                "Content-Type": "application/json", "User-Agent": "smsbatch-alerts"})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as answer:
                    answer.read(4096)
                return
            except urllib.error.HTTPError as exc:
                why = f"HTTP {exc.code}"
                if 400 <= exc.code < 500 and exc.code != 429:
                    break  # refused (a revoked webhook): asking again will not help
            except (OSError, ValueError) as exc:  # unreachable, timed out, refused
                why = str(getattr(exc, "reason", exc)) or type(exc).__name__
        log.warning("alert not delivered to %s after %d tries: %s", display_secret_url(self.url), self.tries,
                    redact(why, self.secrets, limit=200))

    def wait(self, seconds=WAIT_AT_END):
        """Give the alerts still going out up to `seconds` in all. True if none is left."""
        deadline = time.monotonic() + seconds
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in threads)


def notice_stall(store, alerter, now, after):
    """Alert once per episode when batches have been due for `after` seconds or more and no
    processor has run for as long. Returns True if this caller raised the alert."""
    waiting = store.waiting_unclaimed(now, after)
    if waiting is None:
        return False
    last_run = store.last_activity()["last_run_at"]
    if not attention.idle(waiting[0], last_run, now, after):
        return False  # a processor is running; the batches may be held up for another reason
    if not store.claim_alert(STALLED, last_run if last_run is not None else 0.0, now):
        return False  # already announced for this episode (by this or another process)
    count, due = waiting
    ran = f"since {iso_time(last_run)}" if last_run is not None else "ever"
    text = (f"STALLED: no processor has run {ran} while {count} batch{'es' if count != 1 else ''} wait "
            f"(due since {iso_time(due)}): is the cron job running `smsbatch process`?")
    log.warning(text)
    alerter.send(f"smsbatch {text}")
    return True


def watch_stalls(settings, alerter, stop, every=STALL_CHECK_SECONDS, clock=time.time):
    """Start a thread that runs notice_stall every `every` seconds until `stop` is set
    (`serve`: whoever is up notices a processor that stopped)."""
    from smsbatch.db import Store

    def run():
        store = None
        while not stop.wait(every):
            try:
                store = store or Store.open_ready(settings.db_path, busy_timeout=1.0)
                notice_stall(store, alerter, clock(), settings.alert_after_seconds)
            except Exception as exc:  # a busy or broken database: try again next round
                log.debug("could not look for a stalled processor: %s", exc)
                if store is not None:
                    store.close()
                store = None

    thread = threading.Thread(target=run, name="smsbatch-stall-watch", daemon=True)
    thread.start()
    return thread
