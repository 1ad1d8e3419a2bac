"""When a provider's failures become an outage to announce, and when it has recovered: pure
rules on its health row (no I/O). The store keeps the row (Store.record_provider) and applies
what these say under a row lock, so the announcement is made once however many processors run."""


def healthy_lately(row, now, within=60.0):
    """Did the provider's last call work less than `within` seconds ago, with no failure since
    (`row`: failing_since, last_ok_at; None when there is none)? Then another success changes
    nothing worth writing (Store.record_provider only reads)."""
    return row is not None and row["failing_since"] is None and row["last_ok_at"] is not None \
        and now - row["last_ok_at"] < within


def after_call(row, now, error, alert_after):
    """What one call to a provider changes in its health row.

    `row`: {failing_since, alerted_at} before the call (None values when healthy or new);
    `error`: None if the call worked, else why it failed. Returns (changes, event): the
    columns to write, and 'outage' (announce it now: failing without a success for
    `alert_after` seconds, not announced yet), 'recovered' (the first success after an
    announced outage) or None.
    """
    if error is None:
        event = "recovered" if row.get("alerted_at") is not None else None
        return {"failing_since": None, "alerted_at": None, "last_ok_at": now}, event
    since = row.get("failing_since")
    since = now if since is None else since
    alert = row.get("alerted_at") is None and now - since >= alert_after
    changes = {"failing_since": since, "last_failure_at": now, "last_error": error,
               "alerted_at": now if alert else row.get("alerted_at")}
    return changes, "outage" if alert else None
