"""Operator input: times, phone numbers and JSONL trace lines, checked with clear errors."""

import datetime
import json
import math
import re

from smsbatch.errors import InvalidInput

PHONE = re.compile(r"^(whatsapp:)?\+?[0-9]{2,15}$")
LATEST = 253402300799.0  # 9999-12-31T23:59:59Z


def parse_time(text):
    """Epoch seconds or ISO-8601 (naive means UTC) -> epoch seconds, between 1970 and 9999.

    Raises:
        InvalidInput: neither form, or out of range (nan, inf, negative).
    """
    raw = text if isinstance(text, (int, float)) and not isinstance(text, bool) else str(text).strip()
    try:
        value = float(raw)
    except ValueError:
        value = _iso_time(raw)
    if not (math.isfinite(value) and 0 <= value <= LATEST):
        raise InvalidInput(f"bad time {text!r}: out of range (1970 to 9999)")
    return value


def _iso_time(raw):
    try:
        moment = datetime.datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidInput(f"bad time {raw!r}: use epoch seconds or ISO-8601 like 2026-01-31T09:30:00Z") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return moment.timestamp()


def check_body(body):
    """A text body that can be stored as UTF-8.

    Raises:
        InvalidInput: not a string, or holding characters UTF-8 cannot carry (lone surrogates).
    """
    if not isinstance(body, str):
        raise InvalidInput("body must be a string")
    try:
        body.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInput("body is not valid text (not UTF-8)") from None
    return body


def check_phone(text, what="phone number"):
    """A phone number as Twilio writes it (+15551234567); spaces, dashes and dots are dropped.

    Raises:
        InvalidInput: not a phone number.
    """
    raw = str(text or "").strip()
    cleaned = re.sub(r"[\s().-]", "", raw)
    if not PHONE.match(cleaned):
        raise InvalidInput(f"bad {what} {raw!r}: expected digits like +15551234567")
    return cleaned


def parse_record(line):
    """One JSONL trace line -> dict(sid, phone, our_number, body, at).

    Raises:
        InvalidInput: not JSON, not an object, or a bad field.
    """
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"not JSON ({exc.msg})") from None
    if not isinstance(record, dict):
        raise InvalidInput("not a JSON object")
    body = check_body(record.get("body", ""))
    if "at" not in record:
        raise InvalidInput("missing 'at'")
    phone = check_phone(record.get("from"), "'from'")
    our_number = check_phone(record.get("to"), "'to'")
    at = parse_time(record["at"])
    sid = record.get("sid") or derived_sid(phone, our_number, body, at)
    if not isinstance(sid, str) or len(sid) > 64:
        raise InvalidInput("sid must be a string of at most 64 characters")
    return {"sid": sid, "phone": phone, "our_number": our_number, "body": body, "at": at}


def derived_sid(phone, our_number, body, at):
    """A stable MessageSid for a text given without one, so importing a file twice stores it once."""
    import hashlib

    digest = hashlib.sha256(f"{phone}|{our_number}|{body}|{at!r}".encode()).hexdigest()
    return "SMimport" + digest[:24]


DURATION = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([smhdw]?)\s*$", re.IGNORECASE)
DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text):
    """A span like '7d', '24h', '90m', '30s', '2w' (plain numbers are seconds) -> seconds.

    Raises:
        InvalidInput: not a duration, or zero.
    """
    match = DURATION.match(str(text or ""))
    if not match:
        raise InvalidInput(f"bad duration {text!r}: use a number with s, m, h, d or w, like 7d, 24h or 90m")
    seconds = float(match.group(1)) * DURATION_UNITS[match.group(2).lower()]
    if not (0 < seconds <= LATEST):
        raise InvalidInput(f"bad duration {text!r}: must be more than zero")
    return seconds


def iso_time(epoch):
    """Epoch seconds -> '2026-01-31T09:30:00Z' (UTC, to the second): times in logs and output."""
    moment = datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")
