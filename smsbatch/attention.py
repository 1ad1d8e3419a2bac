"""Is a person needed? One verdict, shared by `GET /health?strict=1` and `smsbatch status`.

`needed(facts, now)` is a pure function of what the store says (`gather(store, now)`):
a person is needed during an announced provider outage, when a batch is stuck well past
the moment a processor had to act on it, and when no processor has run for a while
although batches wait (cron or the timer stopped).
"""

from collections import namedtuple

IDLE_PROCESSOR_SECONDS = 180.0  # no processor run for 3 minutes while batches wait
# A pending batch's moment to act (states.acts_at: closing time, retry time or lease expiry)
# is when a processor must act on it.
# A run every minute acts within seconds of it; a batch waiting behind another of the same
# person waits one AI answer more. Past this much, it is stuck.
STUCK_AFTER_SECONDS = 300.0

Reason = namedtuple("Reason", "code text")


def gather(store, now):
    """The facts `needed` looks at, read from the store (three cheap queries)."""
    health, activity = store.health(now), store.last_activity()
    return {"outages": [o["provider"] for o in store.outages()], "pending": health["pending"],
            "earliest_due_at": health["earliest_due_at"], "last_run_at": activity["last_run_at"]}


def needed(facts, now):
    """Why a person is needed now, as Reasons (code, one line); empty when nobody is.

    `facts`: outages (providers in an announced outage), pending (batches not finished),
    earliest_due_at (the earliest moment a processor had to act on one of those,
    states.acts_at, or None), last_run_at (when a processor
    last began or ended a run, or None); epoch seconds.
    """
    reasons = [Reason("outage", f"the {provider} provider is failing (announced outage)")
               for provider in facts["outages"]]
    due = facts["earliest_due_at"]
    if due is not None and now - due > STUCK_AFTER_SECONDS:
        reasons.append(Reason("stuck", f"a batch is {_minutes(now - due)} past the moment a processor "
                                       "had to act on it"))
    if idle(facts["pending"], facts["last_run_at"], now):
        reasons.append(Reason("idle", idle_text(facts["pending"], facts["last_run_at"], now)))
    return reasons


def idle(pending, last_run_at, now, after=IDLE_PROCESSOR_SECONDS):
    """Do batches wait with no processor running? True when `pending` batches wait and no
    processor run began or ended in the last `after` seconds (or none ever ran)."""
    return pending > 0 and (last_run_at is None or now - last_run_at >= after)


def idle_text(pending, last_run_at, now):
    """The idle processor in words, with what to check."""
    ran = "no processor has ever run" if last_run_at is None else \
        f"no processor has run for {how_long(now - last_run_at)}"
    waiting = "1 batch waits" if pending == 1 else f"{pending} batches wait"
    return f"{ran} while {waiting}: is cron or smsbatch-process.timer running `smsbatch process`?"


def how_long(seconds):
    """'4 min', '3 h', '5 days': a span, to the unit that reads best."""
    minutes = int(seconds // 60)
    if minutes < 120:
        return f"{minutes} min"
    return f"{minutes // 60} h" if minutes < 2880 else f"{minutes // 1440} days"


def _minutes(seconds):
    return f"{int(seconds // 60)} min" if seconds >= 60 else f"{int(seconds)} s"
