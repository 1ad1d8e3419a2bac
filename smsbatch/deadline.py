"""Total deadlines for provider calls, and the fence a send passes right before it is written.

The openai and twilio clients' timeouts limit each socket read, not a whole call: a
server trickling a byte a second, or the openai client's own retries, can outlast any
per-read timeout. `call()` runs the provider call in a worker thread and returns to the
caller at the deadline whatever the call is doing; the abandoned thread can finish
reading, but it can no longer *send*: every request a call makes passes `before_write()`,
which refuses once the call was given up on or the fence (the caller's proof that it
still holds the batch's lease) fails.

`Look`: a read of the database for the webhook's /health and /metrics, one at a time on a
thread of its own, waited for at most a few seconds after it began: a server that vanished
answers nothing until the kernel gives up (10-15 s), and every request that comes meanwhile
is answered at once instead of holding a pool thread for the whole wait.
"""

import contextvars
import threading
import time

from smsbatch.errors import LeaseLost

_CALL = contextvars.ContextVar("smsbatch_call", default=None)


class DeadlineExceeded(Exception):
    """The call did not finish by its deadline. `written`: a request had gone out by then."""

    def __init__(self, seconds, written):
        super().__init__(f"no answer within the {seconds:g} s deadline")
        self.seconds = seconds
        self.written = written


class Call:
    """One provider call's state, shared with the thread that runs it."""

    def __init__(self, fence=None):
        self.fence = fence
        self.written = False
        self.abandoned = False
        self.requests = 0  # HTTP requests this call made (a client's own retries included)
        self.lock = threading.Lock()

    def before_write(self):
        """A request of this call is about to go out on the wire.

        Raises:
            LeaseLost: the caller gave up on the call, or the fence no longer holds.
        """
        with self.lock:
            if self.abandoned:
                raise LeaseLost("the call was past its deadline: request not sent")
            if self.fence is not None and not self.fence():
                raise LeaseLost("the batch's lease is no longer provably held: request not sent")
            self.written = True

    def abandon(self):
        """Give up on the call; returns whether a request had gone out."""
        with self.lock:
            self.abandoned = True
            return self.written


def count_request(*_):
    """An HTTP event hook: one more request made by the current call (no-op outside call())."""
    current = _CALL.get()
    if current is not None:
        with current.lock:
            current.requests += 1


def before_write():
    """Called by the HTTP layer right before a request is written (no-op outside call())."""
    current = _CALL.get()
    if current is not None:
        current.before_write()


def call(fn, seconds, fence=None, state=None):
    """fn() with a total deadline: its result, or its exception, by `seconds` from now.

    `fence` (a callable -> bool) is asked right before each request fn makes is written;
    `state` (a Call) lets the caller read what the call did (requests made), even on error.

    Raises:
        DeadlineExceeded: fn was still running at the deadline (it is abandoned).
        LeaseLost: the fence failed before a request went out.
    """
    state = state or Call()
    state.fence = fence
    context = contextvars.copy_context()
    context.run(_CALL.set, state)
    run = _Run(lambda: context.run(fn), "smsbatch-call")
    if not run.done.wait(seconds):
        written = state.abandon()
        if not run.done.is_set():
            raise DeadlineExceeded(seconds, written)
    if run.error is not None:
        raise run.error
    return run.result


class LookTimedOut(Exception):
    """A Look had no answer `seconds` after it began."""


class Look:
    """`work()` run on a thread of its own, one run at a time: a caller that comes while a run
    is under way shares it, and waits until `seconds` after that run BEGAN, never longer. So
    with a database that does not answer, the first callers wait `seconds`, and every later
    one is answered at once until the run ends (then the next caller starts another).
    Thread-safe."""

    def __init__(self, work, seconds, name="smsbatch-look"):
        self.work, self.seconds, self.name = work, seconds, name
        self._lock = threading.Lock()
        self._run = None  # _Run under way, or the last one (ended)

    def __call__(self):
        """What work() returned (or raised).

        Raises:
            LookTimedOut: the run under way began `seconds` ago and has not ended.
        """
        with self._lock:
            run = self._run
            if run is None or run.done.is_set():
                run = self._run = _Run(self.work, self.name)
        if not run.done.wait(max(0.0, run.began + self.seconds - time.monotonic())):
            raise LookTimedOut(f"no answer within {self.seconds:g} s")
        if run.error is not None:
            raise run.error
        return run.result


class _Run:
    """work() on a thread of its own (a call(), or a Look's run): `done` is set once `result`
    or `error` holds how it ended."""

    def __init__(self, work, name):
        self.began, self.result, self.error, self.done = time.monotonic(), None, None, threading.Event()

        def run():
            try:
                self.result = work()
            except BaseException as exc:  # handed to the callers
                self.error = exc
            finally:
                self.done.set()

        threading.Thread(target=run, name=name, daemon=True).start()
