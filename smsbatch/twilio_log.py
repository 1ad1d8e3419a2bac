"""Twilio's message log, read under our own rules: the texts it received for our numbers
(the backfill), the replies we sent from them, and the messaging service's numbers.

Pages are fetched here, not by the twilio package's stream(), because a page's links and
records are the provider's input: a next-page link is followed only on the configured
Twilio origin (scheme, host and port of the API base URL: the account's credentials go
nowhere else), never twice, for at most MAX_PAGES pages a listing and MAX_SECONDS for a
whole run, and not after a stop (SIGTERM). Each record is checked field by field
(smsbatch.twilio_fields): one that cannot be read is reported, not stored, and the
others go on.
"""

import datetime
import logging
import time
from dataclasses import dataclass
from types import SimpleNamespace
from urllib.parse import parse_qsl, quote, urljoin, urlsplit

from smsbatch import twilio_fields
from smsbatch.config import display_url
from smsbatch.errors import DeliveryError, SmsbatchError, visible
from smsbatch.sms import get_json, origin

log = logging.getLogger("smsbatch.backfill")
MAX_PAGES = 50  # a listing's pages (of up to PAGE_SIZE records) per run: 50,000 texts to one number
MAX_SECONDS = 20.0  # the whole run's reading: `process` answers texts after it
PAGE_SIZE = 1000


class PagingStopped(SmsbatchError):
    """Reading stopped before the end of a listing. `everything`: read nothing more this run
    (a stop, or the time cap); otherwise only this listing was cut short."""

    def __init__(self, reason, everything=False):
        super().__init__(reason)
        self.everything = everything


class Paging:
    """One run's limits on reading: pages per listing, total time, and a stop event."""

    def __init__(self, stop=None, max_pages=None, max_seconds=None, clock=time.monotonic):
        self.stop = stop
        self.max_pages = MAX_PAGES if max_pages is None else max_pages
        self.max_seconds = MAX_SECONDS if max_seconds is None else max_seconds
        self.clock = clock
        self.ends = clock() + self.max_seconds

    def check(self, pages_read):
        """Raises: PagingStopped when no further page may be fetched."""
        if self.stop is not None and self.stop.is_set():
            raise PagingStopped("stopped (SIGTERM or Ctrl-C)", everything=True)
        if self.clock() > self.ends:
            raise PagingStopped(f"took longer than {self.max_seconds:g} s", everything=True)
        if pages_read >= self.max_pages:
            raise PagingStopped(f"more than {self.max_pages} pages")


@dataclass
class Found:
    """One inbound record of the log: the text (a dict), or why it cannot be read."""

    sid: object  # as Twilio gave it: shown only through errors.visible
    text: dict = None
    problem: str = None
    at: float = None  # when it was sent (None: not even that can be read)


def _link(url, params):
    """A page's identity: its URL with the query (and `params`) in a fixed order."""
    parts = urlsplit(url)
    query = sorted(parse_qsl(parts.query, keep_blank_values=True) + [(k, str(v)) for k, v in (params or {}).items()])
    return (origin(url), parts.path, tuple(query))


def _any_date(raw):
    """The first of a record's dates that can be read (epoch seconds), else None."""
    for name in ("date_sent", "date_created"):
        try:
            return twilio_fields.moment(raw.get(name))
        except twilio_fields.BadField:
            pass
    return None


def _text(value):
    """A string field of a provider's record, else None."""
    return value if isinstance(value, str) else None


def _iso(epoch):
    return datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class TwilioLog:
    """Reads Twilio's message log with the sender's client (its credentials and timeouts)."""

    def __init__(self, sender, paging=None):
        self.sender = sender
        self.paging = paging or Paging()

    @property
    def _client(self):
        return self.sender._get_client()

    def _messages_url(self):
        account = quote(self.sender.settings.twilio_account_sid, safe="")
        return f"{self._client.api.base_url.rstrip('/')}/2010-04-01/Accounts/{account}/Messages"

    def origins(self):
        """Where a next-page link may lead: the origins of the API and messaging base URLs."""
        client = self._client
        return {origin(client.api.base_url), origin(client.messaging.base_url)} - {None}

    def _get(self, url, params=None):
        """One GET answered with a JSON object. Raises: DeliveryError, PagingStopped (not an object)."""
        client = self._client
        payload = self.sender._call(lambda: get_json(client, url, params))
        if not isinstance(payload, dict):
            raise PagingStopped("Twilio's answer is not a JSON object")
        return payload

    def pages(self, url, params, key, base):
        """The records under `key` of each page, following next-page links (relative ones on
        `base`) under the rules above.

        Raises: PagingStopped, DeliveryError.
        """
        allowed, seen, read = self.origins(), set(), 0
        while url:
            if origin(url) not in allowed:
                raise PagingStopped(f"a next-page link leads off Twilio (to {visible(display_url(url), 80)}): "
                                    "not followed")
            page = _link(url, params)
            if page in seen:
                raise PagingStopped("a next-page link repeats an earlier page")
            self.paging.check(read)
            seen.add(page)
            read += 1
            payload = self._get(url, params)
            records = payload.get(key)
            if not isinstance(records, list):
                raise PagingStopped(f"a page without a list of {key}")
            yield from records
            url, params = self._next(payload, base), None

    @staticmethod
    def _next(payload, base):
        """The next page's URL: meta.next_page_url (v1 APIs) or next_page_uri on `base`."""
        meta = payload.get("meta")
        link = (meta.get("next_page_url") if isinstance(meta, dict) else None) or payload.get("next_page_uri")
        if not link:
            return None
        if not isinstance(link, str) or len(link) > 4096:
            raise PagingStopped("a next-page link that is not a URL")
        if link.startswith("/") and not link.startswith("//"):
            return base.rstrip("/") + link  # as the twilio package joins a relative link
        return urljoin(base, link)

    def received(self, to, since, until):
        """Found records of the texts to `to` that Twilio received between `since` and
        `until` (epoch seconds), every page: each a text (sid, phone, to, body, at, num_media;
        media() lists its pictures) or a problem. Twilio's DateSent filters ask for the window; it is checked here too,
        since the API documents them to the day only.

        Raises: PagingStopped, DeliveryError.
        """
        params = {"To": to, "DateSent>": _iso(since), "DateSent<": _iso(until), "PageSize": PAGE_SIZE}
        base = self._client.api.base_url
        for raw in self.pages(self._messages_url() + ".json", params, "messages", base):
            found = self._inbound(raw, to)
            if found is not None and (found.at is None or since <= found.at <= until):
                yield found

    def _inbound(self, raw, to):
        """A Found for an inbound record; None for anything else (our own replies)."""
        if not isinstance(raw, dict):
            return Found(None, problem="not a message record")
        direction = raw.get("direction")
        if not (isinstance(direction, str) and direction.startswith("inbound")):
            return None
        try:
            text = twilio_fields.inbound_text(raw)
        except twilio_fields.BadField as exc:
            return Found(raw.get("sid"), problem=str(exc), at=_any_date(raw))
        if text["to"] != to:
            return Found(text["sid"], problem=f"sent to {text['to']}, not to {to} as asked", at=text["at"])
        return Found(text["sid"], text, at=text["at"])

    def media(self, text):
        """The media URLs of a found text (none without num_media), or [] when they cannot be
        listed: Twilio answers with an error (pictures deleted, a 5xx), or the listing is cut
        short (a looping or foreign next-page link). The text is stored all the same: one
        listing that fails every turn must not keep the text, and every text after it in the
        window, from being stored and answered.

        Raises: PagingStopped (everything: a stop or the time cap).
        """
        if not text["num_media"]:
            return []
        try:
            return self._media(text["sid"])
        except PagingStopped as exc:
            if exc.everything:
                raise
            problem = exc
        except DeliveryError as exc:
            problem = exc
        log.warning("backfill: text %s: its pictures could not be listed (%s); stored without them",
                    text["sid"], visible(problem, 200))
        return []

    def _media(self, sid):
        """The media URLs of a picture message, as the webhook's MediaUrl{N} give them."""
        url = f"{self._messages_url()}/{sid}/Media"
        urls = []
        for item in self.pages(url + ".json", {"PageSize": twilio_fields.MAX_MEDIA}, "media_list",
                               self._client.api.base_url):
            try:
                urls.append(f"{url}/{twilio_fields.media_sid(item.get('sid') if isinstance(item, dict) else None)}")
            except twilio_fields.BadField:
                log.warning("backfill: text %s: a media item without a valid SID was left out", sid)
        return urls[:twilio_fields.MAX_MEDIA]

    def replies(self, from_, since, until):
        """The messages we sent from `from_` since `since`, by the number they went to:
        {to: [reply, ...]}, a reply being a dict of sid, to, at, body, status
        (twilio_fields.reply). Records that cannot be read are passed over.

        Twilio lists them newest first by the date they were sent; a scheduled message was
        created long before (days), so the reading stops at the first sent before `since`.
        Returns (replies, complete_since, cut): every reply sent after complete_since is there;
        it is `since` unless the listing was cut short (`cut`, the PagingStopped, says why).

        Raises: PagingStopped (everything), DeliveryError.
        """
        sent, oldest = {}, until
        base = self._client.api.base_url
        try:
            records = self.pages(self._messages_url() + ".json", {"From": from_, "PageSize": PAGE_SIZE}, "messages",
                                 base)
            for at, reply in _sent_since(records, since):
                oldest = oldest if at is None else min(oldest, at)
                if reply is not None:
                    sent.setdefault(reply["to"], []).append(reply)
        except PagingStopped as exc:
            if exc.everything:
                raise
            return sent, oldest, exc
        return sent, since, None

    def account_numbers(self):
        """The account's phone numbers (IncomingPhoneNumbers), every page under the rules
        above: each a SimpleNamespace of sid, phone_number, sms_url, sms_method (a field that
        is not a string is None).

        Raises: PagingStopped, DeliveryError (or, for a sender whose _call passes them through,
        the twilio package's errors).
        """
        base = self._client.api.base_url
        account = quote(self.sender.settings.twilio_account_sid, safe="")
        url = f"{base.rstrip('/')}/2010-04-01/Accounts/{account}/IncomingPhoneNumbers.json"
        fields = ("sid", "phone_number", "sms_url", "sms_method")
        return [SimpleNamespace(**{name: _text(item.get(name)) for name in fields})
                for item in self.pages(url, {"PageSize": PAGE_SIZE}, "incoming_phone_numbers", base)
                if isinstance(item, dict)]

    def service_numbers(self):
        """The phone numbers of the configured messaging service (none without one).

        Raises: PagingStopped, DeliveryError.
        """
        sid = self.sender.settings.twilio_messaging_service_sid
        if not sid:
            return set()
        base = self._client.messaging.base_url
        url = f"{base.rstrip('/')}/v1/Services/{quote(sid, safe='')}/PhoneNumbers"
        numbers = set()
        for item in self.pages(url, {"PageSize": PAGE_SIZE}, "phone_numbers", base):
            try:
                numbers.add(twilio_fields.phone(item.get("phone_number") if isinstance(item, dict) else None))
            except twilio_fields.BadField:
                log.warning("backfill: the messaging service lists a number that is not one: %s",
                            visible(item.get("phone_number") if isinstance(item, dict) else item, 40))
        return numbers

    def replies_to(self, from_, to, since):
        """Our messages from `from_` to `to` sent since `since` (Twilio lists them newest
        first by the date they were sent, so reading stops at the first sent before it): a list
        of replies (twilio_fields.reply). Records that cannot be read are passed over.

        Raises: PagingStopped, DeliveryError.
        """
        params = {"From": from_, "To": to, "PageSize": PAGE_SIZE}
        records = self.pages(self._messages_url() + ".json", params, "messages", self._client.api.base_url)
        return [reply for _, reply in _sent_since(records, since) if reply is not None and reply["to"] == to]


def _sent_since(records, since):
    """(date, reply) for each record of Twilio's log (newest first by the date sent) until the
    first sent before `since`: the reply (twilio_fields.reply) if it is one of ours that reads,
    else None; the date if the record has one."""
    for raw in records:
        at = _any_date(raw) if isinstance(raw, dict) else None
        if at is not None and at < since:
            return  # newest first: the rest were sent before
        direction = raw.get("direction") if isinstance(raw, dict) else None
        if not (isinstance(direction, str) and direction.startswith("outbound")):
            yield at, None
            continue
        try:
            yield at, twilio_fields.reply(raw)
        except twilio_fields.BadField:
            yield at, None
