"""The webhook: the WSGI app called directly, and once through a real server on port 0."""

import io
import json
import sqlite3
import threading
import urllib.request
from urllib.error import HTTPError
from urllib.parse import urlencode

import pytest
from twilio.request_validator import RequestValidator

from conftest import T0
from smsbatch.config import Settings
from smsbatch.errors import ConfigError
from smsbatch.web import make_app, make_server_for

TOKEN = "webhook-test-token"
URL = "https://hooks.example.com/sms"


@pytest.fixture
def wsettings(db_path):
    return Settings(db_path=db_path, twilio_auth_token=TOKEN, public_url=URL)


@pytest.fixture
def app(wsettings):
    return make_app(wsettings, clock=lambda: T0)


def form(**extra):
    params = {"MessageSid": "SM" + "a" * 32, "From": "+15553330001", "To": "+15550000000", "Body": "hi",
              "NumMedia": "0", "AccountSid": "AC" + "0" * 32, "SmsStatus": "received", "FromCity": ""}
    params.update(extra)
    return params


def call(app, method="POST", path="/sms", body=b"", headers=None, ctype="application/x-www-form-urlencoded"):
    environ = {"REQUEST_METHOD": method, "PATH_INFO": path, "CONTENT_TYPE": ctype,
               "CONTENT_LENGTH": str(len(body)), "wsgi.input": io.BytesIO(body), "SERVER_NAME": "x",
               "SERVER_PORT": "80", "wsgi.url_scheme": "http"}
    environ.update(headers or {})
    seen = {}
    out = b"".join(app(environ, lambda status, hdrs: seen.update(status=status, headers=dict(hdrs))))
    return int(seen["status"][:3]), seen["headers"], out


def signed(params, url=URL, token=TOKEN):
    body = urlencode(params).encode()
    return body, {"HTTP_X_TWILIO_SIGNATURE": RequestValidator(token).compute_signature(url, params)}


def count(db_path, table="messages"):
    return sqlite3.connect(db_path).execute(f"SELECT count(*) FROM {table}").fetchone()[0]


def test_signed_text_is_stored_and_answered_with_empty_twiml(app, db_path):
    status, headers, body = call(app, body=signed(form())[0], headers=signed(form())[1])
    assert status == 200 and headers["Content-Type"] == "text/xml" and b"<Response/>" in body
    row = sqlite3.connect(db_path).execute("SELECT sid, phone, body, received_at FROM messages").fetchone()
    assert row == ("SM" + "a" * 32, "+15553330001", "hi", T0)


def test_redelivery_is_stored_once(app, db_path):
    body, headers = signed(form())
    assert call(app, body=body, headers=headers)[0] == 200
    assert call(app, body=body, headers=headers)[0] == 200
    assert count(db_path) == 1 and count(db_path, "batches") == 1


def test_blank_fields_are_signed_too(app, db_path):
    """Dropping blank fields (FromCity="") would break the signature."""
    body, headers = signed(form(FromState="", Body="x"))
    assert call(app, body=body, headers=headers)[0] == 200


@pytest.mark.parametrize("headers", [{}, {"HTTP_X_TWILIO_SIGNATURE": "bm90IGEgc2lnbmF0dXJl"}])
def test_bad_or_missing_signature_is_403_and_stores_nothing(app, db_path, headers):
    assert call(app, body=urlencode(form()).encode(), headers=headers)[0] == 403
    assert count(db_path) == 0


def test_signature_for_another_url_or_token_is_refused(app, db_path):
    for kwargs in ({"url": "https://evil.example.com/sms"}, {"token": "other"}):
        body, headers = signed(form(), **kwargs)
        assert call(app, body=body, headers=headers)[0] == 403
    assert count(db_path) == 0


def test_tampered_body_is_refused(app, db_path):
    _, headers = signed(form())
    assert call(app, body=urlencode(form(Body="changed")).encode(), headers=headers)[0] == 403


@pytest.mark.parametrize("missing", ["From", "MessageSid"])
def test_missing_from_or_sid_is_400(app, db_path, missing):
    params = form()
    del params[missing]
    body, headers = signed(params)
    status, _, reason = call(app, body=body, headers=headers)
    assert status == 400 and b"missing" in reason and count(db_path) == 0


def test_oversized_body_is_413(app, db_path):
    body, headers = signed(form(Body="x" * 70_000))
    assert call(app, body=body, headers=headers)[0] == 413 and count(db_path) == 0


@pytest.mark.parametrize("method,path,status", [("GET", "/sms", 405), ("PUT", "/sms", 405), ("POST", "/nope", 404),
                                                ("POST", "/health", 405)])
def test_wrong_method_or_path(app, method, path, status):
    assert call(app, method=method, path=path)[0] == status


def test_wrong_content_type_is_415(app, db_path):
    body, headers = signed(form())
    assert call(app, body=body, headers=headers, ctype="application/json")[0] == 415


@pytest.mark.parametrize("raw", [b"\xff\xfe=\x00", b"Body=%FF%FE&From=1", b"%zz"])
def test_undecodable_body_is_400_or_403_never_500(app, db_path, raw):
    assert call(app, body=raw)[0] in (400, 403) and count(db_path) == 0


def test_duplicate_fields_are_refused(app, db_path):
    pairs = list(form().items()) + [("From", "+15559999999")]
    body = urlencode(pairs).encode()
    params = {}
    for k, v in pairs:
        params.setdefault(k, []).append(v)

    class Multi(dict):
        def getall(self, k):
            return self[k]

    headers = {"HTTP_X_TWILIO_SIGNATURE": RequestValidator(TOKEN).compute_signature(URL, Multi(params))}
    status, _, reason = call(app, body=body, headers=headers)
    assert status == 400 and b"more than once" in reason and count(db_path) == 0


def test_picture_message_with_empty_body_is_a_text(app, db_path):
    params = form(Body="", NumMedia="2", MediaUrl0="https://m/1", MediaUrl1="https://m/2",
                  MediaContentType0="image/jpeg", MediaContentType1="image/png")
    body, headers = signed(params)
    assert call(app, body=body, headers=headers)[0] == 200
    media = sqlite3.connect(db_path).execute("SELECT media FROM messages").fetchone()[0]
    assert json.loads(media) == ["https://m/1", "https://m/2"]


def test_bad_num_media_is_400(app, db_path):
    body, headers = signed(form(NumMedia="lots"))
    assert call(app, body=body, headers=headers)[0] == 400


def test_unwritable_database_answers_503_and_acknowledges_nothing(wsettings, db_path):
    import smsbatch.web as web

    blocker = sqlite3.connect(db_path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # another writer holds the lock past the busy timeout
    old, web.WEB_BUSY_TIMEOUT = web.WEB_BUSY_TIMEOUT, 0.2  # read when the app is made
    try:
        app = make_app(wsettings, clock=lambda: T0)
        body, headers = signed(form())
        assert call(app, body=body, headers=headers)[0] == 503
    finally:
        web.WEB_BUSY_TIMEOUT = old
        blocker.execute("ROLLBACK")
    assert count(db_path) == 0
    assert call(app, body=body, headers=headers)[0] == 200  # recovers once the lock is gone


def test_health_says_only_whether_texts_can_be_stored_and_whether_a_person_is_needed(app, db_path):
    from smsbatch.db import Store

    body, headers = signed(form())
    call(app, body=body, headers=headers)
    Store(db_path).note_run("host", T0 - 30)  # a processor ran lately: the text's batch is in hand
    status, headers, out = call(app, method="GET", path="/health")
    assert status == 200 and json.loads(out) == {"ok": True, "can_store": True, "person_needed": False}


def test_health_is_503_when_the_database_cannot_be_read(tmp_path):
    path = tmp_path / "broken.db"
    path.write_bytes(b"this is not a database" * 100)
    app = make_app(Settings(db_path=str(path), twilio_auth_token=TOKEN, public_url=URL), clock=lambda: T0)
    status, _, out = call(app, method="GET", path="/health")
    assert status == 503 and json.loads(out) == {"ok": False, "can_store": False, "person_needed": True}


def test_refuses_to_run_without_a_token_unless_insecure(db_path):
    with pytest.raises(ConfigError, match="TWILIO_AUTH_TOKEN"):
        make_app(Settings(db_path=db_path))
    app = make_app(Settings(db_path=db_path), insecure=True, clock=lambda: T0)
    assert call(app, body=urlencode(form()).encode())[0] == 200


def test_through_a_real_server_on_port_0(wsettings, db_path):
    """Signatures over SMSBATCH_PUBLIC_URL, whatever the Host header says."""
    app = make_app(wsettings)
    server = make_server_for(app, "127.0.0.1", 0, threads=4)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/sms"
    try:
        params = form()
        request = urllib.request.Request(url, data=urlencode(params).encode(), headers={
            "X-Twilio-Signature": RequestValidator(TOKEN).compute_signature(URL, params),
            "Content-Type": "application/x-www-form-urlencoded"})
        with urllib.request.urlopen(request, timeout=5) as response:
            assert response.status == 200 and b"<Response/>" in response.read()
        with pytest.raises(HTTPError) as err:
            urllib.request.urlopen(urllib.request.Request(url, data=b"From=1", headers={
                "Content-Type": "application/x-www-form-urlencoded"}), timeout=5)
        assert err.value.code == 403
    finally:
        server.shutdown()
        server.server_close()
    assert count(db_path) == 1


def test_a_stalled_client_does_not_block_others(wsettings, db_path):
    import socket

    server = make_server_for(make_app(wsettings), "127.0.0.1", 0, threads=4)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    stalled = socket.create_connection(("127.0.0.1", server.server_port))
    stalled.sendall(b"POST /sms HTTP/1.1\r\nContent-Length: 100\r\n")  # and then nothing
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/health", timeout=3) as response:
            assert response.status == 200
    finally:
        stalled.close()
        server.shutdown()
        server.server_close()


def test_module_level_app_without_a_token_says_what_to_set(db_path, monkeypatch):
    """`smsbatch.web:app` runs under gunicorn and the like: no command-line flag to point at."""
    import smsbatch.web as web

    for name in [k for k in __import__("os").environ if k.startswith(("SMSBATCH_", "TWILIO_"))]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("SMSBATCH_DB", db_path)
    monkeypatch.setattr(web, "_default_app", None)
    with pytest.raises(ConfigError) as err:
        web.app  # noqa: B018 -- a WSGI server's load of `smsbatch.web:app` fails at once
    assert "TWILIO_AUTH_TOKEN" in str(err.value) and "--insecure" not in str(err.value)


def test_queued_writes_commit_together_and_a_bad_one_fails_alone(db_path):
    """Pool threads' writes queue while the connection is busy and are then committed by
    one of them; a write that fails is rolled back and run alone, failing only itself."""
    import time

    from smsbatch.batching import Rules
    from smsbatch.writer import Writer

    writer = Writer(db_path)
    outcomes = {}

    def submit(i):
        rules = None if i == 3 else Rules()  # None: add_message fails inside its transaction
        try:
            outcomes[i] = writer.submit(lambda store: store.add_message(
                f"SM{i:032d}", f"+1555000{i:04d}", "+15550000000", "hi", T0, rules))
        except Exception as exc:
            outcomes[i] = exc

    with writer._lock:  # as while a burst commits: the threads below queue up
        threads = [threading.Thread(target=submit, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 5
        while len(writer._waiting) < 8 and time.monotonic() < deadline:
            time.sleep(0.01)
    for t in threads:
        t.join(5)
    assert isinstance(outcomes.pop(3), AttributeError)
    assert all(not added.duplicate for added in outcomes.values()) and len(outcomes) == 7
    sids = {row[0] for row in sqlite3.connect(db_path).execute("SELECT sid FROM messages")}
    assert sids == {f"SM{i:032d}" for i in range(8) if i != 3} and count(db_path, "batches") == 7


def test_twilio_opt_out_type_counts_as_an_opt_out(app, db_path):
    """A keyword configured in Twilio's Advanced Opt-Out ("ARRET") arrives with OptOutType=STOP."""
    body, headers = signed(form(Body="ARRET", OptOutType="STOP"))
    assert call(app, body=body, headers=headers)[0] == 200
    conn = sqlite3.connect(db_path)
    assert conn.execute("SELECT kind FROM messages").fetchone()[0] == "opt_out"
    assert conn.execute("SELECT count(*) FROM opt_outs").fetchone()[0] == 1


def test_bursts_queued_during_a_commit_share_the_next_one_and_a_bad_burst_stores_nothing(db_path):
    """The accepting thread never waits for the database: a burst's writes are kept and
    committed by the committer thread; bursts that queue meanwhile share one transaction;
    if a write fails, nothing of its transaction is stored and on_done says so."""
    from smsbatch.batching import Rules
    from smsbatch.writer import Writer

    writer = Writer(db_path)
    outcomes = []
    done = threading.Event()

    def burst_of(sids, rules):
        with writer.burst(lambda failed: (outcomes.append((sids, failed)), len(outcomes) == 3 and done.set())):
            for sid in sids:
                assert writer.submit(lambda store, sid=sid: store.add_message(
                    sid, "+15550001111", "+15550000000", "hi", T0, rules)) is None  # kept, not run

    with writer._lock:  # as while a COMMIT runs: the three bursts queue up
        burst_of(("SM1", "SM2"), Rules())
        burst_of(("SM3",), Rules())
        burst_of(("SM4",), None)  # None: add_message fails inside the transaction
        assert count(db_path) == 0
    assert done.wait(5)
    writer.close()
    # One transaction held all three: the bad write failed all of them (the server then runs
    # each request again, alone); nothing was stored.
    assert sorted(failed for _, failed in outcomes) == [True, True, True] and count(db_path) == 0
    outcomes.clear()
    done.clear()
    burst_of(("SM5", "SM6"), Rules())
    burst_of(("SM7",), Rules())
    burst_of(("SM8",), Rules())
    assert done.wait(5) and [failed for _, failed in outcomes] == [False, False, False]
    writer.close()
    assert count(db_path) == 4
