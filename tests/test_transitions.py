"""Batch state moves: written down once (db.TRANSITIONS), refused otherwise, and recorded."""

import pytest

from conftest import T0, add, offline_processor
from smsbatch.db import TRANSITIONS, State
from smsbatch.errors import InvalidTransition

pytestmark = pytest.mark.engines  # on SQLite and PostgreSQL (conftest.ENGINES)


def events(store, batch_id):
    return [(r["from_state"], r["to_state"]) for r in store.conn.execute(
        "SELECT from_state, to_state FROM batch_events WHERE batch_id = ? ORDER BY id", (batch_id,))]


def test_every_state_has_its_moves_written_down_and_sent_is_final():
    assert set(TRANSITIONS) == set(State)
    assert TRANSITIONS[State.SENT] == set() and TRANSITIONS[State.SUPERSEDED] == set()


def test_a_forbidden_move_raises_and_changes_nothing(store):
    batch_id = add(store, "+15551230001", "hi", T0).batch_id
    with pytest.raises(InvalidTransition, match="cannot move from open to sent"):
        with store.transaction() as conn:
            store._move(conn, batch_id, State.SENT, T0, "not allowed")
    assert store.get_batch(batch_id)["state"] == State.OPEN
    assert events(store, batch_id) == [(None, "open")]


def test_a_batch_life_is_recorded_move_by_move(store, settings, clock):
    batch_id = add(store, "+15551230002", "hi", T0).batch_id
    clock.now = T0 + 60
    offline_processor(settings, clock).run()
    assert events(store, batch_id) == [(None, "open"), ("open", "processing"), ("processing", "sending"),
                                       ("sending", "sent")]
    # a sent batch cannot be retried, so its history ends here
    with pytest.raises(InvalidTransition):
        store.retry(batch_id, clock.now)
    assert events(store, batch_id)[-1] == ("sending", "sent")


def test_conversations_are_per_person_and_number(store, settings, clock):
    a = add(store, "+15551230003", "to sales", T0, to="+15550000001").batch_id
    b = add(store, "+15551230003", "to support", T0 + 1, to="+15550000002").batch_id
    assert a != b
    clock.now = T0 + 60
    sender_log = []

    class Sender:
        def send(self, to, body, from_=None):
            sender_log.append((to, from_, body))
            return f"SM{len(sender_log):032d}"

    offline_processor(settings, clock, sender=Sender()).run()
    assert sorted((frm, body.split("You said: ")[1]) for _, frm, body in sender_log) == [
        ("+15550000001", "to sales"), ("+15550000002", "to support")]
