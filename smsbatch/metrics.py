"""GET /metrics: the Prometheus text exposition format, built with prometheus_client.

Two kinds of numbers. What processors do (they are separate cron processes, on any
host) is read from the database on each scrape by DatabaseCollector, so every host's
/metrics says the same: a few aggregate queries through a connection of its own that
never takes the write lock. These are totals over what the database holds, so they are
gauges (SMSBATCH_RETENTION_DAYS pruning lowers them; a counter must never go down).
What this webhook process itself answered (requests by route and answer code, and their
latency) are ordinary counters and a histogram in a registry per app, so tests can build
several apps.

No label holds a person's number or any text: routes and answer codes come from fixed
sets, and a business number is a label only if it is listed (SMSBATCH_NUMBERS, else
TWILIO_FROM_NUMBER) or, with none listed, shaped like E.164 while signatures are checked;
at most MAX_NUMBER_LABELS of them.
"""

import hmac
import logging
import re
import threading
import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from smsbatch.config import E164
from smsbatch.db import Store
from smsbatch.deadline import Look
from smsbatch.states import State

log = logging.getLogger("smsbatch.web")
SCRAPE_BUSY_TIMEOUT = 0.5  # a WAL reader waits only in rare recovery moments: never long
# A scrape waits this long (after the read under way began) for the database, then says it
# could not read it: a server that vanished answers nothing for 10-15 s, and scrapes waiting
# on it one after another held the server's pool threads (and /health behind them).
SCRAPE_SECONDS = 2.0
MAX_NUMBER_LABELS = 50  # business numbers beyond these are summed under "other"
PROVIDERS = ("ai", "sms")
ENCODINGS = ("GSM-7", "UCS-2")
CURRENCY = re.compile(r"[A-Z]{3}")
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


def gauge(name, doc, labels=(), rows=()):
    """A GaugeMetricFamily with one sample per (label values..., value) row."""
    family = GaugeMetricFamily(name, doc, labels=list(labels))
    for *values, value in rows:
        family.add_metric(list(values), value)
    return family


def one_of(value, allowed, other="other"):
    """`value` if it is one of `allowed`, else `other`: a label from a fixed set."""
    return value if value in allowed else other


class DatabaseCollector(Collector):
    """Reads the database on each scrape: what every processor and webhook stored."""

    def __init__(self, settings, clock=time.time, unwritten_rejections=None):
        self.settings, self.clock = settings, clock
        self.unwritten_rejections = unwritten_rejections  # since -> (count, last time) not yet written
        self.numbers = frozenset(settings.listed_numbers)
        # With no number listed (a messaging service), a stored To is trusted only when every
        # text came through a signed request: unsigned ones (--insecure-no-signature) can claim any To.
        self.trust_shape = not self.numbers and bool(settings.twilio_auth_token)
        self._store = None
        self._lock = threading.Lock()
        self._look = Look(lambda: self._read(self.clock()), SCRAPE_SECONDS, "smsbatch-scrape")

    def collect(self):
        try:
            now, data = self._look()  # one read at a time, on a thread of its own
        except Exception as exc:
            log.warning("/metrics: could not read the database: %s", exc)
            yield gauge("smsbatch_database_readable", "1 if the database could be read for this scrape",
                        rows=[(0,)])
            return
        yield gauge("smsbatch_database_readable", "1 if the database could be read for this scrape", rows=[(1,)])
        yield from self._texts(data["counts"]["texts"])
        yield from self._batches(data["counts"]["batches"], data["health"])
        yield from self._replies(data["counts"]["replies"])
        yield from self._providers(data["providers"], now)
        yield from self._activity(data["activity"], data["rejected"])

    def _read(self, now):
        """(now, everything the families need), read under one lock through the scrape's own connection."""
        with self._lock:
            if self._store is None:
                self._store = Store.open_ready(self.settings.db_path, SCRAPE_BUSY_TIMEOUT)
            store = self._store
            try:
                data = store.metrics_snapshot(now)
            except Exception:
                store.close()
                self._store = None
                raise
        if self.unwritten_rejections is not None:
            data["rejected"] += self.unwritten_rejections(now - 3600)[0]
        return now, data

    def number_label(self, number):
        """A business number as a label: listed (SMSBATCH_NUMBERS, else TWILIO_FROM_NUMBER), or
        E.164-shaped when none is listed and signatures are checked; anything else is 'other'."""
        known = number in self.numbers or (self.trust_shape and bool(E164.fullmatch(number or "")))
        return number if known else "other"

    def _texts(self, rows):
        totals = {}
        for number, count in rows:
            label = self.number_label(number)
            if label not in totals and len(totals) >= MAX_NUMBER_LABELS:
                label = "other"
            totals[label] = totals.get(label, 0) + count
        yield gauge("smsbatch_texts_stored", "Inbound texts in the database, by the business number they were "
                    "sent to", ["our_number"], sorted(totals.items()))

    def _batches(self, rows, health):
        states = {s.value: 0 for s in State}
        ai = [0, 0, 0]
        for state, count, requests, prompt, completion in rows:
            states[state] = states.get(state, 0) + count  # the CHECK constraint allows only State values
            ai = [ai[0] + requests, ai[1] + prompt, ai[2] + completion]
        yield gauge("smsbatch_batches", "Batches in the database, by state", ["state"], sorted(states.items()))
        yield gauge("smsbatch_oldest_pending_age_seconds", "Age of the oldest batch not yet answered (0: none)",
                    rows=[(health["oldest_pending_age_seconds"] or 0,)])
        yield gauge("smsbatch_ai_requests", "HTTP requests made to the AI, its client's retries included",
                    rows=[(ai[0],)])
        yield gauge("smsbatch_ai_tokens", "Tokens the AI billed, by kind", ["kind"],
                    [("prompt", ai[1]), ("completion", ai[2])])

    def _replies(self, rows):
        from smsbatch import delivery

        # The usual statuses always, at 0 if none: a series that appears only later confuses rate() and alerts.
        statuses = dict.fromkeys(("no_receipt", "queued", "sent", "delivered", "undelivered", "failed"), 0)
        segments, cost = {}, {}
        for status, encoding, unit, count, parts, price in rows:
            # No receipt yet is said as such, as `status` and `deliveries` say it.
            status = "no_receipt" if status is None else one_of(status, delivery.RANK)
            statuses[status] = statuses.get(status, 0) + count
            encoding = one_of(encoding, ENCODINGS, "unknown" if encoding is None else "other")
            segments[encoding] = segments.get(encoding, 0) + parts
            if price is not None:
                unit = unit if CURRENCY.fullmatch(unit or "") else "other"
                cost[unit] = cost.get(unit, 0.0) - price  # Twilio states a charge as a negative price
        yield gauge("smsbatch_replies", "SMS replies sent, by Twilio's latest delivery status (no_receipt: "
                    "none yet)", ["status"], sorted(statuses.items()))
        yield gauge("smsbatch_sms_segments", "SMS segments sent (what Twilio bills), by encoding", ["encoding"],
                    sorted(segments.items()))
        yield gauge("smsbatch_sms_cost", "What Twilio charged for the replies whose price is known, by currency",
                    ["currency"], sorted(cost.items()))

    def _providers(self, rows, now):
        by_name = {r["provider"]: r for r in rows if r["provider"] in PROVIDERS}
        failing = [(p, int(by_name.get(p, {}).get("failing_since") is not None)) for p in PROVIDERS]
        outage = [(p, int(by_name.get(p, {}).get("alerted_at") is not None)) for p in PROVIDERS]
        since = [(p, now - r["failing_since"]) for p, r in by_name.items() if r["failing_since"] is not None]
        last_fail = [(p, r["last_failure_at"]) for p, r in by_name.items() if r.get("last_failure_at") is not None]
        yield gauge("smsbatch_provider_failing", "1 while a provider's calls keep failing (ai, sms)", ["provider"],
                    failing)
        yield gauge("smsbatch_provider_outage", "1 while an announced outage lasts (failing longer than "
                    "SMSBATCH_ALERT_AFTER_SECONDS)", ["provider"], outage)
        yield gauge("smsbatch_provider_failing_seconds", "How long a failing provider has been failing",
                    ["provider"], since)
        yield gauge("smsbatch_provider_last_failure_timestamp_seconds", "When a provider's call last failed",
                    ["provider"], last_fail)

    def _activity(self, activity, rejected):
        if activity["last_run_at"] is not None:
            yield gauge("smsbatch_last_processor_run_timestamp_seconds", "When a processor last started or ended "
                        "a run (any host)", rows=[(activity["last_run_at"],)])
        if activity["last_text_at"] is not None:
            yield gauge("smsbatch_last_text_timestamp_seconds", "When the latest text was received",
                        rows=[(activity["last_text_at"],)])
        yield gauge("smsbatch_rejected_signatures_last_hour", "Webhook requests refused for a bad "
                    "X-Twilio-Signature in the last hour (every host)", rows=[(rejected,)])


class GuessCollector:
    """smsbatch_webhook_guessed_groups_total{outcome}: groups of texts the PostgreSQL webhook
    stored in one round trip from what it remembered ("right"), or the ordinary way after
    the server found a guess wrong ("wrong": another host writes the same conversations, a
    processor claimed their batches, texts came out of order)."""

    def __init__(self, guesses):
        self.guesses = guesses

    def collect(self):
        family = CounterMetricFamily("smsbatch_webhook_guessed_groups", "Groups of texts this webhook stored in one"
                                     " round trip from what it remembered (right), or the ordinary way after the"
                                     " server found a guess wrong (wrong)", labels=["outcome"])
        for outcome in ("right", "wrong"):
            family.add_metric([outcome], self.guesses.get(outcome, 0))
        yield family


class WebMetrics:
    """The registry behind one app's /metrics: the database collector, this process's
    request counts and latency, and the process collector (CPU, memory, open files)."""

    def __init__(self, settings, route_label, clock=time.time, unwritten_rejections=None, guesses=None):
        self.token = settings.metrics_token
        self.route_label = route_label  # request path -> one of a fixed set of routes
        self.registry = CollectorRegistry()
        self.registry.register(DatabaseCollector(settings, clock, unwritten_rejections))
        if guesses is not None:  # the PostgreSQL writer's: {"right": n, "wrong": n}
            self.registry.register(GuessCollector(guesses))
        ProcessCollector(registry=self.registry)
        self.requests = Counter("smsbatch_webhook_requests", "HTTP requests answered by this process, by route "
                                "and answer code", ["route", "code"], registry=self.registry)
        self.latency = Histogram("smsbatch_webhook_request_duration_seconds", "Time from a request arriving "
                                 "whole to its answer, by route", ["route"], buckets=LATENCY_BUCKETS,
                                 registry=self.registry)
        self._children = {}  # (route, code) -> (counter, histogram) children

    def observe(self, path, status, seconds):
        """Count one answered request (about 3 µs: the labelled children are looked up once)."""
        key = (self.route_label(path), status[:3])
        children = self._children.get(key)
        if children is None:  # a few routes times a few codes: bounded
            children = self._children.setdefault(key, (self.requests.labels(*key), self.latency.labels(key[0])))
        children[0].inc()
        children[1].observe(max(0.0, seconds))

    def authorized(self, environ):
        """True if no SMSBATCH_METRICS_TOKEN is set, or the request bears it (compared in constant time)."""
        if not self.token:
            return True
        scheme, _, given = environ.get("HTTP_AUTHORIZATION", "").strip().partition(" ")
        given = given.strip().encode("latin-1", "replace")  # WSGI headers are latin-1 text
        return scheme.lower() == "bearer" and hmac.compare_digest(given, self.token.encode())

    def page(self):
        """(status, headers, body) of a scrape."""
        return "200 OK", [("Content-Type", CONTENT_TYPE_LATEST)], generate_latest(self.registry)
