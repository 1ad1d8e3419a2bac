"""The HTTP server: wsgiref, answering complete requests at once and slow ones from a pool.

It runs any WSGI app; if the app offers `burst()` (the webhook does), the requests that
arrived complete together share one database transaction. It never imports the app.
"""

import io
import queue
import socket
import threading
import time
from contextlib import nullcontext
from types import SimpleNamespace
from wsgiref.handlers import format_date_time
from wsgiref.simple_server import ServerHandler, WSGIRequestHandler, WSGIServer, make_server

SOCKET_TIMEOUT = 5.0
PEEK_BYTES = 80 * 1024  # a complete request larger than this goes to the pool (the webhook takes 64 KiB bodies)


class LeanServerHandler(ServerHandler):
    """wsgiref's ServerHandler, sending the status line, Date and Server in one piece
    (the date text is made once a second) instead of three writes."""

    _date = (0, "")

    def send_preamble(self):
        """Status line, Date and Server headers in one write."""
        if not (self.origin_server and self.client_is_modern()):
            return super().send_preamble()
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
    """wsgiref's handler without a stderr line per request (cost, and client addresses),
    with a buffered writer so a whole answer leaves in one send (wsgiref flushes it
    after the body)."""

    wbufsize = 16 * 1024

    def __init__(self, request, client_address, server, raw=None):
        self.raw = raw  # the whole request, already read: answer into memory (see setup)
        super().__init__(request, client_address, server)

    def setup(self):
        """Socket files as wsgiref's, or memory files for a request already read."""
        if self.raw is None:
            return super().setup()
        self.connection = self.request
        self.rfile = io.BytesIO(self.raw)
        self.wfile = io.BytesIO()  # the server sends it once the answer may go out

    def finish(self):
        """Flush and close the socket files (memory files: the server sends them)."""
        if self.raw is None:
            super().finish()

    def log_message(self, format, *args):
        """No line per request."""

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
        handler.run(self.server.get_app())


class PooledWSGIServer(WSGIServer):
    """wsgiref's server, answering complete requests at once and slow ones from a pool.

    The accepting thread takes every connection that is waiting (up to `burst_max`) and
    peeks at each without blocking. A request that has fully arrived (headers and
    Content-Length bytes of body, as Twilio sends it) is read and answered by the
    accepting thread itself: nothing can block on the client, and no thread hand-off is
    paid. If the app offers `burst()` (the Webhook does), the complete requests of one
    burst share one database transaction, and their answers are sent only after its
    COMMIT; if anything in the burst fails, nothing of it is committed and the pool
    runs the requests again (where a text that fails, fails alone). Any other connection (a slow or stalled client,
    a request still arriving) goes to a fixed pool of reused threads, where it holds one
    thread for at most SOCKET_TIMEOUT per read, so it cannot hold up the others.

    Measured on 2 cores: handing every connection to a pool thread cost about 200 us of
    CPU per request in thread switches and GIL hand-offs, more than the request itself;
    a COMMIT per text cost about 60 us more.
    """

    request_queue_size = 128
    allow_reuse_address = True
    close_wait = SOCKET_TIMEOUT + 1.0  # longest server_close() waits for requests in progress
    peek_bytes = PEEK_BYTES
    burst_max = 32  # most connections taken (and committed together) per wake-up

    def __init__(self, address, handler, threads=16):
        self.jobs = queue.SimpleQueue()
        self.workers = []  # server_close() runs if binding fails, before any worker exists
        super().__init__(address, handler)
        if hasattr(socket, "TCP_DEFER_ACCEPT"):  # Linux: wake accept() once the request has data
            try:
                self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 1)
            except OSError:
                pass
        self.socket.setblocking(False)  # accept() until nothing is waiting
        self._peek = bytearray(self.peek_bytes)
        self.workers = [threading.Thread(target=self._work, name=f"smsbatch-web-{i}", daemon=True)
                        for i in range(threads)]
        for worker in self.workers:
            worker.start()

    def _handle_request_noblock(self):
        ready = []
        while len(ready) < self.burst_max:
            try:
                request, client_address = self.get_request()
            except OSError:  # nothing more waiting (BlockingIOError), or a client gave up
                break
            if not self.verify_request(request, client_address):
                self.shutdown_request(request)
                continue
            raw = self._take_complete(request)
            if raw is None:
                self.jobs.put((request, client_address))
            else:
                ready.append((request, client_address, raw))
        if ready:
            self._answer(ready)

    def _take_complete(self, request):
        """The whole request if it has arrived (never blocks), else None (nothing read)."""
        try:
            if _MSG_DONTWAIT:
                n = request.recv_into(self._peek, self.peek_bytes, socket.MSG_PEEK | _MSG_DONTWAIT)
            else:  # pragma: no cover - platforms without MSG_DONTWAIT
                request.setblocking(False)
                try:
                    n = request.recv_into(self._peek, self.peek_bytes, socket.MSG_PEEK)
                finally:
                    request.setblocking(True)
            if not request_complete(self._peek, n):
                return None
            request.settimeout(SOCKET_TIMEOUT)
            raw = request.recv(n)  # the n bytes are there: this returns them at once
            while len(raw) < n:  # pragma: no cover - only if the kernel splits them
                more = request.recv(n - len(raw))
                if not more:
                    return None
                raw += more
            return raw
        except OSError:  # nothing there yet (BlockingIOError), or the client went away
            return None

    def _answer(self, ready):
        burst = getattr(self.get_app(), "burst", None)
        answers = []
        with burst() if burst is not None else nullcontext(_NO_BURST) as state:
            if state is not None:
                for request, client_address, raw in ready:
                    if state.failed:
                        break
                    answers.append(self._run(request, client_address, raw))
        if state is None or state.failed:
            # Nothing was committed and nothing was sent (or another thread was writing):
            # the pool runs them again, each in its own transaction, in parallel, so this
            # thread goes back to accepting rather than waiting out a locked database.
            for job in ready:
                self.jobs.put(job)
            return
        for (request, _, _), answer in zip(ready, answers):
            self._send(request, answer)

    def _send(self, request, answer):
        try:
            request.sendall(answer)
        except OSError:
            pass
        finally:
            self.shutdown_request(request)

    def _run(self, request, client_address, raw):
        """Answer a request that was read whole, into memory."""
        try:
            return self.RequestHandlerClass(request, client_address, self, raw).wfile.getvalue()
        except Exception:
            self.handle_error(request, client_address)
            return b""

    def _work(self):
        while True:
            job = self.jobs.get()
            if job is None:
                return
            self._handle(*job)

    def _handle(self, request, client_address, raw=None):
        if raw is not None:  # read whole already; its burst failed
            return self._send(request, self._run(request, client_address, raw))
        try:
            request.settimeout(SOCKET_TIMEOUT)
            self.finish_request(request, client_address)
        except (OSError, socket.timeout):
            pass
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)

    def server_close(self):
        """Close the listening socket; requests in progress in the pool may finish."""
        for _ in self.workers:
            self.jobs.put(None)
        super().server_close()
        deadline = time.monotonic() + self.close_wait
        for worker in self.workers:
            if worker is not threading.current_thread():
                worker.join(max(0.0, deadline - time.monotonic()))


_MSG_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0)
_NO_BURST = SimpleNamespace(failed=False)  # an app without burst(): no transaction that could fail


def request_complete(buffer, n):
    """True if buffer[:n] holds a whole HTTP request: the header block and Content-Length
    bytes of body. Anything unusual (chunked, a bad length, LF-only lines) says False, and
    the request is read by a pool thread, with its timeout, as before."""
    end = buffer.find(b"\r\n\r\n", 0, n)
    if end < 0:
        return False
    head = bytes(buffer[:end]).lower()
    if b"transfer-encoding" in head:
        return False
    length = 0
    at = head.find(b"\r\ncontent-length:")
    if at >= 0:
        stop = head.find(b"\r\n", at + 2)
        value = head[at + 17: stop if stop >= 0 else len(head)].strip()
        if not value.isdigit() or head.find(b"\r\ncontent-length:", at + 2) >= 0:
            return False
        length = int(value)
    return n - end - 4 >= length


def make_server_for(wsgi_app, host="127.0.0.1", port=8080, threads=16):
    """A pooled wsgiref server around `wsgi_app`; port 0 picks a free port."""
    return make_server(
        host, port, wsgi_app, server_class=lambda addr, handler: PooledWSGIServer(addr, handler, threads),
        handler_class=QuietHandler,
    )
