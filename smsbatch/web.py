"""The webhook: a WSGI app that stores each inbound text and answers Twilio at once.

`make_app(settings)` returns the WSGI callable; `app` builds one from the environment
for any WSGI server (`smsbatch.web:app`); `make_server_for()` runs it on wsgiref:
requests that arrive whole are answered by the accepting thread, a burst of them
committed together; slow clients are served by a small pool of reused threads.

Speed (bench/run.py webhook, 2 cores, 16 connections, signatures checked): about
3,600 requests/s with p99 under 10 ms; the figures behind each choice are in the
docstrings of PooledWSGIServer, GroupCommit and Checkpointer.
"""

import io
import json
import logging
import queue
import socket
import sqlite3
import threading
import time
from contextlib import contextmanager
from urllib.parse import unquote, urlparse
from wsgiref.handlers import format_date_time
from wsgiref.simple_server import ServerHandler, WSGIRequestHandler, WSGIServer, make_server

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
MAX_GROUP = 64  # most texts committed in one transaction (group commit)
CHECKPOINT_EVERY = 0.2  # seconds between background WAL checkpoints while texts arrive
CHECKPOINT_IDLE_ROUNDS = 5  # the checkpoint thread ends after this many rounds with no new commit
WAL_CATCH_UP_FRAMES = 10_000  # WAL this long (~40 MB): the writer checkpoints it once itself


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


class WebStore(Store):
    """The webhook's Store: between begin_group() and end_group(), every `transaction()`
    joins the group's one transaction, so many texts share one BEGIN IMMEDIATE ... COMMIT."""

    _grouped = False

    @contextmanager
    def transaction(self):
        if self._grouped:
            yield self.conn
            return
        with super().transaction() as conn:
            yield conn

    def begin_group(self):
        """BEGIN IMMEDIATE; until end_group(), transaction() joins this one."""
        self.conn.execute("BEGIN IMMEDIATE")
        self._grouped = True

    def end_group(self, commit):
        """COMMIT (or ROLLBACK) what begin_group() began. Returns False if the COMMIT failed
        (it is then rolled back: nothing of the group is stored)."""
        self._grouped = False
        try:
            self.conn.execute("COMMIT" if commit else "ROLLBACK")
            return True
        except sqlite3.Error as exc:
            log.error("webhook: could not commit a burst of texts: %s", exc)
            if self.conn.in_transaction:
                try:
                    self.conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            return False


class _Burst:
    """One thread's burst of submits inside one transaction (GroupCommit.burst)."""

    __slots__ = ("thread", "store", "failed")

    def __init__(self, thread):
        self.thread, self.store, self.failed = thread, None, False

    def run(self, work):
        if self.failed or self.store is None:
            raise sqlite3.OperationalError("this burst's transaction already failed")
        try:
            return work(self.store)
        except BaseException:
            self.failed = True
            raise


class _Job:
    __slots__ = ("work", "result", "error", "wake", "lead")

    def __init__(self, work):
        self.work, self.result, self.error, self.lead = work, _NOT_RUN, None, False
        self.wake = threading.Lock()
        self.wake.acquire()

    def outcome(self):
        if self.error is not None:
            raise self.error
        if self.result is _NOT_RUN:
            raise RuntimeError("the group commit leader stopped before running this job")
        return self.result


_NOT_RUN = object()


class GroupCommit:
    """Group commit with a rotating leader, no extra thread.

    A request thread hands in `work(store)` and waits. If no group is running, it leads:
    it takes every waiting job (its own first, at most MAX_GROUP), runs them all in one
    transaction, and wakes each job's thread only after the COMMIT, so a text is still
    acknowledged only once it is stored. Jobs that arrived meanwhile get a new leader.
    If anything in a group fails, the group is rolled back and its jobs run again one
    transaction each, so one bad job fails only itself.
    """

    def __init__(self, open_store, reset_store, after_group=None):
        self._open_store, self._reset_store, self._after_group = open_store, reset_store, after_group
        self._mutex = threading.Lock()
        self._waiting = []
        self._busy = False
        self._burst = None

    def submit(self, work):
        burst = self._burst
        if burst is not None and burst.thread == threading.get_ident():
            return burst.run(work)
        job = _Job(work)
        with self._mutex:
            self._waiting.append(job)
            lead = not self._busy
            self._busy = True
        if not lead:
            job.wake.acquire()  # released when done, or when this thread is made the next leader
        if lead or job.lead:
            self._lead()
        return job.outcome()

    def _lead(self):
        with self._mutex:
            group, self._waiting = self._waiting[:MAX_GROUP], self._waiting[MAX_GROUP:]
        try:
            self._run(group)
        finally:
            for job in group[1:]:  # group[0] is the leader's own job
                job.wake.release()
            self._hand_over()

    def _hand_over(self):
        """End of a leader's turn: housekeeping, then the next leader (or none)."""
        try:
            if self._after_group is not None:
                self._after_group()  # still the only user of the connection
        except Exception:
            log.exception("webhook: housekeeping after a commit failed")
        finally:
            with self._mutex:
                successor = self._waiting[0] if self._waiting else None
                if successor is None:
                    self._busy = False
                else:
                    successor.lead = True
            if successor is not None:
                successor.wake.release()

    @contextmanager
    def burst(self):
        """Until the block ends, every submit() of this thread runs at once inside one
        transaction, committed when the block ends. Yields a _Burst; if its `failed` is
        set afterwards, nothing was committed and every answer given inside the block
        must be thrown away (and the requests run again one by one). Yields None when
        another thread is writing: submit() then works as usual.

        The caller must not let any answer out before the block has ended.
        """
        with self._mutex:
            lead = not self._busy
            self._busy = True
        if not lead:
            yield None
            return
        burst, store = _Burst(threading.get_ident()), None
        try:
            store = self._open_store()
            store.begin_group()
            burst.store = store
            self._burst = burst
        except Exception:
            burst.failed = True
        try:
            yield burst
        except BaseException:
            burst.failed = True
            raise
        finally:
            self._burst = None
            try:
                if burst.store is not None:
                    broken = not store.end_group(commit=not burst.failed)
                    burst.failed = burst.failed or broken
                    if broken:
                        self._reset_store()
            finally:
                self._hand_over()

    def _run(self, group):
        try:
            store = self._open_store()
        except Exception as exc:
            for job in group:
                job.error = exc
            return
        if len(group) > 1:
            try:
                store.begin_group()
            except sqlite3.Error as exc:  # locked past the busy timeout: each alone would wait again
                for job in group:
                    job.error = exc
                self._reset_store()
                return
            try:
                results = [job.work(store) for job in group]
            except Exception:
                store.end_group(commit=False)
            else:
                if store.end_group(commit=True):
                    for job, result in zip(group, results):
                        job.result = result
                    return
        broken = False
        for job in group:  # alone, or the group failed: one transaction each
            try:
                job.result = job.work(store)
            except Exception as exc:
                job.error = exc
                broken = broken or isinstance(exc, sqlite3.Error)
        if broken:
            self._reset_store()


class Checkpointer:
    """Checkpoints the WAL from a background thread with its own connection.

    SQLite's automatic checkpoint runs inside the COMMIT that crosses 1,000 WAL pages,
    fsyncs included (about 10 ms here), and every request waiting on that group waits
    too. The webhook's connection turns it off and this thread checkpoints (PASSIVE:
    never blocks writers) every CHECKPOINT_EVERY seconds while texts arrive, then ends
    when idle. A PASSIVE checkpoint racing a busy writer rarely catches up completely,
    so the WAL cannot restart from its beginning; once it is WAL_CATCH_UP_FRAMES long
    the writer runs one checkpoint itself between groups (cheap: this thread already
    copied almost everything).
    """

    def __init__(self, path):
        self.path = path
        self.wal_long = False
        self._dirty = False
        self._thread = None
        self._lock = threading.Lock()

    def poke(self):
        """A commit happened: make sure the thread runs."""
        self._dirty = True
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="smsbatch-checkpoint", daemon=True)
                    self._thread.start()

    def _run(self):
        conn = None
        idle = 0
        try:
            conn = sqlite3.connect(self.path, timeout=WEB_BUSY_TIMEOUT, isolation_level=None,
                                   check_same_thread=False)
            while True:
                time.sleep(CHECKPOINT_EVERY)
                with self._lock:
                    dirty, self._dirty = self._dirty, False
                    idle = 0 if dirty else idle + 1
                    if idle >= CHECKPOINT_IDLE_ROUNDS:
                        self._thread = None
                        return
                if dirty:
                    _, frames, _ = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                    self.wal_long = frames > WAL_CATCH_UP_FRAMES
        except sqlite3.Error as exc:
            log.warning("webhook: background checkpoint failed: %s", exc)
        finally:
            if conn is not None:
                conn.close()
            with self._lock:
                if self._thread is threading.current_thread():
                    self._thread = None


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
        forms = self._urls.get(url)
        if forms is None:
            from twilio.request_validator import add_port, remove_port

            parsed = urlparse(url)
            forms = (remove_port(parsed), add_port(parsed))
            if len(self._urls) < 64:
                self._urls[url] = forms
        return forms

    def valid(self, url, params, signature):
        from twilio.request_validator import compare  # validate()'s own comparison (any text)

        compute = self.validator.compute_signature
        return any(compare(compute(form, params), signature) for form in self.url_forms(url))


class Webhook:
    """The WSGI application. One shared write connection, written through a group
    commit (threads) or a burst (the server's accepting thread): measured faster and
    steadier (p99) than a connection per request, or a transaction per text. /health
    reads through a connection of its own. A text is answered 200 only once committed.
    """

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
            raise ConfigError("TWILIO_AUTH_TOKEN is not set: refusing unsigned webhooks (--insecure-no-signature to allow)")
        self._store = None
        self._health_store = None
        self._health_lock = threading.Lock()
        self.checkpointer = Checkpointer(settings.db_path)
        self.writer = GroupCommit(self.store, self._reset_store, self._after_group)

    def burst(self):
        """Run the submits of one burst of requests in one transaction (see GroupCommit.burst);
        the server uses it for requests that arrived complete together."""
        return self.writer.burst()

    def store(self):
        """The shared connection; only the group-commit leader uses it."""
        if self._store is None:
            store = WebStore(self.settings.db_path, busy_timeout=WEB_BUSY_TIMEOUT)
            try:
                store.require_schema()
                store.conn.execute("PRAGMA wal_autocheckpoint = 0")  # see Checkpointer
            except Exception:
                store.close()
                raise
            self._store = store
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
        to, body, rules, clock = params.one("To").strip(), params.one("Body"), self.rules, self.clock
        try:
            added = self.writer.submit(
                lambda store: store.add_message(sid, phone, to, body, clock(), rules, media)
            )
        except sqlite3.Error as exc:
            # Twilio retries or uses its fallback URL on 5xx; never acknowledge a lost text.
            log.error("webhook: could not store MessageSid %s: %s", sid, exc)
            raise Reject("503 Service Unavailable", "could not store the message; try again") from None
        log.debug("stored %s in batch %s%s", sid, added.batch_id, " (repeat)" if added.duplicate else "")
        return "200 OK", [("Content-Type", "text/xml")], TWIML_EMPTY

    def check_signature(self, environ, params):
        if self.validator is None:
            return
        signature = environ.get("HTTP_X_TWILIO_SIGNATURE", "")
        if not signature or not self.signatures.valid(self.signed_url(environ), params, signature):
            raise Reject("403 Forbidden", "missing or invalid X-Twilio-Signature")

    def signed_url(self, environ):
        """The URL Twilio signed: SMSBATCH_PUBLIC_URL verbatim when set (behind a proxy),
        else the URL of this request."""
        if self.settings.public_url:
            return self.settings.public_url
        from wsgiref.util import request_uri

        return request_uri(environ, include_query=True)

    def health(self):
        """Read through a connection of its own: a reader is never kept waiting by writers."""
        try:
            with self._health_lock:
                if self._health_store is None:
                    store = Store(self.settings.db_path, busy_timeout=WEB_BUSY_TIMEOUT)
                    try:
                        store.require_schema()
                    except Exception:
                        store.close()
                        raise
                    self._health_store = store
                try:
                    info = self._health_store.health(self.clock())
                except Exception:
                    self._health_store.close()
                    self._health_store = None
                    raise
            status, info = "200 OK", {"ok": True, "database": "ok", **info}
        except Exception as exc:
            status, info = "503 Service Unavailable", {"ok": False, "database": f"unreadable: {exc}"}
        body = json.dumps(info).encode()
        return status, [("Content-Type", "application/json")], body

    def _after_group(self):
        """Run by the group-commit leader after each group."""
        if self._store is None:
            return
        self.checkpointer.poke()
        if self.checkpointer.wal_long:
            self.checkpointer.wal_long = False
            self._store.conn.execute("PRAGMA wal_checkpoint(PASSIVE)")

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
    if not (raw.isascii() and raw.isdigit()) or int(raw) > MAX_MEDIA:  # '²'.isdigit(), yet int('²') fails
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


class LeanServerHandler(ServerHandler):
    """wsgiref's ServerHandler, sending the status line, Date and Server in one piece
    (the date text is made once a second) instead of three writes."""

    _date = (0, "")

    def send_preamble(self):
        if not (self.origin_server and self.client_is_modern()):
            return super().send_preamble()
        now = int(time.time())
        second, date = LeanServerHandler._date
        if second != now:
            date = format_date_time(now)
            LeanServerHandler._date = (now, date)
        lines = [f"HTTP/{self.http_version} {self.status}\r\n"]
        if "Date" not in self.headers:
            lines.append(f"Date: {date}\r\n")
        if self.server_software and "Server" not in self.headers:
            lines.append(f"Server: {self.server_software}\r\n")
        self._write("".join(lines).encode("iso-8859-1"))


class QuietHandler(WSGIRequestHandler):
    """wsgiref's handler without a stderr line per request (cost, and client addresses),
    with a buffered writer so a whole answer leaves in one send (wsgiref flushes it
    after the body)."""

    wbufsize = 16 * 1024

    def __init__(self, request, client_address, server, raw=None):
        self.raw = raw  # the whole request, already read: answer into memory (see setup)
        super().__init__(request, client_address, server)

    def setup(self):
        if self.raw is None:
            return super().setup()
        self.connection = self.request
        self.rfile = io.BytesIO(self.raw)
        self.wfile = io.BytesIO()  # the server sends it once the answer may go out

    def finish(self):
        if self.raw is None:
            super().finish()

    def log_message(self, format, *args):
        pass

    def handle(self):
        """WSGIRequestHandler.handle, with LeanServerHandler."""
        self.raw_requestline = self.rfile.readline(65537)
        if len(self.raw_requestline) > 65536:
            self.requestline = ""
            self.request_version = ""
            self.command = ""
            self.send_error(414)
            return
        if not self.parse_request():
            return
        handler = LeanServerHandler(self.rfile, self.wfile, self.get_stderr(), self.get_environ(),
                                    multithread=False)
        handler.request_handler = self
        handler.run(self.server.get_app())


class PooledWSGIServer(WSGIServer):
    """wsgiref's server, answering complete requests at once and slow ones from a pool.

    The accepting thread takes every connection that is waiting (up to `burst_max`) and
    peeks at each without blocking. A request that has fully arrived (headers and
    Content-Length bytes of body, as Twilio sends it) is read and answered by the
    accepting thread itself: nothing can block on the client, and no thread hand-off is
    paid. If the app offers `burst()` (the Webhook does), the complete requests of one
    burst share one database transaction, and their answers are sent only after its
    COMMIT; if anything in the burst fails, nothing of it is committed and the requests
    are run again one transaction each. Any other connection (a slow or stalled client,
    a request still arriving) goes to a fixed pool of reused threads, where it holds one
    thread for at most SOCKET_TIMEOUT per read, so it cannot hold up the others.

    Measured on 2 cores: handing every connection to a pool thread cost about 200 us of
    CPU per request in thread switches and GIL hand-offs, more than the request itself;
    a COMMIT per text cost about 60 us more.
    """

    request_queue_size = 128
    allow_reuse_address = True
    close_wait = SOCKET_TIMEOUT + 1.0  # longest server_close() waits for requests in progress
    peek_bytes = MAX_BODY + 16 * 1024  # a complete request larger than this goes to the pool
    burst_max = 32  # most connections taken (and committed together) per wake-up

    def __init__(self, address, handler, threads=16):
        super().__init__(address, handler)
        if hasattr(socket, "TCP_DEFER_ACCEPT"):  # Linux: wake accept() once the request has data
            try:
                self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 1)
            except OSError:
                pass
        self.socket.setblocking(False)  # accept() until nothing is waiting
        self._peek = bytearray(self.peek_bytes)
        self.jobs = queue.SimpleQueue()
        self.workers = [threading.Thread(target=self._work, name=f"smsbatch-web-{i}", daemon=True)
                        for i in range(threads)]
        for worker in self.workers:
            worker.start()

    def _handle_request_noblock(self):
        ready = []
        while len(ready) < self.burst_max:
            try:
                request, client_address = self.get_request()
            except OSError:  # nothing more waiting (BlockingIOError), or a client gave up
                break
            if not self.verify_request(request, client_address):
                self.shutdown_request(request)
                continue
            raw = self._take_complete(request)
            if raw is None:
                self.jobs.put((request, client_address))
            else:
                ready.append((request, client_address, raw))
        if ready:
            self._answer(ready)

    def _take_complete(self, request):
        """The whole request if it has arrived (never blocks), else None (nothing read)."""
        try:
            if _MSG_DONTWAIT:
                n = request.recv_into(self._peek, self.peek_bytes, socket.MSG_PEEK | _MSG_DONTWAIT)
            else:  # pragma: no cover - platforms without MSG_DONTWAIT
                request.setblocking(False)
                try:
                    n = request.recv_into(self._peek, self.peek_bytes, socket.MSG_PEEK)
                finally:
                    request.setblocking(True)
            if not request_complete(self._peek, n):
                return None
            request.settimeout(SOCKET_TIMEOUT)
            raw = request.recv(n)  # the n bytes are there: this returns them at once
            while len(raw) < n:  # pragma: no cover - only if the kernel splits them
                more = request.recv(n - len(raw))
                if not more:
                    return None
                raw += more
            return raw
        except OSError:  # nothing there yet (BlockingIOError), or the client went away
            return None

    def _answer(self, ready):
        burst = getattr(self.get_app(), "burst", None)
        if burst is None:  # an app without bursts: answered here, one by one
            for request, client_address, raw in ready:
                self._send(request, self._run(request, client_address, raw))
            return
        answers = []
        with burst() as state:
            if state is not None:
                for request, client_address, raw in ready:
                    if state.failed:
                        break
                    answers.append(self._run(request, client_address, raw))
        if state is None or state.failed:
            # Nothing was committed and nothing was sent (or another thread was writing):
            # the pool runs them again, each in its own transaction, in parallel, so this
            # thread goes back to accepting rather than waiting out a locked database.
            for job in ready:
                self.jobs.put(job)
            return
        for (request, _, _), answer in zip(ready, answers):
            self._send(request, answer)

    def _send(self, request, answer):
        try:
            request.sendall(answer)
        except OSError:
            pass
        finally:
            self.shutdown_request(request)

    def _run(self, request, client_address, raw):
        """Answer a request that was read whole, into memory."""
        try:
            return self.RequestHandlerClass(request, client_address, self, raw).wfile.getvalue()
        except Exception:
            self.handle_error(request, client_address)
            return b""

    def _work(self):
        while True:
            job = self.jobs.get()
            if job is None:
                return
            self._handle(*job)

    def _handle(self, request, client_address, raw=None):
        if raw is not None:  # read whole already; its burst failed
            return self._send(request, self._run(request, client_address, raw))
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
        """Close the listening socket; requests in progress in the pool may finish."""
        for _ in self.workers:
            self.jobs.put(None)
        super().server_close()
        deadline = time.monotonic() + self.close_wait
        for worker in self.workers:
            if worker is not threading.current_thread():
                worker.join(max(0.0, deadline - time.monotonic()))


_MSG_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0)


def request_complete(buffer, n):
    """True if buffer[:n] holds a whole HTTP request: the header block and Content-Length
    bytes of body. Anything unusual (chunked, a bad length, LF-only lines) says False, and
    the request is read by a pool thread, with its timeout, as before."""
    end = buffer.find(b"\r\n\r\n", 0, n)
    if end < 0:
        return False
    head = bytes(buffer[:end]).lower()
    if b"transfer-encoding" in head:
        return False
    length = 0
    at = head.find(b"\r\ncontent-length:")
    if at >= 0:
        stop = head.find(b"\r\n", at + 2)
        value = head[at + 17: stop if stop >= 0 else len(head)].strip()
        if not value.isdigit() or head.find(b"\r\ncontent-length:", at + 2) >= 0:
            return False
        length = int(value)
    return n - end - 4 >= length


def make_server_for(wsgi_app, host="127.0.0.1", port=8080, threads=16):
    """A pooled wsgiref server around `wsgi_app`; port 0 picks a free port."""
    return make_server(
        host, port, wsgi_app, server_class=lambda addr, handler: PooledWSGIServer(addr, handler, threads),
        handler_class=QuietHandler,
    )
