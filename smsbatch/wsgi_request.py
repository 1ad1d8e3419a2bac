"""A request read whole, answered by wsgiref into memory (QuietHandler, LeanServerHandler),
and where a request in a connection's buffer ends (examine): the HTTP half of smsbatch.server.
The two must agree on where a header block ends (header_end, parse_request): a kept
connection's next request begins there."""

import io
import time
from wsgiref.handlers import format_date_time
from wsgiref.simple_server import ServerHandler, WSGIRequestHandler

MAX_HEAD = 16 * 1024  # a header block larger than this is refused (431)


class LeanServerHandler(ServerHandler):
    """wsgiref's ServerHandler, sending the status line, Date and Server in one piece
    (the date text is made once a second) instead of three writes. `keep_alive`: the
    request allows it; `kept` says whether the answer kept it (HTTP/1.1 with a length)."""

    _date = (0, "")
    keep_alive = kept = False
    app_environ = None  # the environ the app was given (close() drops self.environ)

    def setup_environ(self):
        """wsgiref's, keeping the environ the app is given (see QuietHandler.handle)."""
        super().setup_environ()
        self.app_environ = self.environ

    def send_preamble(self):
        """Status line, Date and Server headers in one write."""
        if not (self.origin_server and self.client_is_modern()):
            return super().send_preamble()
        # Without a Content-Length the end of the answer is the connection's close.
        self.kept = self.keep_alive and "Content-Length" in self.headers
        self.http_version = "1.1" if self.kept else "1.0"
        now = int(time.time())
        second, date = LeanServerHandler._date
        if second != now:
            date = format_date_time(now)
            LeanServerHandler._date = (now, date)
        lines = [f"HTTP/{self.http_version} {self.status}\r\n"]
        if "Date" not in self.headers:
            lines.append(f"Date: {date}\r\n")
        if self.server_software and "Server" not in self.headers:
            lines.append(f"Server: {self.server_software}\r\n")
        self._write("".join(lines).encode("iso-8859-1"))


class QuietHandler(WSGIRequestHandler):
    """wsgiref's handler for a request already read whole, answering into memory (the
    server sends the answer once it may go out), without a stderr line per request.
    The environ carries `smsbatch.received`: the monotonic time the request was whole; the app
    may put `smsbatch.answered` in it (see handle())."""

    keep = False  # the answer keeps the connection open for the next request
    answered = None  # environ["smsbatch.answered"], if the app left one

    def __init__(self, request, client_address, server, raw=b"", received=None):
        self.raw, self.received = raw, received
        super().__init__(request, client_address, server)

    def setup(self):
        """Memory files instead of socket files."""
        self.connection = self.request
        self.rfile = io.BytesIO(self.raw)
        self.wfile = io.BytesIO()

    def finish(self):
        """Nothing to flush: the server sends wfile's contents."""

    def log_message(self, format, *args):
        """No line per request."""

    def parse_request(self):
        """http.server's parse_request for HTTP/1.0 and 1.1, with a plain header parser
        (its email parser cost more CPU than the rest of a webhook request). Anything
        else, or a malformed header line, gets 400 (False)."""
        self.command, self.request_version, self.close_connection = None, "HTTP/1.0", True
        self.requestline = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
        words = self.requestline.split()
        if len(words) != 3 or words[2] not in ("HTTP/1.0", "HTTP/1.1"):
            self.send_error(400, "Bad request line")
            return False
        self.command, self.path, self.request_version = words
        headers = []
        while True:
            line = str(self.rfile.readline(65537), "iso-8859-1")
            if line in ("\r\n", "\n", ""):
                break
            name, colon, value = line.partition(":")
            # No folded lines, no space before the colon: where parsers disagree, requests get smuggled.
            if not colon or not name or name != name.strip() or len(headers) >= 100:
                self.send_error(400, "Bad header line")
                return False
            headers.append((name, value.strip()))
        self.headers = PlainHeaders(headers)
        return True

    def get_environ(self):
        """wsgiref's environ plus smsbatch.received."""
        environ = super().get_environ()
        environ["smsbatch.received"] = self.received if self.received is not None else time.monotonic()
        return environ

    def handle(self):
        """WSGIRequestHandler.handle, with LeanServerHandler."""
        self.raw_requestline = self.rfile.readline(65537)
        if len(self.raw_requestline) > 65536:
            self.requestline = ""
            self.request_version = ""
            self.command = ""
            self.send_error(414)
            return
        if not self.parse_request():
            return
        handler = LeanServerHandler(self.rfile, self.wfile, self.get_stderr(), self.get_environ(),
                                    multithread=False)
        handler.request_handler = self
        handler.keep_alive = self.request_version == "HTTP/1.1" and not self.server.stopping and \
            "close" not in (self.headers.get("Connection") or "").lower()
        handler.run(self.server.get_app())
        self.keep = handler.kept
        # An app whose answer waits for a COMMIT may leave a callable here: the server calls it
        # when it sends that answer (None), or a 503 in its place ("503 Service Unavailable").
        self.answered = (handler.app_environ or {}).get("smsbatch.answered")


class PlainHeaders:
    """Request headers as wsgiref's get_environ reads them (get, [], items, get_content_type)."""

    def __init__(self, pairs):
        self._pairs = pairs
        self._first = {}
        for name, value in pairs:
            self._first.setdefault(name.lower(), value)

    def get(self, name, default=None):
        """The first value of header `name` (any case), or `default`."""
        return self._first.get(name.lower(), default)

    def __getitem__(self, name):
        return self._first.get(name.lower())

    def items(self):
        """Every (name, value), in order."""
        return list(self._pairs)

    def get_content_type(self):
        """The default type, as email.message's (get_environ asks only when there is none)."""
        return "text/plain"


def examine(buffer, max_body):
    """None while the request at the start of `buffer` is incomplete, its length once it
    is whole (headers and Content-Length bytes of body), else (status, reason) to refuse
    it with at once."""
    end, start = header_end(buffer)
    if end < 0:
        return ("431 Request Header Fields Too Large", "header block too large") if len(buffer) > MAX_HEAD else None
    if end > MAX_HEAD:
        return "431 Request Header Fields Too Large", "header block too large"
    lengths = []
    for line in bytes(buffer[:end]).split(b"\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"transfer-encoding":
            return "411 Length Required", "send a Content-Length, not Transfer-Encoding"
        if name == b"content-length":
            lengths.append(value.strip())
    if len(lengths) > 1:
        return "400 Bad Request", "more than one Content-Length"
    length = 0
    if lengths:
        value = lengths[0]
        if not value.isdigit() or len(value) > 12:  # bytes.isdigit(): ASCII digits only, no '9_1'
            return "400 Bad Request", "bad Content-Length"
        length = int(value)
    if length > max_body:
        return "413 Content Too Large", f"body over {max_body} bytes"
    return start + length if len(buffer) - start >= length else None


def header_end(buffer):
    """(end of the header block, start of the body) in buffer, or (-1, -1) if not there
    yet. Lines may end in CRLF or, from hand-typed clients, LF alone."""
    # The block ends at the first empty line as QuietHandler.parse_request reads it: "\r\n"
    # or "\n" after a "\n", whatever ended the line before (so "\n\r\n" too). Were the two
    # to disagree, a kept connection's next request would be framed as more headers of
    # this one: swallowed, never stored nor answered.
    crlf = buffer.find(b"\n\r\n")
    lf = buffer.find(b"\n\n")
    if crlf >= 0 and (lf < 0 or crlf < lf):
        return crlf, crlf + 3
    if lf >= 0:
        return lf, lf + 2
    return -1, -1
