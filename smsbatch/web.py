"""The webhook: a WSGI app that stores each inbound text and answers Twilio at once.

`make_app(settings)` returns the WSGI callable; `app` builds one from the environment
for any WSGI server (`smsbatch.web:app`); `make_server_for()` (from smsbatch.server)
runs it on wsgiref. The texts are written through smsbatch.writer.

Speed: bench/run.py webhook and webhook-vs-flask (durable commits: one fsync per
burst); the figures behind each choice are in the docstrings of
server.SelectorWSGIServer, writer.Writer and writer.Checkpointer.
"""

import json
import logging
import os
import re
import threading
import time
from urllib.parse import parse_qs, urlparse

from smsbatch import attention, delivery
from smsbatch.batching import Rules, opt_out_scope
from smsbatch.config import Settings, display_url
from smsbatch.db import Store
from smsbatch.deadline import Look, LookTimedOut
from smsbatch.engine import is_postgres
from smsbatch.errors import ConfigError, SmsbatchError
from smsbatch.intake import Text
from smsbatch.metrics import WebMetrics
from smsbatch.rejections import Rejections, printable
from smsbatch.server import LATE_GRACE, make_server_for
from smsbatch.sms import status_callback_url
from smsbatch.webform import (MAX_BODY, FormParams, Refused, inbound_wrong, media_urls, parse_form, resplit_trace,
                              well_formed)
from smsbatch.writer import WEB_BUSY_TIMEOUT, Writer

__all__ = ["app", "make_app", "make_server_for", "MAX_BODY", "FormParams"]  # re-exported

log = logging.getLogger("smsbatch.web")
TWIML_EMPTY = b'<?xml version="1.0" encoding="UTF-8"?><Response/>'
CARRIER_KINDS = {"STOP": "opt_out", "START": "opt_in"}  # OptOutType; HELP is an ordinary text
# Longer than any of our own commits (milliseconds), far shorter than a text's 4 s wait.
WRITE_PROBE_SECONDS = 0.05
SQLITE_LATE_GRACE = 8.0  # see Webhook.late_grace
HEALTH_BUSY_TIMEOUT = 0.5  # a WAL reader waits only in rare recovery moments: never long
# /health waits this long for its look at the database, then says it cannot store: a server
# that vanished answers nothing until the kernel gives up (10-15 s, engine_pg.NETWORK_TIMEOUTS),
# and a load balancer must hear at once that this host cannot store texts.
HEALTH_SECONDS = 2.0
MIN_FREE_BYTES = 1024 * 1024  # less free disk than this: a COMMIT may fail (SQLITE_FULL)


class Reject(Refused):
    """An HTTP error answer: status line and a one-line reason."""

    def __init__(self, status, reason, headers=(), signed_url=None):
        super().__init__(status, reason)
        self.headers = list(headers)
        self.signed_url = signed_url  # a bad signature: the URL it was checked against


class SignatureChecker:
    """twilio's RequestValidator.validate, with the URL handling done once per URL.

    validate() parses the URL and signs twice (with and without the port) on every
    request; here the two URL forms are worked out once and cached, and the second
    signature is computed only if the first does not match. Same answers.
    """

    def __init__(self, validator):
        self.validator = validator
        self._urls = {}

    def url_forms(self, url):
        """The URL without and with its port: Twilio may have signed either."""
        forms = self._urls.get(url)
        if forms is None:
            from twilio.request_validator import add_port, remove_port

            parsed = urlparse(url)
            forms = (remove_port(parsed), add_port(parsed))
            if len(self._urls) < 64:
                self._urls[url] = forms
        return forms

    def valid(self, url, params, signature):
        """True if `signature` is Twilio's for this URL and these form fields."""
        from twilio.request_validator import compare  # validate()'s own comparison (any text)

        compute = self.validator.compute_signature
        return any(compare(compute(form, params), signature) for form in self.url_forms(url))


class Webhook:
    """The WSGI application. Texts are written through one Writer (one shared
    connection, many texts per transaction): measured faster and steadier (p99) than
    a connection per request, or a transaction per text. /health reads through a
    connection of its own. A text is answered 200 only once committed. Answers that
    store nothing (/health, 404, 405, 415, 403, 400) never take the write lock.
    """

    max_body = MAX_BODY  # the server refuses larger bodies before they arrive

    def __init__(self, settings, clock=time.time, insecure=False):
        self.settings = settings
        self.rules = Rules.from_settings(settings)
        self.clock = clock
        self.validator = None
        if settings.twilio_auth_token:
            from twilio.request_validator import RequestValidator

            self.validator = RequestValidator(settings.twilio_auth_token)
            self.signatures = SignatureChecker(self.validator)
            if not settings.public_url:  # else a client's Host header would choose what is signed
                raise ConfigError("SMSBATCH_PUBLIC_URL is not set: set it to the webhook URL configured in "
                                  "Twilio (signatures are checked against it)")
        elif not insecure:
            raise ConfigError("TWILIO_AUTH_TOKEN is not set: refusing unsigned webhooks")
        remote = is_postgres(settings.db_path)  # a database across a network: PostgreSQL
        if remote:
            from smsbatch.writer_pool import PgWriter

            self.writer = PgWriter(settings.db_path, WEB_BUSY_TIMEOUT)
        else:
            self.writer = Writer(settings.db_path, WEB_BUSY_TIMEOUT)
        # Rejection counts are added to what is stored: wait for how their write ended (patient).
        self.rejections = Rejections(lambda work, deadline: self.writer.submit(work, deadline, patient=True), clock)
        self.metrics = WebMetrics(settings, self.route_label, clock, self.rejections.unwritten,
                                  getattr(self.writer, "guesses", None))
        self._routes = None  # path -> metrics label (route_label)
        # Behind a proxy the webhook may live under a prefix (https://host/shop/sms/).
        public_path = urlparse(settings.public_url).path.rstrip("/") if settings.public_url else ""
        self.sms_paths = {"/sms"} | ({public_path} if public_path else set())
        self.health_paths = {"/health"} | {p.rsplit("/", 1)[0] + "/health" for p in self.sms_paths}
        # Delivery receipts go to SMSBATCH_PUBLIC_URL + /status (a proxy passing the webhook's
        # path through hands them over as <that path>/status).
        self.status_paths = {"/status"} | {p + "/status" for p in self.sms_paths}
        self._health_store = None
        self._health_lock = threading.Lock()
        # /health's look at the database, on a thread of its own, waited for HEALTH_SECONDS
        # after it began at most: every /health during a longer wait is answered at once.
        self._look = Look(self._look_once, HEALTH_SECONDS, "smsbatch-health")
        # The server runs reads (/health, /metrics) on its pool threads, not on the thread that
        # reads the texts: on PostgreSQL a read can wait on the network (a server that vanished).
        # A local SQLite file answers them at once, as before.
        self.offload_reads = remote
        # How long past its deadline a text's COMMIT may come before the server answers it 503
        # (server.LATE_GRACE): on PostgreSQL 0.5 s (a server that vanished: 503 within 5 s); on
        # SQLite a late COMMIT is a slow disk, not a lost server, and it stores the text: it still
        # answers 200, up to 12 s after the text came, inside Twilio's 15 s.
        self.late_grace = LATE_GRACE if remote else SQLITE_LATE_GRACE

    def burst(self, on_done):
        """Commit the writes of one burst of requests in one transaction (see
        Writer.burst); the server uses it for requests that arrived whole together."""
        return self.writer.burst(on_done)

    def drain(self):
        """Let the writes already handed over be committed (the server is stopping)."""
        self.writer.close()

    def __call__(self, environ, start_response):
        started = environ.get("smsbatch.received") or time.monotonic()
        burst = self.writer.current_burst()
        writes = burst.writes if burst is not None else 0
        try:
            status, headers, body = self.route(environ)
        except Refused as exc:
            status, body = exc.status, (str(exc) + "\n").encode()
            headers = [("Content-Type", "text/plain; charset=utf-8")] + getattr(exc, "headers", [])
            if not status.startswith("503"):  # 503s are logged where they happen
                self.rejections.rejected(status, environ.get("PATH_INFO", ""), str(exc),
                                         getattr(exc, "signed_url", None))
        except Exception:  # never a traceback page; say why in the log
            log.exception("webhook: unexpected error")
            status, headers, body = "500 Internal Server Error", [("Content-Type", "text/plain")], b"error\n"
        headers.append(("Content-Length", str(len(body))))
        path = environ.get("PATH_INFO", "")
        if burst is not None and burst.writes != writes:
            # This answer waits for the burst's COMMIT: counted when the server sends it, or a
            # 503 in its place (its COMMIT too late); not at all if the burst fails (the
            # request is run again, and counted then).
            environ["smsbatch.answered"] = lambda instead: self.metrics.observe(
                path, instead or status, time.monotonic() - started)
        else:
            self.metrics.observe(path, status, time.monotonic() - started)
        start_response(status, headers)
        return [b""] if environ.get("REQUEST_METHOD") == "HEAD" else [body]

    def route(self, environ):
        """(status, headers, body) for this request. Raises: Reject."""
        path, method = environ.get("PATH_INFO", "").rstrip("/"), environ.get("REQUEST_METHOD", "")
        if not valid_host(environ.get("HTTP_HOST", "")):
            raise Reject("400 Bad Request", "bad Host header")
        if path in self.sms_paths:
            if method != "POST":
                raise Reject("405 Method Not Allowed", "use POST", [("Allow", "POST")])
            return self.inbound(environ)
        if path in self.status_paths:
            if method != "POST":
                raise Reject("405 Method Not Allowed", "use POST", [("Allow", "POST")])
            return self.delivery_receipt(environ)
        if path in self.health_paths:
            if method not in ("GET", "HEAD"):
                raise Reject("405 Method Not Allowed", "use GET", [("Allow", "GET, HEAD")])
            return self.health(environ.get("QUERY_STRING", ""))
        if path == "/metrics":
            return self.metrics_page(environ, method)
        raise Reject("404 Not Found", "not found")

    def route_label(self, path):
        """A request path as a metrics label: one of a fixed set of routes, never the path sent."""
        if self._routes is None:
            self._routes = {"/metrics": "/metrics"} | {p: "/health" for p in self.health_paths} | {
                p: "/status" for p in self.status_paths} | {p: "/sms" for p in self.sms_paths}
        return self._routes.get(path.rstrip("/"), "other")

    def metrics_page(self, environ, method):
        """GET /metrics (smsbatch.metrics). Raises: Reject 405, or 401 without the SMSBATCH_METRICS_TOKEN."""
        if method not in ("GET", "HEAD"):
            raise Reject("405 Method Not Allowed", "use GET", [("Allow", "GET, HEAD")])
        if not self.metrics.authorized(environ):
            raise Reject("401 Unauthorized", "missing or wrong bearer token (SMSBATCH_METRICS_TOKEN)",
                         [("WWW-Authenticate", 'Bearer realm="smsbatch metrics"')])
        return self.metrics.page()

    def inbound(self, environ):
        """POST /sms: check, store, answer empty TwiML. Raises: Reject (503 if not stored)."""
        params = parse_form(environ)
        self.check_signature(environ, params, self.settings.public_url)
        # The shapes keep a re-split of a signed request from passing; unsigned (local
        # testing, --insecure-no-signature), any form could be sent anyway.
        wrong = inbound_wrong(params) if self.validator is not None else well_formed(params)
        if wrong:
            raise Reject("400 Bad Request", wrong)
        sid, phone = params.one("MessageSid"), params.one("From").strip()
        if not phone:
            raise Reject("400 Bad Request", "missing From")
        if len(phone) > 64:
            raise Reject("400 Bad Request", "From too long")
        media = media_urls(params)
        to, body, rules, clock = params.one("To").strip(), params.one("Body"), self.rules, self.clock
        # Twilio's Advanced Opt-Out names the keywords configured in the console.
        carrier = CARRIER_KINDS.get(params.one("OptOutType").strip().upper())
        scope = opt_out_scope(to, self.settings.twilio_messaging_service_sid)
        # The wait for the lock counts from when the request was whole (the server says when).
        deadline = environ.get("smsbatch.received", time.monotonic()) + self.writer.busy_timeout
        try:
            added = self.writer.submit(Text(sid, phone, to, body, clock(), rules, media, carrier, scope), deadline)
        except SmsbatchError as exc:
            # Never acknowledge a lost text. A failed burst is run again (see Writer.burst):
            # only the last word is worth a line.
            if not self.writer.in_burst():
                log.error("webhook: could not store MessageSid %s: %s", sid, exc)
            raise Reject("503 Service Unavailable", "could not store the message; try again") from None
        if added is not None:  # None inside a burst: stored at its COMMIT, before this answer goes out
            repeat = " (repeat of a pruned text)" if added.batch_id is None else " (repeat)"
            log.debug("stored %s in batch %s%s", sid, added.batch_id, repeat if added.duplicate else "",
                      extra={"batch_id": added.batch_id, "our_number": to})
        return "200 OK", [("Content-Type", "text/xml")], TWIML_EMPTY

    def delivery_receipt(self, environ):
        """POST /status: Twilio's status callback for a reply we sent, signed like /sms
        (for the URL SMSBATCH_PUBLIC_URL + /status). Records the latest MessageStatus and
        ErrorCode; a MessageSid we never sent is answered 200 and ignored.

        Raises: Reject (403 unsigned or forged, 400 bad fields, 503 not stored).
        """
        params = parse_form(environ)
        if self.validator is not None:
            self.check_signature(environ, params, status_callback_url(self.settings.public_url))
        wrong = well_formed(params) or resplit_trace(params)
        if wrong:
            raise Reject("400 Bad Request", wrong)
        sid, status = params.one("MessageSid"), params.one("MessageStatus").strip().lower()
        code = params.one("ErrorCode").strip()
        if not status or len(status) > 32:
            raise Reject("400 Bad Request", "missing MessageStatus")
        if not delivery.is_status(status):  # a status Twilio added (partially_delivered, ...): nothing to
            return "200 OK", [("Content-Type", "text/plain")], b""  # record, and no reason to be asked again
        if code and not (code.isascii() and code.isdigit() and len(code) < 10):
            raise Reject("400 Bad Request", "bad ErrorCode")
        at, error = self.clock(), int(code) if code and code != "0" else None
        # Like a text's, the wait for the lock counts from when the request was whole, so
        # receipts never hold texts past their 503 deadline.
        deadline = environ.get("smsbatch.received", time.monotonic()) + self.writer.busy_timeout
        try:
            self.writer.submit(lambda store: store.record_delivery(sid, status, error, at), deadline)
        except SmsbatchError as exc:
            log.error("webhook: could not store the status of %s: %s", sid, exc, extra={"reply_sid": sid})
            raise Reject("503 Service Unavailable", "could not store the status; try again") from None
        return "200 OK", [("Content-Type", "text/plain")], b""

    def check_signature(self, environ, params, url):
        """Raises: Reject 403 unless X-Twilio-Signature is Twilio's for `url` and these fields
        (or signatures are off). `url` is always from SMSBATCH_PUBLIC_URL, never the request."""
        if self.validator is None:
            return
        signature = environ.get("HTTP_X_TWILIO_SIGNATURE", "")
        if not signature or not self.signatures.valid(url, params, signature):
            raise Reject("403 Forbidden", "missing or invalid X-Twilio-Signature",
                         signed_url=display_url(url, masked=True))

    def signature_note(self):
        """One line for `serve` to print at start: the URL signatures are checked against."""
        if self.validator is None:
            return "signatures are NOT checked"
        return (f"signatures are checked against {display_url(self.settings.public_url, masked=True)} "
                "(SMSBATCH_PUBLIC_URL)")

    def health(self, query=""):
        """GET /health for monitors, without credentials: only whether texts can be stored
        (`can_store`) and whether a person is needed (`person_needed`, attention.needed);
        the details stay in `smsbatch status`. 200 while texts can be stored; with
        ?strict=1, 503 as well whenever a person is needed.

        Reads through a connection of its own and never waits for the write lock: whether a
        text can be stored comes from the writer's last attempts, the file system, and a
        probe that gives up after WRITE_PROBE_SECONDS if another process holds the lock.
        A look at the database that has not answered HEALTH_SECONDS after it began means it
        cannot store (a server that vanished answers nothing for 10-15 s): one look at a time,
        and a /health that comes later than that during the look is answered at once."""
        strict = parse_qs(query).get("strict", [""])[-1].lower() in ("1", "true", "yes")
        try:
            reasons, trouble = self._look()
        except LookTimedOut:
            self.rejections.log.warning("webhook: /health: the database did not answer within %g s", HEALTH_SECONDS)
            reasons, trouble = ["unreadable"], f"the database did not answer within {HEALTH_SECONDS:g} s"
        info = {"can_store": trouble is None, "person_needed": bool(reasons)}
        info["ok"] = info["can_store"] and not (strict and info["person_needed"])
        status = "200 OK" if info["ok"] else "503 Service Unavailable"
        return status, [("Content-Type", "application/json")], json.dumps(info).encode()

    def _look_once(self):
        """(why a person is needed, why texts cannot be stored or None): one look at the database."""
        try:
            reasons = self._attention()
            return reasons, self.writer.trouble() or unwritable(self.settings.db_path) or self._probe_write()
        except Exception as exc:  # unreadable: nothing can be stored either, and someone must look
            self.rejections.log.warning("webhook: /health cannot read the database: %s", printable(exc))
            return ["unreadable"], "unreadable"

    def _probe_write(self):
        """None if the write lock can be had now, else why not (the probe writes nothing)."""
        with self._health_lock:
            if self._health_store is None:
                return None  # the read above failed and said so
            try:
                return self._health_store.write_blocked(WRITE_PROBE_SECONDS)
            except SmsbatchError as exc:
                return f"the database cannot be written: {exc}"

    def _attention(self):
        """Why a person is needed now (attention.needed), read through the health connection."""
        with self._health_lock:
            if self._health_store is None:
                self._health_store = Store.open_ready(self.settings.db_path, HEALTH_BUSY_TIMEOUT)
            try:
                now = self.clock()
                return attention.needed(attention.gather(self._health_store, now), now)
            except Exception:
                self._health_store.close()
                self._health_store = None
                raise


# A Host header: a name or IPv4 address (RFC 3986 reg-name characters) or a bracketed IPv6
# literal, then an optional port. Nothing here depends on it; anything else is a client's junk.
HOST = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~!$&'()*+,;=%-]*)(:[0-9]{0,5})?")


def valid_host(host):
    """True if `host` (a Host header, "" when absent) is host[:port] with a port up to 65535."""
    match = HOST.fullmatch(host)
    if match is None:
        return False
    port = (match.group(2) or ":")[1:]
    return not port or int(port) <= 65535


def unwritable(db_path):
    """Why the database cannot take a write now (read-only file or folder, disk full), or None.
    (PostgreSQL: the write probe asks the server.)"""
    if is_postgres(db_path):
        return None
    folder = os.path.dirname(os.path.abspath(db_path))
    if not os.access(db_path, os.W_OK) or not os.access(folder, os.W_OK):
        return "the database or its folder is read-only"
    try:
        stat = os.statvfs(folder)
    except OSError:
        return None
    if stat.f_bavail * stat.f_frsize < MIN_FREE_BYTES:
        return "the disk holding the database is full"
    return None


def make_app(settings, clock=time.time, insecure=False):
    """The webhook WSGI app for these settings.

    Raises:
        ConfigError: no TWILIO_AUTH_TOKEN and not `insecure`.
    """
    return Webhook(settings, clock=clock, insecure=insecure)


def default_app():
    """The app `smsbatch.web:app` names, built once from the environment.

    Raises:
        ConfigError: a setting is wrong, TWILIO_AUTH_TOKEN is not set (there is no
            --insecure-no-signature here), or SMSBATCH_PUBLIC_URL is not.
    """
    global _default_app
    with _default_lock:
        if _default_app is None:
            try:
                settings = Settings.from_env()
                built = make_app(settings)
            except ConfigError as exc:
                raise ConfigError(f"smsbatch.web:app: {exc} (settings come from the WSGI server's "
                                  "environment)") from None
            if settings.alert_webhook_url:  # as `serve`: whoever is up notices that no processor runs
                from smsbatch.alerts import Alerter, watch_stalls

                watch_stalls(settings, Alerter.for_settings(settings), threading.Event())
            _default_app = built
    return _default_app


def __getattr__(name):
    """`smsbatch.web:app` for gunicorn, uwsgi and the like. Built when the server loads it
    (`from smsbatch.web import app`, getattr), not at the first request: a missing or wrong
    setting stops the server from starting (gunicorn: "Worker failed to boot") instead of
    answering every request 500."""
    if name == "app":
        return default_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_default_app = None
_default_lock = threading.Lock()
