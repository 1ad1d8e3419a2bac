"""Operators' actions on the store: retry, hold and release, replies by hand, prune, backup."""

from smsbatch import batching, segments
from smsbatch.errors import InvalidTransition, NotFound
from smsbatch.states import FINAL, PENDING, RETRYABLE, State, placeholders, retry_refusal


class OperatorActions:
    """Methods of Store (smsbatch.db): operators' actions on the store: retry, hold and release, replies by hand, prune, backup."""

    # -- operators --------------------------------------------------------------

    def get_batch(self, batch_id):
        """Raises: NotFound."""
        row = self.conn.execute("SELECT * FROM batches WHERE id = ?", (batch_id,)).fetchone()
        if row is None:
            raise NotFound(f"no batch with id {batch_id!r}")
        return dict(row)

    def retry(self, batch_id, now, fresh=False):
        """Requeue a failed, skipped, expired or unknown batch, due at once. Its stored AI reply,
        if any, is kept to be sent again (no new AI call) unless `fresh`.

        Raises:
            NotFound: no such batch.
            InvalidTransition: the batch went out, is pending, or only holds a keyword.
        """
        with self.transaction() as conn:
            batch = self._locked_batch(conn, batch_id)
            why = retry_refusal(batch, self._holds_keyword(conn, batch_id), fresh)
            if why:
                raise InvalidTransition(why)
            fresh_note = "; its stored reply is dropped (--fresh)" if fresh else ""
            self._move(conn, batch_id, State.QUEUED, now, f"requeued by an operator (smsbatch retry){fresh_note}",
                       "retry_at = ?, attempts = 0, claim = NULL, lease_expires_at = NULL, last_error = NULL,"
                       " completed_at = NULL, retried_at = ?, response_text = CASE WHEN ? = 1 THEN NULL ELSE response_text END",
                       (now, now, int(fresh)), expect=[s.value for s in RETRYABLE])
        return self.get_batch(batch_id)

    @staticmethod
    def _holds_keyword(conn, batch_id):
        return conn.execute("SELECT 1 FROM messages WHERE batch_id = ? AND kind != 'text'",
                            (batch_id,)).fetchone() is not None

    def _locked_batch(self, conn, batch_id):
        """The batch's row, locked (PostgreSQL) until the transaction ends. Raises: NotFound."""
        row = conn.execute("SELECT * FROM batches WHERE id = ?" + self.db.for_update, (batch_id,)).fetchone()
        if row is None:
            raise NotFound(f"no batch with id {batch_id!r}")
        return dict(row)

    def status(self, now, latest=10):
        """Counts by state, oldest pending age, latest batches, texts in the last hour."""
        counts = {s.value: 0 for s in State}
        for state, n in self.conn.execute("SELECT state, count(*) FROM batches GROUP BY state"):
            counts[state] = n
        oldest = self.conn.execute(
            f"SELECT min(first_at) FROM batches WHERE state IN ({placeholders(PENDING)})",
            [s.value for s in PENDING],
        ).fetchone()[0]
        rows = self.conn.execute(
            "SELECT id, phone, our_number, message_count, state, first_at, last_at, attempts, last_error,"
            " provider_sid, quiet_seconds FROM batches ORDER BY seq DESC LIMIT ?",
            (latest,),
        ).fetchall()
        last_hour = self.conn.execute(
            "SELECT count(*) FROM messages WHERE received_at >= ?", (now - 3600,)
        ).fetchone()[0]
        return self._in_flight_and_cost(now) | self._delivery() | {
            "counts": counts,
            "pending": sum(counts[s.value] for s in PENDING),
            "oldest_pending_age_seconds": None if oldest is None else round(now - oldest, 1),
            "messages_last_hour": last_hour,
            "latest": [dict(r) | {"age_seconds": round(now - r["last_at"], 1)} for r in rows],
        }

    def _in_flight_and_cost(self, now):
        """Who holds each batch in flight and when it last renewed; what the AI cost in all."""
        rows = self.conn.execute(
            "SELECT id, state, holder, heartbeat_at, lease_expires_at FROM batches"
            " WHERE state IN ('processing', 'sending') AND claim IS NOT NULL ORDER BY seq LIMIT 100"
        ).fetchall()
        in_flight = [dict(r) | {"renewed_seconds_ago": None if r["heartbeat_at"] is None
                                else round(now - r["heartbeat_at"], 1),
                                "lease_left_seconds": round(r["lease_expires_at"] - now, 1)} for r in rows]
        cost = self.conn.execute(
            "SELECT coalesce(sum(ai_requests), 0), coalesce(sum(prompt_tokens), 0),"
            " coalesce(sum(completion_tokens), 0) FROM batches"
        ).fetchone()
        return {"in_flight": in_flight,
                "ai": {"requests": cost[0], "prompt_tokens": cost[1], "completion_tokens": cost[2]}}

    # -- operators' tools: check, backup, prune, hold, send (issue 10 "Act") ----------

    def check_writable(self):
        """Take the write lock and let it go, writing nothing.

        Raises:
            StoreError: the file or its folder is read-only, the lock is held too long, or
            (PostgreSQL) the server refuses.
        """
        self.db.check_writable()

    def copy_to(self, path):
        """Copy the whole SQLite database into the empty file at `path` (see
        engine_sqlite.Database.copy_to); returns counts of what it holds.

        Raises:
            SmsbatchError: the copy fails its integrity check, or this is PostgreSQL (pg_dump).
        """
        return self.db.copy_to(path)

    def space(self):
        """How big the database is and how much of it is free: {"bytes", "free_bytes"}
        (the engine's measure: engine_sqlite / engine_pg Database.space)."""
        return self.db.space()

    def reclaim_space(self):
        """Give the space a prune freed back (SQLite: VACUUM, which needs free disk of about the
        database's size and holds the write lock while it runs; PostgreSQL: VACUUM of each table,
        which marks it reusable without locking). Returns space() after.

        Raises:
            StoreError: not enough disk, or the lock not had within the busy timeout.
        """
        return self.db.reclaim_space()

    def retry_refusal(self, batch_id):
        """Why `retry` would refuse this batch, or None if it can be requeued.

        Raises:
            NotFound: no such batch.
        """
        batch = self.get_batch(batch_id)
        return retry_refusal(batch, self._holds_keyword(self.conn, batch_id),
                             hold=self._hold_for(self.conn, batch["phone"], batch["our_number"]))

    def retry_candidates(self, states, since):
        """Batches that ended in one of `states` at or after `since`, oldest first, without
        keyword batches (nothing to answer) or people on hold: what `retry --failed/--unknown
        --since` requeues."""
        values = [State(s).value for s in states]
        return [dict(r) for r in self.conn.execute(
            "SELECT id, phone, state, message_count, completed_at, last_error, response_text IS NOT NULL"
            f" AS has_reply, send_started_at FROM batches b WHERE state IN ({placeholders(values)})"
            " AND completed_at >= ?"
            " AND NOT EXISTS (SELECT 1 FROM messages m WHERE m.batch_id = b.id AND m.kind != 'text')"
            " AND phone NOT IN (SELECT phone FROM holds) AND our_number NOT IN (SELECT number FROM number_holds)"
            " ORDER BY completed_at, seq", (*values, since))]

    def hold(self, phone, reason, now):
        """Put a person on hold: no AI reply to them until released (their texts are still
        stored). Holding someone already held keeps the start and updates the reason.
        Returns the hold (phone, since, reason)."""
        with self.transaction() as conn:
            _start_hold(conn, "holds", "phone", phone, reason, now)
            conn.execute("INSERT INTO hold_log (phone, at, kind, reason) VALUES (?, ?, 'hold', ?)", (phone, now, reason))
            return dict(self._on_hold(conn, phone))

    def find_hold(self, phone):
        """The person's hold (phone, since, reason), or None."""
        row = self._on_hold(self.conn, phone)
        return None if row is None else dict(row)

    @staticmethod
    def _on_hold(conn, phone):
        return conn.execute("SELECT phone, since, reason FROM holds WHERE phone = ?", (phone,)).fetchone()

    def find_hold_for(self, batch):
        """What keeps the AI from answering this batch's conversation: the person's hold, else
        its number's pause (a dict with `number`), or None."""
        return self._hold_for(self.conn, batch["phone"], batch["our_number"])

    @classmethod
    def _hold_for(cls, conn, phone, our_number):
        hold = cls._on_hold(conn, phone) or cls._number_on_hold(conn, our_number)
        return None if hold is None else dict(hold)

    def release(self, phone, now, answer_pending=False):
        """End a hold. With `answer_pending`, the batches that ended *held* during it are
        answered: per conversation, the newest is requeued with the older ones' texts folded
        in (one reply covers them all). Returns (the hold with held_batches and held_texts:
        what ended held during it, and held_ids: those batches; ids of the requeued batches).

        Raises:
            NotFound: the person is not on hold.
        """
        with self.transaction() as conn:
            hold, held = self._end_hold(conn, "holds", "phone", "phone", phone, now, f"{phone} is not on hold")
            requeued = self._answer_held(conn, held, now) if answer_pending else []
            texts = sum(r["message_count"] for r in held)
            what = f"{texts} text(s) that came meanwhile " + ("answered" if answer_pending else "not answered")
            conn.execute("INSERT INTO hold_log (phone, at, kind, reason) VALUES (?, ?, 'release', ?)",
                         (phone, now, what if held else None))
        return dict(hold) | {"held_batches": len(held), "held_texts": sum(r["message_count"] for r in held),
                             "held_ids": [r["id"] for r in held]}, requeued

    def _end_hold(self, conn, table, key, column, value, now, missing):
        """End the hold in `table` keyed `key` = `value` (a person's, or a pause of one of our
        numbers: batches' `column` holds the same value): the texts still waiting end held too.
        Returns (the hold, the batches that ended held during it, locked).

        Raises:
            NotFound: `missing`, no such hold.
        """
        assert (table, key, column) in (("holds", "phone", "phone"), ("number_holds", "number", "our_number"))
        # DELETE ... RETURNING: of two releases at once, one ends the hold, the other finds none
        hold = conn.execute(f"DELETE FROM {table} WHERE {key} = ? RETURNING {key}, since, reason",
                            (value,)).fetchone()
        if hold is None:
            raise NotFound(missing)
        self._hold_waiting(conn, column, value, hold, now)
        held = conn.execute(f"SELECT * FROM batches WHERE {column} = ? AND state = 'held' AND completed_at >= ?"
                            " ORDER BY seq" + self.db.for_update, (value, hold["since"])).fetchall()
        return hold, held

    def _hold_waiting(self, conn, column, value, hold, now):
        """Texts that came during the hold (of a person: `column` phone, or of one of our
        numbers: our_number) but whose batches were not yet due (open, queued) end *held*
        like the others: answered only if the operator asks (--answer-pending)."""
        assert column in ("phone", "our_number")  # a name of ours, never input
        waiting = conn.execute(f"SELECT id FROM batches WHERE {column} = ? AND state IN ('open', 'queued')"
                               " AND created_at >= ? ORDER BY seq" + self.db.for_update,
                               (value, hold["since"])).fetchall()
        why = f": {hold['reason']}" if hold["reason"] else ""
        during = "on hold" if column == "phone" else f"our number {value} was paused"
        reason = f"came while {during}, not answered at its release (smsbatch retry to answer it){why}"
        for row in waiting:  # a claim that came first leaves its batch to begin_send, which sees the hold
            self._move(conn, row["id"], State.HELD, now, reason,
                       "retry_at = NULL, claim = NULL, lease_expires_at = NULL, completed_at = ?,"
                       " last_error = ?", (now, reason),
                       expect=("open", "queued"))

    def _answer_held(self, conn, held, now):
        newest = {(row["phone"], row["our_number"]): row for row in held}  # one reply per conversation
        for row in newest.values():
            # the stored reply, if any, predates the texts folded in: ask the AI afresh
            self._move(conn, row["id"], State.QUEUED, now, "released: answering the texts that came while held",
                       "retry_at = ?, attempts = 0, claim = NULL, lease_expires_at = NULL, last_error = NULL,"
                       " completed_at = NULL, retried_at = ?, response_text = NULL", (now, now))
        for row in held:
            target = newest[(row["phone"], row["our_number"])]
            if row["id"] != target["id"]:
                fresh = conn.execute("SELECT * FROM batches WHERE id = ?", (target["id"],)).fetchone()
                self._fold(conn, row, fresh, now, batching.Rules())
        return [row["id"] for row in newest.values()]

    # -- pausing one of our numbers (issue 16) ---------------------------------

    def hold_number(self, number, reason, now):
        """Pause one of our numbers: texts to it are stored, their batches end held, until
        release_number. Pausing it again keeps the start and updates the reason.
        Returns the pause (number, since, reason)."""
        with self.transaction() as conn:
            _start_hold(conn, "number_holds", "number", number, reason, now)
            return dict(self._number_on_hold(conn, number))

    def number_holds(self):
        """Our paused numbers (number, since, reason), oldest pause first."""
        return [dict(r) for r in self.conn.execute("SELECT number, since, reason FROM number_holds ORDER BY since")]

    @staticmethod
    def _number_on_hold(conn, number):
        return conn.execute("SELECT number, since, reason FROM number_holds WHERE number = ?", (number,)).fetchone()

    def release_number(self, number, now, answer_pending=False):
        """End the pause of one of our numbers, as release() ends a person's hold: with
        `answer_pending`, each conversation's texts that came meanwhile get one reply (not
        those of people still on hold themselves). Returns (the pause with held_batches and
        held_texts, held_ids: the held batches of people not on hold themselves; ids of the
        requeued batches).

        Raises:
            NotFound: the number is not paused.
        """
        with self.transaction() as conn:
            hold, held = self._end_hold(conn, "number_holds", "number", "our_number", number, now,
                                        f"our number {number} is not paused")
            free = [row for row in held if self._on_hold(conn, row["phone"]) is None]
            requeued = self._answer_held(conn, free, now) if answer_pending else []
        return dict(hold) | {"held_batches": len(held), "held_texts": sum(r["message_count"] for r in held),
                             "held_ids": [r["id"] for r in free]}, requeued

    def last_number(self, phone):
        """The number this person last wrote to, or None."""
        row = self.conn.execute("SELECT our_number FROM messages WHERE phone = ? ORDER BY received_at DESC, id DESC"
                                " LIMIT 1", (phone,)).fetchone()
        return None if row is None else row[0]

    def record_manual(self, sid, phone, our_number, body, now):
        """Log a reply an operator sent by hand (`smsbatch send`), with what it is billed as:
        the AI sees it as history."""
        size = segments.count(body)
        with self.transaction() as conn:
            conn.execute("INSERT INTO outbound (sid, batch_id, phone, our_number, body, source, sent_at, segments,"
                         " encoding) VALUES (?, NULL, ?, ?, ?, 'manual', ?, ?, ?)",
                         (sid, phone, our_number, body, now, size.segments, size.encoding))

    def prune(self, cutoff, dry_run=False, chunk=500, limit=None):
        """Delete what is older than `cutoff`: every finished batch whose texts and outcome are
        all older, with its texts, state history and reply log, and replies sent by hand before
        then. Never a pending batch, nor anything of a person on hold or opted out (their STOP
        is the record that they did). Works in transactions of `chunk` batches so the webhook
        never waits long; at most `limit` batches in all. Returns counts of what went (or,
        with `dry_run`, would go).
        """
        totals = dict.fromkeys(("batches", "texts", "events", "replies", "manual_replies"), 0)
        if dry_run:
            with self.db.snapshot() as conn:  # one snapshot to count in; nothing is written
                doomed = self._prunable(conn, cutoff, None)
                for i in range(0, len(doomed), chunk):
                    _add(totals, self._prune_counts(conn, doomed[i:i + chunk]))
                totals["manual_replies"] = conn.execute(
                    f"SELECT count(*) FROM outbound WHERE {_MANUAL_PRUNABLE}", (cutoff,)).fetchone()[0]
            return totals
        while limit is None or totals["batches"] < limit:
            with self.transaction() as conn:
                doomed = self._prunable(conn, cutoff, chunk if limit is None else min(chunk, limit - totals["batches"]),
                                        self.db.for_update)
                _add(totals, self._prune_counts(conn, doomed))
                self._delete_batches(conn, doomed)
            if not doomed:
                break
        with self.transaction() as conn:
            totals["manual_replies"] = conn.execute(f"DELETE FROM outbound WHERE {_MANUAL_PRUNABLE}", (cutoff,)).rowcount
            conn.execute("DELETE FROM hold_log WHERE at < ? AND phone NOT IN (SELECT phone FROM holds)", (cutoff,))
        return totals

    @staticmethod
    def _prunable(conn, cutoff, limit, lock=""):
        """Ids of finished batches older than `cutoff` that no kept batch points at (superseded_by).
        With `lock` (FOR UPDATE), the rows stay locked until the deletion: a batch an operator
        retries meanwhile is either retried after the prune (gone: NotFound) or kept."""
        finished = [s.value for s in FINAL]
        rows = conn.execute(
            f"SELECT id FROM batches WHERE state IN ({placeholders(finished)}) AND last_at < ?"
            " AND coalesce(completed_at, last_at) < ? AND coalesce(retried_at, 0) < ?"
            " AND phone NOT IN (SELECT phone FROM holds) AND phone NOT IN (SELECT phone FROM opt_outs)"
            + (" LIMIT ?" if limit else "") + lock, (*finished, cutoff, cutoff, cutoff, *([limit] if limit else [])))
        doomed = {r[0] for r in rows}
        while doomed:  # a kept batch folded into a doomed one keeps it (and what it points at)
            kept = set()
            for part in _chunks(sorted(doomed)):
                kept |= {r[1] for r in conn.execute(
                    f"SELECT id, superseded_by FROM batches WHERE superseded_by IN ({placeholders(part)})", part)
                    if r[0] not in doomed}
            if not kept:
                break
            doomed -= kept
        return sorted(doomed)

    @staticmethod
    def _prune_counts(conn, ids):
        if not ids:
            return {}
        marks = placeholders(ids)
        return {"batches": len(ids),
                "texts": conn.execute(f"SELECT count(*) FROM messages WHERE batch_id IN ({marks})", ids).fetchone()[0],
                "events": conn.execute(f"SELECT count(*) FROM batch_events WHERE batch_id IN ({marks})",
                                       ids).fetchone()[0],
                "replies": conn.execute(f"SELECT count(*) FROM outbound WHERE batch_id IN ({marks})", ids).fetchone()[0]}

    @staticmethod
    def _delete_batches(conn, ids):
        """Delete these finished batches and what hangs on them (locked by _prunable)."""
        if not ids:
            return
        marks = placeholders(ids)
        # Twilio's signatures carry no time: the pruned texts' MessageSids keep a captured
        # request's replay a duplicate (add_message).
        conn.execute("INSERT INTO pruned_sids (sid, received_at) SELECT sid, received_at FROM messages"
                     f" WHERE batch_id IN ({marks}) ON CONFLICT (sid) DO NOTHING", ids)
        # children first; a conversation whose (stale) open-batch pointer goes is simply recreated
        # by its next text
        for table, column in (("conversations", "open_batch"), ("outbound", "batch_id"),
                              ("batch_events", "batch_id"), ("messages", "batch_id"), ("batches", "id")):
            conn.execute(f"DELETE FROM {table} WHERE {column} IN ({marks})", ids)


# Replies sent by hand (no batch) before the cutoff, to people neither held nor opted out.
_MANUAL_PRUNABLE = ("batch_id IS NULL AND sent_at < ? AND phone NOT IN (SELECT phone FROM holds)"
                    " AND phone NOT IN (SELECT phone FROM opt_outs)")


def _start_hold(conn, table, key, value, reason, now):
    """Hold a person (holds.phone) or pause one of our numbers (number_holds.number); holding
    again keeps the start and updates the reason (a reason not given keeps the old one)."""
    assert (table, key) in (("holds", "phone"), ("number_holds", "number"))  # names of ours, never input
    conn.execute(f"INSERT INTO {table} ({key}, since, reason) VALUES (?, ?, ?) ON CONFLICT ({key})"
                 f" DO UPDATE SET reason = coalesce(excluded.reason, {table}.reason)", (value, now, reason))


def _chunks(items, size=500):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _add(totals, counts):
    for key, n in counts.items():
        totals[key] += n

