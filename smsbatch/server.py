"""The HTTP server: wsgiref's request handling, with one thread that reads every connection.

The accepting thread keeps every connection in a selector and buffers what arrives
until the request is whole (headers and Content-Length bytes of body) or its deadline
passes (408). Whole requests are answered by that thread at once; if the app offers
`burst()` (the webhook does), the ones that arrived together share one database
transaction. A slow client therefore holds only a buffer, never a thread, and a
request split over many TCP segments is served like any other. The pool threads only
run writes that must wait for the database lock. It never imports the app.

HTTP/1.1 connections are kept open for the client's next request (keep-alive: a proxy
in front, such as Caddy or nginx with `keepalive`, then opens no connection per text).
A kept connection with no request under way is closed after KEEP_ALIVE_SECONDS, longer
than the proxies keep theirs idle, so that they close first and never send a text into
our close. Answers that close the connection say HTTP/1.0, as before.
"""

import collections
import errno
import heapq
import itertools
import logging
import queue
import selectors
import socket
import threading
import time
from wsgiref.simple_server import WSGIServer, make_server

from smsbatch.rejections import RateLimitedLog, printable
from smsbatch.wsgi_request import QuietHandler, examine

log = logging.getLogger("smsbatch.web")
REQUEST_DEADLINE = 5.0  # seconds for a whole request (headers and body): from accept(), or from its first byte on a kept connection
DEFAULT_MAX_BODY = 1024 * 1024  # for apps that do not say (the webhook's max_body is 64 KiB)
RECV_BYTES = 64 * 1024
MAX_CONNECTIONS = 4096  # most open client connections, whatever the descriptor limit
RESERVED_FDS = 64  # descriptors kept for the database, its WAL, logs and the pool's sockets
ACCEPT_PAUSE = 0.05  # seconds without accept() after EMFILE/ENFILE (else it fails in a loop)
SEND_TIMEOUT = 2.0  # a pool thread's sendall of one small answer
# Reads (GET, HEAD: /health, /metrics) run on threads of their own when the app offloads them,
# never on the pool threads that run again the texts of a failed burst: reads waiting on a
# database that does not answer (or a flood of them) held every pool thread, and those texts
# waited behind them for their answer.
READ_THREADS = 4
# A request whose write is not committed LATE_GRACE after its deadline is answered 503 by the
# selecting thread, whatever the committing thread is doing: a database that vanished (no
# answer until the kernel gives up, 10-15 s) must not hold the answer past Twilio's patience.
# (Its deadline is 4 s after it arrived: the 503 comes within 5 s.) A COMMIT that lands after
# that stores the text all the same: answered 503, not lost; Twilio does not send it again.
LATE_GRACE = 0.5  # an app may say its own (`late_grace`: the webhook on SQLite waits longer)
# An idle kept-alive connection is closed after this: longer than a proxy keeps its idle
# connections to us (nginx's upstream keepalive_timeout 60 s, Go's 90 s, Caddy's 2 min), so
# the proxy closes first. Closing under it could lose a POST it sent at that instant
# (proxies do not resend a POST), and Twilio does not send a failed webhook again.
KEEP_ALIVE_SECONDS = 150.0


class Connection:
    """A client connection: its request arriving (`buffer`), being answered, or kept idle
    for the next one. `request`: the whole request being answered (the buffer keeps what
    came after it: the next request, if the client sent it already)."""

    __slots__ = ("sock", "address", "buffer", "request", "deadline", "received", "watched", "keep", "answered")

    def __init__(self, sock, address, deadline):
        self.sock, self.address, self.deadline = sock, address, deadline
        self.buffer = bytearray()
        self.request = b""
        self.received = None
        self.watched = False  # registered with the selector (most requests are whole at accept())
        self.keep = False  # the answer being sent keeps the connection for the next request
        self.answered = None  # the app's environ["smsbatch.answered"] for the answer held for its COMMIT


class SelectorWSGIServer(WSGIServer):
    """wsgiref's server with one thread that accepts, reads and answers (see the module).

    Open connections are capped below the process's descriptor limit (RLIMIT_NOFILE):
    at the cap, or when accept() fails with EMFILE/ENFILE, connections are closed: the
    oldest kept idle first, then the oldest still sending its request (the slowest).
    EMFILE/ENFILE is logged once per episode and accept() pauses briefly instead of
    failing in a loop.

    Measured on 2 cores (bench/run.py webhook): handing every connection to a pool
    thread cost about 200 us of CPU per request in thread switches and GIL hand-offs,
    more than the request itself; a COMMIT per text cost about 60 us more, and with
    synchronous=FULL an fsync each. bench/run.py webhook-vs-flask (2 cores, other work
    using about one, 4 paired runs): this server 2,544 req/s median, p99 22 ms; the same
    app on plain threaded wsgiref with the Writer's group commit 929 req/s, p99 58 ms;
    the Flask quickstart under gunicorn -w 4, 1,134 req/s, p99 64 ms. The plain server
    also has no whole-request deadline and no descriptor cap (slowloris, EMFILE).
    """

    request_queue_size = 128
    allow_reuse_address = True
    accept_max = 64  # most connections taken (and committed together) per wake-up
    request_deadline = REQUEST_DEADLINE

    keep_alive_seconds = KEEP_ALIVE_SECONDS

    def __init__(self, address, handler, threads=16):
        self.jobs = queue.SimpleQueue()  # requests run again after their burst failed
        self.reads = queue.SimpleQueue()  # reads the app offloads (offload_reads)
        self.workers, self._worker_queues = [], []  # server_close() runs if binding fails, before any worker exists
        self.conns = {}  # fd -> Connection whose request is arriving, oldest (earliest deadline) first
        self.idle = {}  # fd -> Connection kept for its next request, oldest first
        self.kept = collections.deque()  # connections answered and kept, for this thread to watch again
        self.held = []  # heap of (late, n, _Held): answers waiting for their COMMIT (this thread's only)
        self._held_order = itertools.count()
        self.stopping = False  # server_close() began: answers close their connections
        self.selector = None
        self._waker = None
        super().__init__(address, handler)
        if hasattr(socket, "TCP_DEFER_ACCEPT"):  # Linux: wake accept() once the request has data
            try:
                self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 1)
            except OSError:
                pass
        self.socket.setblocking(False)
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.socket, selectors.EVENT_READ, None)
        # Answers sent by other threads (committed groups, pool threads) wake select() through this.
        self._waker = socket.socketpair()
        for end in self._waker:
            end.setblocking(False)
        self.selector.register(self._waker[0], selectors.EVENT_READ, self._waker)
        self._main = threading.current_thread()  # replaced by serve_forever's
        self.max_connections = connection_cap()
        self._held = 0  # whole requests not yet answered (committing, or in the pool)
        self._held_lock = threading.Lock()
        self._paused_until = 0.0  # accept() paused after EMFILE until then
        self._out_of_fds = False  # in an EMFILE/ENFILE episode (logged once)
        self._refusals = RateLimitedLog()
        self._stop = False
        self._stopped = threading.Event()
        self._stopped.set()
        self._worker_queues = [self.jobs] * threads + [self.reads] * READ_THREADS  # each worker's, in order
        self.workers = [threading.Thread(target=self._work, args=(jobs,), daemon=True,
                                         name=f"smsbatch-{'read' if jobs is self.reads else 'web'}-{i}")
                        for i, jobs in enumerate(self._worker_queues)]
        for worker in self.workers:
            worker.start()

    def serve_forever(self, poll_interval=0.5):
        """Accept, read and answer until shutdown()."""
        self._stopped.clear()
        self._main = threading.current_thread()
        try:
            while not self._stop:
                self.step(poll_interval)
        finally:
            self._stop = False
            self._stopped.set()

    def shutdown(self):
        """Stop serve_forever() and wait until it has returned (call from another thread)."""
        self._stop = True
        self._stopped.wait()

    def step(self, poll_interval=0.5):
        """Wait for activity (at most poll_interval), then read and answer what is whole."""
        now = time.monotonic()
        timeout = 0.0 if self.kept else poll_interval
        for waiting in (self.conns, self.idle):
            if waiting:
                timeout = min(timeout, max(0.0, next(iter(waiting.values())).deadline - now))
        if self._paused_until:
            timeout = min(timeout, max(0.0, self._paused_until - now))
        if self.held:
            timeout = min(timeout, max(0.0, self.held[0][0] - now))
        ready = []
        for key, _ in self.selector.select(timeout):
            if key.data is None:
                self._accept(ready)
            elif key.data is self._waker:
                self._drain_waker()
            elif key.data.sock.fileno() in self.conns or key.data.sock.fileno() in self.idle:
                self._receive(key.data, ready)
        now = time.monotonic()
        self._watch_kept(now, ready)
        if self._paused_until and now >= self._paused_until:
            self._paused_until = 0.0
            self.selector.register(self.socket, selectors.EVENT_READ, None)
        self._expire(now)
        self._answer_late(now)
        if ready:
            self._answer(ready)

    def _accept(self, ready):
        for _ in range(self.accept_max):
            try:
                sock, address = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    self._descriptors_exhausted(exc)
                return  # ECONNABORTED and the like: the client gave up
            if self._out_of_fds:
                self._out_of_fds = False
                log.warning("webhook: accepting connections again (%d open)", self.open_connections())
            # Requests taken whole this wake-up (ready) hold descriptors too, and once answered
            # stay open, kept: count them. Kept idle connections may outnumber the cap (it is
            # lowered after EMFILE): shed until there is room, and close the new client only
            # when every other connection is being answered.
            while self.open_connections() + len(ready) >= self.max_connections and self._shed_oldest():
                pass
            if self.open_connections() + len(ready) >= self.max_connections:  # all being answered
                sock.close()
                continue
            sock.setblocking(False)
            conn = Connection(sock, address, time.monotonic() + self.request_deadline)
            self.conns[sock.fileno()] = conn
            if self._receive(conn, ready):  # TCP_DEFER_ACCEPT: usually the request is here already
                self.selector.register(sock, selectors.EVENT_READ, conn)
                conn.watched = True

    def _descriptors_exhausted(self, exc):
        """Something else holds descriptors too: lower the cap below what is open now,
        close the slowest connections down to it, and pause accept()."""
        open_now = self.open_connections()
        self.max_connections = max(16, min(self.max_connections, open_now - max(8, open_now // 10)))
        if not self._out_of_fds:
            self._out_of_fds = True
            log.warning("webhook: out of file descriptors (%s) with %d connections open; closing the "
                        "slowest, at most %d from now on", exc.strerror, open_now, self.max_connections)
        # Idle kept connections hold descriptors too (and are shed first): with only those
        # open, shedding nothing would leave accept() failing until they idle out (150 s).
        while self.open_connections() >= self.max_connections and self._shed_oldest():
            pass
        self.selector.unregister(self.socket)
        self._paused_until = time.monotonic() + ACCEPT_PAUSE

    def open_connections(self):
        """Client connections open now: arriving, kept (idle, or answered and about to be
        watched again), and not yet answered."""
        return len(self.conns) + len(self.idle) + len(self.kept) + self._held

    def _shed_oldest(self):
        """Close the connection that has waited longest: an idle kept one first, then one
        answered and kept but not yet watched again (idle too: else a client arriving in the
        same wake-up as their answers found no room), then the slowest still arriving, and
        last a kept one whose client already sent (pipelined) the start of its next request.
        False if there is none (every connection is being answered)."""
        if self.idle:
            self._close(next(iter(self.idle.values())))
            return True
        # Kept ones are in no dict nor the selector; whichever thread answered is done with
        # them. Others append to `kept` meanwhile: look at a copy (made under the GIL at once).
        empty = next((conn for conn in list(self.kept) if not conn.buffer), None)
        if empty is not None:
            self.kept.remove(empty)
            self.shutdown_request(empty.sock)
        elif self.conns:
            self._close(next(iter(self.conns.values())))
        elif self.kept:
            self.shutdown_request(self.kept.popleft().sock)
        else:
            return False
        return True

    def _receive(self, conn, ready):
        """Read what has arrived; True while the request is still incomplete."""
        try:
            data = conn.sock.recv(RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            data = b""
        if not data:  # the client went away (or closed a kept connection) before a request was whole
            self._close(conn)
            return False
        fd = conn.sock.fileno()
        if fd in self.idle:  # its next request begins: it has REQUEST_DEADLINE from now to arrive
            # Empty lines before a request line are ignored (RFC 9112 2.2: some clients end a
            # body with a CRLF that Content-Length does not count): they begin no request, so
            # the connection stays idle instead of getting a 408, and no 400 follows.
            data = data.lstrip(b"\r\n")
            if not data:
                return True
            del self.idle[fd]
            conn.deadline = time.monotonic() + self.request_deadline
            self.conns[fd] = conn
        conn.buffer += data
        return self._examine(conn, ready)

    def _examine(self, conn, ready):
        """Take the request out of the buffer if it is whole (ready), refuse it if it is
        bad; True while it is still incomplete."""
        verdict = examine(conn.buffer, getattr(self.get_app(), "max_body", DEFAULT_MAX_BODY))
        if verdict is None:
            return True
        self._forget(conn)
        if isinstance(verdict, tuple):
            self._refuse(conn, *verdict)
        else:  # the end of the request: what follows is the client's next one
            # Minus empty lines (see _receive): a CRLF after the body is no next request.
            conn.request, conn.buffer = bytes(conn.buffer[:verdict]), conn.buffer[verdict:].lstrip(b"\r\n")
            conn.received = time.monotonic()
            ready.append(conn)
        return False

    def _watch_kept(self, now, ready):
        """Watch again the connections whose answers kept them (sent by any thread): idle
        until their next request, or that request at once if it came with the last one."""
        while self.kept:
            conn = self.kept.popleft()
            if self.stopping:
                self._close(conn)
                continue
            fd = conn.sock.fileno()
            if conn.buffer:
                conn.deadline = now + self.request_deadline
                self.conns[fd] = conn
                if not self._examine(conn, ready):
                    continue
            else:
                conn.deadline = now + self.keep_alive_seconds
                self.idle[fd] = conn
            self.selector.register(conn.sock, selectors.EVENT_READ, conn)
            conn.watched = True

    def _drain_waker(self):
        try:
            while self._waker[0].recv(4096):
                pass
        except OSError:  # nothing more to read
            pass

    def _expire(self, now):
        for conn in _late(self.conns, now):
            self._forget(conn)
            self._refuse(conn, "408 Request Timeout", "the request did not arrive in time")
        for conn in _late(self.idle, now):  # kept idle too long: closed without a word, as HTTP/1.1 allows
            self._close(conn)

    def _forget(self, conn):
        """Stop watching a connection (it is answered, refused or closed next)."""
        fd = conn.sock.fileno()
        if (self.conns.pop(fd, None) or self.idle.pop(fd, None)) is not None and conn.watched:
            conn.watched = False
            self.selector.unregister(conn.sock)

    def _close(self, conn):
        self._forget(conn)
        conn.sock.close()

    def _refuse(self, conn, status, reason):
        conn.keep = False  # its answer says Connection: close
        target = bytes((conn.request or conn.buffer)[:300]).split(b"\n", 1)[0].split(b" ")[1:2] or [b"?"]
        self._refusals.warning("webhook: rejected %s %s: %s", status[:3], printable(target[0].decode("latin-1")), reason)
        body = (reason + "\n").encode()
        head = (f"HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        self._send(conn, head + body)

    def _answer(self, ready):
        """Answer whole requests; those that wrote are sent only once committed. Reads
        (GET, HEAD: /health, /metrics) go to the pool threads if the app says they may wait
        (`offload_reads`: a database across a network), so that this thread goes on reading texts."""
        app = self.get_app()
        if getattr(app, "offload_reads", False):
            writes = []
            for conn in ready:
                if conn.request.split(b" ", 1)[0] in (b"GET", b"HEAD"):
                    self._hold(1)
                    self.reads.put(conn)
                else:
                    writes.append(conn)
            ready = writes
        burst = getattr(app, "burst", None)
        if burst is None:
            for conn in ready:
                self._send(conn, self._run(conn))
            return
        held = _Held()
        self._hold(len(ready))
        with burst(lambda failed: self._after_commit(held, failed)) as state:
            for conn in ready:
                writes = state.writes
                answer = self._run(conn)
                if state.writes == writes:  # stored nothing: its answer waits for no COMMIT
                    self._send(conn, answer)
                    self._hold(-1)
                else:
                    held.answers.append((conn, answer))
        if held.answers:
            late = state.deadline + getattr(app, "late_grace", LATE_GRACE)
            heapq.heappush(self.held, (late, next(self._held_order), held))

    def _after_commit(self, held, failed):
        """The burst's writes are committed (send the answers) or not (the pool runs
        those requests again, each waiting for the lock until its own deadline); unless
        they were answered 503 meanwhile, too late (_answer_late)."""
        answers = held.take()
        for conn, answer in answers:
            if failed:
                self.jobs.put(conn)
            else:
                self._answered(conn, None)
                self._send(conn, answer, wake=False)
                self._hold(-1)
        if answers and not failed:
            self._wake()  # once for the whole group: a wake-up per answer cost the selecting thread

    def _answer_late(self, now):
        """503 for the held answers whose COMMIT has not come LATE_GRACE after their deadline.
        The heap's top is the earliest `late`; committed groups (answers taken) leave it as
        they reach the top (most come in order): no scan of every group held at each step."""
        while self.held and (self.held[0][0] <= now or not self.held[0][2].answers):
            _, _, held = heapq.heappop(self.held)
            for conn, _ in held.take():
                self._answered(conn, "503 Service Unavailable")
                self._refuse(conn, "503 Service Unavailable", "the database did not store the text in time")
                self._hold(-1)

    def _answered(self, conn, instead):
        """Tell the app the held answer goes out now (`instead`: the status sent in its place),
        through the callable it left in environ["smsbatch.answered"] (the webhook counts it then)."""
        answered, conn.answered = conn.answered, None
        if answered is not None:
            try:
                answered(instead)
            except Exception:
                log.exception("webhook: counting an answer failed")

    def _hold(self, n):
        with self._held_lock:
            self._held += n

    def _run(self, conn):
        """Answer a request that was read whole, into memory."""
        conn.answered = None
        try:
            handler = self.RequestHandlerClass(conn.sock, conn.address, self, conn.request, conn.received)
            conn.keep = getattr(handler, "keep", False)
            conn.answered = getattr(handler, "answered", None)
            return handler.wfile.getvalue()
        except Exception:
            conn.keep = False
            self.handle_error(conn.sock, conn.address)
            return b""

    def _send(self, conn, answer, wake=True):
        """Send an answer (from any thread); then close the connection, or hand it back to
        the selecting thread for the next request (`wake`: wake it now)."""
        try:
            conn.sock.sendall(answer)
        except OSError:  # gone, or not reading (a small answer fits any socket buffer)
            conn.keep = False
        if not conn.keep or self.stopping:
            self.shutdown_request(conn.sock)
            return
        if conn.sock.gettimeout() != 0.0:  # a pool thread's send timeout: back to non-blocking
            conn.sock.setblocking(False)
        self.kept.append(conn)
        if wake:
            self._wake()

    def _wake(self):
        """Wake the selecting thread (from another) to watch the kept connections again."""
        if threading.current_thread() is not self._main:
            try:
                self._waker[1].send(b"\0")
            except OSError:  # its buffer is full: select() is woken already
                pass

    def _work(self, jobs):
        while True:
            conn = jobs.get()
            if conn is None:
                return
            try:
                answer = self._run(conn)
                conn.sock.settimeout(SEND_TIMEOUT)
                self._send(conn, answer)
            finally:
                self._hold(-1)

    def server_close(self):
        """Close the listening socket, every connection still arriving and every kept one;
        requests being committed or waiting in the pool may finish (at most their
        deadline), their connections closed once answered."""
        self.stopping = True  # answers from now on close their connections
        # Kept connections are closed before the wait for the last commits: no one reads
        # them any more, and a proxy that sees the close sends its next text elsewhere
        # instead of into a connection reset when the wait ends.
        for conn in [*self.conns.values(), *self.idle.values()]:
            self._close(conn)
        self._close_kept()
        drain = getattr(self.get_app(), "drain", None)
        if drain is not None:  # let its last commits finish and their answers go out
            drain()
        for jobs in self._worker_queues:  # one stop for each worker
            jobs.put(None)
        if self.selector is not None:
            self.selector.close()
        if self._waker is not None:
            for end in self._waker:
                end.close()
        super().server_close()
        deadline = time.monotonic() + REQUEST_DEADLINE + 1.0
        for worker in self.workers:
            if worker is not threading.current_thread():
                worker.join(max(0.0, deadline - time.monotonic()))
        self._close_kept()  # kept by an answer that checked `stopping` just before it was set

    def _close_kept(self):
        while self.kept:
            self.shutdown_request(self.kept.popleft().sock)


class _Held:
    """The answers of one burst's requests (conn, answer), waiting for its COMMIT: sent by the
    thread that committed it, or 503 at its late time by the selecting thread if it has not come
    by then. Whichever takes them first sends them; the other finds none."""

    __slots__ = ("answers", "_lock")

    def __init__(self):
        self.answers, self._lock = [], threading.Lock()

    def take(self):
        with self._lock:
            answers, self.answers = self.answers, []
        return answers


def _late(waiting, now):
    """The connections of `waiting` (earliest deadline first) whose deadline has passed."""
    late = []
    for conn in waiting.values():
        if conn.deadline > now:
            break
        late.append(conn)
    return late


def connection_cap():
    """Most client connections to keep open: below RLIMIT_NOFILE, at most MAX_CONNECTIONS."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):  # pragma: no cover - not a Unix
        return 1000
    if soft == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS
    return max(16, min(MAX_CONNECTIONS, soft - RESERVED_FDS))


def make_server_for(wsgi_app, host="127.0.0.1", port=8080, threads=16):
    """A wsgiref server around `wsgi_app` (see the module); port 0 picks a free port."""
    return make_server(
        host, port, wsgi_app, server_class=lambda addr, handler: SelectorWSGIServer(addr, handler, threads),
        handler_class=QuietHandler,
    )
