"""Storing texts from the command line: one, or many from a JSONL trace."""

import time

from smsbatch.batching import Rules, opt_out_scope
from smsbatch.engine import StoreConflict
from smsbatch.errors import InvalidInput
from smsbatch.inputs import check_body, check_not_future, derived_sid, parse_record


def ingest_one(store, settings, phone, our_number, body, sid=None, at=None, now=None):
    """Store one text like the webhook would. Returns counts like ingest_lines.

    Raises:
        InvalidInput: a bad body, or `at` too far ahead of `now` (default: the clock).
    """
    now = time.time() if now is None else now
    at = now if at is None else check_not_future(at, now)
    body = check_body(body)
    sid = sid or derived_sid(phone, our_number, body, at)
    added = store.add_message(sid, phone, our_number, body, at, Rules.from_settings(settings),
                              scope=opt_out_scope(our_number, settings.twilio_messaging_service_sid))
    return {"stored": int(not added.duplicate), "duplicates": int(added.duplicate), "errors": [],
            "batch_id": added.batch_id}


def ingest_lines(store, lines, settings, now=None):
    """Store every good line of a JSONL trace; bad lines are reported by number and skipped.
    A line whose time is ahead of `now` (default: the clock) by more than a few minutes is bad.

    Returns {"stored", "duplicates", "errors": [(line number, reason)]}.
    """
    rules = Rules.from_settings(settings)
    now = time.time() if now is None else now
    stored = duplicates = 0
    errors = []
    for number, raw in enumerate(lines, 1):
        try:
            line = raw.decode("utf-8") if isinstance(raw, bytes) else raw
            if not line.strip():
                continue
            r = parse_record(line)
            check_not_future(r["at"], now)
        except UnicodeDecodeError:
            errors.append((number, "not UTF-8"))
            continue
        except InvalidInput as exc:
            errors.append((number, str(exc)))
            continue
        try:
            scope = opt_out_scope(r["our_number"], settings.twilio_messaging_service_sid)
            added = store.add_message(r["sid"], r["phone"], r["our_number"], r["body"], r["at"], rules,
                                      scope=scope)
        except StoreConflict as exc:  # the line is bad; the file goes on
            errors.append((number, f"not stored: {exc}"))
            continue
        duplicates += added.duplicate
        stored += not added.duplicate
    return {"stored": stored, "duplicates": duplicates, "errors": errors}
