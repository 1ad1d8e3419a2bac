"""What Twilio's REST API says, checked before anything is stored: pure functions, no I/O.

A provider's answer is input like any other. The message log (the backfill) and the
delivery fetch give SIDs, numbers, bodies, dates, statuses and error codes; each is held
to the shape the webhook accepts (web.py) and Twilio documents, so one odd record is
skipped or recorded as unknown, never stored as given nor the cause of a traceback later.
"""

import email.utils
import math
import re

from smsbatch import delivery
from smsbatch.errors import InvalidInput
from smsbatch.inputs import LATEST, check_body

MESSAGE_SID = re.compile(r"(SM|MM)[0-9a-f]{32}")
MEDIA_SID = re.compile(r"ME[0-9a-f]{32}")
# A person's or our number as Twilio gives it: E.164, a short code, or either after whatsapp:.
PHONE = re.compile(r"(whatsapp:)?(\+[1-9][0-9]{6,14}|[1-9][0-9]{2,5})")
MAX_ERROR_CODE = 99999  # Twilio's error codes have five digits at most
MAX_MEDIA = 10  # Twilio gives at most 10 media per message


class BadField(InvalidInput):
    """A field of a provider's answer does not have the shape it must have."""


def message_sid(value):
    """A MessageSid: SM or MM and 32 hex digits. Raises: BadField."""
    if isinstance(value, str) and MESSAGE_SID.fullmatch(value):
        return value
    raise BadField("bad MessageSid")


def media_sid(value):
    """A media SID: ME and 32 hex digits. Raises: BadField."""
    if isinstance(value, str) and MEDIA_SID.fullmatch(value):
        return value
    raise BadField("bad media SID")


def phone(value, name="number"):
    """A From or To number (E.164 or a short code, maybe after whatsapp:). Raises: BadField."""
    if isinstance(value, str) and PHONE.fullmatch(value):
        return value
    raise BadField(f"bad {name}" if value is not None else f"no {name}")


def body(value):
    """A text's body: a string the webhook would have stored (None is an empty body).

    Raises: BadField (not a string, not UTF-8, longer than batching.MAX_TEXT_BYTES).
    """
    try:
        return check_body("" if value is None else value)
    except InvalidInput as exc:
        raise BadField(str(exc)) from None


def moment(value, name="date"):
    """An RFC 2822 date as Twilio writes it ('Mon, 16 Aug 2010 03:45:01 +0000') -> epoch
    seconds, between 1970 and 9999. Raises: BadField."""
    if not isinstance(value, str) or len(value) > 64:
        raise BadField(f"bad {name}")
    try:
        at = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, OverflowError, IndexError):
        raise BadField(f"bad {name}") from None
    if not (math.isfinite(at) and 0 <= at <= LATEST):
        raise BadField(f"bad {name}")
    return at


def media_count(value):
    """NumMedia: a whole number from 0 to 10 (a string or a number; None is 0). Raises: BadField."""
    if value is None:
        return 0
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_MEDIA:
        return value
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 2 \
            and int(value) <= MAX_MEDIA:
        return int(value)
    raise BadField("bad num_media")


def error_code(value):
    """A message's ErrorCode: None when there is none (None, '', 0), else a whole number from
    1 to 99999. Raises: BadField (text, a fraction, negative, too large)."""
    if value is None or value == "" or value == 0 or value == "0":
        return None
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_ERROR_CODE:
        return value
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 5:
        return int(value)
    raise BadField("bad error_code")


def status(value):
    """A MessageStatus smsbatch knows (delivery.RANK). Raises: BadField."""
    if isinstance(value, str) and delivery.is_status(value):
        return value
    raise BadField("unknown status")


def inbound_text(raw):
    """A message record of Twilio's log, for a text a person sent us -> dict of sid, phone,
    to, body, at, num_media, each checked as the webhook checks them.

    Raises: BadField (the first field that is wrong).
    """
    sent = raw.get("date_sent")
    return {"sid": message_sid(raw.get("sid")), "phone": phone(raw.get("from"), "from"),
            "to": phone(raw.get("to"), "to"), "body": body(raw.get("body")),
            "at": moment(sent, "date_sent") if sent is not None else moment(raw.get("date_created"), "date_created"),
            "num_media": media_count(raw.get("num_media"))}


def reply(raw):
    """A message record of Twilio's log, for a message we sent -> dict of sid, to, at (when
    Twilio accepted it: date_created), body, status (None when unknown).

    Raises: BadField.
    """
    try:
        known = status(raw.get("status"))
    except BadField:
        known = None
    return {"sid": message_sid(raw.get("sid")), "to": phone(raw.get("to"), "to"),
            "at": moment(raw.get("date_created"), "date_created"), "body": body(raw.get("body")),
            "status": known}
