"""Operators' tools that take more than one store call: an online backup, bulk retry,
a reply sent by hand, and how much `process` prunes per run.

The SQL lives in db.py; this module handles the files and the rules around it.
"""

import os
import secrets
import stat

from smsbatch.db import Store
from smsbatch.engine import is_postgres
from smsbatch.errors import SmsbatchError
from smsbatch.files import check_target


def backup(db_path, dest, force=False):
    """Write a consistent copy of the database to `dest` (mode 0600) while serve and process run.

    The copy is made in a private temporary file next to `dest` (O_EXCL, O_NOFOLLOW) and then
    put in place, so `dest` is never a half-written file. `dest` must be a regular file or a
    new name: never a symbolic link, a device, nor the database or its -wal/-shm (compared as
    files, so a linked folder does not hide them), whatever `force` says. Returns what the
    copy holds (version, texts, batches, bytes).

    Raises:
        SmsbatchError: no database, `dest` refused (files.check_target) or exists (without
            `force`), or its folder cannot be written.
    """
    if is_postgres(db_path):
        raise SmsbatchError("backup copies an SQLite file; for PostgreSQL use pg_dump "
                            "(e.g. pg_dump -Fc -f smsbatch.dump DBNAME), which is consistent while smsbatch runs")
    if not os.path.exists(db_path):
        raise SmsbatchError(f"database {db_path} does not exist")
    check_target(dest, db_path)
    dest = os.path.abspath(dest)
    if os.path.exists(dest) and not force:
        raise SmsbatchError(f"{dest} already exists: choose another name, or --force to overwrite it")
    temp = os.path.join(os.path.dirname(dest), f".{os.path.basename(dest)}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(temp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise SmsbatchError(f"cannot write {dest}: {exc.strerror}") from None
    try:
        made = os.fstat(fd)
        store = Store(db_path)
        try:
            _still(temp, made)  # SQLite opens by name: the name must still be the file we made
            info = store.copy_to(temp)
        finally:
            store.close()
        _still(temp, made)
        _fsync(temp)
        _put_in_place(temp, dest, force)
        _fsync(os.path.dirname(dest))  # the new name, too, survives a power loss
    finally:
        os.close(fd)
        if os.path.lexists(temp):
            os.unlink(temp)
    return info | {"path": dest, "bytes": os.path.getsize(dest)}


def _still(path, made):
    """Raise unless `path` is still the regular file `made` (os.fstat) describes."""
    try:
        now = os.lstat(path)
    except FileNotFoundError:
        now = None
    if now is None or not stat.S_ISREG(now.st_mode) or (now.st_dev, now.st_ino) != (made.st_dev, made.st_ino):
        raise SmsbatchError(f"{path} was replaced while the backup was written: nothing was written there")


def _put_in_place(temp, dest, force):
    if force:
        os.replace(temp, dest)
        return
    try:
        os.link(temp, dest)  # fails if dest appeared meanwhile: never overwrite without --force
    except FileExistsError:
        raise SmsbatchError(f"{dest} already exists: choose another name, or --force to overwrite it") from None


def _fsync(path):
    """Flush a file (or a folder's entries) to disk: the copy survives a power loss once we say it was made."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- retry ------------------------------------------------------------------------


def retry_batches(store, batch_ids, states, since, now, dry_run=False, fresh=False):
    """Requeue the given batches, or every batch in `states` that ended since `since`.

    Each batch is requeued on its own: one refusal (already sent, pending, no such id) does not
    stop the others. Returns {"dry_run", "requeued": [batch summaries], "refused": [reasons]}.
    """
    from smsbatch.errors import NotFound

    chosen, refused = [], []
    if states:
        chosen = store.retry_candidates(states, since)
    for batch_id in dict.fromkeys(batch_ids):  # an id given twice is requeued (and listed) once
        try:
            reason = store.retry_refusal(batch_id)
        except NotFound as exc:
            reason = str(exc)
        if reason:
            refused.append(reason)
        else:
            chosen.append(store.get_batch(batch_id))
    requeued = []
    for batch in chosen:
        if not dry_run:
            try:
                store.retry(batch["id"], now, fresh=fresh)
            except SmsbatchError as exc:  # it moved meanwhile (a processor took it, say)
                refused.append(str(exc))
                continue
        requeued.append(_summary(batch, fresh))
    return {"dry_run": dry_run, "by_filter": bool(states), "requeued": requeued, "refused": refused}


def _summary(batch, fresh):
    reuse = batch.get("has_reply", batch.get("response_text") is not None) and not fresh
    return {"id": batch["id"], "phone": batch["phone"], "state": batch["state"],
            "texts": batch["message_count"], "last_error": batch["last_error"], "reuses_reply": bool(reuse),
            # sent before: Twilio's log is asked first, so a reply that went out is not sent twice
            "checks_first": bool(reuse) and batch.get("send_started_at") is not None}


def retry_lines(result):
    """Human lines for `smsbatch retry`: one per batch, then a total when there were several."""
    verb = "would requeue" if result["dry_run"] else "requeued"
    lines = []
    for b in result["requeued"]:
        texts = "1 text" if b["texts"] == 1 else f"{b['texts']} texts"
        reuse = ", reusing its stored reply" if b["reuses_reply"] else ""
        reuse += " unless Twilio's log shows it went out" if b["checks_first"] else ""
        error = f": {b['last_error']}" if result["dry_run"] and b["last_error"] else ""
        if result["dry_run"]:
            lines.append(f"would requeue batch {b['id']} ({b['state']}, {texts} from {b['phone']}{reuse}){error}")
        else:
            lines.append(f"batch {b['id']} requeued ({texts} from {b['phone']}{reuse})")
    n = len(result["requeued"])
    if n > 1 or result["by_filter"]:
        lines.append(f"{verb} {n} batch{'' if n == 1 else 'es'}")
    return lines


# -- replying by hand -------------------------------------------------------------


def send_by_hand(store, settings, sender, phone, body, our_number, now):
    """Send `body` to `phone` from `our_number` (default: the number they last wrote to when it
    is one of ours, else TWILIO_FROM_NUMBER) and log it in the conversation, where the AI will see it.

    Raises:
        SmsbatchError: `our_number` is not one of ours, the person opted out, no number to
            send from, or the send failed.
    """
    from smsbatch import batching
    from smsbatch.errors import DeliveryError

    if our_number:
        check_ours(settings, sender, our_number)
    our_number = our_number or _default_number(store, settings, sender, phone)
    if not our_number:
        raise SmsbatchError(f"{phone} never wrote to us and TWILIO_FROM_NUMBER is not set: give --from NUMBER")
    scope = batching.opt_out_scope(our_number, settings.twilio_messaging_service_sid)
    if store.is_opted_out(phone, scope):
        raise SmsbatchError(f"{phone} opted out (STOP) of {scope}: not sending")
    from smsbatch import segments

    body = segments.smart_encode(body) if settings.smart_encoding else body  # as for AI replies; no budget
    try:
        sid = sender.send(phone, body, our_number)
    except DeliveryError as exc:
        if exc.opted_out:
            store.record_opt_out(phone, scope, now)
        if exc.ambiguous:
            raise SmsbatchError(f"{exc}: it may have gone out; check Twilio's message log before sending again") from None
        raise SmsbatchError(f"not sent: {exc}") from None
    store.record_manual(sid, phone, our_number, body, now)
    size = segments.count(body)
    return {"sid": sid, "to": phone, "from": our_number, "segments": size.segments, "encoding": size.encoding}


def _default_number(store, settings, sender, phone):
    """The number to send from without --from: the one `phone` last wrote to, else
    TWILIO_FROM_NUMBER. A number only the database names (an imported trace's, another app's
    on the same account) is refused rather than sent from.

    Raises: SmsbatchError.
    """
    from smsbatch.errors import visible

    last = store.last_number(phone)
    if last is None:
        return settings.twilio_from_number
    try:
        check_ours(settings, sender, last)
    except SmsbatchError:
        raise SmsbatchError(f"{phone} last wrote to {visible(last, 40)}, which is not one of our numbers "
                            "(SMSBATCH_NUMBERS): give --from NUMBER") from None
    return last


def check_ours(settings, sender, number):
    """Refuse a number we do not answer for: not in Settings.listed_numbers nor (with a
    messaging service) among the service's numbers, which are asked of Twilio only then.

    Raises:
        SmsbatchError: not one of ours, or the service's numbers could not be read.
    """
    from smsbatch.errors import DeliveryError

    listed = settings.listed_numbers
    service = settings.twilio_messaging_service_sid
    if number in listed or not (listed or service):  # nothing configured to compare with (console)
        return
    if service and hasattr(sender, "service_numbers"):
        try:
            if number in sender.service_numbers():
                return
        except DeliveryError as exc:
            raise SmsbatchError(f"cannot tell whether {number} is ours: {exc}") from None
    ours = ", ".join(listed) + (" and messaging service " + service if service else "")
    raise SmsbatchError(f"{number} is not one of our numbers ({ours}); list it in SMSBATCH_NUMBERS to send from it")


# -- retention --------------------------------------------------------------------

# `process` with SMSBATCH_RETENTION_DAYS deletes at most this many batches a run: cron runs
# every minute, so a large first clean-up spreads over runs instead of stalling one.
PRUNE_PER_RUN = 500
