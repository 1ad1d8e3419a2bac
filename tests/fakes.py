"""Small stand-in servers for OpenAI and Twilio, on 127.0.0.1 port 0.

The real `openai` and `twilio` clients talk to them over HTTP, so auth, serialisation
and error mapping are exercised. Each server takes a script of answers (consumed in
order, then "ok" forever) and records what it received.
"""

import json
import re
import secrets
import threading
import time
from email.utils import format_datetime
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlencode, urlparse


class QuietServer(ThreadingHTTPServer):
    """Clients that time out and hang up are part of the tests, not errors to print.
    A listen backlog of 64, not socketserver's 5: with more simultaneous new connections
    than that, the kernel drops SYNs and the client waits a second to send it again."""

    daemon_threads = True
    request_queue_size = 64

    def handle_error(self, request, client_address):
        pass


class StandIn:
    """Base: a threading HTTP server with a script of answers and a record of requests."""

    def __init__(self, script=()):
        self.script = list(script)
        self.lock = threading.Lock()
        self.requests = []
        self.times = []  # time.monotonic() of each request, as received
        standin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms wait for an ACK

            def log_message(self, *args):
                pass

            def do_GET(self):
                standin.dispatch(self, "GET")

            def do_POST(self):
                standin.dispatch(self, "POST")

        self.server = QuietServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server.server_port}"

    def take(self, request):
        """Record a request and return the next scripted action; "hang" never answers."""
        with self.lock:
            self.requests.append(request)
            self.times.append(time.monotonic())
            action = self.script.pop(0) if self.script else "ok"
        if action == "hang":
            time.sleep(30)
        return action

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    @classmethod
    def reply(cls, handler, status, payload):
        cls.raw(handler, status, json.dumps(payload).encode())

    @staticmethod
    def raw(handler, status, body, content_type="application/json"):
        handler.send_response(status)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    @staticmethod
    def read_body(handler):
        length = int(handler.headers.get("Content-Length") or 0)
        return handler.rfile.read(length) if length else b""


class FakeOpenAI(StandIn):
    """POST /v1/chat/completions. Script items: "ok", an HTTP status (int),
    ("delay", seconds) then ok, ("say", text): a 200 whose reply is `text`,
    "hang" (never answers within any sane timeout),
    ("echo-key", status): that error, its message quoting the API key it was sent,
    ("200", text): a 200 whose JSON body is `text` as is (cut-off JSON, or JSON without choices),
    or ("trickle", seconds): a good answer written one byte a second for that long, then cut
    off (no per-read timeout ever fires). Usage counts words: prompt and reply."""

    def __init__(self, script=(), delay=0.0):
        super().__init__(script)
        self.delay = delay
        self.calls = []  # the messages of each successful call
        self.models = {"gpt-4o-mini"}  # what GET /v1/models/{id} finds
        self.api_key = None  # when set, GET /v1/models/{id} answers 401 to any other key

    def model(self, handler, model_id):
        """GET /v1/models/{id}, as OpenAI answers it (404 model_not_found for an unknown id)."""
        if self.api_key and handler.headers.get("Authorization", "") != f"Bearer {self.api_key}":
            return self.reply(handler, 401, {"error": {"message": "Incorrect API key provided",
                                                       "type": "invalid_request_error", "code": "invalid_api_key"}})
        if model_id not in self.models:
            return self.reply(handler, 404, {"error": {"message": f"The model `{model_id}` does not exist",
                                                       "type": "invalid_request_error", "code": "model_not_found"}})
        self.reply(handler, 200, {"id": model_id, "object": "model", "created": 1700000000, "owned_by": "standin"})

    def dispatch(self, handler, method):
        body = self.read_body(handler)
        if method == "GET" and urlparse(handler.path).path.startswith("/v1/models/"):
            return self.model(handler, urlparse(handler.path).path.removeprefix("/v1/models/"))
        if method != "POST" or urlparse(handler.path).path != "/v1/chat/completions":  # like OpenAI: /v1 or 404
            return self.reply(handler, 404, {"error": {"message": "not found"}})
        action = self.take(body)
        if action == "hang":
            return
        if isinstance(action, tuple) and action[0] == "delay":
            time.sleep(action[1])
        elif self.delay:
            time.sleep(self.delay)
        if isinstance(action, int):
            return self.reply(handler, action, {"error": {"message": f"scripted {action}", "type": "x"}})
        if isinstance(action, tuple) and action[0] == "200":
            return self.raw(handler, 200, action[1].encode())
        if isinstance(action, tuple) and action[0] == "trickle":
            return self.trickle(handler, action[1])
        if isinstance(action, tuple) and action[0] == "echo-key":
            # like "Incorrect API key provided: ...", but echoing the whole key: the worst case
            key = handler.headers.get("Authorization", "").removeprefix("Bearer ")
            return self.reply(handler, action[1], {"error": {"message": f"Incorrect API key provided: {key}",
                                                             "type": "invalid_request_error", "code": "invalid_api_key"}})
        request = json.loads(body)
        with self.lock:
            self.calls.append(request["messages"])
        said = action[1] if isinstance(action, tuple) and action[0] == "say" else None
        self.reply(handler, 200, self.completion(request, said))

    @staticmethod
    def completion(request, said=None):
        last = request["messages"][-1]["content"]
        content = f"AI reply to: {last}" if said is None else said
        prompt = sum(len(m["content"].split()) for m in request["messages"])
        return {
            "id": "chatcmpl-" + secrets.token_hex(6), "object": "chat.completion", "created": int(time.time()),
            "model": request["model"],
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": len(content.split()),
                      "total_tokens": prompt + len(content.split())},
        }

    @staticmethod
    def trickle(handler, seconds):
        """Status line, headers and body, one byte a second: every read gets a byte in time."""
        body = b'{"choices": []}'
        raw = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
               % (len(body) + 1000, body))
        end = time.monotonic() + seconds
        for byte in raw:
            if time.monotonic() > end:
                break
            try:
                handler.wfile.write(bytes([byte]))
                handler.wfile.flush()
            except OSError:
                break
            time.sleep(1.0)
        handler.close_connection = True


class FakeTwilio(StandIn):
    """Twilio's Messages resource: POST creates, GET lists (filtered by To).

    Script items: "ok"; (status, code) for a Twilio error; "hang" (accept nothing,
    answer nothing); "accept-then-hang" (record the message as sent, then never answer,
    like a connection cut after Twilio accepted); ("accept-then", status, code) (record
    the message as sent, then answer that error); ("echo-auth", status) (an error whose
    message quotes the Authorization header it got and the token, like a misbehaving proxy);
    "accept-then-garbage" (record the message as sent, then answer 201 with a body that is not JSON);
    "accept-then-trickle" (record it, then answer one byte a second: no read timeout fires);
    ("error", status, code, message) (an error in Twilio's own words); ("sid", text) (accepted,
    under that MessageSid).

    GET Messages/{sid}.json fetches one message. `link_shortening` rewrites URLs in bodies as
    Twilio's Link Shortening does; `page_cap` lowers the largest page so a test sees several
    pages. Each message has a `status` (and `error_code`) a test may change; fetch and list
    report it; callback() builds the signed status callback Twilio would post. Once a message
    is sent or final, it has a `price` (PRICE unless a test sets one, any string Twilio might
    send) and `price_unit`; before that its price is null, as Twilio's is until it is priced.

    Hostile answers (the backfill's attacks): deliver_inbound(..., raw={...}) lists a text with
    those fields as given (a date that does not parse, `from: null`, ...); `next_link` makes
    every listing of texts to a number link on: "self" (to the page just served), "endless"
    (to ever new page numbers, serving the same page again), a URI or URL given as is, or
    ("meta", url) (a v1-style meta.next_page_url, which the twilio package prefers);
    `page_delay` slows each such page. Script item ("accept-as", {fields}): record the message,
    then answer 201 with those fields of its resource as given (a malformed SID, say).
    """
    URL = re.compile(r"https?://\S+")

    ACCOUNT = "AC" + "0" * 32
    TOKEN = "twilio-test-token"

    def __init__(self, script=(), list_script=(), link_shortening=False, page_cap=1000):
        super().__init__(script)
        self.list_script = list(list_script)
        self.link_shortening = link_shortening
        self.page_cap = page_cap
        self.fetched = []  # SIDs fetched one by one
        self.listed = []  # the query of each list request (one per page)
        self.sent = []  # dicts: sid, to, from, body, date_created
        self.numbers = []  # IncomingPhoneNumbers: dicts sid, phone_number, sms_url, sms_method
        self.account_requests = []  # (method, path?query) of the Account/IncomingPhoneNumbers requests
        self.services = {}  # messaging service sid -> its phone numbers (Messaging v1 PhoneNumbers)
        self.inbound = []  # texts Twilio received: sid, to, from, body, date_sent, media (content types)
        self.pages_served = 0
        self.next_link = None  # a hostile next-page link for the listings of texts To a number
        self.replies_link = None  # the same for the listings of our messages (From a number)
        self.clock = time.time  # when a sent message is created (a test may pin it to its `now`)
        self.page_delay = 0.0
        self.media_gone = set()  # SIDs of texts whose Media list answers 404 (deleted pictures)

    def dispatch(self, handler, method):
        body = self.read_body(handler)
        path = urlparse(handler.path)
        if self.serve_account(handler, method, path, body) or self.serve_service(handler, method, path):
            return
        if not path.path.startswith(f"/2010-04-01/Accounts/{self.ACCOUNT}/Messages"):
            return self.reply(handler, 404, {"code": 20404, "message": "not found", "status": 404})
        if handler.headers.get("Authorization", "") != self._basic():
            return self.reply(handler, 401, {"code": 20003, "message": "Authenticate", "status": 401})
        if method == "GET" and path.path.endswith("/Media.json"):
            return self.media_list(handler, path.path.split("/Messages/")[1].split("/")[0])
        if method == "GET" and "/Messages/" in path.path:
            return self.fetch(handler, path.path.split("/Messages/")[1].removesuffix(".json"))
        if method == "GET":
            return self.list(handler, parse_qs(path.query))
        form = {k: v[0] for k, v in parse_qs(body.decode(), keep_blank_values=True).items()}
        action = self.take(form)
        if isinstance(action, tuple) and action[0] == "accept-as":
            return self.reply(handler, 201, self.resource(self.record(form)) | action[1])
        if action == "hang":
            return
        if isinstance(action, tuple) and action[0] == "echo-auth":
            echo = f"bad request; you sent Authorization: {handler.headers.get('Authorization')} token={self.TOKEN}"
            return self.reply(handler, action[1], {"code": 20001, "message": echo, "status": action[1]})
        if isinstance(action, tuple) and action[0] == "error":  # ("error", status, code, message): Twilio's words
            return self.reply(handler, action[1], {"code": action[2], "message": action[3], "status": action[1]})
        if isinstance(action, tuple) and action[0] == "sid":  # ("sid", text): accepted under that MessageSid
            message = self.record(form)
            message["sid"] = action[1]
            return self.reply(handler, 201, self.resource(message))
        if isinstance(action, tuple) and action[0] == "accept-then":
            self.record(form)  # Twilio queued it, then the answer was an error anyway
            action = action[1:]
        if isinstance(action, tuple):
            status, code = action
            return self.reply(handler, status, {"code": code, "message": f"scripted {code}", "status": status})
        message = self.record(form)
        if action == "accept-then-garbage":
            return self.raw(handler, 201, b"<html>upstream hiccup</html>")
        if action == "accept-then-hang":
            time.sleep(30)
            return
        if action == "accept-then-trickle":  # accepted, then the answer comes a byte a second
            return FakeOpenAI.trickle(handler, 20)
        self.reply(handler, 201, self.resource(message))

    def record(self, form, at=None, queued=False):
        """Store a message as Twilio would; `queued`: not handed to a carrier yet (no DateSent)."""
        created = datetime.fromtimestamp(self.clock() if at is None else at, timezone.utc)
        body = form.get("Body")
        if self.link_shortening and body:
            body = self.URL.sub(lambda _: "https://twil.io/" + secrets.token_hex(4), body)
        message = {"sid": "SM" + secrets.token_hex(16), "to": form.get("To"), "from": form.get("From"),
                   "messaging_service_sid": form.get("MessagingServiceSid"), "body": body,
                   "status_callback": form.get("StatusCallback"), "date_created": created,
                   "date_sent": None if queued else created, "status": "queued", "error_code": None}
        with self.lock:
            self.sent.append(message)
        return message

    def list(self, handler, query):
        """GET Messages.json as Twilio answers it: both directions, newest first, filtered by
        To, From, DateSent> (on or after) and DateSent< (on or before), in pages of PageSize
        (default 50) linked by next_page_uri with a PageToken (the last SID of the page)."""
        with self.lock:
            action = self.list_script.pop(0) if self.list_script else "ok"
        if isinstance(action, tuple):
            status, code = action
            return self.reply(handler, status, {"code": code, "message": f"scripted {code}", "status": status})
        one = {k: v[0] for k, v in query.items()}
        with self.lock:
            self.listed.append(one)
            found = [m for m in self.inbound + self.sent if _matches(m, one)]
        found.sort(key=lambda m: (m.get("date_sent") or m["date_created"], m["sid"]), reverse=True)
        size = min(int(one.get("PageSize", 50)), self.page_cap)
        token = one.get("PageToken", "")
        start = next((i + 1 for i, m in enumerate(found) if "PA" + m["sid"] == token), 0)
        page = found[start:start + size]
        self.pages_served += 1
        path = urlparse(handler.path).path
        following, meta = None, None
        rest = {k: v for k, v in one.items() if k not in ("Page", "PageToken")}
        number = int(one.get("Page", 0)) + 1
        if start + size < len(found):
            following = path + "?" + urlencode({**rest, "Page": number, "PageToken": "PA" + page[-1]["sid"]})
        hostile = self.next_link if "To" in one else self.replies_link
        if hostile is not None:
            time.sleep(self.page_delay)
            page = found[:size]  # the same first page, whatever link was followed
            if hostile == "self":
                following = handler.path
            elif hostile == "endless":
                following = path + "?" + urlencode({**rest, "Page": number, "PageToken": f"PA{number}"})
            elif isinstance(hostile, tuple):
                meta = {"key": "messages", "next_page_url": hostile[1], "page": number - 1, "page_size": size}
            else:
                following = hostile
        answer = {"messages": [self.resource(m) for m in page], "next_page_uri": following,
                  "page": int(one.get("Page", 0)), "page_size": size, "start": start,
                  "end": start + len(page), "uri": handler.path,
                  "first_page_uri": handler.path, "previous_page_uri": None}
        self.reply(handler, 200, answer | ({"meta": meta} if meta else {}))

    def deliver_inbound(self, phone, to, body, at, media=(), raw=None):
        """A text Twilio received (its message log has it), whether or not our webhook got it.
        `raw`: fields listed as given instead (an odd record). Returns its MessageSid."""
        sid = "SM" + secrets.token_hex(16)
        sent = datetime.fromtimestamp(at, timezone.utc)
        with self.lock:
            self.inbound.append({"sid": sid, "to": to, "from": phone, "body": body, "date_created": sent,
                                 "date_sent": sent, "direction": "inbound", "status": "received",
                                 "media": list(media), "raw": dict(raw or {})})
        return sid

    def media_list(self, handler, sid):
        """GET Messages/{sid}/Media.json: the media of an inbound text."""
        with self.lock:
            message = next((m for m in self.inbound if m["sid"] == sid and sid not in self.media_gone), None)
        if message is None:
            return self.reply(handler, 404, {"code": 20404, "message": "not found", "status": 404})
        base = f"/2010-04-01/Accounts/{self.ACCOUNT}/Messages/{sid}/Media"
        items = [{"sid": f"ME{i:032d}", "parent_sid": sid, "account_sid": self.ACCOUNT, "content_type": kind,
                  "uri": f"{base}/ME{i:032d}.json"} for i, kind in enumerate(message["media"])]
        self.reply(handler, 200, {"media_list": items, "next_page_uri": None, "page": 0, "page_size": 50,
                                  "start": 0, "end": len(items), "uri": base + ".json",
                                  "first_page_uri": base + ".json", "previous_page_uri": None})

    PRICED = ("sent", "delivered", "undelivered", "read")  # like Twilio: null until the carrier leg is priced
    PRICE = "-0.00790"

    def resource(self, m):
        sent = m.get("date_sent")
        priced = m.get("status", "queued") in self.PRICED and m.get("direction", "outbound-api") != "inbound"
        return {"sid": m["sid"], "to": m["to"], "from": m["from"], "body": m["body"],
                "price": m.get("price", self.PRICE) if priced else None,
                "price_unit": m.get("price_unit", "USD"),
                "status": m.get("status", "queued"), "account_sid": self.ACCOUNT,
                "error_code": m.get("error_code"), "messaging_service_sid": m.get("messaging_service_sid"),
                "direction": m.get("direction", "outbound-api"), "num_segments": "1",
                "num_media": str(len(m.get("media", ()))),
                "date_created": format_datetime(m["date_created"]),
                "date_sent": format_datetime(sent) if sent else None, "date_updated": None,
                "uri": f"/2010-04-01/Accounts/{self.ACCOUNT}/Messages/{m['sid']}.json"} | m.get("raw", {})

    def fetch(self, handler, sid):
        with self.lock:
            self.fetched.append(sid)
            found = [m for m in self.sent if m["sid"] == sid]
        if not found:
            return self.reply(handler, 404, {"code": 20404, "message": "not found", "status": 404})
        self.reply(handler, 200, self.resource(found[0]))

    def callback(self, message, status, error_code=None, token=None):
        """The signed status callback Twilio would POST to the message's StatusCallback:
        (url, form body, headers)."""
        from twilio.request_validator import RequestValidator

        params = {"MessageSid": message["sid"], "MessageStatus": status, "AccountSid": self.ACCOUNT,
                  "To": message["to"], "From": message["from"] or "", "SmsSid": message["sid"],
                  "SmsStatus": status, "ApiVersion": "2010-04-01"}
        if error_code is not None:
            params["ErrorCode"] = str(error_code)
        url = message["status_callback"]
        signature = RequestValidator(token or self.TOKEN).compute_signature(url, params)
        return url, urlencode(params).encode(), {"HTTP_X_TWILIO_SIGNATURE": signature}

    def _basic(self):
        import base64

        return "Basic " + base64.b64encode(f"{self.ACCOUNT}:{self.TOKEN}".encode()).decode()

    # -- the Account and its IncomingPhoneNumbers (for `smsbatch check`) -------------

    def add_number(self, phone_number, sms_url="", sms_method="POST"):
        """Give the account a number whose incoming-message webhook is `sms_url`."""
        number = {"sid": "PN" + secrets.token_hex(16), "phone_number": phone_number, "sms_url": sms_url,
                  "sms_method": sms_method}
        with self.lock:
            self.numbers.append(number)
        return number

    def serve_account(self, handler, method, path, body):
        """GET Accounts/{sid}.json, GET IncomingPhoneNumbers.json (PhoneNumber filter, paged with
        PageSize/Page and next_page_uri), POST IncomingPhoneNumbers/{sid}.json (update).
        Returns False for any other path (the Messages resource)."""
        base = f"/2010-04-01/Accounts/{self.ACCOUNT}"
        if not path.path.startswith("/2010-04-01/Accounts/") or path.path.startswith(base + "/Messages"):
            return False
        with self.lock:
            self.account_requests.append((method, handler.path))
        if handler.headers.get("Authorization", "") != self._basic():
            self.reply(handler, 401, {"code": 20003, "message": "Authenticate", "status": 401,
                                      "more_info": "https://www.twilio.com/docs/errors/20003"})
        elif method == "GET" and path.path == base + ".json":
            self.reply(handler, 200, {"sid": self.ACCOUNT, "friendly_name": "Stand-in", "status": "active",
                                      "type": "Full", "auth_token": self.TOKEN, "uri": base + ".json"})
        elif method == "GET" and path.path == base + "/IncomingPhoneNumbers.json":
            self.list_numbers(handler, base, parse_qs(path.query))
        elif method == "POST" and path.path.startswith(base + "/IncomingPhoneNumbers/PN"):
            self.update_number(handler, path.path.rsplit("/", 1)[1].removesuffix(".json"), body)
        else:
            self.reply(handler, 404, {"code": 20404, "message": "The requested resource was not found",
                                      "status": 404})
        return True

    def list_numbers(self, handler, base, query):
        from urllib.parse import urlencode

        wanted = query.get("PhoneNumber", [None])[0]
        size, page = min(int(query.get("PageSize", ["50"])[0]), self.page_cap), int(query.get("Page", ["0"])[0])
        with self.lock:
            # like Twilio's, the filter matches partial numbers: "+1555000" finds "+15550001234"
            found = [n for n in self.numbers if wanted is None or wanted in n["phone_number"]]
        chunk = found[page * size:(page + 1) * size]
        more = (page + 1) * size < len(found)
        params = ({"PhoneNumber": wanted} if wanted else {}) | {"PageSize": size, "Page": page + 1,
                                                                "PageToken": f"PA{page + 1}"}
        uri = f"{base}/IncomingPhoneNumbers.json"
        self.reply(handler, 200, {
            "incoming_phone_numbers": [self.number_resource(base, n) for n in chunk],
            "next_page_uri": f"{uri}?{urlencode(params)}" if more else None, "page": page, "page_size": size,
            "start": page * size, "end": page * size + len(chunk), "uri": handler.path,
            "first_page_uri": uri, "previous_page_uri": None})

    def serve_service(self, handler, method, path):
        """GET /v1/Services/{sid}/PhoneNumbers (Twilio's Messaging API, on the same stand-in):
        the service's numbers, paged with PageSize/Page and meta.next_page_url like Twilio.
        Returns False for any other path."""
        match = re.fullmatch(r"/v1/Services/(MG\w+)/PhoneNumbers", path.path)
        if not match or method != "GET":
            return False
        with self.lock:
            self.account_requests.append((method, handler.path))
        if handler.headers.get("Authorization", "") != self._basic():
            self.reply(handler, 401, {"code": 20003, "message": "Authenticate", "status": 401})
            return True
        sid, query = match.group(1), parse_qs(path.query)
        if sid not in self.services:
            self.reply(handler, 404, {"code": 20404, "message": "The requested resource was not found", "status": 404})
            return True
        size, page = min(int(query.get("PageSize", ["50"])[0]), self.page_cap), int(query.get("Page", ["0"])[0])
        numbers = self.services[sid][page * size:(page + 1) * size]
        url = f"{self.url}/v1/Services/{sid}/PhoneNumbers"
        more = (page + 1) * size < len(self.services[sid])
        self.reply(handler, 200, {
            "phone_numbers": [{"sid": "PN" + secrets.token_hex(16), "account_sid": self.ACCOUNT, "service_sid": sid,
                               "phone_number": n, "country_code": "US", "capabilities": ["SMS"],
                               "url": f"{url}/PN0"} for n in numbers],
            "meta": {"page": page, "page_size": size, "first_page_url": f"{url}?PageSize={size}&Page=0",
                     "previous_page_url": None, "url": f"{url}?PageSize={size}&Page={page}",
                     "next_page_url": f"{url}?PageSize={size}&Page={page + 1}" if more else None,
                     "key": "phone_numbers"}})
        return True

    def update_number(self, handler, sid, body):
        form = {k: v[0] for k, v in parse_qs(body.decode(), keep_blank_values=True).items()}
        with self.lock:
            number = next((n for n in self.numbers if n["sid"] == sid), None)
            if number is not None:
                number["sms_url"] = form.get("SmsUrl", number["sms_url"])
                number["sms_method"] = form.get("SmsMethod", number["sms_method"])
        if number is None:
            return self.reply(handler, 404, {"code": 20404, "message": "not found", "status": 404})
        self.reply(handler, 200, self.number_resource(f"/2010-04-01/Accounts/{self.ACCOUNT}", number))

    def number_resource(self, base, n):
        return {"sid": n["sid"], "account_sid": self.ACCOUNT, "phone_number": n["phone_number"],
                "friendly_name": n["phone_number"], "sms_url": n["sms_url"], "sms_method": n["sms_method"],
                "capabilities": {"sms": True, "mms": True, "voice": True},
                "uri": f"{base}/IncomingPhoneNumbers/{n['sid']}.json"}

    def bodies_to(self, phone):
        with self.lock:
            return [m["body"] for m in self.sent if m["to"] == phone]


def _twilio_time(text):
    """A DateSent filter value: a day (YYYY-MM-DD, its midnight) or an ISO-8601 moment."""
    if len(text) == 10:
        return datetime.fromisoformat(text).replace(tzinfo=timezone.utc)
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _matches(message, query):
    """Does a message pass Twilio's list filters (To, From, DateSent>, DateSent<)?"""
    if "To" in query and message["to"] != query["To"]:
        return False
    if "From" in query and message["from"] != query["From"]:
        return False
    sent = message.get("date_sent")
    if "DateSent>" in query and (sent is None or sent < _twilio_time(query["DateSent>"])):
        return False
    if "DateSent<" in query and (sent is None or sent > _twilio_time(query["DateSent<"])):
        return False
    return True


def provider_env(openai, twilio, **extra):
    """Environment that points the real clients at the stand-ins."""
    env = {
        "OPENAI_API_KEY": "sk-test-standin-key",
        "OPENAI_BASE_URL": openai.url + "/v1",
        "TWILIO_ACCOUNT_SID": FakeTwilio.ACCOUNT,
        "TWILIO_AUTH_TOKEN": FakeTwilio.TOKEN,
        "TWILIO_FROM_NUMBER": "+15550000000",
        "SMSBATCH_TWILIO_BASE_URL": twilio.url,
        "SMSBATCH_AI": "openai",
        "SMSBATCH_SMS": "twilio",
    }
    env.update({k: str(v) for k, v in extra.items()})
    return env


class Bystander(StandIn):
    """Another host: records each request's method, path and Authorization header, and
    answers an empty page of messages (where a foreign next-page link would lead)."""

    def dispatch(self, handler, method):
        self.take((method, handler.path, handler.headers.get("Authorization")))
        self.reply(handler, 200, {"messages": [], "next_page_uri": None, "page": 1, "page_size": 50})


class WebPage(StandIn):
    """A web server that is not an API: every GET and POST gets 200 and an HTML page (a
    base URL pointed at the wrong host)."""

    def dispatch(self, handler, method):
        self.take(self.read_body(handler))
        self.raw(handler, 200, b"<html><body>welcome</body></html>", "text/html")


class ChatHook(StandIn):
    """An incoming chat webhook (Slack, Mattermost, Discord's /slack): takes a POSTed JSON
    {"text": ...} and answers 200 "ok", as Slack does. Script items: "ok", an HTTP status
    (int), "hang" (never answers within any sane timeout)."""

    def dispatch(self, handler, method):
        action = self.take(self.read_body(handler))
        status = action if isinstance(action, int) else 200
        self.raw(handler, status, b"ok" if status == 200 else b"server error", "text/plain")

    @property
    def texts(self):
        """The text of every alert received, tries included, in order."""
        with self.lock:
            return [json.loads(body)["text"] for body in self.requests]


def message_sid(label):
    """A Twilio-shaped MessageSid (SM and 32 hex digits) that spells `label` (at most 16
    characters), so tests can name their texts and the webhook still takes them."""
    return "SM" + label.encode().hex().ljust(32, "0")[:32]
