"""Log lines as JSON (SMSBATCH_LOG_FORMAT=json): one object a line, for a log shipper.

Each line holds time (ISO-8601 UTC, milliseconds), level, logger and message, plus
batch_id, reply_sid and our_number when the call site passed them (`extra=`). Phone
numbers in the message are masked as in the plain logs (errors.hide_numbers); the JSON is
ASCII, so control characters, escape sequences and bidi controls are escaped (\u001b,
\u202e) and one record is always one line.
"""

import json
import logging
import sys
import threading
from datetime import datetime, timezone

from smsbatch.errors import hide_numbers

# Passed by call sites as logging's extra=: the batch, Twilio's SID of the reply, the business number.
CONTEXT_KEYS = ("batch_id", "reply_sid", "our_number")


def iso_millis(epoch):
    """2026-01-31T09:30:00.123Z: a record's time, to the millisecond, in UTC."""
    moment = datetime.fromtimestamp(epoch, timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object a record: time, level, logger, message, and the context keys given."""

    def format(self, record):
        entry = {"time": iso_millis(record.created), "level": record.levelname, "logger": record.name,
                 "message": hide_numbers(record.getMessage())}
        for key in CONTEXT_KEYS:
            value = getattr(record, key, None)
            if value is not None:
                entry[key] = str(value)
        if record.exc_info:
            entry["exception"] = hide_numbers(self.formatException(record.exc_info))
        return json.dumps(entry, default=str)  # ASCII: C1 and bidi controls escaped too


def line(logger, message, level="INFO", **fields):
    """One JSON log line written outside logging (the summary `process` prints), same shape."""
    record = logging.LogRecord(logger, logging.getLevelName(level), __file__, 0, message, None, None)
    text = JsonFormatter().format(record)
    if not fields:
        return text
    return json.dumps(json.loads(text) | fields, default=str)


def use_json(handler):
    """Make `handler` write JSON lines, and send what would reach stderr outside logging there
    too: Python's warnings, and an uncaught exception's traceback (main thread or another)."""
    handler.setFormatter(JsonFormatter())
    logging.captureWarnings(True)
    crash = logging.getLogger("smsbatch")

    def uncaught(kind, value, trace):
        crash.critical("unexpected error: %s", value, exc_info=(kind, value, trace))

    sys.excepthook = uncaught
    threading.excepthook = lambda args: uncaught(args.exc_type, args.exc_value, args.exc_traceback)
