"""The webhook: a WSGI app that stores each inbound text and answers Twilio at once.

`make_app(settings)` returns the WSGI callable; `app` builds one from the environment
for any WSGI server (`smsbatch.web:app`); `serve()` runs it on wsgiref with a small
pool of reused threads.
"""

import json
import logging
import queue
import socket
import sqlite3
import threading
import time
from urllib.parse import parse_qsl
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from smsbatch.batching import Rules
from smsbatch.config import Settings
from smsbatch.db import Store
from smsbatch.errors import ConfigError

log = logging.getLogger("smsbatch.web")
MAX_BODY = 64 * 1024
TWIML_EMPTY = b'<?xml version="1.0" encoding="UTF-8"?><Response/>'
WEB_BUSY_TIMEOUT = 5.0  # Twilio gives up on a webhook after 15 s; answer 503 well before
SOCKET_TIMEOUT = 5.0
MAX_MEDIA = 10  # Twilio sends at most 10 media per message
SINGLE_FIELDS = ("MessageSid", "From", "To", "Body", "NumMedia")


class Reject(Exception):
    """An HTTP error answer: status line and a one-line reason."""

    def __init__(self, status, reason, headers=()):
        super().__init__(reason)
        self.status = status
        self.headers = list(headers)


class FormParams(dict):
    """A form as {name: [values]} that twilio's RequestValidator can read (getall)."""

    def getall(self, name):
        return self[name]

    def one(self, name, default=""):
        values = self.get(name)
        return values[0] if values else default


class Webhook:
    """The WSGI application. One shared write connection, used under a lock: measured
    faster and steadier (p99) than a connection per request."""

    def __init__(self, settings, clock=time.time, insecure=False):
        self.settings = settings
        self.rules = Rules.from_settings(settings)
        self.clock = clock
        self.validator = None
        if settings.twilio_auth_token:
            from twilio.request_validator import RequestValidator

            self.validator = RequestValidator(settings.twilio_auth_token)
        elif not insecure:
            raise ConfigError("TWILIO_AUTH_TOKEN is not set: refusing unsigned webhooks (--insecure-no-signature to allow)")
        self._store = None
        self._lock = threading.Lock()

    def store(self):
        if self._store is None:
            self._store = Store(self.settings.db_path, busy_timeout=WEB_BUSY_TIMEOUT)
            self._store.require_schema()
        return self._store

    def __call__(self, environ, start_response):
        try:
            status, headers, body = self.route(environ)
        except Reject as exc:
            status, body = exc.status, (str(exc) + "\n").encode()
            headers = [("Content-Type", "text/plain; charset=utf-8")] + exc.headers
        except Exception:  # never a traceback page; say why in the log
            log.exception("webhook: unexpected error")
            status, headers, body = "500 Internal Server Error", [("Content-Type", "text/plain")], b"error\n"
        headers.append(("Content-Length", str(len(body))))
        start_response(status, headers)
        return [body]

    def route(self, environ):
        path, method = environ.get("PATH_INFO", ""), environ.get("REQUEST_METHOD", "")
        if path == "/sms":
            if method != "POST":
                raise Reject("405 Method Not Allowed", "use POST", [("Allow", "POST")])
            return self.inbound(environ)
        if path == "/health":
            if method not in ("GET", "HEAD"):
                raise Reject("405 Method Not Allowed", "use GET", [("Allow", "GET, HEAD")])
            return self.health()
        raise Reject("404 Not Found", "not found")

    def inbound(self, environ):
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
        with self._lock:
            try:
                added = self.store().add_message(
                    sid, phone, params.one("To").strip(), params.one("Body"), self.clock(), self.rules, media
                )
            except sqlite3.Error as exc:
                # Twilio retries or uses its fallback URL on 5xx; never acknowledge a lost text.
                log.error("webhook: could not store MessageSid %s: %s", sid, exc)
                self._reset_store()
                raise Reject("503 Service Unavailable", "could not store the message; try again") from None
        log.debug("stored %s in batch %s%s", sid, added.batch_id, " (repeat)" if added.duplicate else "")
        return "200 OK", [("Content-Type", "text/xml")], TWIML_EMPTY

    def check_signature(self, environ, params):
        if self.validator is None:
            return
        signature = environ.get("HTTP_X_TWILIO_SIGNATURE", "")
        if not signature or not self.validator.validate(self.signed_url(environ), params, signature):
            raise Reject("403 Forbidden", "missing or invalid X-Twilio-Signature")

    def signed_url(self, environ):
        """The URL Twilio signed: SMSBATCH_PUBLIC_URL verbatim when set (behind a proxy),
        else the URL of this request."""
        if self.settings.public_url:
            return self.settings.public_url
        from wsgiref.util import request_uri

        return request_uri(environ, include_query=True)

    def health(self):
        try:
            with self._lock:
                info = self.store().health(self.clock())
            status, info = "200 OK", {"ok": True, "database": "ok", **info}
        except Exception as exc:
            self._reset_store()
            status, info = "503 Service Unavailable", {"ok": False, "database": f"unreadable: {exc}"}
        body = json.dumps(info).encode()
        return status, [("Content-Type", "application/json")], body

    def _reset_store(self):
        """Drop a connection that failed, so the next request opens a fresh one."""
        if self._store is not None:
            try:
                self._store.close()
            except sqlite3.Error:
                pass
            self._store = None


def parse_form(environ):
    """Read and parse a form-encoded body of at most MAX_BODY bytes.

    Raises:
        Reject: 413 too large, 415 not a form, 400 unreadable.
    """
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        raise Reject("400 Bad Request", "bad Content-Length") from None
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
        # keep_blank_values: Twilio signs empty fields too, so dropping them breaks signatures.
        pairs = parse_qsl(raw.decode("ascii"), keep_blank_values=True, encoding="utf-8", errors="strict")
    except (UnicodeDecodeError, ValueError):
        raise Reject("400 Bad Request", "body is not valid form-encoded UTF-8") from None
    params = FormParams()
    for name, value in pairs:
        params.setdefault(name, []).append(value)
    return params


def media_urls(params):
    """MediaUrl0..N-1 of a picture message.

    Raises:
        Reject: NumMedia is not a small whole number.
    """
    raw = params.one("NumMedia", "0").strip() or "0"
    if not raw.isdigit() or int(raw) > MAX_MEDIA:
        raise Reject("400 Bad Request", "bad NumMedia")
    return [params.one(f"MediaUrl{i}") for i in range(int(raw)) if params.one(f"MediaUrl{i}")]


def make_app(settings, clock=time.time, insecure=False):
    """The webhook WSGI app for these settings.

    Raises:
        ConfigError: no TWILIO_AUTH_TOKEN and not `insecure`.
    """
    return Webhook(settings, clock=clock, insecure=insecure)


def app(environ, start_response):
    """`smsbatch.web:app` for gunicorn, uwsgi and the like: settings from the environment."""
    global _default_app
    if _default_app is None:
        with _default_lock:
            if _default_app is None:
                _default_app = make_app(Settings.from_env())
    return _default_app(environ, start_response)


_default_app = None
_default_lock = threading.Lock()


class QuietHandler(WSGIRequestHandler):
    """wsgiref's handler without a stderr line per request (cost, and client addresses)."""

    def log_message(self, format, *args):
        pass


class PooledWSGIServer(WSGIServer):
    """wsgiref's server with a fixed pool of reused threads: connections are handled
    concurrently (one stalled client holds one thread, for at most SOCKET_TIMEOUT per
    read), without the cost of starting a thread per request."""

    request_queue_size = 128
    allow_reuse_address = True

    def __init__(self, address, handler, threads=16):
        super().__init__(address, handler)
        self.jobs = queue.SimpleQueue()
        self.workers = [threading.Thread(target=self._work, daemon=True) for _ in range(threads)]
        for worker in self.workers:
            worker.start()

    def process_request(self, request, client_address):
        self.jobs.put((request, client_address))

    def _work(self):
        while True:
            job = self.jobs.get()
            if job is None:
                return
            request, client_address = job
            try:
                request.settimeout(SOCKET_TIMEOUT)
                self.finish_request(request, client_address)
            except (OSError, socket.timeout):
                pass
            except Exception:
                self.handle_error(request, client_address)
            finally:
                self.shutdown_request(request)

    def server_close(self):
        for _ in self.workers:
            self.jobs.put(None)
        super().server_close()


def make_server_for(wsgi_app, host="127.0.0.1", port=8080, threads=16):
    """A pooled wsgiref server around `wsgi_app`; port 0 picks a free port."""
    return make_server(
        host, port, wsgi_app, server_class=lambda addr, handler: PooledWSGIServer(addr, handler, threads),
        handler_class=QuietHandler,
    )
