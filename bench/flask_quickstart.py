"""What a user would write instead of smsbatch serve: Twilio's Flask quickstart shape.

Flask, twilio's RequestValidator, and one SQLite `INSERT OR IGNORE` per request on a
connection per worker process (WAL, synchronous = FULL: durable, like smsbatch), run by
bench_vs_flask.py under gunicorn with 4 sync workers. Settings from the environment:
TWILIO_AUTH_TOKEN, SMSBATCH_PUBLIC_URL (the URL signatures are checked against) and
BENCH_FLASK_DB (a database holding the `messages` table made by bench_vs_flask.py).
"""

import os
import sqlite3
import time

from flask import Flask, Response, abort, request
from twilio.request_validator import RequestValidator
from twilio.twiml.messaging_response import MessagingResponse

app = Flask(__name__)
validator = RequestValidator(os.environ["TWILIO_AUTH_TOKEN"])
PUBLIC_URL = os.environ["SMSBATCH_PUBLIC_URL"]
_conn = None


def db():
    """This worker's connection, opened on first use."""
    global _conn
    if _conn is None:
        _conn = sqlite3.connect(os.environ["BENCH_FLASK_DB"], timeout=30, isolation_level=None)
        _conn.execute("PRAGMA journal_mode = WAL")
        _conn.execute("PRAGMA synchronous = FULL")
    return _conn


@app.route("/sms", methods=["POST"])
def sms():
    """Check the signature, store the text once, answer empty TwiML."""
    if not validator.validate(PUBLIC_URL, request.form, request.headers.get("X-Twilio-Signature", "")):
        abort(403)
    form = request.form
    db().execute("INSERT OR IGNORE INTO messages (sid, phone, our_number, body, received_at) VALUES (?, ?, ?, ?, ?)",
                 (form["MessageSid"], form["From"], form.get("To", ""), form.get("Body", ""), time.time()))
    return Response(str(MessagingResponse()), mimetype="text/xml")


@app.route("/health")
def health():
    """wrk_signed.lua's last request once a thread has run out of bodies."""
    return {"ok": True}
