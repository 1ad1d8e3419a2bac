"""Decisions taken out of the store: pure functions of a row and `now` (no database)."""

from smsbatch import outages
from smsbatch.states import retry_refusal

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
    return {"id": "b1", "state": state, "provider_sid": "SMx", "superseded_by": "b2", **extra}


def test_retry_refusals_name_the_reason():
    assert "already sent" in retry_refusal(batch("sent"), False)
    assert "retry that one" in retry_refusal(batch("superseded"), False)
    assert "already waiting" in retry_refusal(batch("queued"), False)
    assert "keyword" in retry_refusal(batch("failed"), True)
    assert "without --fresh" in retry_refusal(batch("unknown"), False, fresh=True)
    assert retry_refusal(batch("unknown"), False) is None
    assert retry_refusal(batch("failed"), False, fresh=True) is None
