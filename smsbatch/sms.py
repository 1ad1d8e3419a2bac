"""Senders: deliver one reply by SMS.

A sender has `send(to, body, from_) -> provider_sid` (from_: the number the person wrote to) and
`find_sent(to, from_, since, body, exclude) -> sid | None` (did an earlier send go out? `exclude`:
SIDs already recorded for other replies); both raise
DeliveryError, and find_sent raises CannotReconcile when the sender cannot be asked.
"""

import datetime
import math
import re
import secrets
import sys
import threading
import time
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

from smsbatch import deadline, delivery, twilio_fields
from smsbatch.errors import BIDI, CannotReconcile, DeliveryError, UnreadableJSON, read_json, redact, visible

# Twilio error codes worth trying again later: rate limit, unreachable handset, unknown carrier error.
TRANSIENT_CODES = frozenset({20429, 30003, 30008})
OPTED_OUT_CODE = 21610
RECONCILE_SLACK_SECONDS = 300  # clocks differ; look a little before the send started
RECONCILE_PAGE_SIZE = 50


class ConsoleSender:
    """A stand-in that records replies and prints them to stderr instead of sending."""

    name = "console"

    def __init__(self, stream=None, quiet=False):
        self.sent = []
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self._lock = threading.Lock()

    def send(self, to, body, from_=None):
        sid = delivery.CONSOLE_SID_PREFIX + secrets.token_hex(12)
        with self._lock:
            self.sent.append((sid, to, body))
        if not self.quiet:  # a reply may quote the customer: escape sequences are shown, not obeyed
            from smsbatch.inputs import iso_time

            sender = "" if from_ is None else f" from {from_}"  # which of our numbers it would go out from
            shown = re.sub(f"[\\x00-\\x09\\x0b-\\x1f\\x7f-\\x9f{BIDI}]", "?", f"[console sms{sender} to {to}] {body}")
            print(f"{iso_time(time.time())} {shown}", file=self.stream)
        return sid

    def find_sent(self, to, from_, since, body, exclude=frozenset()):
        raise CannotReconcile("the console sender keeps no record between runs")


class TwilioSender:
    """Messages through the `twilio` package, built on first use, with a timeout on every call."""

    name = "twilio"
    takes_fence = True  # send(..., fence=): asked right before the request is written
    reads_log = True  # its message log can be read (twilio_log.TwilioLog): stale batches are checked there

    def __init__(self, settings):
        self.settings = settings
        self._client = None
        self._lock = threading.Lock()

    def warm(self):
        """Build the client now (imports included), so a first send does not wait for it."""
        self._get_client()

    def _get_client(self):
        with self._lock:
            if self._client is None:
                s = self.settings
                client = twilio_client(s, s.sms_timeout_seconds, fenced=True)
                client.messages  # noqa: B018 (imports the resource now, not within a send's deadline)
                self._client = client
            return self._client

    def sender_fields(self, from_):
        """Who a reply comes from: the number the person wrote to (with a messaging service,
        the service and that number as its sender); TWILIO_FROM_NUMBER only for a text
        whose number is unknown."""
        s = self.settings
        if s.twilio_messaging_service_sid:
            fields = {"messaging_service_sid": s.twilio_messaging_service_sid}
            return fields | ({"from_": from_} if from_ else {})
        return {"from_": from_ or s.twilio_from_number}

    def send(self, to, body, from_=None, fence=None):
        """Send within the total SMS deadline; `fence` is asked right before the request is
        written (after connecting), and a False answer stops the send.

        Raises: DeliveryError (ambiguous when the request may have reached Twilio),
        LeaseLost (the fence failed: nothing was sent).
        """
        client, fields = self._get_client(), self.sender_fields(from_)
        if self.settings.public_url:
            fields["status_callback"] = status_callback_url(self.settings.public_url)
        sid = self._call(lambda: client.messages.create(to=to, body=body, **fields).sid, fence)
        try:
            return twilio_fields.message_sid(sid)
        except twilio_fields.BadField:  # accepted, but which message is it? The log is asked before resending
            raise DeliveryError("Twilio's answer holds no valid message SID; outcome unknown", transient=True,
                                ambiguous=True) from None

    def _call(self, fn, fence=None, seconds=None):
        """One Twilio call under its total deadline (the SMS deadline unless given), its
        errors as DeliveryError."""
        def guarded():
            try:
                return fn()
            except provider_errors() as exc:
                raise classify(exc, self.settings.secrets()) from None
            # Anything else (a TypeError: a bug, ours or the library's) propagates: the processor
            # logs its traceback and leaves the batch to its lease, rather than calling a bug a
            # Twilio outage and retrying it as "maybe sent" for ever. That is safe even when the
            # bug struck after Twilio accepted the message (say, while reading its answer): the
            # batch was committed as *sending* before this call, and a *sending* batch is never
            # sent again without first asking Twilio (Processor._reconcile). LeaseLost (the
            # fence) passes through the same way.

        try:
            return deadline.call(guarded, seconds or self.settings.sms_deadline, fence)
        except deadline.DeadlineExceeded as exc:
            if exc.written:
                raise DeliveryError(f"Twilio call timed out: {exc}; outcome unknown", transient=True,
                                    ambiguous=True) from None
            raise DeliveryError(f"Twilio unreachable (timed out: {exc}); request not sent", transient=True) from None

    def find_sent(self, to, from_, since, body, exclude=frozenset()):
        """Our reply's SID if Twilio has it, else None: the messages to `to` from our sender
        created in the send's time window, following Twilio's pages to the end of the window.

        A message whose SID is in `exclude` is recorded already (another batch's reply, a
        manual send). One candidate left is ours, whatever its body says (Link Shortening
        and Smart Encoding rewrite bodies); among several the body is a tie-break.

        The window is matched on date_created here, not with Twilio's DateSent filter: a
        message Twilio accepted but still queues has no DateSent, and must count as sent.

        Raises: CannotReconcile (several candidates: a person decides), DeliveryError.
        """
        client, fields = self._get_client(), self.sender_fields(from_)
        start, end = since - RECONCILE_SLACK_SECONDS, since + self.settings.sms_deadline + RECONCILE_SLACK_SECONDS

        def scan():
            try:
                return list(_in_window(client, to, fields, start, end, exclude))
            except ValueError:  # the twilio package could not read a record (a date in the year 99999)
                raise CannotReconcile("Twilio's message log holds a record that cannot be read") from None

        candidates = self._call(scan, None, self.settings.sms_deadline * 2)
        return pick_reply(candidates, body)


    def service_numbers(self):
        """The phone numbers of the configured messaging service (none without one), in Twilio's order.

        Raises: DeliveryError.
        """
        sid = self.settings.twilio_messaging_service_sid
        if not sid:
            return []
        from smsbatch.twilio_log import PagingStopped, TwilioLog

        try:  # paged under the backfill's rules: next-page links only on Twilio's own origin
            return sorted(TwilioLog(self).service_numbers())
        except PagingStopped as exc:
            raise DeliveryError(f"could not list the messaging service's numbers: {exc}", transient=True) from None

    def our_numbers(self):
        """The business numbers we answer for: Settings.listed_numbers, then the messaging
        service's numbers (asked of Twilio when there is a service).

        Raises: DeliveryError.
        """
        return list(dict.fromkeys([*self.settings.listed_numbers, *self.service_numbers()]))

    def fetch_status(self, sid):
        """Twilio's current status of a message we sent (GET Messages/{sid}.json), each field
        checked: one Twilio gives in a shape smsbatch does not know is None in the answer and
        named in its `problems`.

        Raises: DeliveryError; not transient when Twilio answered about this message with an
        error (a 404, a 5xx, an answer that cannot be read): that is final for it, so one
        reply Twilio keeps failing on does not hold up the checks of every later one. Only
        "not reached" (a timeout, no connection) and 429 (slow down) are worth another run.
        """
        try:
            sid = twilio_fields.message_sid(sid)
        except twilio_fields.BadField:
            raise DeliveryError("not a Twilio message SID", transient=False) from None
        client = self._get_client()
        account = quote(self.settings.twilio_account_sid, safe="")
        url = f"{client.api.base_url.rstrip('/')}/2010-04-01/Accounts/{account}/Messages/{sid}.json"
        message = self._call(lambda: _answered_about(lambda: get_json(client, url), self.settings.secrets()))
        return delivery_status(message if isinstance(message, dict) else {})


def _answered_about(fn, secrets):
    """fn(), an error Twilio answered with (an HTTP error but 429, or JSON that cannot be read)
    raised as a DeliveryError that is not transient (see TwilioSender.fetch_status)."""
    import json

    from twilio.base.exceptions import TwilioRestException

    try:
        return fn()
    except (TwilioRestException, json.JSONDecodeError) as exc:
        error = classify(exc, secrets)
        error.transient = error.transient and getattr(exc, "status", None) == 429
        raise error from None


@dataclass
class DeliveryStatus:
    """What a delivery fetch learned of one message we sent."""

    status: str = None  # a MessageStatus smsbatch knows, else None
    error_code: int = None  # Twilio's ErrorCode; None: none, or not a sane one
    problems: tuple = ()  # the fields Twilio gave in a shape smsbatch does not know
    price: float = None  # Twilio's price (negative: a charge); None until priced (read_price)
    price_unit: str = None


def delivery_status(message):
    """A DeliveryStatus from a Message resource (a dict as Twilio's JSON has it)."""
    found, problems = {}, []
    for name, read in (("status", twilio_fields.status), ("error_code", twilio_fields.error_code)):
        try:
            found[name] = read(message.get(name))
        except twilio_fields.BadField:
            problems.append(f"{name} {visible(repr(message.get(name)), 40)}")
    price, unit = read_price(message.get("price"), message.get("price_unit"))  # None while not priced
    return DeliveryStatus(found.get("status"), found.get("error_code"), tuple(problems), price, unit)


def get_json(client, url, params=None):
    """GET a Twilio URL with the client's credentials; its JSON answer.

    Raises: TwilioRestException (not 200: classify() maps it), json.JSONDecodeError (read_json).
    """
    from twilio.base.exceptions import TwilioRestException

    response = client.request("GET", url, params=params)
    if response.status_code != 200:
        try:
            error = read_json(response.text)
        except ValueError:
            error = None
        error = error if isinstance(error, dict) else {}
        code = error.get("code") if isinstance(error.get("code"), int) else None
        raise TwilioRestException(response.status_code, url, redact(error.get("message", ""), limit=200), code)
    return read_json(response.text)


def _in_window(client, to, fields, start, end, exclude):
    """Messages to `to` from our sender created within [start, end], not in `exclude`."""
    sender = {"from_": fields["from_"]} if "from_" in fields else {}
    service = fields.get("messaging_service_sid")
    for message in client.messages.stream(to=to, page_size=RECONCILE_PAGE_SIZE, **sender):
        sent = message.date_sent
        if sent is not None and _epoch(sent) < start:
            break  # newest first: every later message was sent, so created, before the window
        created = message.date_created
        if message.sid in exclude or (service and message.messaging_service_sid != service):
            continue
        if created is None or start <= _epoch(created) <= end:
            yield message


def pick_reply(candidates, body):
    """Which of the candidate messages is our reply: the only one, or else the only one
    whose body matches ours. Returns its SID or None (no candidate).

    Raises: CannotReconcile when several remain, or a candidate's SID is not one.
    """
    if not all(isinstance(m.sid, str) and twilio_fields.MESSAGE_SID.fullmatch(m.sid) for m in candidates):
        raise CannotReconcile("a message in the send's time window has no valid SID")
    if len(candidates) <= 1:
        return candidates[0].sid if candidates else None
    same = [m for m in candidates if fingerprint(m.body) == fingerprint(body)]
    if len(same) == 1:
        return same[0].sid
    raise CannotReconcile(f"{len(candidates)} messages to this number in the send's time window "
                          "could be this reply")


PRICE_UNIT = re.compile(r"[A-Z]{3}")
MOST_PRICE = 1000.0  # no one SMS costs this much: a larger figure is garbage, not a price


def read_price(price, unit):
    """(price, currency) from a message resource's `price` and `price_unit`, or (None, None).

    Twilio gives the price as a string, negative for a charge ("-0.00790"), and null until
    the message is priced. Anything that is not a finite number of a sane size, or whose
    currency is not three capital letters, is no price at all.
    """
    try:
        value = float(str(price).strip())
    except (TypeError, ValueError):
        return None, None
    if price is None or not math.isfinite(value) or abs(value) >= MOST_PRICE:
        return None, None
    unit = unit.strip().upper() if isinstance(unit, str) else ""
    return (value, unit) if PRICE_UNIT.fullmatch(unit) else (None, None)


def status_callback_url(public_url):
    """Where Twilio posts delivery receipts: the webhook's URL with /status added to its path,
    before any query string (https://host/sms?key=abc -> https://host/sms/status?key=abc)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(public_url)
    return urlunsplit(parts._replace(path=parts.path.rstrip("/") + "/status"))


TWILIO_ORIGINS = ("https://api.twilio.com", "https://messaging.twilio.com")


def origin(url):
    """(scheme, host, port) of a URL, the default port filled in; None when unparseable."""
    try:
        parts = urlsplit(url)
        port = parts.port or {"https": 443, "http": 80}.get(parts.scheme.lower())
        return (parts.scheme.lower(), (parts.hostname or "").lower(), port) if parts.hostname else None
    except ValueError:
        return None


def twilio_client(settings, timeout, fenced=False):
    """A twilio Client for our account whose requests time out after `timeout` and never leave
    Twilio's own origins (SMSBATCH_TWILIO_BASE_URL's, when set): a next-page link to another
    host, which the twilio package would follow with the account's credentials, is refused.
    `fenced`: each request asks deadline.before_write() right before it is written."""
    from twilio.http.http_client import TwilioHttpClient
    from twilio.rest import Client

    base = settings.twilio_base_url.rstrip("/")
    allowed = {origin(u) for u in ((base,) if base else TWILIO_ORIGINS)}

    class OursOnly(TwilioHttpClient):
        def request(self, method, url, *args, **kwargs):
            if origin(url) not in allowed:
                from requests.exceptions import InvalidURL

                raise InvalidURL("refused to send the account's credentials outside Twilio's API: "
                                 + visible(str(url), 80))
            response = super().request(method, url, *args, **kwargs)
            _decodable(response.text)
            return response

    http = OursOnly(timeout=timeout)
    if fenced:
        for prefix in ("http://", "https://"):
            http.session.mount(prefix, _fenced_adapter())
    client = Client(settings.twilio_account_sid or "AC-not-set", settings.twilio_auth_token or "not-set",
                    http_client=http)
    if base:
        client.api.base_url = base
        client.messaging.base_url = base
    return client


def _decodable(text):
    """Raise json.JSONDecodeError (a provider error: classify) for an answer the twilio package's
    own json.loads would fail on with ValueError or RecursionError (an integer of 5,000 digits,
    nesting too deep), which would escape as a bug; an answer that is not JSON at all is left
    to the twilio package, which names it."""
    try:
        read_json(text)
    except UnreadableJSON:
        raise
    except ValueError:
        pass


def _fenced_adapter():
    """A requests adapter whose connections ask deadline.before_write() after connecting and
    right before writing each request: a frozen or abandoned send never goes out late."""
    from requests.adapters import HTTPAdapter
    from urllib3.connection import HTTPConnection, HTTPSConnection
    from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

    def fenced(base):
        class Fenced(base):
            def request(self, *args, **kwargs):
                if self.sock is None:
                    self.connect()  # so the fence is asked after the (slow) connect, not before it
                deadline.before_write()
                return super().request(*args, **kwargs)
        return Fenced

    class HTTPPool(HTTPConnectionPool):
        ConnectionCls = fenced(HTTPConnection)

    class HTTPSPool(HTTPSConnectionPool):
        ConnectionCls = fenced(HTTPSConnection)

    class Adapter(HTTPAdapter):
        def init_poolmanager(self, *args, **kwargs):
            super().init_poolmanager(*args, **kwargs)
            self.poolmanager.pool_classes_by_scheme = {"http": HTTPPool, "https": HTTPSPool}

    return Adapter()


def fingerprint(text):
    """A body's letters and digits only. Twilio's Smart Encoding may store our reply with
    curly quotes, dashes and "…" replaced by plain ones; that is still our reply."""
    return re.sub(r"[\W_]+", "", (text or "").casefold())


def _epoch(moment):
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return moment.timestamp()


def provider_errors():
    """The exceptions a failed Twilio call raises: the twilio, requests and urllib3 stack's own,
    and a JSON error from reading an answer that is not JSON. classify() maps only these."""
    import json

    import requests
    import urllib3
    from twilio.base.exceptions import TwilioException

    return (TwilioException, requests.exceptions.RequestException, urllib3.exceptions.HTTPError,
            json.JSONDecodeError)


def classify(exc, secrets=()):
    """Map an exception of provider_errors() to a DeliveryError, its text redacted of `secrets`."""
    import json

    from twilio.base.exceptions import TwilioRestException

    if isinstance(exc, TwilioRestException):
        code, status = _error_code(exc.code), exc.status
        message = f"Twilio error {code or status}: {redact(exc.msg, secrets, limit=200)}"
        if code == OPTED_OUT_CODE:
            return DeliveryError(message, transient=False, opted_out=True)
        transient = code in TRANSIENT_CODES or status == 429 or status >= 500
        # A 5xx may come after Twilio queued the message: check before sending again.
        return DeliveryError(message, transient=transient, ambiguous=status >= 500)
    name = type(exc).__name__
    if isinstance(exc, json.JSONDecodeError):  # Twilio answered (2xx), unreadably: it may have queued it
        return DeliveryError("Twilio's answer could not be read; outcome unknown", transient=True, ambiguous=True)
    if _never_connected(exc):
        return DeliveryError(f"Twilio unreachable at {_server(exc)} ({name})", transient=True)
    # Timed out or cut off after the request went out: Twilio may have accepted it.
    return DeliveryError(f"Twilio call failed ({name}); outcome unknown", transient=True, ambiguous=True)


def _error_code(value):
    """Twilio's error `code` when it is a sane one (twilio_fields.error_code), else None: the
    twilio package passes through whatever the JSON held, text with escape sequences included."""
    try:
        return twilio_fields.error_code(value)
    except twilio_fields.BadField:
        return None


def _server(exc):
    """The scheme and host a requests error was about (never a path, query or credentials)."""
    from urllib.parse import urlsplit

    url = getattr(getattr(exc, "request", None), "url", None) or ""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}" if parts.netloc else "(unknown address)"


def _never_connected(exc):
    """True when the request certainly never reached Twilio (refused, DNS, connect timeout)."""
    import requests

    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return True
    if isinstance(exc, requests.exceptions.ConnectionError):
        from urllib3.exceptions import NameResolutionError, NewConnectionError

        reason = getattr(exc.args[0], "reason", None) if exc.args else None
        return isinstance(reason, (NewConnectionError, NameResolutionError))
    return False


def make_sender(settings):
    """The sender the settings ask for."""
    return ConsoleSender() if settings.sms == "console" else TwilioSender(settings)
