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

    @staticmethod
    def reply(handler, status, payload):
        body = json.dumps(payload).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    @staticmethod
    def read_body(handler):
        length = int(handler.headers.get("Content-Length") or 0)
        return handler.rfile.read(length) if length else b""


class FakeOpenAI(StandIn):
    """POST /v1/chat/completions. Script items: "ok", an HTTP status (int),
    ("delay", seconds) then ok, "hang" (never answers within any sane timeout),
    ("trickle", seconds): a good answer written one byte a second for that long, then cut
    off (no per-read timeout ever fires), or ("echo-key", status): that error, its message
    quoting the API key it was sent. Usage counts words: prompt and reply."""

    def __init__(self, script=(), delay=0.0):
        super().__init__(script)
        self.delay = delay
        self.calls = []  # the messages of each successful call

    def dispatch(self, handler, method):
        body = self.read_body(handler)
        if method != "POST" or not handler.path.endswith("/chat/completions"):
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
        self.reply(handler, 200, self.completion(request))

    @staticmethod
    def completion(request):
        last = request["messages"][-1]["content"]
        content = f"AI reply to: {last}"
        prompt = sum(len(m["content"].split()) for m in request["messages"])
        return {
            "id": "chatcmpl-" + secrets.token_hex(6), "object": "chat.completion", "created": int(time.time()),
            "model": request["model"],
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": len(content.split()),
                      "total_tokens": prompt + len(content.split())},
        }

    def trickle(self, handler, seconds):
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
    """Twilio's Messages resource: POST creates, GET lists (newest first, filtered by To,
    From, DateSent> and DateSent<, paged by PageSize with next_page_uri) or fetches one.

    Script items: "ok"; (status, code) for a Twilio error; "hang" (accept nothing,
    answer nothing); "accept-then-hang" (record the message as sent, then never answer,
    like a connection cut after Twilio accepted); ("accept-then", status, code) (record
    the message as sent, then answer that error).

    `link_shortening` rewrites URLs in bodies as Twilio's Link Shortening does; `page_cap`
    lowers the largest page (Twilio's is 1000) so a test sees several pages. Each message
    has a `status` (and `error_code`) a test may change; fetch and list report it.
    """

    ACCOUNT = "AC" + "0" * 32
    TOKEN = "twilio-test-token"
    URL = re.compile(r"https?://\S+")

    def __init__(self, script=(), list_script=(), link_shortening=False, page_cap=1000):
        super().__init__(script)
        self.list_script = list(list_script)
        self.link_shortening = link_shortening
        self.page_cap = page_cap
        self.sent = []  # dicts: sid, to, from, body, date_created, date_sent, status, error_code
        self.fetched = []  # SIDs fetched one by one
        self.listed = []  # the query of each list request (one per page)

    def dispatch(self, handler, method):
        body = self.read_body(handler)
        path = urlparse(handler.path)
        base = f"/2010-04-01/Accounts/{self.ACCOUNT}/Messages"
        if not path.path.startswith(base):
            return self.reply(handler, 404, {"code": 20404, "message": "not found", "status": 404})
        if handler.headers.get("Authorization", "") != self._basic():
            return self.reply(handler, 401, {"code": 20003, "message": "Authenticate", "status": 401})
        if method == "GET" and path.path.startswith(base + "/"):
            return self.fetch(handler, path.path[len(base) + 1:].removesuffix(".json"))
        if method == "GET":
            return self.list(handler, path.path, parse_qs(path.query))
        form = {k: v[0] for k, v in parse_qs(body.decode(), keep_blank_values=True).items()}
        action = self.take(form)
        if action == "hang":
            return
        if isinstance(action, tuple) and action[0] == "accept-then":
            self.record(form)  # Twilio queued it, then the answer was an error anyway
            action = action[1:]
        if isinstance(action, tuple):
            status, code = action
            return self.reply(handler, status, {"code": code, "message": f"scripted {code}", "status": status})
        message = self.record(form)
        if action == "accept-then-hang":
            time.sleep(30)
            return
        self.reply(handler, 201, self.resource(message))

    def record(self, form, at=None, queued=False):
        """Store a message as Twilio would; `queued`: not handed to a carrier yet (no DateSent)."""
        created = datetime.fromtimestamp(time.time() if at is None else at, timezone.utc)
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

    def fetch(self, handler, sid):
        with self.lock:
            self.fetched.append(sid)
            found = [m for m in self.sent if m["sid"] == sid]
        if not found:
            return self.reply(handler, 404, {"code": 20404, "message": "not found", "status": 404})
        self.reply(handler, 200, self.resource(found[0]))

    def list(self, handler, path, query):
        with self.lock:
            action = self.list_script.pop(0) if self.list_script else "ok"
        if isinstance(action, tuple):
            status, code = action
            return self.reply(handler, status, {"code": code, "message": f"scripted {code}", "status": status})
        one = {k: v[0] for k, v in query.items()}
        with self.lock:
            self.listed.append(one)
            found = [m for m in self.sent if self.matches(m, one)]
        # Newest first; messages not yet sent (no DateSent) first of all.
        found.sort(key=lambda m: (m["date_sent"] is None, m["date_sent"] or m["date_created"], m["date_created"]),
                   reverse=True)
        size = min(int(one.get("PageSize", 50)), self.page_cap)
        page = int(one.get("Page", 0))
        chunk = found[page * size:(page + 1) * size]
        more = (page + 1) * size < len(found)
        following = urlencode({**{k: v for k, v in one.items() if k not in ("Page", "PageToken")},
                               "Page": page + 1, "PageToken": "PA" + secrets.token_hex(8)})
        self.reply(handler, 200, {"messages": [self.resource(m) for m in chunk],
                                  "next_page_uri": f"{path}?{following}" if more else None,
                                  "page": page, "page_size": size, "start": page * size,
                                  "end": page * size + len(chunk), "uri": handler.path,
                                  "first_page_uri": handler.path, "previous_page_uri": None})

    @staticmethod
    def matches(m, query):
        """Twilio's list filters; DateSent> and DateSent< include the bound (Twilio's >= and <=)."""
        if "To" in query and m["to"] != query["To"]:
            return False
        if "From" in query and m["from"] != query["From"]:
            return False
        for name, later in (("DateSent>", True), ("DateSent<", False)):
            if name in query:
                bound = datetime.fromisoformat(query[name].replace("Z", "+00:00"))
                if m["date_sent"] is None or (m["date_sent"] < bound if later else m["date_sent"] > bound):
                    return False
        return True

    def resource(self, m):
        sent = m.get("date_sent")
        return {"sid": m["sid"], "to": m["to"], "from": m["from"], "body": m["body"], "status": m.get("status", "queued"),
                "error_code": m.get("error_code"), "messaging_service_sid": m.get("messaging_service_sid"),
                "account_sid": self.ACCOUNT, "direction": "outbound-api", "num_segments": "1",
                "date_created": format_datetime(m["date_created"]),
                "date_sent": format_datetime(sent) if sent else None, "date_updated": None}

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

    def bodies_to(self, phone):
        with self.lock:
            return [m["body"] for m in self.sent if m["to"] == phone]


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
