"""Processing: claim due batches, answer each with one AI reply, send it, record it.

`Processor.handle` is one batch's life, written as one readable step; `Processor.run`
is the loop around it (claim as many as there are free workers, wait, repeat).
"""

import dataclasses
import logging
import os
import random
import re
import signal
import threading
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from smsbatch import ai, batching, delivery, elsewhere, segments
from smsbatch.alerts import Alerter
from smsbatch.config import FAULT_POINT
from smsbatch.db import State, Store
from smsbatch.engine import StoreBusy, StoreError, StoreUnavailable
from smsbatch.errors import (CannotReconcile, ConfigError, DeliveryError, InvalidInput, LeaseLost, hide_numbers,
                             redact, visible)
from smsbatch.inputs import check_phone, iso_time
from smsbatch.lease import Leases, calibrate
from smsbatch.states import held_reason
from smsbatch.twilio_log import TwilioLog

log = logging.getLogger("smsbatch.processor")
POLL_SECONDS = 1.0  # with --for, new work is picked up within about this long
# A long run (--for) notes that it still runs this often, so `status` and /health?strict=1
# (attention.IDLE_PROCESSOR_SECONDS: 3 minutes) never take it for a stopped processor.
STILL_RUNNING_EVERY = 60.0
# taken_over: this processor's lease ran out and another took the batch over (harmless: it goes on there).
# error: an unexpected exception (a bug) while handling it; logged with its traceback, and the
# batch is left to its lease (then retried, or failed after its attempts).
OUTCOMES = ("sent", "skipped", "superseded", "retrying", "failed", "unknown", "taken_over", "error", "held")
PROVIDER_NAMES = {"ai": "AI", "sms": "Twilio"}


def _digits(phone):
    """Compare numbers by their digits: '+1 555 123 4567' is '15551234567'."""
    return re.sub(r"\D", "", phone or "")


def _span(seconds):
    """'8m12s', '45s', '2h03m': how long an outage has lasted, for a log line."""
    seconds = int(max(0, seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def same_number(phone, other):
    """Two numbers compared as E.164 (AI_SMS_TEST_NUMBER=5551234567 is +15551234567, as on the
    command line), or by their digits when either is not a number check_phone takes."""
    try:
        return check_phone(phone) == check_phone(other)
    except InvalidInput:
        return _digits(phone) == _digits(other)


def context(batch):
    """logging's extra= for a line about a batch: its id and business number (JSON logs show them)."""
    return {"batch_id": batch["id"], "our_number": batch["our_number"]}


def fault_point(name):
    """Die here, abruptly (SIGKILL, no cleanup), if the crash tests asked for it; or, for
    SMSBATCH_FAULT_INJECT=stop:<point>, freeze here (SIGSTOP) until a SIGCONT."""
    if FAULT_POINT == name:
        os.kill(os.getpid(), signal.SIGKILL)
    elif FAULT_POINT == "stop:" + name:
        os.kill(os.getpid(), signal.SIGSTOP)


@dataclass
class RunReport:
    """What one `smsbatch process` run did."""

    claimed: int = 0
    expired: int = 0
    ai_calls: int = 0
    ai_requests: int = 0  # HTTP requests to the AI, its client's own retries included
    prompt_tokens: int = 0
    completion_tokens: int = 0
    undelivered: int = 0  # replies newly known undelivered or failed (each reported once)
    counts: dict = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))
    paused: bool = False
    backfilled: int = 0  # texts found in Twilio's log that the webhook never got

    def add(self, outcome):
        self.counts[outcome] += 1

    @property
    def need_a_person(self):
        """Batches that need a person: failed, unknown whether the reply went out, or hit by a bug."""
        return self.counts["failed"] + self.counts["unknown"] + self.counts["error"]

    def as_dict(self):
        return {"claimed": self.claimed, "expired": self.expired, "ai_calls": self.ai_calls,
                "ai_requests": self.ai_requests, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "undelivered": self.undelivered,
                "paused": self.paused, "backfilled": self.backfilled, **self.counts}

    def add_usage(self, usage):
        self.ai_requests += usage.requests
        self.prompt_tokens += usage.prompt_tokens
        self.completion_tokens += usage.completion_tokens


class Clock:
    """Wall time, or a chosen start time that advances with real time (`--now` with `--for`),
    or a frozen time (`--now` alone, for deterministic replays)."""

    def __init__(self, start=None, advancing=True):
        self.offset = 0.0 if start is None else start - time.time()
        self.frozen = start if (start is not None and not advancing) else None

    def __call__(self):
        return self.frozen if self.frozen is not None else time.time() + self.offset


def stored_reply(batch):
    """The AI reply to send again without asking the AI: an operator retried a batch whose
    reply was stored and only its send failed (`retry --fresh` clears it to ask again)."""
    return batch["response_text"] if batch["retried_at"] is not None else None


class DatabaseAway:
    """A long run's view of a database that is away or busy (a restart, a failover): each
    step that needs it is tried again after POLL_SECONDS, and the outage is told once, in one
    warning line, however many rounds it lasts (and once more, at info, when it is over)."""

    def __init__(self):
        self.since = None  # monotonic time of the first failure of this outage; None: it answers

    def failed(self, what, exc):
        if self.since is None:
            self.since = time.monotonic()
            log.warning("database unavailable (%s) while %s; waiting for it, trying again every %g s",
                        exc, what, POLL_SECONDS)

    def answered(self):
        if self.since is not None:
            log.info("the database answers again after %s", _span(time.monotonic() - self.since))
            self.since = None

    def wait_out(self, step, what, deadline, stop):
        """step(), returning what it returns. With a `deadline` (a long run's end, monotonic), a
        database that is away or busy is waited out: told once, tried again every POLL_SECONDS
        until it answers, or until the deadline or `stop` (a SIGTERM) comes, and then its error
        is raised. Without one (a cron run) the first failure is raised: the run ends with one
        line (exit 1), and cron starts the next. `step` must be safe to run again after a failure.

        Raises: StoreUnavailable, StoreBusy."""
        stop = stop or threading.Event()
        while True:
            try:
                result = step()
            except (StoreUnavailable, StoreBusy) as exc:
                if deadline is None or stop.is_set() or time.monotonic() + POLL_SECONDS > deadline:
                    raise
                self.failed(what, exc)
                stop.wait(POLL_SECONDS)
                continue
            self.answered()
            return result


class Processor:
    """Answers batches. Each worker thread gets its own SQLite connection."""

    def __init__(self, db_path, settings, responder, sender, clock=time.time, rng=None, alerter=None, away=None):
        self.db_path = db_path
        self.settings = settings
        self.responder = responder
        self.sender = sender
        self.clock = clock
        self.rng = rng or random
        self.prompts = ai.SystemPrompts(settings.system_prompt, settings.prompts_dir)
        self._local = threading.local()
        self.leases = Leases(db_path, clock, settings.lease)
        self.usage = ai.Usage()  # what the AI calls of this processor cost, so far
        self._usage_lock = threading.Lock()
        self.alerter = alerter or Alerter.for_settings(settings)  # SMSBATCH_ALERT_WEBHOOK_URL
        self._next_due = 0.0  # the earliest moment to act the last claim saw (Store.next_due); None: nothing pending
        self.away = away or DatabaseAway()  # a long run's database outage, told once

    def store(self):
        if not hasattr(self._local, "store"):
            self._local.store = Store(self.db_path, durable=False)  # begin_send alone commits durably
        return self._local.store

    def scope(self, batch):
        """What an opt-out must cover for this batch to be skipped (batching.opt_out_scope)."""
        return batching.opt_out_scope(batch["our_number"], self.settings.twilio_messaging_service_sid)

    # -- one batch --------------------------------------------------------------

    def handle(self, batch):
        """Take one claimed batch as far as it can go; returns its outcome (see OUTCOMES)."""
        try:
            return self._handle(batch)
        finally:
            self.leases.drop(batch)

    def _handle(self, batch):
        store, s = self.store(), self.settings
        if batch["state"] == State.SENDING:
            return self._reconcile(store, batch)
        if batch["attempts"] > s.max_attempts:
            return self._finish(store, batch, State.FAILED, f"gave up after {s.max_attempts} attempts")
        looked = stored_reply(batch) is not None and batch["send_started_at"] is not None
        if looked:  # Twilio's log is asked here already: _answered_elsewhere need not ask again
            sid = self._earlier_send(store, batch)
            if sid:  # the reply went out after all: record it, never send it twice
                return "sent" if store.mark_sent(batch, sid, self.clock(), found=True) else "taken_over"
        if store.is_opted_out(batch["phone"], self.scope(batch)):
            return self._finish(store, batch, State.SKIPPED, "opted out")
        hold = store.find_hold_for(batch)  # the person on hold, or our number paused
        if hold is not None:
            return self._finish(store, batch, State.HELD, held_reason(hold))
        if s.test_number and not same_number(batch["phone"], s.test_number):
            return self._finish(store, batch, State.SKIPPED, "not the AI_SMS_TEST_NUMBER")
        if batch["attempts"] > 1 and store.fold_if_answered(batch, self.clock(), s):
            return "superseded"  # a retry overtaken by a newer reply that covered it
        outcome = None if looked else self._answered_elsewhere(store, batch)
        if outcome is not None:
            return outcome
        fault_point("before_ai")
        reply = stored_reply(batch)
        reused = reply is not None
        if not reused:
            try:
                reply = self._ask_ai(store, batch)
            except DeliveryError as exc:
                return self._failed_attempt(store, batch, exc)
        fault_point("after_ai")
        state = store.begin_send(batch, reply, self.clock(), s, reused=reused)
        if state is None:
            return "taken_over"
        if state != State.SENDING:
            return State(state).value
        return self._send(store, batch, reply)

    def _earlier_send(self, store, batch):
        """A retried batch whose stored reply may already have gone out (it was sent before):
        the SID of that earlier send if Twilio has it (the same lookup as _reconcile), else None.
        When Twilio cannot be asked, the operator chose to retry after checking: None, noted."""
        try:
            return self._call(store, "sms", self.sender.find_sent, batch["phone"], batch["our_number"],
                              batch["send_started_at"], batch["response_text"],
                              exclude=store.reply_sids(batch["phone"]))
        except (CannotReconcile, DeliveryError) as exc:
            store.note(batch, self.clock(), f"could not check whether the earlier send went out ({exc}); "
                       "sending, as the operator retried it")
            return None

    def _answered_elsewhere(self, store, batch):
        """A stale batch (batching.is_stale) may have been answered from another database (a
        restored backup, a copy) or by hand in Twilio's console: with a sender whose log can be
        read, ask it first (smsbatch.elsewhere). Returns the outcome when the batch must not be
        answered now: skipped (that reply found, and logged as the batch's), or retrying/failed
        when Twilio cannot be asked (never sent blind); None to answer it."""
        if not (getattr(self.sender, "reads_log", False) and batching.is_stale(batch, self.clock())):
            return None
        try:
            reply = self._call(store, "sms", elsewhere.find_reply, store, TwilioLog(self.sender), batch)
        except DeliveryError as exc:
            return self._failed_attempt(store, batch, exc)
        if reply is None:
            return None
        reason = elsewhere.reason(reply)
        if not store.finish_answered(batch, reply, self.clock(), reason):
            return "taken_over"
        log.warning("batch %s: %s; not answered again", batch["id"], reason, extra=context(batch))
        return State.SKIPPED.value

    def _ask_ai(self, store, batch):
        """The AI's one reply to the batch's texts, with the conversation so far.

        Raises:
            DeliveryError: the AI failed (transient or not).
        """
        s = self.settings
        texts = store.batch_texts(batch["id"])
        history = store.history(batch["phone"], batch["our_number"], batch["id"], texts[0]["received_at"],
                                s.history_messages, until=self.clock())
        messages = ai.build_prompt(self._system_prompt(batch), history, texts, ai.budget_note(s.max_segments))
        store.record_prompt(batch, messages)  # `show --prompt`: exactly what the AI is sent
        try:
            reply, usage = self._call(store, "ai", ai.ask, self.responder, messages)
        except DeliveryError as exc:
            self._record_usage(store, batch, getattr(exc, "usage", None))
            raise
        self._record_usage(store, batch, usage)
        # What is stored is what is sent, and what its segments are counted from (mark_sent).
        reply = segments.fit(reply, s.max_segments, s.smart_encoding)
        if not reply:  # nothing but invisible characters
            raise DeliveryError("AI returned a reply with nothing to send", transient=True)
        return reply

    def _record_usage(self, store, batch, usage):
        if usage is None:
            return
        store.record_usage(batch["id"], usage.requests, usage.prompt_tokens, usage.completion_tokens)
        with self._usage_lock:
            for name in ("requests", "prompt_tokens", "completion_tokens"):
                setattr(self.usage, name, getattr(self.usage, name) + getattr(usage, name))

    def _system_prompt(self, batch):
        """The system prompt for the batch's number.

        Raises:
            DeliveryError (transient): its prompt file cannot be read. A configuration problem,
            not a bug: the attempt is retried with backoff, like an outage, until someone fixes it.
        """
        try:
            return self.prompts.for_number(batch["our_number"])
        except ConfigError as exc:
            log.warning("batch %s: %s; retrying later (fix the file in SMSBATCH_PROMPTS_DIR)", batch["id"],
                        hide_numbers(exc), extra=context(batch))
            raise DeliveryError(str(exc), transient=True) from None

    def _send(self, store, batch, reply):
        fault_point("before_twilio")
        # The fence: this processor may have been frozen since it last looked at the
        # database. Only its own monotonic clock can say the lease still runs.
        fence = lambda: self.leases.holds(batch)  # noqa: E731
        if not fence():
            log.warning("batch %s: lease no longer held (taken over); not sending", batch["id"], extra=context(batch))
            return "taken_over"
        try:
            kwargs = {"fence": fence} if getattr(self.sender, "takes_fence", False) else {}
            sid = self._call(store, "sms", self.sender.send, batch["phone"], reply, batch["our_number"], **kwargs)
        except LeaseLost as exc:
            log.warning("batch %s: %s", batch["id"], exc, extra=context(batch))
            return "taken_over"
        except DeliveryError as exc:
            if exc.opted_out:
                store.record_opt_out(batch["phone"], self.scope(batch), self.clock())
                return self._finish(store, batch, State.SKIPPED, str(exc))
            if exc.ambiguous:
                # Twilio may have it: keep *sending* so the next claim asks before resending.
                return self._later(store.release_sending, batch, str(exc))
            return self._failed_attempt(store, batch, exc)
        fault_point("after_twilio")
        return "sent" if store.mark_sent(batch, sid, self.clock()) else "taken_over"

    def _reconcile(self, store, batch):
        """A batch left in *sending* (its processor died, or the send's outcome was unclear):
        ask Twilio before resending. *unknown* only when Twilio cannot be asked."""
        out_of_attempts = batch["attempts"] > self.settings.max_attempts
        try:
            sid = self._call(store, "sms", self.sender.find_sent, batch["phone"], batch["our_number"],
                             batch["send_started_at"], batch["response_text"],
                             exclude=store.reply_sids(batch["phone"]))
        except CannotReconcile as exc:
            return self._finish(store, batch, State.UNKNOWN, f"send outcome unknown: {exc}; check, then retry")
        except DeliveryError as exc:
            if out_of_attempts:
                return self._finish(store, batch, State.UNKNOWN,
                                    f"could not check whether the reply went out: {exc}; check, then retry")
            return self._later(store.release_sending, batch, f"could not check the earlier send: {exc}")
        if sid:
            return "sent" if store.mark_sent(batch, sid, self.clock()) else "taken_over"
        if store.is_opted_out(batch["phone"], self.scope(batch)):
            return self._finish(store, batch, State.SKIPPED, "opted out before the reply was sent")
        hold = store.find_hold_for(batch)  # the person on hold, or our number paused
        if hold is not None:
            return self._finish(store, batch, State.HELD, held_reason(hold, "before the reply was sent"))
        if store.fold_if_answered(batch, self.clock(), self.settings):
            return "superseded"  # not sent, and a newer reply has covered it meanwhile
        if out_of_attempts:  # Twilio says it never went out: nothing sent, so a plain failure
            return self._finish(store, batch, State.FAILED, f"not sent after {self.settings.max_attempts} attempts")
        return self._send(store, batch, batch["response_text"])

    def _call(self, store, provider, call, *args, **kwargs):
        """Call a provider ('ai' or 'sms') and note in the database whether it answered: the one
        place outages are tracked. Only a transient failure (unreachable, timed out, 429, 5xx)
        means the provider is failing; a definite refusal (an invalid number, an opted-out
        recipient, a bad request) is an answer about that one call."""
        try:
            result = call(*args, **kwargs)
        except DeliveryError as exc:
            self._note_health(store, provider, hide_numbers(exc) if exc.transient else None)
            raise
        self._note_health(store, provider, None)
        return result

    def _note_health(self, store, provider, error):
        now = self.clock()
        change = store.record_provider(provider, now, error, self.settings.alert_after_seconds)
        if change is None:
            return
        what, row = change
        name = PROVIDER_NAMES[provider]
        # stderr, one line each way: cron mails it, so someone hears of the outage and of its end;
        # and the chat channel, if there is one (announced once among processors, as the line).
        if what == "outage":
            text = (f"OUTAGE: {name} calls failing since {iso_time(row['failing_since'])} "
                    f"({_span(now - row['failing_since'])}): {error}")
        else:
            text = (f"RECOVERED: {name} calls work again after failing for {_span(now - row['failing_since'])} "
                    f"(since {iso_time(row['failing_since'])})")
        log.warning("%s", text)
        self.alerter.send(f"smsbatch {text}")

    def _failed_attempt(self, store, batch, exc):
        if exc.transient and batch["attempts"] < self.settings.max_attempts:
            return self._later(store.requeue, batch, str(exc))
        note = f" (after {batch['attempts']} attempts)" if exc.transient else ""
        return self._finish(store, batch, State.FAILED, f"{exc}{note}")

    def _finish(self, store, batch, state, error):
        ok = store.finish(batch, state, self.clock(), error)
        if ok and state in (State.FAILED, State.UNKNOWN):
            # stderr: cron mails it, so a person hears about batches that need them
            # Provider errors may quote the number: the log (cron mail) gets the batch id instead.
            log.warning("batch %s %s: %s (smsbatch retry %s)", batch["id"], State(state).value,
                        hide_numbers(error), batch["id"], extra=context(batch))
        return State(state).value if ok else "taken_over"

    def _later(self, move, batch, error):
        """Try again after the backoff: `move` is store.requeue or store.release_sending."""
        due = self.clock() + batching.backoff_seconds(batch["attempts"], self.settings.retry_base_seconds, self.rng)
        return "retrying" if move(batch, due, error, self.clock()) else "taken_over"

    def _safe_handle(self, batch):
        """handle() for a worker thread: a bug must not kill the run, and must leave the
        batch to its lease (retried later) rather than half-finished."""
        try:
            return self.handle(batch)
        except (StoreUnavailable, StoreBusy) as exc:  # not a bug: the database is away or busy
            log.warning("batch %s: the database could not be written (%s); the batch is left to its lease, "
                        "then taken up again", batch["id"], exc)
            return "error"
        except Exception:
            # Redacted like provider errors: an exception's text may quote a secret or a number.
            trace = hide_numbers(redact(traceback.format_exc(), self.settings.secrets()))
            log.error("batch %s: unexpected error (a bug); the batch is left to its lease, then retried "
                      "or failed after its attempts\n%s", batch["id"], trace.rstrip(), extra=context(batch))
            return "error"

    # -- the loop ---------------------------------------------------------------

    def claim(self, limit):
        """Claim up to `limit` due batches now, leases tracked (and renewed while `run` runs).
        Returns (rows, expired count)."""
        store = self.store()
        confirmed = time.monotonic()
        # One cheap read first: with nothing pending (an idle processor) it is the only query
        # of the round, so idling costs about one query a second (POLL_SECONDS). The clock is
        # calibrated only when there is something to claim: nothing else needs it exact.
        self._next_due = store.next_due()
        if self._next_due is None:
            return [], 0
        calibrate(self.clock, store)
        now = self.clock()
        self.leases.free_dead(store, now)
        rows, expired = store.claim_due(now, limit, self.leases.lease, self.settings.max_age_seconds,
                                        holder=self.leases.holder, node=self.leases.node)
        self.leases.add(rows, confirmed)
        return rows, expired

    def run(self, limit=1000, concurrency=4, seconds=0.0, stop=None):
        """Process due batches until none is due (or, with `seconds`, until that long has
        passed), at most `limit` in all, `concurrency` at a time. Returns a RunReport.

        `stop` (a threading.Event) ends the run early: nothing new is claimed and the
        batches in hand are finished.
        """
        stop = stop or threading.Event()
        report = RunReport(paused=not self.settings.enabled)
        host = self.leases.holder.rsplit(":", 1)[0]
        deadline = time.monotonic() + seconds

        def start():
            calibrate(self.clock, self.store(), force=True)  # leases are on the database's clock
            self.store().note_run(host, self.clock())

        self.away.wait_out(start, "starting the run", deadline if seconds else None, stop)
        try:
            if report.paused:
                return report
            return self._run(report, limit, concurrency, deadline if seconds else None, stop)
        finally:
            self._note_run(host, finished=True)

    def _note_run(self, host, finished=False):
        """Record that this run still goes on (or ended): /health and status tell a stopped
        processor by it. A database away for a moment is no reason to end the run."""
        try:
            self.store().note_run(host, self.clock(), finished=finished)
        except StoreError as exc:  # the run's own outcome matters more than this note
            log.warning("could not record that this run %s: %s", "ended" if finished else "goes on", exc)

    def _run(self, report, limit, concurrency, deadline, stop):
        """The rounds; `deadline` (monotonic) is a long run's end, None for a cron run."""
        long_run = deadline is not None
        if long_run:  # a long run: have the clients ready before the first batch needs them
            threading.Thread(target=self._warm, name="smsbatch-warm", daemon=True).start()
        else:
            deadline = time.monotonic()
        calls_before = getattr(self.responder, "calls", 0)
        usage_before = dataclasses.replace(self.usage)
        with self.leases.running(), ThreadPoolExecutor(concurrency, thread_name_prefix="smsbatch") as pool:
            inflight = set()
            noted = time.monotonic()
            while not stop.is_set():
                if time.monotonic() - noted >= STILL_RUNNING_EVERY:
                    noted = time.monotonic()
                    self._note_run(self.leases.holder.rsplit(":", 1)[0])
                # With --for, nothing new is claimed past the deadline: finish what is in hand.
                claiming = not long_run or time.monotonic() < deadline
                room = min(concurrency - len(inflight), limit - report.claimed) if claiming else 0
                claimed = 0
                if room > 0:
                    rows, expired = self._claim_or_wait(room, long_run)
                    report.claimed += len(rows)
                    report.expired += expired
                    claimed = len(rows)
                    inflight |= {pool.submit(self._safe_handle, row) for row in rows}
                if inflight:
                    done, inflight = wait(inflight, timeout=POLL_SECONDS, return_when=FIRST_COMPLETED)
                    for future in done:
                        report.add(future.result())
                    continue
                if claimed:
                    continue
                left = deadline - time.monotonic()
                if left <= 0 or report.claimed >= limit:
                    break
                stop.wait(min(left, self._idle_wait()))
            for future in wait(inflight).done:
                report.add(future.result())
        try:
            report.undelivered = self.follow_deliveries()
        except (StoreUnavailable, StoreBusy) as exc:  # the batches are done; the next run checks
            log.warning("could not check replies' delivery now (%s); the next run does", exc)
        report.ai_calls = getattr(self.responder, "calls", 0) - calls_before
        report.add_usage(ai.Usage(self.usage.requests - usage_before.requests,
                                  self.usage.prompt_tokens - usage_before.prompt_tokens,
                                  self.usage.completion_tokens - usage_before.completion_tokens))
        return report

    def _claim_or_wait(self, room, long_run):
        """claim(room); in a long run (--for) a database that is away or busy is waited out
        (the connection reopens by itself when it is back) instead of ending the run: nothing is
        claimed this round, and the round's wait (_idle_wait, or the batches in hand) is the
        POLL_SECONDS before the next try."""
        try:
            rows = self.claim(room)
        except (StoreUnavailable, StoreBusy) as exc:
            if not long_run:
                raise
            self.away.failed("claiming batches", exc)
            return [], 0
        self.away.answered()
        return rows

    def _warm(self):
        for provider in (self.responder, self.sender):
            try:
                getattr(provider, "warm", lambda: None)()
            except Exception as exc:  # the batch that needs it will report the problem
                log.debug("could not prepare %s: %s", getattr(provider, "name", provider), exc)

    def follow_deliveries(self):
        """Ask Twilio once about replies still not final a few minutes after sending, a few
        per run: without SMSBATCH_PUBLIC_URL there are no callbacks, and with it a callback
        may be lost or arrive before the reply was recorded. Then report each reply newly
        known undelivered or failed once, on stderr. Returns how many were reported."""
        store, now = self.store(), self.clock()
        fetch = getattr(self.sender, "fetch_status", None)
        if fetch is not None:
            for row in store.deliveries_to_check(now, delivery.CHECKS_PER_RUN):
                if not self._check_delivery(store, fetch, row, now):
                    break
        problems = store.take_new_problems(now)
        lines = [f"batch {p['batch_id'] or '(manual)'}: reply {delivery.explain(p['status'], p['error_code'])}"
                 for p in problems]
        for p, line in zip(problems, lines):
            log.warning("%s", line, extra={"batch_id": p["batch_id"], "reply_sid": p["sid"]})
        if lines:  # one alert per run, however many: each reply is reported once (take_new_problems)
            more = f"\n... and {len(lines) - 10} more (smsbatch status)" if len(lines) > 10 else ""
            self.alerter.send("smsbatch UNDELIVERED:\n" + "\n".join(lines[:10]) + more)
        return len(problems)

    def _check_delivery(self, store, fetch, row, now):
        """Fetch one reply's status and record it. A definite answer, an error Twilio answered
        about this reply (a 404, a 5xx, an answer that cannot be read) included, is final for
        it: it is not asked again, and the next reply is. Returns False when Twilio cannot be
        reached or asks us to slow down (the next run tries again), True to go on."""
        batch, sid = row["batch_id"] or "(manual)", visible(row["sid"], 40)
        try:
            fetched = fetch(row["sid"])
        except DeliveryError as exc:
            if exc.transient:
                log.warning("batch %s: could not check the delivery of reply %s (the next run tries again): %s",
                            batch, sid, hide_numbers(exc))
                return False
            store.mark_checked(row["sid"], now)
            log.warning("batch %s: Twilio could not tell the delivery of reply %s (%s); not asked again",
                        batch, sid, hide_numbers(exc))
            return True
        store.mark_checked(row["sid"], now, fetched.price, fetched.price_unit)
        if fetched.problems:
            log.warning("batch %s: reply %s: Twilio gave %s; recorded as unknown", batch, sid,
                        ", ".join(fetched.problems))
        if fetched.status is not None:
            store.record_delivery(row["sid"], fetched.status, fetched.error_code, now)
        return True

    def _idle_wait(self):
        """How long to sleep when nothing is due: until the next batch is due, at most POLL_SECONDS."""
        try:
            due = None if self._next_due is None else self.store().next_due()  # None: nothing was pending
        except (StoreUnavailable, StoreBusy):  # waited out like a failed claim (_claim_or_wait)
            return POLL_SECONDS
        if due is None or due <= self.clock():  # due but not claimable: its phone is busy
            return POLL_SECONDS
        return max(0.02, min(POLL_SECONDS, due - self.clock()))
