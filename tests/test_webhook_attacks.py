"""The second hostile run against the webhook (issue 15 M4-M8, L5, L6, L9), each written as
the attack: real `serve` processes and sockets, signatures from twilio's RequestValidator,
a real second process holding the write lock."""

import json
import os
import re
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from urllib.parse import urlencode

import pytest
from twilio.request_validator import RequestValidator

from conftest import T0, invoke, wait_for
from smsbatch.web import FormParams
from test_hostile_web import (LOCK_HOLDER, TOKEN, URL, exchange, form, server, signed_request,  # noqa: F401
                              start_serve, stored)

# -- M4: a captured request re-split keeps its signature ---------------------------------


def resplit(params):
    """The attack: `MessageSid=SM…&NumMedia=0` sent as `MessageSid=SM…NumMedia0`. Twilio's
    signature joins sorted names and values with no separator, so it still matches."""
    forged = {k: v for k, v in params.items() if k != "NumMedia"}
    forged["MessageSid"] = params["MessageSid"] + "NumMedia" + params["NumMedia"]
    return forged


def raw_post(body, signature, host="hooks.example.com", path="/sms"):
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/x-www-form-urlencoded\r\n"
            f"X-Twilio-Signature: {signature}\r\nContent-Length: {len(body)}\r\n\r\n")
    return head.encode("latin-1") + body


def test_a_captured_text_re_split_with_its_valid_signature_is_refused(server, db_path):
    captured = form(1)
    signature = RequestValidator(TOKEN).compute_signature(URL, captured)
    forged = resplit(captured)
    assert RequestValidator(TOKEN).validate(URL, forged, signature)  # the forgery is validly signed
    status, _, body = exchange(server.server_port, [raw_post(urlencode(forged).encode(), signature)])
    assert status == 400 and b"MessageSid" in body and stored(db_path) == set()
    assert exchange(server.server_port, [signed_request(captured)])[0] == 200  # the real one is stored
    assert stored(db_path) == {captured["MessageSid"]}


@pytest.mark.parametrize("field, value", [("AccountSid", "AC123"), ("AccountSid", "AC" + "A" * 32),
                                          ("MessageSid", "SM" + "0" * 31), ("MessageSid", "XX" + "0" * 32),
                                          ("MessageSid", " SM" + "0" * 32)])
def test_malformed_identifiers_are_refused_even_when_signed(server, db_path, field, value):
    status, _, body = exchange(server.server_port, [signed_request(form(2, **{field: value}))])
    assert status == 400 and field.encode() in body and stored(db_path) == set()


@pytest.mark.parametrize("field", ["AccountSid", "OptOutType", "MediaUrl0", "SmsStatus"])
def test_a_field_twilio_sends_once_given_twice_is_refused_even_when_signed(server, db_path, field):
    params = FormParams({k: [v] for k, v in form(3).items()})
    params.setdefault(field, []).extend(["STOP", "x"] if field != "AccountSid" else ["AC" + "1" * 32])
    pairs = [(k, v) for k, values in params.items() for v in values]
    signature = RequestValidator(TOKEN).compute_signature(URL, params)
    status, _, body = exchange(server.server_port, [raw_post(urlencode(pairs).encode(), signature)])
    assert status == 400 and b"more than once" in body and stored(db_path) == set()


def test_the_test_suites_sids_are_twilio_shaped():
    """The rule stays; the test data follows it (test_web, test_hostile_web, the demo, the stand-in)."""
    from fakes import FakeTwilio
    from smsbatch.webform import ACCOUNT_SID, MESSAGE_SID
    from test_web import form as web_form

    for params in (web_form(), form(0), form(10**9)):
        assert MESSAGE_SID.fullmatch(params["MessageSid"]) and ACCOUNT_SID.fullmatch(params["AccountSid"])
    assert ACCOUNT_SID.fullmatch(FakeTwilio.ACCOUNT)


# -- M5: a text that cannot be committed gets its 503 in time ------------------------------


def test_every_text_gets_its_503_within_5_s_while_another_process_holds_the_lock(db_path, tmp_path):
    """20 texts a second for 6 s through real sockets while a second process holds BEGIN
    IMMEDIATE: each answer (a 503) comes within 5 s of sending, none late."""
    proc, port = start_serve(db_path, tmp_path / "serve.log")
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, db_path], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    answers = {}

    def text(n):
        started = time.monotonic()
        try:
            status = exchange(port, [signed_request(form(n))], timeout=30)[0]
        except OSError as exc:
            status = repr(exc)
        answers[n] = (status, time.monotonic() - started)

    try:
        assert holder.stdout.readline().strip() == "locked"
        threads, start = [], time.monotonic()
        for n in range(120):
            time.sleep(max(0.0, start + n / 20 - time.monotonic()))
            threads.append(threading.Thread(target=text, args=(n,)))
            threads[-1].start()
        for thread in threads:
            thread.join(40)
    finally:
        holder.communicate("", timeout=10)
        proc.terminate()
        proc.wait(timeout=15)
    statuses = {status for status, _ in answers.values()}
    slowest = max(seconds for _, seconds in answers.values())
    late = sum(1 for _, seconds in answers.values() if seconds >= 5.0)
    assert len(answers) == 120 and statuses == {503}, statuses
    assert late == 0, f"{late} of 120 answers came after 5 s (slowest {slowest:.1f} s)"
    assert stored(db_path) == set() and "Traceback" not in open(tmp_path / "serve.log").read()


# -- M6: forms far larger than Twilio's, in a flood ----------------------------------------


def test_a_form_of_thousands_of_fields_is_refused_before_any_signature_work(db_path, monkeypatch):
    from smsbatch.config import Settings
    from smsbatch.web import make_app
    from test_web import call

    app = make_app(Settings(db_path=db_path, twilio_auth_token=TOKEN, public_url=URL), clock=lambda: T0)
    signed = []
    monkeypatch.setattr(app.signatures, "valid", lambda *args: signed.append(args) or False)
    body = b"&".join(b"f%d=" % i for i in range(8_000)) + b"&" + urlencode(form(4)).encode()
    status, _, reason = call(app, body=body, headers={"HTTP_X_TWILIO_SIGNATURE": "x"})
    assert status == 400 and b"form fields" in reason and signed == []
    big = urlencode(form(4, Body="x" * 70_000)).encode()
    assert call(app, body=big, headers={"HTTP_X_TWILIO_SIGNATURE": "x"})[0] == 413 and signed == []


def flood(port, stop, sent, connections=25):
    """Forms of ~10,000 distinct empty fields (60 KiB), `connections` at a time, until `stop`."""
    body = b"&".join(b"f%d=" % i for i in range(10_000))[:60_000]
    request = raw_post(body, "AAAA")
    while not stop.is_set():
        socks = []
        for _ in range(connections):
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=10)
                sock.sendall(request)
                socks.append(sock)
            except OSError:
                break
        for sock in socks:
            try:
                sock.recv(100)
                sent.append(1)
            except OSError:
                pass
            finally:
                sock.close()


def test_real_texts_keep_their_latency_under_a_flood_of_many_field_forms(db_path, tmp_path):
    proc, port = start_serve(db_path, tmp_path / "serve.log")
    stop, sent, latencies = threading.Event(), [], []
    flooders = [threading.Thread(target=flood, args=(port, stop, sent)) for _ in range(8)]  # 200 connections
    try:
        for thread in flooders:
            thread.start()
        wait_for(lambda: len(sent) >= 200)
        for n in range(15):
            started = time.monotonic()
            assert exchange(port, [signed_request(form(100 + n))], timeout=30)[0] == 200
            latencies.append(time.monotonic() - started)
            time.sleep(0.1)
    finally:
        stop.set()
        for thread in flooders:
            thread.join(30)
        proc.terminate()
        proc.wait(timeout=15)
    latencies.sort()
    assert latencies[-1] < 2.0, f"real texts took up to {latencies[-1]:.2f} s under the flood"
    assert stored(db_path) == {form(100 + n)["MessageSid"] for n in range(15)}


# -- M7/L9: the Host header chooses nothing ------------------------------------------------


def test_serve_without_a_public_url_refuses_to_start_in_one_line(db_path):
    result = invoke(["serve", "--port", "0"], {"SMSBATCH_DB": db_path, "TWILIO_AUTH_TOKEN": TOKEN})
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1 and "SMSBATCH_PUBLIC_URL" in result.output


@pytest.mark.parametrize("host", ["[", "x:abc", "x:99999", "a b", "hooks.example.com:80:80"])
def test_a_host_header_that_is_no_host_is_400_with_rate_limited_log_lines(db_path, tmp_path, host):
    from smsbatch.rejections import LINES_PER_MINUTE

    proc, port = start_serve(db_path, tmp_path / "serve.log")
    try:
        params = form(5)
        body = urlencode(params).encode()
        signature = RequestValidator(TOKEN).compute_signature(URL, params)
        for _ in range(60):
            assert exchange(port, [raw_post(body, signature, host=host)])[0] == 400
        assert exchange(port, [f"GET /health HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()])[0] == 400
    finally:
        proc.terminate()
        proc.wait(timeout=15)
    log = open(tmp_path / "serve.log").read()
    assert "Traceback" not in log and log.count("bad Host header") == LINES_PER_MINUTE
    assert stored(db_path) == set()


def test_a_text_signed_for_another_webhook_of_the_account_is_refused_whatever_the_host(server, db_path):
    other = "https://other-app.example.com/sms"
    params = form(6)
    body = urlencode(params).encode()
    signature = RequestValidator(TOKEN).compute_signature(other, params)
    assert exchange(server.server_port, [raw_post(body, signature, host="other-app.example.com")])[0] == 403
    assert stored(db_path) == set()


# -- M8: what a client wrote is escaped in every log line ----------------------------------

EVIL = "\x1b[2J\x1b]52;c;ZWNobyBwd25lZA==\x07\rwebhook: stored everything\u202e\u2066"


def test_client_text_reaches_the_log_escaped(db_path, tmp_path):
    proc, port = start_serve(db_path, tmp_path / "serve.log")
    quoted = "".join(f"%{b:02x}" for b in EVIL.encode())
    try:
        exchange(port, [f"GET /{quoted}?{quoted} HTTP/1.1\r\nHost: x\r\n\r\n".encode()])  # 404
        exchange(port, [f"GET /health HTTP/1.1\r\nHost: {EVIL}\r\n\r\n".encode("utf-8")])  # bad Host
        exchange(port, [raw_post(urlencode(form(7)).encode(), "bad", path=f"/sms?{quoted}")])  # 403
        params = FormParams({k: [v] for k, v in form(8).items()} | {EVIL: ["a", "b"]})  # a field given twice
        pairs = [(k, v) for k, values in params.items() for v in values]
        signature = RequestValidator(TOKEN).compute_signature(URL, params)
        assert exchange(port, [raw_post(urlencode(pairs).encode(), signature)])[0] == 400
        exchange(port, [signed_request(form(9, MessageSid=EVIL))])  # a malformed MessageSid
    finally:
        proc.terminate()
        proc.wait(timeout=15)
    log = open(tmp_path / "serve.log", encoding="utf-8").read()
    for raw in ("\x1b", "\x07", "\r", "\u202e", "\u2066"):
        assert raw not in log, repr(raw)
    assert log.count("\\x1b]52;c;") >= 2 and "\\u202e" in log  # shown, not obeyed
    for line in log.splitlines():  # no forged lines: each is one of ours
        assert re.match(r"\S+ (WARNING|ERROR) smsbatch\.web: webhook: ", line) or line.startswith(
            ("listening on ", "signatures are ")), line


# -- L5/L6: a secret in SMSBATCH_PUBLIC_URL's query ------------------------------------------

SECRET_URL = "https://hooks.example.com/sms?key=s3cr3t-query"


def test_a_query_secret_in_the_public_url_is_masked_at_start_in_rejections_stored_and_in_status(db_path, tmp_path):
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SMSBATCH_", "TWILIO_"))}
        env.update(SMSBATCH_DB=db_path, TWILIO_AUTH_TOKEN=TOKEN, SMSBATCH_PUBLIC_URL=SECRET_URL)
        proc = subprocess.Popen([sys.executable, "-m", "smsbatch", "serve", "--port", "0"], env=env,
                                stdout=subprocess.DEVNULL, stderr=log)
    try:
        wait_for(lambda: "signatures are" in open(log_path).read())
        port = int(open(log_path).read().split("listening on http://", 1)[1].split(":")[1].split("/")[0])
        assert exchange(port, [signed_request(form(10), url="https://old.example.com/sms")])[0] == 403
        wait_for(lambda: sqlite3.connect(db_path).execute("SELECT count(*) FROM rejections").fetchone()[0])
    finally:
        proc.terminate()
        proc.wait(timeout=15)
    log = open(log_path).read()
    assert "s3cr3t" not in log and "checked against https://hooks.example.com/sms?***" in log
    [(last_url,)] = sqlite3.connect(db_path).execute("SELECT last_url FROM rejections").fetchall()
    assert last_url == "https://hooks.example.com/sms?***"
    status = invoke(["status", "--json"], {"SMSBATCH_DB": db_path})
    assert status.exit_code == 0 and "s3cr3t" not in status.output


def test_status_json_masks_a_query_secret_stored_by_an_older_version(db_path, store):
    store.record_rejections([(int(time.time() // 60), 1, time.time(), SECRET_URL)], time.time())
    info = json.loads(invoke(["status", "--json"], {"SMSBATCH_DB": db_path}).output)
    assert info["last_rejected_signature_url"] == "https://hooks.example.com/sms?***"


def test_receipts_go_to_status_before_the_query_and_verify_through_a_real_server(real_settings, store, clock,
                                                                                 twilio_standin):
    from conftest import add, real_processor
    from smsbatch.web import make_app, make_server_for

    settings = real_settings.replace(public_url=SECRET_URL, ai_client_retries=0)
    add(store, "+15557770001", "hi", T0)
    clock.now = T0 + 10
    assert real_processor(settings, clock).run().counts["sent"] == 1
    [message] = twilio_standin.sent
    assert message["status_callback"] == "https://hooks.example.com/sms/status?key=s3cr3t-query"
    url, body, headers = twilio_standin.callback(message, "delivered")
    server = make_server_for(make_app(settings, clock=lambda: T0 + 20), "127.0.0.1", 0, threads=2)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        raw = raw_post(body, headers["HTTP_X_TWILIO_SIGNATURE"], path="/sms/status?key=s3cr3t-query")
        assert exchange(server.server_port, [raw])[0] == 200
    finally:
        server.shutdown()
        server.server_close()
    row = store.conn.execute("SELECT status FROM outbound WHERE sid = ?", (message["sid"],)).fetchone()
    assert row["status"] == "delivered"


# -- round 3, M4: every inbound field has Twilio's shape; a re-split cannot keep them --------

VICTIM, NEW_SID = "+15557770000", "SM" + "e" * 32


def signed_string(params):
    """What Twilio signs (besides the URL): the sorted names and values, joined."""
    return "".join(k + params[k] for k in sorted(params))


def post_forgery(port, captured, forged):
    """Post `forged` with the signature Twilio gave `captured` (checked to still match)."""
    assert signed_string(forged) == signed_string(captured)
    signature = RequestValidator(TOKEN).compute_signature(URL, captured)
    assert RequestValidator(TOKEN).validate(URL, forged, signature)  # validly signed
    return exchange(port, [raw_post(urlencode(forged).encode(), signature)])


def phones(db_path):
    return {row[0] for row in sqlite3.connect(db_path).execute("SELECT phone FROM messages")}


def test_a_re_split_whose_tail_field_is_one_twilio_sends_is_refused(server, db_path):
    """The round-3 forgery with its tail named ToZip, a field Twilio does send: the real
    From and MessageSid end up inside ToZip, which no Twilio-made ToZip holds."""
    captured = form(1, Body="hiFrom" + VICTIM + "MessageSid" + NEW_SID + "To+15550000000ToZip")
    signed = signed_string(captured)
    tail = signed[signed.index("ToZip") + len("ToZip"):]
    forged = {"AccountSid": captured["AccountSid"], "Body": "hi", "From": VICTIM, "MessageSid": NEW_SID,
              "To": "+15550000000", "ToZip": tail}
    status, _, body = post_forgery(server.server_port, captured, forged)
    assert status == 400 and b"ToZip" in body, (status, body)
    assert NEW_SID not in stored(db_path) and VICTIM not in phones(db_path)


def test_a_re_split_that_hides_the_real_fields_in_the_body_is_refused(server, db_path):
    """A WhatsApp user's ProfileName (a field after From and MessageSid) spells the forged
    fields; the forged Body swallows the real From, MessageSid and NumMedia up to it."""
    us, them = "whatsapp:+15550000000", "whatsapp:+15553330001"
    profile = "xFromwhatsapp:" + VICTIM + "MessageSid" + NEW_SID + "NumMedia0ProfileNameBob"
    captured = form(2, From=them, To=us, ProfileName=profile)
    forged = {"AccountSid": captured["AccountSid"],
              "Body": captured["Body"] + "From" + them + "MessageSid" + captured["MessageSid"] + "NumMedia0"
                      + "ProfileName" + "x",
              "From": "whatsapp:" + VICTIM, "MessageSid": NEW_SID, "NumMedia": "0", "ProfileName": "Bob", "To": us}
    status, _, body = post_forgery(server.server_port, captured, forged)
    assert status == 400 and b"Body" in body, (status, body)
    assert NEW_SID not in stored(db_path) and phones(db_path) == set()


def test_a_field_twilio_does_not_send_is_refused_even_when_signed(server, db_path):
    status, _, body = exchange(server.server_port, [signed_request(form(3, Note="hello"))])
    assert status == 400 and b"unknown field 'Note'" in body and stored(db_path) == set()


def twilio_sms(n):
    """An inbound SMS with every field Twilio sends (as bench/bench_webhook.py's twilio_form)."""
    sid = f"SM{n:032x}"
    return {"ToCountry": "US", "ToState": "CA", "SmsMessageSid": sid, "NumMedia": "0", "ToCity": "",
            "FromZip": "94105", "SmsSid": sid, "FromState": "CA", "SmsStatus": "received",
            "FromCity": "SAN FRANCISCO", "Body": "From +1 555 000 1111: is my order on its way? MessageSid?",
            "FromCountry": "US", "To": "+15550000000", "ToZip": "", "NumSegments": "1", "MessageSid": sid,
            "AccountSid": "AC" + "0" * 32, "From": f"+1555333{n:04d}", "ApiVersion": "2010-04-01",
            "MessagingServiceSid": "MG" + "a" * 32}


def test_the_forms_twilio_sends_are_accepted(server, db_path):
    """An SMS with the geographic fields, a picture message, a WhatsApp text (ProfileName,
    WaId), a short code and STOP with Advanced Opt-Out: all stored."""
    mms = dict(twilio_sms(2), MessageSid="MM" + "2" * 32, NumMedia="1", Body="",
               MediaUrl0=f"https://api.twilio.com/2010-04-01/Accounts/AC{'0' * 32}/Messages/MM{'2' * 32}"
                         f"/Media/ME{'3' * 32}", MediaContentType0="image/svg+xml")
    whatsapp = dict(form(4, From="whatsapp:+15553330004", To="whatsapp:+15550000000"),
                    ProfileName="Ana María (Bäckerei) 😀", WaId="15553330004", MessageType="text",
                    SmsStatus="received", NumSegments="1", ApiVersion="2010-04-01")
    stop = dict(twilio_sms(5), Body="STOP", OptOutType="STOP")
    short_code = dict(form(6), From="72345", Body="call me back, From+15553330006")
    texts = [twilio_sms(1), mms, whatsapp, stop, short_code]
    answers = [exchange(server.server_port, [signed_request(params)])[0] for params in texts]
    assert answers == [200] * len(texts)
    assert stored(db_path) == {params["MessageSid"] for params in texts}


# -- round 3, M7: `smsbatch.web:app` refuses to start, saying what is missing ----------------


@pytest.mark.parametrize("settings, says, not_said", [
    ({"TWILIO_AUTH_TOKEN": "a-token"}, "SMSBATCH_PUBLIC_URL is not set", "TWILIO_AUTH_TOKEN"),
    ({"SMSBATCH_PUBLIC_URL": URL}, "TWILIO_AUTH_TOKEN is not set", "SMSBATCH_PUBLIC_URL"),
    ({"TWILIO_AUTH_TOKEN": "a-token", "SMSBATCH_PUBLIC_URL": "https://[::1/sms"}, "SMSBATCH_PUBLIC_URL", "TWILIO"),
])
def test_the_wsgi_app_fails_when_loaded_naming_only_what_is_wrong(db_path, store, settings, says, not_said):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SMSBATCH_", "TWILIO_"))}
    env.update(SMSBATCH_DB=db_path, **settings)
    done = subprocess.run([sys.executable, "-c", "from smsbatch.web import app"], env=env, capture_output=True,
                          text=True, timeout=30)
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode != 0 and says in last and not_said not in last, done.stderr


def test_a_delivery_receipt_carrying_a_re_split_is_refused(server, db_path):
    """A receipt whose value holds `MessageSid<id>`: what a re-split moving the receipt onto
    another reply must leave behind."""
    from smsbatch.sms import status_callback_url

    receipt = {"MessageSid": "SM" + "1" * 32, "AccountSid": "AC" + "0" * 32, "To": "+15553330001",
               "MessageStatus": "deliveredMessageSidSM" + "2" * 32, "From": "+15550000000"}
    request = signed_request(receipt, path="/sms/status", url=status_callback_url(URL))
    status, _, body = exchange(server.server_port, [request])
    assert status == 400 and b"MessageStatus holds another field" in body, (status, body)
