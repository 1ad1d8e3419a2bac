"""Is a person needed? One verdict, shared by `GET /health?strict=1` and `smsbatch status`.

`needed(facts, now)` is a pure function of what the store says (`gather(store, now)`):
a person is needed during an announced provider outage, when a batch is stuck well past
the moment a processor had to act on it, and when no processor has run for a while
although batches wait (cron or the timer stopped).
"""

from collections import namedtuple

IDLE_PROCESSOR_SECONDS = 180.0  # no processor run for 3 minutes while batches wait
# A batch's due_at is when a processor must act (closing time, retry time, lease expiry).
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
    earliest_due_at (the earliest due_at of those, or None), last_run_at (when a processor
    last began or ended a run, or None); epoch seconds.
    """
    reasons = [Reason("outage", f"the {provider} provider is failing (announced outage)")
               for provider in facts["outages"]]
    due = facts["earliest_due_at"]
    if due is not None and now - due > STUCK_AFTER_SECONDS:
        reasons.append(Reason("stuck", f"a batch is {_minutes(now - due)} past the moment a processor "
                                       "had to act on it"))
    last_run = facts["last_run_at"]
    if facts["pending"] and (last_run is None or now - last_run >= IDLE_PROCESSOR_SECONDS):
        when = "has ever run" if last_run is None else f"has run for {_minutes(now - last_run)}"
        reasons.append(Reason("idle", f"no processor {when} while {facts['pending']} batches wait"))
    return reasons


def _minutes(seconds):
    return f"{int(seconds // 60)} min" if seconds >= 60 else f"{int(seconds)} s"
