"""What operators read from the store: status, show, stats, delivery receipts and outages."""

import json

from smsbatch import delivery, outages
from smsbatch.states import PENDING_SQL, acts_at, placeholders

NO_RECEIPT = "no_receipt"  # a reply Twilio has sent no status for yet
REJECTIONS_KEPT_SECONDS = 86400  # rejection counts older than a day are dropped as new ones arrive


class OperatorReports:
    """Methods of Store (smsbatch.db): what operators read from the store: status, show, stats, delivery receipts and outages."""

    # -- delivery receipts ------------------------------------------------------

    def _delivery(self, latest=5):
        """Replies by latest MessageStatus, and the latest undelivered or failed ones."""
        # A reply with no status has had no receipt yet (Twilio's answer to the send itself is
        # not a receipt): counted as such, not as queued; one the console stand-in "sent" never
        # gets one, and is counted apart (a prefix of ours, not input: a literal is safe).
        console = f"status IS NULL AND sid LIKE '{delivery.CONSOLE_SID_PREFIX}%'"
        counts = {NO_RECEIPT if status is None else status: n for status, n in self.conn.execute(
            f"SELECT CASE WHEN {console} THEN '{delivery.CONSOLE}' ELSE status END AS s, count(*) FROM outbound"
            " GROUP BY s").fetchall()}
        return {"delivery": dict(sorted(counts.items())),
                "delivery_problems": self.delivery_problems(None, None, delivery.PROBLEMS, latest)}

    def delivery_problems(self, since, until, statuses, limit=None):
        """Replies sent in [since, until) (None: no bound) whose latest status is one of
        `statuses` (NO_RECEIPT for none yet), newest first, each with its error in words."""
        wanted = [s for s in statuses if s != NO_RECEIPT]
        tests = ([f"status IN ({placeholders(wanted)})"] if wanted else []) + \
            (["status IS NULL"] if NO_RECEIPT in statuses else [])
        where, args = ["(" + " OR ".join(tests) + ")"], list(wanted)
        for bound, test in ((since, "sent_at >= ?"), (until, "sent_at < ?")):
            if bound is not None:
                where.append(test)
                args.append(bound)
        rows = self.conn.execute(
            "SELECT sid, batch_id, phone, our_number, status, error_code, sent_at, status_at FROM outbound"
            f" WHERE {' AND '.join(where)} ORDER BY coalesce(status_at, sent_at) DESC, sid"
            + (" LIMIT ?" if limit else ""), (*args, *([limit] if limit else []))).fetchall()
        return [dict(r) | {"error": delivery.explain(r["status"], r["error_code"]) if r["status"] else
                           "console (no receipts)" if delivery.is_console_sid(r["sid"]) else "no receipt yet"}
                for r in rows]

    def record_delivery(self, sid, status, error_code, at):
        """Record Twilio's latest MessageStatus (and ErrorCode) of a reply we sent, unless it
        would move the reply backwards. Returns False for a SID we never sent (ignored)."""
        with self.transaction() as conn:
            # locked (PostgreSQL): of two receipts at once the second waits and compares with the first
            row = conn.execute("SELECT status FROM outbound WHERE sid = ?" + self.db.for_update, (sid,)).fetchone()
            if row is None:
                return False
            if delivery.moves_forward(row["status"], status):  # compare-and-set on the status read
                conn.execute("UPDATE outbound SET status = ?, error_code = ?, status_at = ? WHERE sid = ?"
                             " AND coalesce(status, '') = ?", (status, error_code, at, sid, row["status"] or ""))
            return True

    def deliveries_to_check(self, now, limit):
        """Replies never checked yet, CHECK_AFTER_SECONDS after sending: those without a final
        status, and those of the last PRICE_WITHIN_SECONDS without a price (a status callback
        may have said it was delivered, but only the message resource says what it cost).
        Rows of sid and batch_id."""
        return [dict(r) for r in self.conn.execute(
            f"SELECT sid, batch_id FROM outbound WHERE checked_at IS NULL AND sent_at <= ? AND (status IS NULL"
            f" OR status NOT IN ({placeholders(delivery.FINAL)}) OR price IS NULL AND sent_at >= ?)"
            " ORDER BY sent_at LIMIT ?",
            (now - delivery.CHECK_AFTER_SECONDS, *sorted(delivery.FINAL), now - delivery.PRICE_WITHIN_SECONDS,
             limit))]

    def mark_checked(self, sid, now, price=None, price_unit=None):
        """Note that Twilio was asked about a reply (it is not asked again), and the price it
        gave (None: not priced yet)."""
        with self.transaction() as conn:
            conn.execute("UPDATE outbound SET checked_at = ?, price = coalesce(?, price),"
                         " price_unit = coalesce(?, price_unit) WHERE sid = ?", (now, price, price_unit, sid))

    def take_new_problems(self, now):
        """Replies newly known undelivered or failed, each returned once (marked reported)."""
        new = self.conn.execute(  # a read first: most runs have nothing to report, and need no write
            f"SELECT 1 FROM outbound WHERE reported_at IS NULL AND status IN ({placeholders(delivery.PROBLEMS)})"
            " LIMIT 1", delivery.PROBLEMS).fetchone()
        if new is None:
            return []
        with self.transaction() as conn:
            return [dict(r) for r in conn.execute(
                f"UPDATE outbound SET reported_at = ? WHERE reported_at IS NULL"
                f" AND status IN ({placeholders(delivery.PROBLEMS)})"
                " RETURNING sid, batch_id, status, error_code", (now, *delivery.PROBLEMS))]

    def health(self, now):
        """Pending count, the oldest pending batch's age and the earliest moment a processor
        had to act on one of them (states.acts_at), from one cheap query."""
        row = self.conn.execute(
            f"SELECT count(*), min(first_at), min({acts_at()}) FROM batches WHERE {PENDING_SQL}").fetchone()
        return {"pending": row[0], "oldest_pending_age_seconds": None if row[1] is None else round(now - row[1], 1),
                "earliest_due_at": row[2]}

    def note_run(self, host, now, finished=False):
        """Record that `host`'s processor began (or ended) a run at `now`."""
        with self.transaction() as conn:
            if finished:
                conn.execute("UPDATE processors SET finished_at = ? WHERE host = ?", (now, host))
            else:
                conn.execute(
                    "INSERT INTO processors (host, started_at) VALUES (?, ?) ON CONFLICT (host)"
                    " DO UPDATE SET started_at = excluded.started_at, finished_at = NULL", (host, now))

    def last_activity(self):
        """When the last text was stored and a processor last ran (epoch seconds, or None)."""
        text = self.conn.execute("SELECT max(received_at) FROM messages").fetchone()[0]
        started, finished = self.conn.execute(
            "SELECT max(started_at), max(finished_at) FROM processors").fetchone()
        runs = [t for t in (started, finished) if t is not None]
        return {"last_text_at": text, "last_run_at": max(runs) if runs else None}

    def record_rejections(self, rows, now):
        """Add (minute, count, last_at, last_url) rows of bad-signature counts; drop old ones."""
        with self.transaction() as conn:
            conn.executemany(
                "INSERT INTO rejections (minute, count, last_at, last_url) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (minute) DO UPDATE SET count = rejections.count + excluded.count,"
                f" last_at = {self.db.greatest('rejections.last_at', 'excluded.last_at')},"
                " last_url = CASE WHEN excluded.last_at >= rejections.last_at THEN excluded.last_url"
                " ELSE rejections.last_url END",
                rows,
            )
            conn.execute("DELETE FROM rejections WHERE minute < ?", (int((now - REJECTIONS_KEPT_SECONDS) // 60),))

    def rejected_signatures(self, now):
        """Webhook requests refused for a bad signature in the last hour, and the latest one's
        time and checked URL: {"rejected_signatures", "last_rejected_signature_at", ...}."""
        count = self.conn.execute(
            "SELECT coalesce(sum(count), 0) FROM rejections WHERE minute >= ?", (int((now - 3600) // 60),)
        ).fetchone()[0]
        last = self.conn.execute("SELECT last_at, last_url FROM rejections ORDER BY last_at DESC LIMIT 1").fetchone()
        return {"rejected_signatures": count, "last_rejected_signature_at": last[0] if last else None,
                "last_rejected_signature_url": last[1] if last else None}

    def messages_since(self, since):
        """Inbound texts received at or after `since`, oldest first (for export)."""
        return self.conn.execute(
            "SELECT phone, our_number, body, sid, received_at, media FROM messages"
            " WHERE received_at >= ? ORDER BY received_at, id",
            (since,),
        )

    # -- operators: see (issue 10: show, stats, status, outages) ---------------

    def record_prompt(self, batch, messages):
        """Keep the exact chat messages about to be sent to the AI (`show --prompt`)."""
        with self.transaction() as conn:
            conn.execute("UPDATE batches SET prompt = ? WHERE id = ? AND claim = ?",
                         (json.dumps(messages), batch["id"], batch["claim"]))

    def record_provider(self, provider, now, error=None, alert_after=300.0):
        """Note one call to a provider ('ai', 'sms') that worked (error None) or failed.

        Returns ('outage', row) the first time its calls have kept failing, with no success
        in between, for `alert_after` seconds; ('recovered', row) on the first success after
        an announced outage; else None. Each is returned to one caller only, however many
        processors run, so the outage is announced once.
        """
        if error is None and self._healthy_lately(provider, now):
            return None  # the common case costs a read, not a write
        with self.transaction() as conn:
            # locked (PostgreSQL): of several processors failing at once, one announces the outage
            row = conn.execute("SELECT * FROM provider_health WHERE provider = ?" + self.db.for_update,
                               (provider,)).fetchone()
            row = dict(row) if row else {"provider": provider, "failing_since": None, "alerted_at": None}
            changes, event = outages.after_call(row, now, error, alert_after)
            if error is None:
                conn.execute(
                    "INSERT INTO provider_health (provider, last_ok_at) VALUES (?, ?) ON CONFLICT (provider)"
                    " DO UPDATE SET failing_since = NULL, alerted_at = NULL, last_ok_at = excluded.last_ok_at",
                    (provider, now))
                return (event, row) if event else None
            conn.execute(
                "INSERT INTO provider_health (provider, failing_since, last_failure_at, last_error, alerted_at)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (provider) DO UPDATE SET failing_since ="
                " excluded.failing_since, last_failure_at = excluded.last_failure_at,"
                " last_error = excluded.last_error, alerted_at = excluded.alerted_at",
                (provider, changes["failing_since"], now, error, changes["alerted_at"]))
            row.update(failing_since=changes["failing_since"], last_failure_at=now, last_error=error)
            return (event, row) if event else None

    def _healthy_lately(self, provider, now):
        return outages.healthy_lately(self.conn.execute(
            "SELECT failing_since, last_ok_at FROM provider_health WHERE provider = ?", (provider,)).fetchone(), now)

    def provider_health(self):
        """Every provider's health row, failing ones with failing_since set."""
        return [dict(r) for r in self.conn.execute("SELECT * FROM provider_health ORDER BY provider")]

    def outages(self):
        """Announced outages still going on (/health, status): provider, since, last error."""
        return [{"provider": r["provider"], "since": r["failing_since"], "last_failure_at": r["last_failure_at"],
                 "last_error": r["last_error"]}
                for r in self.provider_health() if r["failing_since"] is not None and r["alerted_at"] is not None]

    def next_retry(self):
        """The batch retried soonest: queued again after a failed attempt, or a send to check
        again. (retry_at, batch id), or None."""
        row = self.conn.execute(
            "SELECT retry_at, id FROM batches WHERE (state = 'queued' AND attempts > 0"
            " OR state = 'sending' AND claim IS NULL) AND retry_at IS NOT NULL ORDER BY retry_at LIMIT 1"
        ).fetchone()
        return None if row is None else (row[0], row[1])

    def batch_life(self, batch_id):
        """Everything about one batch for `smsbatch show`: its row, texts, every state change
        (oldest first), the SMS sent for it, and the batches folded into it.

        Raises:
            NotFound: no such batch.
        """
        batch = self.get_batch(batch_id)
        texts = self.conn.execute(
            "SELECT sid, body, media, kind, received_at FROM messages WHERE batch_id = ? ORDER BY received_at, id",
            (batch_id,)).fetchall()
        events = self.conn.execute(
            "SELECT at, from_state, to_state, reason FROM batch_events WHERE batch_id = ? ORDER BY id",
            (batch_id,)).fetchall()
        sent = self.conn.execute("SELECT * FROM outbound WHERE batch_id = ? ORDER BY sent_at", (batch_id,)).fetchall()
        folded = self.conn.execute("SELECT id FROM batches WHERE superseded_by = ? ORDER BY seq", (batch_id,))
        return {"batch": batch, "texts": [dict(r) for r in texts], "events": [dict(r) for r in events],
                "outbound": [dict(r) for r in sent], "folded": [r[0] for r in folded]}

    def conversation(self, phone, limit):
        """The last `limit` things in a person's conversation (any of our numbers), oldest first:
        texts in, SMS out (the AI's and by hand), opt-outs, holds, and batches that ended
        without a reply."""
        texts = self.conn.execute(
            "SELECT received_at AS at, 'in' AS kind, our_number, body, media, batch_id, kind AS detail"
            " FROM messages WHERE phone = ? ORDER BY received_at DESC, id DESC LIMIT ?", (phone, limit))
        sent = self.conn.execute(
            "SELECT sent_at AS at, 'out' AS kind, our_number, body, NULL AS media, batch_id, source AS detail,"
            " sid, status, segments FROM outbound WHERE phone = ? ORDER BY sent_at DESC LIMIT ?", (phone, limit))
        unanswered = self.conn.execute(
            "SELECT completed_at AS at, 'note' AS kind, our_number, last_error AS body, id AS batch_id,"
            " state AS detail FROM batches WHERE phone = ? AND state IN ('failed', 'unknown', 'expired', 'held')"
            " AND completed_at IS NOT NULL ORDER BY completed_at DESC LIMIT ?", (phone, limit))
        opt_outs = self.conn.execute(
            "SELECT since AS at, 'opt_out' AS kind, scope AS our_number, keyword AS body FROM opt_outs"
            " WHERE phone = ?", (phone,))
        holds = self.conn.execute(
            "SELECT at, kind, reason AS body FROM hold_log WHERE phone = ? ORDER BY at DESC LIMIT ?", (phone, limit))
        items = [dict(r) for rows in (texts, sent, unanswered, opt_outs, holds) for r in rows]
        items.sort(key=lambda item: (item["at"], item["kind"] != "in"))
        return items[-limit:]

    def person_flags(self, phone):
        """Is this person on hold ({since, reason} or None), and which scopes did they opt out of."""
        hold = self.conn.execute("SELECT since, reason FROM holds WHERE phone = ?", (phone,)).fetchone()
        outs = self.conn.execute("SELECT scope, since, keyword FROM opt_outs WHERE phone = ? ORDER BY since",
                                 (phone,)).fetchall()
        return {"hold": None if hold is None else dict(hold), "opt_outs": [dict(r) for r in outs]}

    def recent_text_times(self, phone, at, limit):
        """When the person's latest `limit` texts up to `at` arrived, oldest first (their pace)."""
        rows = self.conn.execute("SELECT received_at FROM messages WHERE phone = ? AND received_at <= ?"
                                 " ORDER BY received_at DESC LIMIT ?", (phone, at, limit)).fetchall()
        return [r[0] for r in reversed(rows)]

    def reply_costs(self, since, until):
        """Every SMS we sent in [since, until): when, its segments (NULL: sent before they were
        counted; its body then comes too, to count them from), and Twilio's price and currency."""
        return [dict(r) for r in self.conn.execute(
            "SELECT sent_at, segments, CASE WHEN segments IS NULL THEN body END AS body, price, price_unit"
            " FROM outbound WHERE sent_at >= ? AND sent_at < ?", (since, until))]

    def tokens_between(self, since, until):
        """(prompt, completion) tokens billed for the batches created in [since, until)."""
        row = self.conn.execute(
            "SELECT coalesce(sum(prompt_tokens), 0), coalesce(sum(completion_tokens), 0) FROM batches"
            " WHERE created_at >= ? AND created_at < ?", (since, until)).fetchone()
        return row[0], row[1]

    def stats_rows(self, since, until):
        """What `smsbatch stats` counts in [since, until), one row per thing (report.stats buckets
        them by UTC day): texts in (by arrival), batches (by creation) with their AI requests,
        tokens, answerable texts and whether the AI answered them, and every SMS we sent with
        its latency (seconds from its batch's last text; None for one sent by hand)."""
        texts = self.conn.execute(
            "SELECT received_at AS at, kind FROM messages WHERE received_at >= ? AND received_at < ?",
            (since, until)).fetchall()
        batches = self.conn.execute(
            "SELECT b.created_at AS at, b.ai_requests, b.prompt_tokens, b.completion_tokens,"
            " b.response_text IS NOT NULL AS answered,"
            " (SELECT count(*) FROM messages m WHERE m.batch_id = b.id AND m.kind = 'text') AS texts"
            " FROM batches b WHERE b.created_at >= ? AND b.created_at < ?", (since, until)).fetchall()
        replies = self.conn.execute(
            "SELECT o.sent_at AS at, o.sent_at - b.last_at AS latency, o.status FROM outbound o"
            " LEFT JOIN batches b ON b.id = o.batch_id WHERE o.sent_at >= ? AND o.sent_at < ?",
            (since, until)).fetchall()
        return {"texts": [dict(r) for r in texts], "batches": [dict(r) for r in batches],
                "replies": [dict(r) for r in replies]}

    # -- metrics and alerts (issue 17: /metrics, SMSBATCH_ALERT_WEBHOOK_URL) ---------

    def metrics_counts(self):
        """What /metrics reads from the database besides health and activity, in three
        aggregate queries over covering indexes (schema step 10): texts per business number;
        batches per state with what the AI cost; replies per delivery status (None: no receipt
        yet), encoding and currency, with their SMS segments and Twilio's prices."""
        c = self.conn
        return {
            "texts": [tuple(r) for r in c.execute("SELECT our_number, count(*) FROM messages GROUP BY our_number")],
            "batches": [tuple(r) for r in c.execute(
                "SELECT state, count(*), coalesce(sum(ai_requests), 0), coalesce(sum(prompt_tokens), 0),"
                " coalesce(sum(completion_tokens), 0) FROM batches GROUP BY state")],
            "replies": [tuple(r) for r in c.execute(
                "SELECT status, encoding, price_unit, count(*), coalesce(sum(segments), 0), sum(price)"
                " FROM outbound GROUP BY status, encoding, price_unit")],
        }

    def metrics_snapshot(self, now):
        """Everything /metrics reads, from one read snapshot (read-only: it never takes the write
        lock): metrics_counts, health, provider health, last activity, bad signatures."""
        with self.db.snapshot():
            return {"counts": self.metrics_counts(), "health": self.health(now), "providers": self.provider_health(),
                    "activity": self.last_activity(), "rejected": self.rejected_signatures(now)["rejected_signatures"]}

    def waiting_unclaimed(self, now, after):
        """Batches that have been due for `after` seconds or more with no processor acting on
        them: (how many, the earliest due time), or None when there are none."""
        row = self.conn.execute(
            f"SELECT count(*), min({acts_at()}) FROM batches WHERE {PENDING_SQL} AND {acts_at()} <= ?",
            (now - after,)).fetchone()
        return (row[0], row[1]) if row[0] else None

    def claim_alert(self, event, episode, now):
        """True for exactly one caller per (event, episode), however many processes notice it:
        that caller sends the alert. A new episode (another value) replaces the old one."""
        row = self.conn.execute("SELECT episode FROM alerts WHERE event = ?", (event,)).fetchone()
        if row is not None and row[0] == episode:
            return False  # the common case costs a read, not a write
        with self.transaction() as conn:
            return conn.execute(
                "INSERT INTO alerts (event, episode, sent_at) VALUES (?, ?, ?) ON CONFLICT (event)"
                " DO UPDATE SET episode = excluded.episode, sent_at = excluded.sent_at"
                " WHERE alerts.episode <> excluded.episode", (event, episode, now)).rowcount == 1
