"""Senders: deliver one reply by SMS.

A sender has `send(to, body, from_) -> provider_sid` (from_: the number the person wrote to) and
`find_sent(to, from_, since, body, exclude) -> sid | None` (did an earlier send go out? `exclude`:
SIDs already recorded for other replies); both raise
DeliveryError, and find_sent raises CannotReconcile when the sender cannot be asked.
"""

import datetime
import re
import secrets
import sys
import threading
import time

from smsbatch import deadline
from smsbatch.errors import CannotReconcile, DeliveryError, redact

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
        sid = "SMconsole" + secrets.token_hex(12)
        with self._lock:
            self.sent.append((sid, to, body))
        if not self.quiet:  # a reply may quote the customer: escape sequences are shown, not obeyed
            from smsbatch.inputs import iso_time

            shown = re.sub(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]", "?", f"[console sms to {to}] {body}")
            print(f"{iso_time(time.time())} {shown}", file=self.stream)
        return sid

    def find_sent(self, to, from_, since, body, exclude=frozenset()):
        raise CannotReconcile("the console sender keeps no record between runs")


class TwilioSender:
    """Messages through the `twilio` package, built on first use, with a timeout on every call."""

    name = "twilio"
    takes_fence = True  # send(..., fence=): asked right before the request is written

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
                from twilio.http.http_client import TwilioHttpClient
                from twilio.rest import Client

                s = self.settings
                http = TwilioHttpClient(timeout=s.sms_timeout_seconds)
                for prefix in ("http://", "https://"):
                    http.session.mount(prefix, _fenced_adapter())
                client = Client(s.twilio_account_sid, s.twilio_auth_token, http_client=http)
                if s.twilio_base_url:
                    client.api.base_url = s.twilio_base_url.rstrip("/")
                    client.messaging.base_url = s.twilio_base_url.rstrip("/")
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
        return self._call(lambda: client.messages.create(to=to, body=body, **fields).sid, fence)

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
            return list(_in_window(client, to, fields, start, end, exclude))

        candidates = self._call(scan, None, self.settings.sms_deadline * 2)
        return pick_reply(candidates, body)


    def fetch_status(self, sid):
        """Twilio's current (MessageStatus, ErrorCode) of a message we sent.

        Raises: DeliveryError.
        """
        client = self._get_client()
        message = self._call(lambda: client.messages(sid).fetch())
        return message.status, message.error_code


class TwilioLog:
    """Reads Twilio's message log: the texts it received for our numbers (the backfill)."""

    def __init__(self, sender):
        self.sender = sender

    def service_numbers(self):
        """The phone numbers of the configured messaging service (none without one).

        Raises: DeliveryError.
        """
        sid = self.sender.settings.twilio_messaging_service_sid
        if not sid:
            return set()
        client = self.sender._get_client()
        try:
            return {n.phone_number for n in client.messaging.v1.services(sid).phone_numbers.stream(page_size=1000)}
        except provider_errors() as exc:
            raise classify(exc, self.sender.settings.secrets()) from None

    def received(self, to, since, until):
        """Inbound texts to `to` that Twilio sent to the webhook between `since` and `until`
        (epoch seconds), following every page: dicts of sid, phone, to, body, at, media.

        Twilio's DateSent filters are asked for the window, and the window is checked here
        too, since the API documents them to the day only.

        Raises: DeliveryError.
        """
        client = self.sender._get_client()
        after = datetime.datetime.fromtimestamp(since, datetime.timezone.utc)
        before = datetime.datetime.fromtimestamp(until, datetime.timezone.utc)
        try:
            for m in client.messages.stream(to=to, date_sent_after=after, date_sent_before=before, page_size=1000):
                at = _epoch(m.date_sent or m.date_created)
                if (m.direction or "").startswith("inbound") and since <= at <= until:
                    yield {"sid": m.sid, "phone": m.from_, "to": m.to, "body": m.body or "", "at": at,
                           "media": self._media(client, m)}
        except provider_errors() as exc:
            raise classify(exc, self.sender.settings.secrets()) from None

    @staticmethod
    def _media(client, message):
        """The media URLs of a picture message, as the webhook's MediaUrl{N} give them."""
        if not int(message.num_media or 0):
            return []
        base = client.api.base_url.rstrip("/")
        return [base + item.uri.removesuffix(".json") for item in client.messages(message.sid).media.list()]


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

    Raises: CannotReconcile when several remain.
    """
    if len(candidates) <= 1:
        return candidates[0].sid if candidates else None
    same = [m for m in candidates if fingerprint(m.body) == fingerprint(body)]
    if len(same) == 1:
        return same[0].sid
    raise CannotReconcile(f"{len(candidates)} messages to this number in the send's time window "
                          "could be this reply")


def status_callback_url(public_url):
    """Where Twilio posts delivery receipts: the webhook's URL with /status added to its path,
    before any query string (https://host/sms?key=abc -> https://host/sms/status?key=abc)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(public_url)
    return urlunsplit(parts._replace(path=parts.path.rstrip("/") + "/status"))


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
        code, status = exc.code, exc.status
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
