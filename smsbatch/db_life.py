"""One batch's life after it is claimed, and the backfill's bookkeeping: the store's SQL for them."""

from smsbatch import batching, segments
from smsbatch.config import HEARTBEAT_LEASE_SECONDS
from smsbatch.inputs import iso_time
from smsbatch.states import SendFacts, State, before_send, covered_by_answered


class BatchLife:
    """Methods of Store (smsbatch.db): one batch's life after it is claimed, and the backfill's bookkeeping: the store's SQL for them."""

    # -- one batch's life -------------------------------------------------------

    def batch_texts(self, batch_id):
        """The texts of a batch, oldest first."""
        return [dict(r) for r in self.conn.execute(
            "SELECT sid, body, media, received_at FROM messages WHERE batch_id = ?"
            " ORDER BY received_at, id", (batch_id,))]

    def history(self, phone, our_number, batch_id, before, limit, until=None):
        """The conversation before this batch: (time, role, text, media, source), oldest first;
        with `until`, then every reply sent after `before` up to `until` (ai.build_prompt
        places those among the batch's texts).

        Replies are every SMS we sent to this person from this number: the AI's and
        those an operator sent by hand (source 'ai' / 'manual'; None for their texts).
        """
        texts = self.conn.execute(
            "SELECT received_at, 'user', body, media, NULL FROM messages WHERE phone = ? AND our_number = ?"
            " AND batch_id != ? AND kind = 'text' AND received_at <= ? ORDER BY received_at DESC LIMIT ?",
            (phone, our_number, batch_id, before, limit),
        ).fetchall()
        replies = self.conn.execute(
            "SELECT sent_at, 'assistant', body, NULL, source FROM outbound WHERE phone = ? AND our_number = ?"
            " AND sent_at <= ? ORDER BY sent_at DESC LIMIT ?",
            (phone, our_number, before, limit),
        ).fetchall()
        merged = sorted([tuple(r) for r in texts] + [tuple(r) for r in replies], key=lambda r: r[0])
        merged = merged[-limit:] if limit else []
        if until is not None:
            merged += [tuple(r) for r in self.conn.execute(
                "SELECT sent_at, 'assistant', body, NULL, source FROM outbound WHERE phone = ? AND our_number = ?"
                " AND sent_at > ? AND sent_at <= ? ORDER BY sent_at", (phone, our_number, before, until))]
        return merged

    def reply_sids(self, phone):
        """The provider SIDs already recorded for messages we sent this phone (any number)."""
        return {r[0] for r in self.conn.execute("SELECT sid FROM outbound WHERE phone = ?", (phone,))}

    def is_opted_out(self, phone, scope):
        """True if `phone` opted out of `scope` (batching.opt_out_scope) or of every number."""
        return self._opted_out(self.conn, phone, scope)

    @staticmethod
    def _opted_out(conn, phone, scope):
        return conn.execute(
            "SELECT 1 FROM opt_outs WHERE phone = ? AND scope IN (?, '*')", (phone, scope)).fetchone() is not None

    def record_opt_out(self, phone, scope, now, keyword="21610"):
        """Record that `phone` opted out of `scope` (Twilio's 21610 says so)."""
        with self.transaction() as conn:
            conn.execute(
                "INSERT INTO opt_outs (phone, scope, since, keyword) VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
                (phone, scope, now, keyword),
            )

    def begin_send(self, batch, response, now, settings, reused=False):
        """Commit the reply as *sending* before Twilio is called, unless states.before_send
        says the batch goes elsewhere (skipped: opted out; held; superseded: its texts fold
        into a newer batch). The facts it needs are read and its verdict applied in one
        transaction, the rows it looks at locked (PostgreSQL). `reused`: the reply is one
        stored earlier (an operator's retry), not a new answer. Returns the state the batch is
        now in, or None if this processor no longer holds the lease.
        """
        with self.durable_transaction() as conn:  # the mark that keeps a reply from going out twice
            if not self._holds(conn, batch, State.PROCESSING):
                return None
            facts, rows = self._send_facts(conn, batch, settings)
            verdict = before_send(batch, facts, settings, reused)
            if verdict.state == State.SUPERSEDED:
                self._fold(conn, batch, rows[verdict.into], now, batching.Rules.from_settings(settings),
                           verdict.reason)
            elif verdict.state == State.SENDING:
                # the lease of a send in flight (renewed by heartbeats like any other)
                self._move(conn, batch["id"], State.SENDING, now, verdict.reason,
                           "response_text = ?, send_started_at = ?, lease_expires_at = ?",
                           (response, now, now + HEARTBEAT_LEASE_SECONDS), claim=batch["claim"])
            else:
                self._finish(conn, batch, verdict.state, now, error=verdict.reason)
        return verdict.state

    def _send_facts(self, conn, batch, settings):
        """What states.before_send looks at (SendFacts), and the rows it may name ({id: row}),
        locked until the transaction ends (PostgreSQL) so that the verdict cannot go stale."""
        scope = batching.opt_out_scope(batch["our_number"], settings.twilio_messaging_service_sid)
        answered = self._answered_after(conn, batch)
        # Only texts written after this batch was first claimed supersede it (a batch closed by
        # max messages is not held back by texts that were already waiting).
        newer = conn.execute(
            "SELECT * FROM batches WHERE phone = ? AND our_number = ? AND state IN ('open', 'queued')"
            " AND seq > ? AND created_at >= ? ORDER BY seq LIMIT 1" + self.db.for_update,
            (batch["phone"], batch["our_number"], batch["seq"], batch["claimed_at"]),
        ).fetchone()
        facts = SendFacts(
            opted_out=self._opted_out(conn, batch["phone"], scope),
            hold=self._hold_for(conn, batch["phone"], batch["our_number"]),  # the person's, or our number's
            answered=answered and answered["id"],
            answered_between=self._between(conn, batch, answered) if answered else 0,
            newer=newer and newer["id"])
        return facts, {row["id"]: row for row in (answered, newer) if row}

    def fold_if_answered(self, batch, now, settings):
        """Before answering an older batch (it was backing off): if a newer batch of the
        conversation already went out with these texts in its prompt (states.covered_by_answered),
        fold into it instead of sending a stale reply. Returns True if folded."""
        with self.transaction() as conn:
            if not self._holds(conn, batch, State(batch["state"])):
                return False
            answered = self._answered_after(conn, batch)
            facts = SendFacts(answered=answered and answered["id"],
                              answered_between=self._between(conn, batch, answered) if answered else 0)
            if not covered_by_answered(batch, facts, settings.history_messages):
                return False
            self._fold(conn, batch, answered, now, batching.Rules.from_settings(settings))
            return True

    def _answered_after(self, conn, batch):
        """The newest batch of the conversation after this one already sending or sent, locked; or None."""
        return conn.execute(
            "SELECT * FROM batches WHERE phone = ? AND our_number = ? AND seq > ? AND state IN ('sending', 'sent')"
            " ORDER BY seq DESC LIMIT 1" + self.db.for_update,
            (batch["phone"], batch["our_number"], batch["seq"]),
        ).fetchone()

    @staticmethod
    def _between(conn, batch, answered):
        """Texts (of other batches) and replies from this batch's first text to the answered
        batch's first: how far back in that batch's prompt history this batch's texts were."""
        return conn.execute(
            "SELECT (SELECT count(*) FROM messages WHERE phone = ? AND our_number = ? AND kind = 'text'"
            " AND batch_id != ? AND received_at >= ? AND received_at <= ?) + (SELECT count(*) FROM outbound"
            " WHERE phone = ? AND our_number = ? AND sent_at >= ? AND sent_at <= ?)",
            (batch["phone"], batch["our_number"], answered["id"], batch["first_at"], answered["first_at"],
             batch["phone"], batch["our_number"], batch["first_at"], answered["first_at"]),
        ).fetchone()[0]

    def _fold(self, conn, batch, newer, now, rules, reason=None):
        conn.execute("UPDATE messages SET batch_id = ? WHERE batch_id = ?", (newer["id"], batch["id"]))
        first = min(newer["first_at"], batch["first_at"])
        count = newer["message_count"] + batch["message_count"]
        urgent = bool(newer["urgent"] or batch["urgent"])
        closes = newer["closes_at"]
        if newer["state"] == State.OPEN:  # still collecting: it closes by its new first text and count
            closes = batching.due_at(rules, first, newer["last_at"], count, urgent, newer["quiet_seconds"])
        conn.execute(
            "UPDATE batches SET message_count = ?, first_at = ?, urgent = ?, closes_at = ?,"
            f" fold_depth = {self.db.greatest('fold_depth', '?')} WHERE id = ?",
            (count, first, int(urgent), closes, batch["fold_depth"] + 1, newer["id"]),
        )
        self._record(conn, newer["id"], now, newer["state"], newer["state"],
                     f"took the {batch['message_count']} text(s) of batch {batch['id']}")
        self._move(conn, batch["id"], State.SUPERSEDED, now, reason or f"folded into batch {newer['id']}",
                   "superseded_by = ?, retry_at = NULL, claim = NULL, lease_expires_at = NULL, completed_at = ?,"
                   " last_error = NULL",
                   (newer["id"], now))

    def mark_sent(self, batch, provider_sid, now, found=False):
        """Record that the reply went out (and log it in outbound). `found`: a retried batch
        whose earlier send Twilio's log shows went out (it moves from *processing*, no second
        send). Returns False if the lease was lost."""
        how = f"sent ({provider_sid}): the earlier send was found in Twilio's message log" if found \
            else f"sent ({provider_sid})"
        with self.transaction() as conn:
            moved = self._update_held(
                conn, batch, State.SENT, now, how,
                "provider_sid = ?, sent_at = ?, completed_at = ?, retry_at = NULL, last_error = NULL",
                (provider_sid, now, now), (State.PROCESSING,) if found else (State.SENDING,))
            if moved:
                row = conn.execute("SELECT provider_sid, id, phone, our_number, response_text, sent_at FROM batches"
                                   " WHERE id = ?", (batch["id"],)).fetchone()
                size = segments.count(row["response_text"])
                conn.execute(
                    "INSERT INTO outbound (sid, batch_id, phone, our_number, body, source, sent_at, segments,"
                    " encoding) VALUES (?, ?, ?, ?, ?, 'ai', ?, ?, ?) ON CONFLICT (sid) DO NOTHING",
                    (row["provider_sid"], row["id"], row["phone"], row["our_number"], row["response_text"],
                     row["sent_at"], size.segments, size.encoding))
            return moved

    def note(self, batch, now, reason):
        """Write a line in a claimed batch's history without moving it (while the claim holds)."""
        with self.transaction() as conn:
            if self._holds(conn, batch, State(batch["state"])):
                self._record(conn, batch["id"], now, batch["state"], batch["state"], reason)

    def finish(self, batch, state, now, error=None):
        """Move a claimed batch to a final state (skipped, held, failed, unknown).

        Returns False if this processor no longer holds the lease.
        """
        with self.transaction() as conn:
            return self._finish(conn, batch, state, now, error)

    def _finish(self, conn, batch, state, now, error):
        return self._update_held(conn, batch, state, now, error, "last_error = ?, completed_at = ?, retry_at = NULL",
                                 (error, now))

    def requeue(self, batch, due, error, now):
        """Put a claimed batch back in the queue to try again at `due` (backoff)."""
        with self.transaction() as conn:
            return self._update_held(conn, batch, State.QUEUED, now, f"{error}; next try at {iso_time(due)}",
                                     "retry_at = ?, last_error = ?", (due, error))

    def release_sending(self, batch, due, error, now):
        """Leave a batch in *sending* (outcome unknown) to be reconciled at `due`."""
        with self.transaction() as conn:
            return self._update_held(conn, batch, State.SENDING, now, f"{error}; checking at {iso_time(due)}",
                                     "retry_at = ?, last_error = ?", (due, error), (State.SENDING,))

    def _holds(self, conn, batch, state):
        """Does this processor's claim still hold the batch, in `state`? The row stays locked
        (PostgreSQL) until the transaction ends, so what is decided on it cannot go stale."""
        row = conn.execute("SELECT state, claim FROM batches WHERE id = ?" + self.db.for_update,
                           (batch["id"],)).fetchone()
        return row is not None and row["claim"] == batch["claim"] and row["state"] == state

    # -- backfill ---------------------------------------------------------------

    def has_message(self, sid):
        """True if a text with this MessageSid is stored."""
        return self.conn.execute("SELECT 1 FROM messages WHERE sid = ?", (sid,)).fetchone() is not None

    def record_found_reply(self, reply, batch_id, phone, our_number):
        """Log a reply Twilio's log shows we sent (a dict of sid, at, body, status), answering a
        text the backfill found: the AI sees it as history, and its SID is not taken for
        another batch's reply. A reply already logged is left as it is."""
        with self.transaction() as conn:
            self._log_found_reply(conn, reply, batch_id, phone, our_number)

    @staticmethod
    def _log_found_reply(conn, reply, batch_id, phone, our_number):
        conn.execute("INSERT INTO outbound (sid, batch_id, phone, our_number, body, source, sent_at, status)"
                     " VALUES (?, ?, ?, ?, ?, 'ai', ?, ?) ON CONFLICT (sid) DO NOTHING",
                     (reply["sid"], batch_id, phone, our_number, reply["body"], reply["at"], reply["status"]))

    def finish_answered(self, batch, reply, now, reason):
        """End a claimed batch *skipped* because Twilio's log shows `reply` (a dict of sid, at,
        body, status), which this database has no record of, answered it already; log that
        reply as the batch's, in the same transaction (the AI sees it as history).

        Returns False if this processor no longer holds the lease (nothing is written).
        """
        with self.transaction() as conn:
            if not self._finish(conn, batch, State.SKIPPED, now, reason):
                return False
            self._log_found_reply(conn, reply, batch["id"], batch["phone"], batch["our_number"])
            return True

    def known_numbers(self):
        """Every number of ours that people have written to."""
        return {r[0] for r in self.conn.execute("SELECT DISTINCT our_number FROM conversations")}

    def claim_backfill(self, now, every):
        """Take the backfill's turn if nobody took it in the last `every` seconds (across
        every processor). Returns (True, checked_until) when the turn is ours, else (False, None)."""
        with self.transaction() as conn:
            conn.execute("INSERT INTO backfill (id) VALUES (1) ON CONFLICT DO NOTHING")
            taken = conn.execute(
                "UPDATE backfill SET claimed_at = ? WHERE id = 1 AND (claimed_at IS NULL OR claimed_at <= ?"
                " OR claimed_at > ?) RETURNING checked_until", (now, now - every, now)).fetchone()
        return (True, taken[0]) if taken else (False, None)

    def finish_backfill(self, until):
        """Record that Twilio's log was searched up to `until`."""
        with self.transaction() as conn:
            conn.execute(f"UPDATE backfill SET checked_until = {self.db.greatest('coalesce(checked_until, 0)', '?')}"
                         " WHERE id = 1", (until,))
