"""Delivery receipts, as rules: Twilio's MessageStatus values in the order a message
moves through them, which are final, and what an error code means in words. Pure
functions: the store records receipts with them, `status` and `process` explain them.
"""

# A message moves forward through these; a receipt that would move it back (a late
# "sent" after "delivered": callbacks may arrive out of order) is ignored.
RANK = {
    "accepted": 0, "scheduled": 0, "queued": 1, "sending": 2, "sent": 3,
    "delivered": 4, "undelivered": 4, "failed": 4, "canceled": 4, "read": 5,
}
FINAL = frozenset({"delivered", "undelivered", "failed", "canceled", "read"})
PROBLEMS = ("undelivered", "failed")
# Replies with no receipt after this long (no SMSBATCH_PUBLIC_URL, so no callbacks, or a
# callback lost) are fetched from Twilio once, at most CHECKS_PER_RUN per `process` run.
CHECK_AFTER_SECONDS = 300
CHECKS_PER_RUN = 20
# The SIDs the console stand-in (SMSBATCH_SMS=console) makes up: nothing was sent, so no
# receipt will ever come; status and deliveries say so instead of "no receipt yet".
CONSOLE_SID_PREFIX = "SMconsole"
CONSOLE = "console"  # how such a reply is counted and named: "console (no receipts)"
# A reply whose status a callback gave is still fetched once for its price, if it went out
# within this long (older ones are not worth the requests).
PRICE_WITHIN_SECONDS = 86400

ERROR_WORDS = {
    30003: "unreachable (handset off or out of coverage)",
    30004: "blocked by the recipient",
    30005: "unknown number (does not exist)",
    30006: "landline or unreachable carrier",
    30007: "carrier filtered (spam)",
    30008: "unknown error",
    21610: "recipient unsubscribed",
    21614: "not a mobile number",
}


def is_console_sid(sid):
    """True for a SID the console stand-in made up (no receipt ever comes for it)."""
    return str(sid).startswith(CONSOLE_SID_PREFIX)


def is_status(text):
    """True for a MessageStatus value smsbatch knows."""
    return text in RANK


def moves_forward(old, new):
    """May a receipt saying `new` replace the recorded `old` (None: nothing recorded)?"""
    if old is None or old not in RANK:
        return True
    return RANK[new] > RANK[old]


def explain(status, error_code):
    """A receipt in words: 'undelivered: 30007 carrier filtered (spam)'."""
    if not error_code:
        return status
    if not isinstance(error_code, int):  # a row stored before codes were checked: shown, never a traceback
        return f"{status}: Twilio error (unreadable code)"
    words = ERROR_WORDS.get(error_code)
    return f"{status}: {error_code} {words}" if words else f"{status}: Twilio error {error_code}"
