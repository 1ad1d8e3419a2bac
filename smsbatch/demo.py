"""`smsbatch demo`: the whole job on embedded defaults, with no keys and no network."""

import io
import os
import time
from urllib.parse import urlencode
from wsgiref.util import setup_testing_defaults

from smsbatch.ai import OfflineResponder
from smsbatch.config import Settings
from smsbatch.db import Store
from smsbatch.processor import Processor
from smsbatch.sms import ConsoleSender
from smsbatch.web import make_app

DEMO_TOKEN = "demo-auth-token"
DEMO_URL = "https://demo.smsbatch.invalid/sms"
DEMO_ACCOUNT = "AC" + "de70" * 8
OUR_NUMBER = "+15550000000"
# (seconds after start, phone, text): bursts, a lone text, an urgent one, an opt-out.
SCRIPT = [
    (0, "+15550101001", "hi"),
    (2, "+15550101001", "quick question"),
    (4, "+15550101001", "about my claim, is it approved yet?"),
    (1, "+15550101002", "Hello, what are your opening hours?"),
    (3, "+15550101003", "my pipe burst, this is an EMERGENCY"),
    (5, "+15550101004", "please stop texting me"),
    (6, "+15550101004", "STOP"),
    (7, "+15550101002", "and do you open on Sundays?"),
]


def signed_request(validator, params):
    """A WSGI environ for POST /sms carrying a valid X-Twilio-Signature."""
    body = urlencode(params).encode()
    environ = {}
    setup_testing_defaults(environ)
    environ.update({
        "REQUEST_METHOD": "POST", "PATH_INFO": "/sms", "CONTENT_TYPE": "application/x-www-form-urlencoded",
        "CONTENT_LENGTH": str(len(body)), "wsgi.input": io.BytesIO(body),
        "HTTP_X_TWILIO_SIGNATURE": validator.compute_signature(DEMO_URL, params),
    })
    return environ


def post(app, environ):
    """Call the WSGI app; returns the status line."""
    seen = {}
    b"".join(app(environ, lambda status, headers: seen.setdefault("status", status)))
    return seen["status"]


def run_demo(folder, start=None):
    """Post SCRIPT through the real webhook (signed), then process with the offline stand-ins.

    Returns a dict: the batches with their texts and replies, and totals.
    """
    from twilio.request_validator import RequestValidator

    start = time.time() if start is None else start
    settings = Settings(
        db_path=os.path.join(folder, "demo.db"), twilio_auth_token=DEMO_TOKEN, public_url=DEMO_URL,
        ai="offline", sms="console",
    )
    store = Store(settings.db_path)
    store.migrate()
    clock = [start]
    app = make_app(settings, clock=lambda: clock[0])
    validator = RequestValidator(DEMO_TOKEN)
    for i, (offset, phone, text) in enumerate(sorted(SCRIPT)):
        clock[0] = start + offset
        params = {"MessageSid": f"SM{0xde70:04x}{i:028x}", "AccountSid": DEMO_ACCOUNT, "From": phone,
                  "To": OUR_NUMBER, "Body": text, "NumMedia": "0"}
        status = post(app, signed_request(validator, params))
        if not status.startswith("200"):
            raise RuntimeError(f"demo webhook answered {status}")
    responder, sender = OfflineResponder(), ConsoleSender(quiet=True)
    later = start + max(o for o, _, _ in SCRIPT) + settings.max_wait_seconds
    report = Processor(settings.db_path, settings, responder, sender, clock=lambda: later).run()
    return summarize(store, settings.db_path, report, len(SCRIPT))


def summarize(store, db_path, report, texts):
    batches = []
    for row in store.conn.execute("SELECT * FROM batches ORDER BY seq"):
        bodies = [t["body"] for t in store.batch_texts(row["id"])]
        if not bodies:
            bodies = ["(folded into " + (row["superseded_by"] or "?") + ")"]
        batches.append({"id": row["id"], "phone": row["phone"], "texts": bodies, "state": row["state"],
                        "reply": row["response_text"] if row["state"] == "sent" else None,
                        "note": row["last_error"]})
    replies = sum(1 for b in batches if b["state"] == "sent")
    return {"db_path": db_path, "batches": batches, "report": report.as_dict(),
            "totals": {"texts": texts, "batches": len(batches), "ai_calls": report.ai_calls, "replies": replies}}
