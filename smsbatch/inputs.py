"""Operator input: times, phone numbers and JSONL trace lines, checked with clear errors."""

import datetime
import json
import math
import re

from smsbatch.batching import MAX_TEXT_BYTES
from smsbatch.errors import InvalidInput

LATEST = 253402300799.0  # 9999-12-31T23:59:59Z
FUTURE_SLACK_SECONDS = 300  # a stored text may be this far ahead of our clock (clocks differ), no further
PHONE_HINT = "give it with its country code, like +15551234567 or +447700900123"


def quoted(value, limit=40):
    """repr() of a value for an error message, cut short: one line, whatever it held."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def parse_time(text):
    """Epoch seconds or ISO-8601 (naive means UTC) -> epoch seconds, between 1970 and 9999.

    Raises:
        InvalidInput: neither form, or out of range (nan, inf, negative).
    """
    raw = text if isinstance(text, (int, float)) and not isinstance(text, bool) else str(text).strip()
    try:
        value = float(raw)
    except OverflowError:  # an integer too large for a float
        value = math.inf
    except ValueError:
        value = _iso_time(raw)
    if not (math.isfinite(value) and 0 <= value <= LATEST):
        raise InvalidInput(f"bad time {quoted(text)}: out of range (1970 to 9999)")
    return value


def check_not_future(at, now):
    """A text's arrival time, refused when ahead of `now` by more than FUTURE_SLACK_SECONDS:
    its batch would wait, pending, until that moment (for ever, for the year 9999).

    Raises:
        InvalidInput: too far in the future.
    """
    if at > now + FUTURE_SLACK_SECONDS:
        raise InvalidInput(f"time {iso_time(at)} is in the future (more than {FUTURE_SLACK_SECONDS // 60} minutes "
                           f"from now); a text cannot arrive later than it is stored")
    return at


def _iso_time(raw):
    try:
        moment = datetime.datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidInput(f"bad time {quoted(raw)}: use epoch seconds or ISO-8601 like 2026-01-31T09:30:00Z") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return moment.timestamp()


def check_body(body):
    """A text body that can be stored as UTF-8, at most MAX_TEXT_BYTES long (the webhook's limit).

    Raises:
        InvalidInput: not a string, too long, or holding characters UTF-8 cannot carry (lone surrogates).
    """
    if not isinstance(body, str):
        raise InvalidInput("body must be a string")
    try:
        size = len(body.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidInput("body is not valid text (not UTF-8)") from None
    if size > MAX_TEXT_BYTES:
        raise InvalidInput(f"body is {size} bytes; the most a text may hold is {MAX_TEXT_BYTES}")
    return body


def check_text(text, what="argument"):
    """A string that can be stored and compared as UTF-8 (a command-line argument with bytes
    that are not UTF-8 arrives holding lone surrogates).

    Raises:
        InvalidInput: not valid UTF-8 text.
    """
    text = str(text)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInput(f"{what} is not valid text (not UTF-8)") from None
    return text


def decode_text(data, name):
    """The bytes of a text file (`name` for the message) as str.

    Raises:
        InvalidInput: not UTF-8, or binary (holding NUL bytes).
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidInput(f"{name} is not a UTF-8 text file") from None
    if "\x00" in text:
        raise InvalidInput(f"{name} is a binary file, not text")
    return text


def check_sid(sid):
    """A MessageSid as given by an operator or a trace: printable text, at most 64 characters.

    Raises:
        InvalidInput: not such a string.
    """
    if not isinstance(sid, str) or len(sid) > 64 or not sid.isprintable():
        raise InvalidInput("sid must be a string of at most 64 printable characters")
    return check_text(sid, "sid")


def check_phone(text, what="phone number"):
    """A phone number in E.164, as Twilio sends it (+15551234567): the one place numbers given
    by an operator are normalised, so 5551234567 and +1 555 123 4567 are the same person.

    Spaces, dashes, dots and brackets are dropped; `whatsapp:` is kept in front. Without a +,
    10 digits are a North American number (+1 added), as are 11 digits starting with 1, and
    3 to 6 digits are a short code (kept as is). Anything else is ambiguous and refused.

    Raises:
        InvalidInput: not a phone number, or ambiguous without its country code.
    """
    raw = str(text if text is not None else "").strip()
    cleaned = re.sub(r"[\s().-]", "", raw)
    prefix = "whatsapp:" if cleaned.lower().startswith("whatsapp:") else ""
    number = _e164(cleaned[len(prefix):])
    if number is None:
        raise InvalidInput(f"bad {what} {quoted(raw)}: {PHONE_HINT}")
    return prefix + number


def _e164(number):
    """+digits for an unambiguous number, else None."""
    if re.fullmatch(r"\+[1-9][0-9]{6,14}", number):
        return number
    if not re.fullmatch(r"[1-9][0-9]*", number):
        return None  # letters, a lone +, or a leading 0 (a national prefix: which country?)
    if re.fullmatch(r"1?[2-9][0-9]{9}", number):  # North American area codes start with 2-9
        return "+1" + number[-10:]
    if 3 <= len(number) <= 6:
        return number  # a short code has no country code
    return None


def parse_record(line):
    """One JSONL trace line -> dict(sid, phone, our_number, body, at).

    Raises:
        InvalidInput: not JSON, not an object, or a bad field.
    """
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"not JSON ({exc.msg})") from None
    except RecursionError:
        raise InvalidInput("not JSON this program can read (nested too deeply)") from None
    except ValueError as exc:  # e.g. an integer over sys.get_int_max_str_digits() digits
        raise InvalidInput(f"not JSON this program can read ({str(exc).split(':')[0]})") from None
    if not isinstance(record, dict):
        raise InvalidInput("not a JSON object")
    body = check_body(record.get("body", ""))
    if "at" not in record:
        raise InvalidInput("missing 'at'")
    phone = check_phone(record.get("from"), "'from'")
    our_number = check_phone(record.get("to"), "'to'")
    at = parse_time(record["at"])
    sid = check_sid(record.get("sid") or derived_sid(phone, our_number, body, at))
    return {"sid": sid, "phone": phone, "our_number": our_number, "body": body, "at": at}


def derived_sid(phone, our_number, body, at):
    """A stable MessageSid for a text given without one, so importing a file twice stores it once."""
    import hashlib

    digest = hashlib.sha256(f"{phone}|{our_number}|{body}|{at!r}".encode()).hexdigest()
    return "SMimport" + digest[:24]


DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
MAX_DURATION_SECONDS = 100 * 365.25 * 86400  # 100 years: longer is a typo, and past what dates can say


def parse_duration(text):
    """'90d', '12h', '30m', '45s', '2w' -> seconds, at most 100 years.

    Raises:
        InvalidInput: not a number followed by one of s, m, h, d, w, or longer than 100 years.
    """
    match = DURATION.match(str(text).strip().lower())
    if not match:
        raise InvalidInput(f"bad duration {text!r}: use a number and a unit, like 90d, 12h, 30m")
    seconds = float(match.group(1)) * DURATION_UNITS[match.group(2)]
    if seconds > MAX_DURATION_SECONDS:  # also a number too long for a float (inf)
        shown = text if len(str(text)) <= 20 else str(text)[:20] + "…"
        raise InvalidInput(f"bad duration {shown!r}: at most 100 years (36525d)")
    return seconds


def parse_since(text, now):
    """A moment given as a duration before `now` ('7d', '2h') or as a time (epoch or ISO-8601).

    Raises:
        InvalidInput: neither.
    """
    if DURATION.match(str(text).strip().lower()):
        return now - parse_duration(text)  # a duration, too long or not: say so, not "bad time"
    try:
        return parse_time(text)
    except InvalidInput:
        raise InvalidInput(f"bad time {text!r}: use a duration before now (7d, 2h, 30m) or a time "
                           "(epoch seconds or ISO-8601 like 2026-01-31T09:30:00Z)") from None


def iso_time(epoch):
    """Epoch seconds -> '2026-01-31T09:30:00Z' (UTC, to the second): times in logs and output."""
    moment = datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")
