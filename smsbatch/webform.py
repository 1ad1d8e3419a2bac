"""The webhook's forms: read, bounded and checked before any signature work.

Twilio's signature joins the sorted field names and values with no separator, so the
same signature covers every way of re-splitting that text into fields
(`MessageSid=SM…&NumMedia=0` and `MessageSid=SM…NumMedia0`). What a re-split request
cannot keep is the shape of Twilio's fields: each sent once, its identifiers exactly
`SM`/`MM`/`AC` and 32 hex digits. Those are checked here (well_formed), and for an inbound
text every field by name (inbound_wrong, below: why a re-split cannot pass it).
"""

import re
from urllib.parse import unquote

MAX_BODY = 64 * 1024  # a real form is far smaller (a 1,600-character emoji text: about 20 KiB)
# Twilio sends about 20 fields, some 60 with ten media and WhatsApp's extras; a form with
# more is refused before it is parsed (parsing and signing 11,000 empty fields costs 30 ms).
MAX_FIELDS = 100
MAX_MEDIA = 10  # Twilio sends at most 10 media per message
MESSAGE_SID = re.compile(r"(SM|MM)[0-9a-f]{32}")
ACCOUNT_SID = re.compile(r"AC[0-9a-f]{32}")
ADDRESS = r"(?:whatsapp:)?\+?[0-9]{3,15}"  # From/To: E.164, a short code, or WhatsApp's
# A short Twilio-made text (FromCity, ToZip, SmsStatus, ...): no '+' or ':' (a sender's
# address), no '=' or '&'.
SHORT = r"[^\x00-\x1f+:=&]{0,64}"
MEDIA_URL = r"https?://[A-Za-z0-9.-]+(?::[0-9]{1,5})?(?:/[A-Za-z0-9._~%/-]*)?"
# Twilio's documented inbound-message fields (Messaging webhooks; WhatsApp's extras): name
# -> the whole value's shape. Body is the one free-form field. Any other name is refused.
INBOUND_FIELDS = {name: re.compile(shape) for name, shape in {
    "MessageSid": MESSAGE_SID.pattern, "SmsMessageSid": MESSAGE_SID.pattern, "SmsSid": MESSAGE_SID.pattern,
    "AccountSid": ACCOUNT_SID.pattern, "MessagingServiceSid": r"MG[0-9a-f]{32}",
    "From": ADDRESS, "To": ADDRESS, "Body": r"(?s:.*)",
    "NumMedia": r"[0-9]{1,2}", "NumSegments": r"[0-9]{1,2}", "ReferralNumMedia": r"[0-9]{1,2}",
    "SmsStatus": r"[a-z_]{1,32}", "ApiVersion": r"[0-9]{4}-[0-9]{2}-[0-9]{2}", "OptOutType": r"[A-Za-z]{0,16}",
    **{f"{side}{part}": SHORT for side in ("From", "To") for part in ("City", "State", "Zip", "Country")},
    **{f"MediaUrl{i}": MEDIA_URL for i in range(MAX_MEDIA)},
    **{f"MediaContentType{i}": r"[A-Za-z0-9.-]{1,64}/[A-Za-z0-9.+-]{1,127}" for i in range(MAX_MEDIA)},
    "ProfileName": r"[^\x00-\x1f]{0,256}",  # a person's chosen name: RESPLIT guards it
    "WaId": r"[0-9]{1,20}", "MessageType": r"[a-z_]{1,32}",
    "Forwarded": r"true|false", "FrequentlyForwarded": r"true|false",
}.items()}
# What a re-split must leave inside some field's value (see inbound_wrong): a field pair
# `From<address>` followed by the next field's name (a capital: any name, even one Twilio
# adds later), or a whole `MessageSid<id>`; in a field other than the Body, also
# `From<address>` ending the value. No person types these; Twilio sends none of them.
RESPLIT = re.compile(r"From" + ADDRESS + r"(?=[A-Z])|MessageSid(?:SM|MM)[0-9a-f]{32}")
RESPLIT_END = re.compile(r"From" + ADDRESS + r"\Z")


class Refused(Exception):
    """A form the webhook refuses: HTTP status line and a one-line reason."""

    def __init__(self, status, reason):
        super().__init__(reason)
        self.status = status


class FormParams(dict):
    """A form as {name: [values]} that twilio's RequestValidator can read (getall)."""

    def getall(self, name):
        """Every value of `name`. Raises: KeyError if there is none."""
        return self[name]

    def one(self, name, default=""):
        """The first value of `name`, or `default`."""
        values = self.get(name)
        return values[0] if values else default


def parse_form(environ):
    """Read and parse a form-encoded body of at most MAX_BODY bytes and MAX_FIELDS fields.

    Raises:
        Refused: 413 too large, 415 not a form, 400 unreadable or too many fields.
    """
    raw_length = environ.get("CONTENT_LENGTH") or "0"
    if not (raw_length.isascii() and raw_length.isdigit()):  # int() takes '9_1', ' 9' and '+9'
        raise Refused("400 Bad Request", "bad Content-Length")
    length = int(raw_length)
    if length > MAX_BODY:
        raise Refused("413 Content Too Large", f"body over {MAX_BODY} bytes")
    ctype = environ.get("CONTENT_TYPE", "").split(";")[0].strip().lower()
    if ctype != "application/x-www-form-urlencoded":
        raise Refused("415 Unsupported Media Type", "expected application/x-www-form-urlencoded")
    try:
        raw = environ["wsgi.input"].read(length) if length > 0 else b""
    except (OSError, ValueError):
        raise Refused("400 Bad Request", "could not read the body") from None
    if len(raw) < length:
        raise Refused("400 Bad Request", "body shorter than Content-Length")
    if raw.count(b"&") >= MAX_FIELDS:  # counted in C, before any parsing
        raise Refused("400 Bad Request", f"more than {MAX_FIELDS} form fields")
    try:
        pairs = form_pairs(raw.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise Refused("400 Bad Request", "body is not valid form-encoded UTF-8") from None
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


def well_formed(params):
    """Why this form is not one Twilio sent (a field given twice, a malformed MessageSid or
    AccountSid), or None. Run after the signature check, so a forgery is still a 403."""
    for name, values in params.items():
        if len(values) > 1:
            return f"field {name} given more than once"
    for name, shape, said in (("MessageSid", MESSAGE_SID, "SM or MM"), ("AccountSid", ACCOUNT_SID, "AC")):
        if name not in params:
            return f"missing {name}"
        if not shape.fullmatch(params.one(name)):
            return f"{name} is not {said} and 32 hex digits"
    return None


def inbound_wrong(params):
    """Why this inbound-text form is not one Twilio sent (well_formed, an unknown field, a
    field of the wrong shape, a re-split's trace), or None. Cheap: one fullmatch per field.

    Why a re-split cannot pass. The signed text is the sorted `name value` pairs joined. A
    forgery that stores a new text needs a MessageSid of its own, so the real
    `MessageSid<id>` must end up inside another field's value: no field name can start
    inside it (names start with a capital; `SM`/`MM` begin no name). RESPLIT finds it in
    any value, the Body too. A forgery that keeps the real MessageSid is a duplicate, or
    changes From: then the real `From<address>` lies inside a value (the same reasoning),
    followed by the next real field's name or ending that value, which RESPLIT (and
    RESPLIT_END) find too. That value is never the Body ending there: the forged From
    would then have no place before the next real field, which sorts after From.
    Only the Body is free-form; every other field has a shape of its own.
    """
    wrong = well_formed(params)
    if wrong:
        return wrong
    for name, values in params.items():
        shape, value = INBOUND_FIELDS.get(name), values[0]
        if shape is None:
            return f"unknown field {printable_name(name)}"
        if not shape.fullmatch(value):
            return f"{name} is not as Twilio sends it"
    return resplit_trace(params)


def resplit_trace(params):
    """Why this form is a re-split (a field's value holds RESPLIT: see inbound_wrong), or
    None. Also for delivery receipts, whose MessageSid a re-split would change the same way."""
    for name, values in params.items():
        if RESPLIT.search(values[0]) or (name != "Body" and RESPLIT_END.search(values[0])):
            return f"{name} holds another field's name and value"
    return None


def printable_name(name):
    """A field name for a one-line reason: short, with control characters made visible."""
    return ascii(name[:40])


def media_urls(params):
    """MediaUrl0..N-1 of a picture message.

    Raises:
        Refused: NumMedia is not a small whole number.
    """
    raw = params.one("NumMedia", "0").strip() or "0"
    # '²'.isdigit(), yet int('²') fails; int() of 4,300+ digits raises: look at the length first.
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 2 or int(raw) > MAX_MEDIA:
        raise Refused("400 Bad Request", "bad NumMedia")
    return [params.one(f"MediaUrl{i}") for i in range(int(raw)) if params.one(f"MediaUrl{i}")]
