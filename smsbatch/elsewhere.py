"""Batches answered elsewhere: a restored backup or a copy of the database has batches still
waiting that another database answered meanwhile (or an operator answered by hand in Twilio's
console). Twilio's log has that reply; this database does not.

Before a stale batch (batching.is_stale) is answered, the processor asks Twilio's log for a
message from the batch's number to the person after the batch's last text that this database
has no record of. One found ends the batch *skipped* with that reply logged as its own: no
second SMS. Twilio API call, per stale batch: GET /2010-04-01/Accounts/{sid}/Messages.json?
From={our number}&To={person}&PageSize=1000 (newest first, read back to the last text).
"""

from smsbatch.backfill import answered_by
from smsbatch.errors import DeliveryError
from smsbatch.inputs import iso_time
from smsbatch.twilio_log import PagingStopped


def find_reply(store, twilio_log, batch):
    """Our first reply to the batch's person from its number after its last text, that this
    database has no record of (backfill.answered_by), or None.

    Raises: DeliveryError: Twilio's log could not be read (transient unless Twilio refused).
    """
    phone, last = batch["phone"], batch["last_at"]
    try:
        replies = twilio_log.replies_to(batch["our_number"], phone, last)
    except PagingStopped as exc:
        raise DeliveryError(f"could not read Twilio's log for an earlier reply: {exc}", transient=True) from None
    except DeliveryError as exc:
        raise DeliveryError(f"could not check Twilio's log for an earlier reply: {exc}",
                            transient=exc.transient) from None
    return answered_by(store, {"phone": phone, "at": last}, replies)


def reason(reply):
    """Why the batch ends skipped, naming the reply Twilio's log shows."""
    return (f"answered already: Twilio's log shows reply {reply['sid']} at {iso_time(reply['at'])} "
            "(a restored or copied database?)")
