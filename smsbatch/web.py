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
import threading
import time
from urllib.parse import unquote, urlparse

from smsbatch import delivery
from smsbatch.batching import Rules, opt_out_scope
from smsbatch.config import Settings
from smsbatch.db import Store
from smsbatch.engine import is_postgres
from smsbatch.errors import ConfigError, SmsbatchError
from smsbatch.rejections import Rejections
from smsbatch.server import make_server_for
from smsbatch.sms import status_callback_url
from smsbatch.writer import WEB_BUSY_TIMEOUT, Writer

__all__ = ["app", "make_app", "make_server_for"]  # make_server_for: from smsbatch.server

log = logging.getLogger("smsbatch.web")
MAX_BODY = 64 * 1024
TWIML_EMPTY = b'<?xml version="1.0" encoding="UTF-8"?><Response/>'
MAX_MEDIA = 10  # Twilio sends at most 10 media per message
CARRIER_KINDS = {"STOP": "opt_out", "START": "opt_in"}  # OptOutType; HELP is an ordinary text
SINGLE_FIELDS = ("MessageSid", "From", "To", "Body", "NumMedia")
# Longer than any of our own commits (milliseconds), far shorter than a text's 4 s wait.
WRITE_PROBE_SECONDS = 0.05
HEALTH_BUSY_TIMEOUT = 0.5  # a WAL reader waits only in rare recovery moments: never long
MIN_FREE_BYTES = 1024 * 1024  # less free disk than this: a COMMIT may fail (SQLITE_FULL)


class Reject(Exception):
    """An HTTP error answer: status line and a one-line reason."""

    def __init__(self, status, reason, headers=(), signed_url=None):
        super().__init__(reason)
        self.status = status
        self.headers = list(headers)
        self.signed_url = signed_url  # a bad signature: the URL it was checked against


class FormParams(dict):
    """A form as {name: [values]} that twilio's RequestValidator can read (getall)."""

    def getall(self, name):
        """Every value of `name`. Raises: KeyError if there is none."""
        return self[name]

    def one(self, name, default=""):
        """The first value of `name`, or `default`."""
        values = self.get(name)
        return values[0] if values else default


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
        elif not insecure:
            raise ConfigError("TWILIO_AUTH_TOKEN is not set: refusing unsigned webhooks")
        if is_postgres(settings.db_path):
            from smsbatch.writer_pool import PgWriter

            self.writer = PgWriter(settings.db_path, WEB_BUSY_TIMEOUT)
        else:
            self.writer = Writer(settings.db_path, WEB_BUSY_TIMEOUT)
        self.rejections = Rejections(self.writer.submit, clock)
        # Behind a proxy the webhook may live under a prefix (https://host/shop/sms/).
        public_path = urlparse(settings.public_url).path.rstrip("/") if settings.public_url else ""
        self.sms_paths = {"/sms"} | ({public_path} if public_path else set())
        self.health_paths = {"/health"} | {p.rsplit("/", 1)[0] + "/health" for p in self.sms_paths}
        # Delivery receipts go to SMSBATCH_PUBLIC_URL + /status (a proxy passing the webhook's
        # path through hands them over as <that path>/status).
        self.status_paths = {"/status"} | {p + "/status" for p in self.sms_paths}
        self._health_store = None
        self._health_lock = threading.Lock()

    def burst(self, on_done):
        """Commit the writes of one burst of requests in one transaction (see
        Writer.burst); the server uses it for requests that arrived whole together."""
        return self.writer.burst(on_done)

    def drain(self):
        """Let the writes already handed over be committed (the server is stopping)."""
        self.writer.close()

    def __call__(self, environ, start_response):
        try:
            status, headers, body = self.route(environ)
        except Reject as exc:
            status, body = exc.status, (str(exc) + "\n").encode()
            headers = [("Content-Type", "text/plain; charset=utf-8")] + exc.headers
            if not status.startswith("503"):  # 503s are logged where they happen
                self.rejections.rejected(status, environ.get("PATH_INFO", ""), str(exc), exc.signed_url)
        except Exception:  # never a traceback page; say why in the log
            log.exception("webhook: unexpected error")
            status, headers, body = "500 Internal Server Error", [("Content-Type", "text/plain")], b"error\n"
        headers.append(("Content-Length", str(len(body))))
        start_response(status, headers)
        return [b""] if environ.get("REQUEST_METHOD") == "HEAD" else [body]

    def route(self, environ):
        """(status, headers, body) for this request. Raises: Reject."""
        path, method = environ.get("PATH_INFO", "").rstrip("/"), environ.get("REQUEST_METHOD", "")
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
            return self.health()
        raise Reject("404 Not Found", "not found")

    def inbound(self, environ):
        """POST /sms: check, store, answer empty TwiML. Raises: Reject (503 if not stored)."""
        params = parse_form(environ)
        self.check_signature(environ, params)
        for name in SINGLE_FIELDS:
            if len(params.get(name, ())) > 1:
                raise Reject("400 Bad Request", f"field {name} given more than once")
        sid, phone = params.one("MessageSid").strip(), params.one("From").strip()
        if not sid or not phone:
            raise Reject("400 Bad Request", "missing From or MessageSid")
        if len(sid) > 64 or len(phone) > 64:
            raise Reject("400 Bad Request", "From or MessageSid too long")
        media = media_urls(params)
        to, body, rules, clock = params.one("To").strip(), params.one("Body"), self.rules, self.clock
        # Twilio's Advanced Opt-Out names the keywords configured in the console.
        carrier = CARRIER_KINDS.get(params.one("OptOutType").strip().upper())
        scope = opt_out_scope(to, self.settings.twilio_messaging_service_sid)
        # The wait for the lock counts from when the request was whole (the server says when).
        deadline = environ.get("smsbatch.received", time.monotonic()) + self.writer.busy_timeout
        try:
            added = self.writer.submit(
                lambda store: store.add_message(sid, phone, to, body, clock(), rules, media, carrier, scope),
                deadline
            )
        except SmsbatchError as exc:
            # Never acknowledge a lost text. A failed burst is run again (see Writer.burst):
            # only the last word is worth a line.
            if not self.writer.in_burst():
                log.error("webhook: could not store MessageSid %s: %s", sid, exc)
            raise Reject("503 Service Unavailable", "could not store the message; try again") from None
        if added is not None:  # None inside a burst: stored at its COMMIT, before this answer goes out
            log.debug("stored %s in batch %s%s", sid, added.batch_id, " (repeat)" if added.duplicate else "")
        return "200 OK", [("Content-Type", "text/xml")], TWIML_EMPTY

    def delivery_receipt(self, environ):
        """POST /status: Twilio's status callback for a reply we sent, signed like /sms
        (for the URL SMSBATCH_PUBLIC_URL + /status). Records the latest MessageStatus and
        ErrorCode; a MessageSid we never sent is answered 200 and ignored.

        Raises: Reject (403 unsigned or forged, 400 bad fields, 503 not stored).
        """
        params = parse_form(environ)
        if self.validator is not None:
            url = status_callback_url(self.settings.public_url) if self.settings.public_url else None
            signature = environ.get("HTTP_X_TWILIO_SIGNATURE", "")
            url = url or self.signed_url(environ)
            if not signature or not self.signatures.valid(url, params, signature):
                raise Reject("403 Forbidden", "missing or invalid X-Twilio-Signature", signed_url=shown_url(url))
        sid, status = params.one("MessageSid").strip(), params.one("MessageStatus").strip().lower()
        code = params.one("ErrorCode").strip()
        if not sid or len(sid) > 64 or not status or len(status) > 32:
            raise Reject("400 Bad Request", "missing MessageSid or MessageStatus")
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
            log.error("webhook: could not store the status of %s: %s", sid, exc)
            raise Reject("503 Service Unavailable", "could not store the status; try again") from None
        return "200 OK", [("Content-Type", "text/plain")], b""

    def check_signature(self, environ, params):
        """Raises: Reject 403 unless X-Twilio-Signature is right (or signatures are off)."""
        if self.validator is None:
            return
        signature, url = environ.get("HTTP_X_TWILIO_SIGNATURE", ""), self.signed_url(environ)
        if not signature or not self.signatures.valid(url, params, signature):
            raise Reject("403 Forbidden", "missing or invalid X-Twilio-Signature", signed_url=shown_url(url))

    def signature_note(self):
        """One line for `serve` to print at start: the URL signatures are checked against."""
        if self.validator is None:
            return "signatures are NOT checked"
        if self.settings.public_url:
            return f"signatures are checked against {shown_url(self.settings.public_url)} (SMSBATCH_PUBLIC_URL)"
        return ("signatures are checked against each request's own URL; behind a proxy or TLS terminator "
                "set SMSBATCH_PUBLIC_URL to the URL configured in Twilio")

    def signed_url(self, environ):
        """The URL Twilio signed: SMSBATCH_PUBLIC_URL verbatim when set (behind a proxy),
        else the URL of this request."""
        if self.settings.public_url:
            return self.settings.public_url
        from wsgiref.util import request_uri

        return request_uri(environ, include_query=True)

    def health(self):
        """200 if texts can be read and stored now, else 503 saying why. Reads through a
        connection of its own and never waits for the write lock: whether a text can be
        stored comes from the writer's last attempts, the file system, and a probe that
        gives up after WRITE_PROBE_SECONDS if another process holds the lock."""
        try:
            info = {"ok": True, "database": "ok", **self._read_health()}
        except Exception as exc:
            info = {"ok": False, "database": f"unreadable: {exc}"}
        trouble = self.writer.trouble() or unwritable(self.settings.db_path) or self._probe_write()
        info["can_store"] = trouble is None
        if trouble:
            info.update(ok=False, cannot_store=trouble)
        status = "200 OK" if info["ok"] else "503 Service Unavailable"
        return status, [("Content-Type", "application/json")], json.dumps(info).encode()

    def _probe_write(self):
        """None if the write lock can be had now, else why not (the probe writes nothing)."""
        with self._health_lock:
            if self._health_store is None:
                return None  # the read above failed and said so
            try:
                return self._health_store.write_blocked(WRITE_PROBE_SECONDS)
            except SmsbatchError as exc:
                return f"the database cannot be written: {exc}"

    def _read_health(self):
        with self._health_lock:
            if self._health_store is None:
                self._health_store = Store.open_ready(self.settings.db_path, HEALTH_BUSY_TIMEOUT)
            try:
                now = self.clock()
                info = self._health_store.health(now)
                info.update(self._rejected_signatures(now))
                info["outages"] = self._health_store.outages()  # announced, still going on
                return info
            except Exception:
                self._health_store.close()
                self._health_store = None
                raise


    def _rejected_signatures(self, now):
        """Bad signatures in the last hour: those written to the database plus those not yet."""
        info = self._health_store.rejected_signatures(now)
        count, last_at = self.rejections.unwritten(now - 3600)
        info["rejected_signatures"] += count
        if last_at is not None and (info["last_rejected_signature_at"] or 0) < last_at:
            info["last_rejected_signature_at"] = last_at
        info.pop("last_rejected_signature_url", None)
        return info


def shown_url(url):
    """The URL with any user:password@ replaced by ***@ (Twilio allows credentials in webhook URLs)."""
    parsed = urlparse(url)
    if "@" not in parsed.netloc:
        return url
    return parsed._replace(netloc="***@" + parsed.netloc.rsplit("@", 1)[1]).geturl()


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


def parse_form(environ):
    """Read and parse a form-encoded body of at most MAX_BODY bytes.

    Raises:
        Reject: 413 too large, 415 not a form, 400 unreadable.
    """
    raw_length = environ.get("CONTENT_LENGTH") or "0"
    if not (raw_length.isascii() and raw_length.isdigit()):  # int() takes '9_1', ' 9' and '+9'
        raise Reject("400 Bad Request", "bad Content-Length")
    length = int(raw_length)
    if length > MAX_BODY:
        raise Reject("413 Content Too Large", f"body over {MAX_BODY} bytes")
    ctype = environ.get("CONTENT_TYPE", "").split(";")[0].strip().lower()
    if ctype != "application/x-www-form-urlencoded":
        raise Reject("415 Unsupported Media Type", "expected application/x-www-form-urlencoded")
    try:
        raw = environ["wsgi.input"].read(length) if length > 0 else b""
    except (OSError, ValueError):
        raise Reject("400 Bad Request", "could not read the body") from None
    if len(raw) < length:
        raise Reject("400 Bad Request", "body shorter than Content-Length")
    try:
        pairs = form_pairs(raw.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise Reject("400 Bad Request", "body is not valid form-encoded UTF-8") from None
    params = FormParams()
    for name, value in pairs:
        params.setdefault(name, []).append(value)
    return params


def form_pairs(text):
    """The (name, value) pairs of a form body: exactly parse_qsl(text, keep_blank_values=True,
    encoding="utf-8", errors="strict"), at about half the cost (only pieces holding '+'
    or '%' are decoded). keep_blank_values: Twilio signs empty fields too, so dropping
    them would break signatures.

    Raises:
        UnicodeDecodeError: a %-escape that is not UTF-8.
    """
    pairs = []
    for piece in text.split("&") if text else ():
        if not piece:
            continue
        name, _, value = piece.partition("=")
        if "+" in name:
            name = name.replace("+", " ")
        if "%" in name:
            name = unquote(name, "utf-8", "strict")
        if "+" in value:
            value = value.replace("+", " ")
        if "%" in value:
            value = unquote(value, "utf-8", "strict")
        pairs.append((name, value))
    return pairs


def media_urls(params):
    """MediaUrl0..N-1 of a picture message.

    Raises:
        Reject: NumMedia is not a small whole number.
    """
    raw = params.one("NumMedia", "0").strip() or "0"
    # '²'.isdigit(), yet int('²') fails; int() of 4,300+ digits raises: look at the length first.
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 2 or int(raw) > MAX_MEDIA:
        raise Reject("400 Bad Request", "bad NumMedia")
    return [params.one(f"MediaUrl{i}") for i in range(int(raw)) if params.one(f"MediaUrl{i}")]


def make_app(settings, clock=time.time, insecure=False):
    """The webhook WSGI app for these settings.

    Raises:
        ConfigError: no TWILIO_AUTH_TOKEN and not `insecure`.
    """
    return Webhook(settings, clock=clock, insecure=insecure)


def app(environ, start_response):
    """`smsbatch.web:app` for gunicorn, uwsgi and the like: settings from the environment.

    Raises:
        ConfigError: a setting is wrong, or TWILIO_AUTH_TOKEN is not set.
    """
    global _default_app
    if _default_app is None:
        with _default_lock:
            if _default_app is None:
                settings = Settings.from_env()
                try:
                    _default_app = make_app(settings)
                except ConfigError as exc:  # there is no --insecure-no-signature here
                    raise ConfigError(f"{exc}: set TWILIO_AUTH_TOKEN in the WSGI server's environment") from None
    return _default_app(environ, start_response)


_default_app = None
_default_lock = threading.Lock()
