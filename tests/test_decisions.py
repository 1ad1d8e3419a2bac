"""Decisions taken out of the store: pure functions of a row and `now` (no database)."""

import pytest

from smsbatch import outages
from smsbatch.config import Settings
from smsbatch.states import SendFacts, State, before_send, covered_by_answered, retry_refusal

T = 1_800_000_000.0


def test_an_outage_is_announced_once_after_alert_after_seconds_and_its_end_once():
    healthy = {"failing_since": None, "alerted_at": None}
    changes, event = outages.after_call(healthy, T, "timeout", 300)
    assert event is None and changes["failing_since"] == T
    failing = {"failing_since": T, "alerted_at": None}
    assert outages.after_call(failing, T + 299, "timeout", 300)[1] is None
    changes, event = outages.after_call(failing, T + 300, "timeout", 300)
    assert event == "outage" and changes["alerted_at"] == T + 300
    announced = {"failing_since": T, "alerted_at": T + 300}
    assert outages.after_call(announced, T + 900, "timeout", 300)[1] is None  # not twice
    changes, event = outages.after_call(announced, T + 901, None, 300)
    assert event == "recovered" and changes["failing_since"] is None
    assert outages.after_call(failing, T + 10, None, 300)[1] is None  # never announced: no recovery news


def batch(state, **extra):
    return {"id": "b1", "state": state, "provider_sid": "SMx", "superseded_by": "b2", "phone": "+15550001111",
            "our_number": "+15550000000", **extra}


def test_retry_refusals_name_the_reason():
    assert "already sent" in retry_refusal(batch("sent"), False)
    assert "retry that one" in retry_refusal(batch("superseded"), False)
    assert "already waiting" in retry_refusal(batch("queued"), False)
    assert "keyword" in retry_refusal(batch("failed"), True)
    assert "without --fresh" in retry_refusal(batch("unknown"), False, fresh=True)
    assert retry_refusal(batch("unknown"), False) is None
    assert retry_refusal(batch("failed"), False, fresh=True) is None

    person, number = {"phone": "+15550001111", "since": T, "reason": None}, \
        {"number": "+15550000000", "since": T, "reason": "audit"}
    assert "release +15550001111` first" in retry_refusal(batch("failed"), False, hold=person)
    assert "our number +15550000000 is paused" in retry_refusal(batch("failed"), False, hold=number)
    assert "already sent" in retry_refusal(batch("sent"), False, hold=person)  # the batch's own reason first


def test_a_provider_healthy_lately_needs_no_write():
    assert outages.healthy_lately({"failing_since": None, "last_ok_at": T - 59}, T)
    assert not outages.healthy_lately({"failing_since": None, "last_ok_at": T - 60}, T)
    assert not outages.healthy_lately({"failing_since": T - 5, "last_ok_at": T - 10}, T)  # failing since
    assert not outages.healthy_lately({"failing_since": None, "last_ok_at": None}, T)
    assert not outages.healthy_lately(None, T)  # never called


# -- what a claimed, answered batch becomes: states.before_send ----------------------------------

ON_HOLD = {"phone": "+15550001111", "since": T, "reason": "complaint"}
PAUSED = {"number": "+15550000000", "since": T, "reason": None}
ANSWERED = {"answered": "newer00001", "answered_between": 2}
NEWER = {"newer": "newer00002"}


def claimed(**extra):
    return {"id": "b1", "state": "processing", "fold_depth": 0, "retried_at": None, **extra}


@pytest.mark.parametrize("facts, row, settings, state, reason, into", [
    ({}, {}, {}, State.SENDING, "AI answered; sending", None),
    ({"opted_out": True, "hold": ON_HOLD, **ANSWERED, **NEWER}, {}, {}, State.SKIPPED,
     "opted out before the reply was sent", None),  # a STOP wins over everything
    ({"hold": ON_HOLD, **ANSWERED, **NEWER}, {}, {}, State.HELD,
     "on hold before the reply was sent (smsbatch release to end it): complaint", None),
    ({"hold": PAUSED}, {}, {}, State.HELD,
     "our number +15550000000 paused before the reply was sent (smsbatch release --number +15550000000 to end it)",
     None),
    ({**ANSWERED, **NEWER}, {}, {}, State.SUPERSEDED, "folded into batch newer00001", "newer00001"),
    # an operator asked for this one to be answered: a newer answered batch does not take it
    ({**ANSWERED}, {"retried_at": T - 10}, {}, State.SENDING, "AI answered; sending", None),
    # these texts were further back than the newer batch's prompt history reached, or not between
    ({"answered": "newer00001", "answered_between": 21}, {}, {"history_messages": 20}, State.SENDING,
     "AI answered; sending", None),
    ({"answered": "newer00001", "answered_between": 0}, {}, {}, State.SENDING, "AI answered; sending", None),
    ({**NEWER}, {}, {}, State.SUPERSEDED, "folded into batch newer00002", "newer00002"),
    ({**NEWER}, {}, {"supersede": False}, State.SENDING, "AI answered; sending", None),
    ({**NEWER}, {"fold_depth": 2}, {"max_supersede": 2}, State.SENDING, "AI answered; sending", None),
    ({**NEWER}, {"fold_depth": 1}, {"max_supersede": 2}, State.SUPERSEDED, "folded into batch newer00002",
     "newer00002"),
])
def test_before_send_decides_the_next_state_from_the_facts_alone(facts, row, settings, state, reason, into):
    verdict = before_send(claimed(**row), SendFacts(**facts), Settings().replace(**settings))
    assert (verdict.state, verdict.reason, verdict.into) == (state, reason, into)


def test_a_stored_reply_sent_again_says_so():
    verdict = before_send(claimed(retried_at=T), SendFacts(), Settings(), reused=True)
    assert (verdict.state, verdict.reason) == (State.SENDING, "sending the stored reply again (no new AI call)")


def test_a_batch_backing_off_folds_into_an_answered_newer_one_only_if_its_texts_were_in_that_prompt():
    facts = SendFacts(answered="newer00001", answered_between=5)
    assert covered_by_answered(claimed(), facts, 20)
    assert not covered_by_answered(claimed(), facts, 4)
    assert not covered_by_answered(claimed(retried_at=T), facts, 20)
    assert not covered_by_answered(claimed(), SendFacts(), 20)
