"""A batch's states and the moves between them, written down once.

TRANSITIONS is the one table of allowed moves; the store's single move helper
(Store._move) refuses any other with InvalidTransition and records every move made.
"""

from dataclasses import dataclass
from enum import Enum


class State(str, Enum):
    """A batch's state, stored verbatim in batches.state."""

    OPEN = "open"  # collecting texts
    QUEUED = "queued"  # closed, waiting for a processor (full, retry, requeued)
    PROCESSING = "processing"  # claimed; the AI is answering
    SENDING = "sending"  # committed before calling Twilio; outcome not yet recorded
    SENT = "sent"
    SUPERSEDED = "superseded"  # texts folded into a newer batch of the same phone
    SKIPPED = "skipped"  # opted out, test-number filter, keyword text
    EXPIRED = "expired"  # too old to answer
    HELD = "held"  # an operator put the person on hold (`smsbatch hold`)
    FAILED = "failed"  # gave up; `smsbatch retry` brings it back
    UNKNOWN = "unknown"  # send outcome cannot be checked; a person decides


PENDING = (State.OPEN, State.QUEUED, State.PROCESSING, State.SENDING)
RETRYABLE = (State.FAILED, State.SKIPPED, State.EXPIRED, State.UNKNOWN, State.HELD)
FINAL = tuple(s for s in State if s not in PENDING)
_S = State
# Every move a batch may make, written down once. A move to the same state (a claim
# taken over, a send left to be checked again) is a move too, so it is recorded.
TRANSITIONS = {
    # open/queued -> held: texts of the hold not yet claimed when it is released
    _S.OPEN: {_S.QUEUED, _S.PROCESSING, _S.EXPIRED, _S.HELD},
    _S.QUEUED: {_S.PROCESSING, _S.EXPIRED, _S.HELD},
    # processing -> sent: a retried batch's earlier send turned out to have gone out
    _S.PROCESSING: {_S.PROCESSING, _S.SENDING, _S.SENT, _S.QUEUED, _S.SUPERSEDED, _S.SKIPPED, _S.HELD, _S.FAILED},
    # a send found not to have gone out is not sent again to a person put on hold meanwhile
    _S.SENDING: {_S.SENDING, _S.SENT, _S.QUEUED, _S.SUPERSEDED, _S.SKIPPED, _S.HELD, _S.FAILED, _S.UNKNOWN},
    _S.SENT: set(),
    _S.SUPERSEDED: set(),
    **{s: {_S.QUEUED} for s in RETRYABLE},
    # `release --answer-pending` answers a person's held batches with one reply: the older
    # ones fold into the newest
    _S.HELD: {_S.QUEUED, _S.SUPERSEDED},
}
# Claiming moves a due batch to processing; a batch found in *sending* stays there (reconciled).
CLAIMABLE = tuple(s for s in TRANSITIONS if _S.PROCESSING in TRANSITIONS[s]) + (_S.SENDING,)
# The move a claim makes from each claimable state, each one allowed by TRANSITIONS.
CLAIM_MOVES = {s: (_S.SENDING if s == _S.SENDING else _S.PROCESSING) for s in CLAIMABLE}
assert all(to in TRANSITIONS[s] for s, to in CLAIM_MOVES.items())
assert set(CLAIMABLE) == set(PENDING)  # the claim picks from PENDING_SQL


# SQL for the moment a processor must next act on a pending batch, from the one column that
# matters in its state: the lease's end while claimed, else the retry time (a failed
# attempt backing off, a send to be checked, an operator's requeue), else the closing time.
# Written exactly as in the index batches_state_acts_at (migrations step 11), so that it is used.
def acts_at(alias=""):
    """coalesce(lease_expires_at, retry_at, closes_at), of table `alias` if given."""
    p = f"{alias}." if alias else ""
    return f"coalesce({p}lease_expires_at, {p}retry_at, {p}closes_at)"


# The pending states written out, as constants the planner sees (not bound parameters).
PENDING_SQL = "state IN ('open', 'queued', 'processing', 'sending')"
assert PENDING_SQL == "state IN (" + ", ".join(f"'{s.value}'" for s in PENDING) + ")"


def placeholders(items):
    """'?,?,?' for an SQL IN (...) of `items`."""
    return ",".join("?" for _ in items)


def retry_refusal(batch, holds_keyword, fresh=False, hold=None):
    """Why `smsbatch retry` must refuse this batch (a dict of its row), or None: it went out,
    is pending, only holds an opt-out/opt-in keyword (`holds_keyword`), or (`fresh`) is
    unknown, so its reply may already have gone out; or (`hold`: the person's hold or our
    number's pause, Store.find_hold_for) the AI may not answer its conversation now. A pure
    rule: the store applies it."""
    state, batch_id = State(batch["state"]), batch["id"]
    if state == _S.SENT:
        return f"batch {batch_id} was already sent ({batch['provider_sid']}); not sending it twice"
    if state == _S.SUPERSEDED:
        return f"batch {batch_id} was folded into batch {batch['superseded_by']}; retry that one"
    if state not in RETRYABLE:
        return f"batch {batch_id} is {state.value}, already waiting to be answered"
    if holds_keyword:
        return f"batch {batch_id} holds an opt-out/opt-in keyword; nothing to answer"
    if fresh and state == _S.UNKNOWN:
        # Its reply may have gone out: only the stored reply can be looked up in Twilio's
        # log before sending, so a fresh one could reach the person as a second reply.
        return (f"batch {batch_id} is unknown: its reply may already have been sent; "
                "retry it without --fresh (Twilio's log is checked first)")
    if hold is not None and "number" in hold:
        return (f"batch {batch_id}: our number {batch['our_number']} is paused; `smsbatch release --number "
                f"{batch['our_number']}` first (--answer-pending answers what came meanwhile)")
    if hold is not None:
        return (f"batch {batch_id}: {batch['phone']} is on hold; `smsbatch release {batch['phone']}` first "
                "(--answer-pending answers what came meanwhile)")
    return None


def held_reason(hold, when=""):
    """A batch's last_error when it ends held (a person's hold, or a pause of our number:
    Store.find_hold_for): the operator's reason, if they gave one."""
    why = f": {hold['reason']}" if hold["reason"] else ""
    when = " " + when if when else ""
    if "number" in hold:
        return f"our number {hold['number']} paused{when} (smsbatch release --number {hold['number']} to end it){why}"
    return f"on hold{when} (smsbatch release to end it){why}"


@dataclass(frozen=True)
class SendFacts:
    """What the store read, in the transaction that commits a reply as *sending*, for
    before_send: `opted_out` (the person opted out of the batch's scope), `hold` (the
    person's hold or our number's pause: a dict, or None), `answered` (the id of the newest
    batch of the conversation after this one already in sending/sent, or None) and
    `answered_between` (texts and replies from this batch's first text to that batch's first:
    how deep in its prompt's history this batch's texts were), `newer` (the id of a newer
    open/queued batch written after this one was first claimed, or None)."""

    opted_out: bool = False
    hold: dict | None = None
    answered: str | None = None
    answered_between: int = 0
    newer: str | None = None


@dataclass(frozen=True)
class Verdict:
    """Where a batch goes next: `state`, the `reason` recorded, and (superseded) the batch
    its texts fold `into`."""

    state: State
    reason: str
    into: str | None = None


def covered_by_answered(batch, facts, history_messages):
    """Did a newer batch that already went out have this batch's texts in its prompt (within
    its `history_messages` window), so this one's reply would be late and stale? Never for a
    batch an operator requeued (`smsbatch retry`): they asked for it to be answered."""
    return (batch["retried_at"] is None and facts.answered is not None
            and 0 < facts.answered_between <= history_messages)


def before_send(batch, facts, settings, reused=False):
    """The state a claimed, answered batch (a dict of its row) moves to instead of being sent,
    or *sending*: a pure rule on what the store read (`facts`, SendFacts); Store.begin_send
    reads them and applies the verdict in one transaction.

    In order: an opt-out skips it; a hold holds it; a newer batch already answered with these
    texts in its prompt takes them (covered_by_answered); and (with `supersede`, at most
    `max_supersede` folds in a row) a newer unclaimed batch takes them so that the next reply
    covers both. `reused`: the reply is one stored earlier (an operator's retry)."""
    if facts.opted_out:
        return Verdict(_S.SKIPPED, "opted out before the reply was sent")
    if facts.hold is not None:
        return Verdict(_S.HELD, held_reason(facts.hold, "before the reply was sent"))
    if covered_by_answered(batch, facts, settings.history_messages):
        return Verdict(_S.SUPERSEDED, f"folded into batch {facts.answered}", facts.answered)
    if settings.supersede and batch["fold_depth"] < settings.max_supersede and facts.newer is not None:
        return Verdict(_S.SUPERSEDED, f"folded into batch {facts.newer}", facts.newer)
    return Verdict(_S.SENDING, "sending the stored reply again (no new AI call)" if reused
                   else "AI answered; sending")
