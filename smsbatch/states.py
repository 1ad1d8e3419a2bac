"""A batch's states and the moves between them, written down once.

TRANSITIONS is the one table of allowed moves; the store's single move helper
(Store._move) refuses any other with InvalidTransition and records every move made.
"""

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


def placeholders(items):
    """'?,?,?' for an SQL IN (...) of `items`."""
    return ",".join("?" for _ in items)


def retry_refusal(batch, holds_keyword, fresh=False):
    """Why `smsbatch retry` must refuse this batch (a dict of its row), or None: it went out,
    is pending, only holds an opt-out/opt-in keyword (`holds_keyword`), or (`fresh`) is
    unknown, so its reply may already have gone out. A pure rule: the store applies it."""
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
    return None
