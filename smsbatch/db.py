"""The store: connection setup, migrations, every SQL statement, transactions, claiming."""

import json
import os
import secrets
import sqlite3
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from importlib import resources

from smsbatch import batching, delivery, migrations
from smsbatch.config import HEARTBEAT_LEASE_SECONDS
from smsbatch.errors import InvalidTransition, NotFound, SmsbatchError

SCHEMA_VERSION = migrations.LATEST
REJECTIONS_KEPT_SECONDS = 86400  # rejection counts older than a day are dropped as new ones arrive
ID_ALPHABET = "23456789abcdefghjkmnpqrstuvwxyz"  # no 0/o, 1/l/i: easy to read aloud and type
BUSY_TIMEOUT_SECONDS = 30.0


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


LATE_REASON = "found in Twilio's message log, older than SMSBATCH_MAX_AGE_SECONDS: not answered late"
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


@dataclass(frozen=True)
class Added:
    """What storing one inbound text did."""

    batch_id: str
    duplicate: bool
    kind: str


def new_id():
    """A short random batch id such as 'b7k2mq9xza'."""
    return "".join(secrets.choice(ID_ALPHABET) for _ in range(10))


def placeholders(items):
    return ",".join("?" for _ in items)


class Store:
    """One SQLite connection and the statements smsbatch runs on it. Not thread-safe."""

    def __init__(self, path, busy_timeout=BUSY_TIMEOUT_SECONDS):
        self.path = str(path)
        _create_private(self.path)
        self.conn = sqlite3.connect(
            self.path, timeout=busy_timeout, isolation_level=None, check_same_thread=False
        )
        self.conn.row_factory = sqlite3.Row
        self.conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
        try:
            self.conn.execute("PRAGMA journal_mode = WAL")
        except sqlite3.DatabaseError as exc:
            if "not a database" not in str(exc):
                raise
            raise SmsbatchError(f"{self.path} is not an SQLite database") from None
        # FULL: in WAL mode every COMMIT fsyncs the WAL, so a text answered 200 and a batch
        # marked sending survive power loss (NORMAL may roll them back). The webhook commits
        # in groups, so it pays one fsync per burst, not per text (bench/run.py webhook-vs-flask).
        self.conn.execute("PRAGMA synchronous = FULL")
        self.conn.execute("PRAGMA foreign_keys = ON")

    @classmethod
    def open_ready(cls, path, busy_timeout=BUSY_TIMEOUT_SECONDS):
        """Open an existing, migrated database (never creates one).

        Raises:
            SmsbatchError: missing, not an SQLite database, or not migrated.
        """
        if str(path) != ":memory:" and not os.path.exists(path):
            raise SmsbatchError(f"database {path} does not exist: run `smsbatch migrate` first")
        store = cls(path, busy_timeout=busy_timeout)
        try:
            store.require_schema()
        except Exception:
            store.close()
            raise
        return store

    def close(self):
        self.conn.close()

    def make_throwaway(self):
        """Make a scratch database (simulate's) fast: it need not survive a crash nor be
        shared. The journal stays, in memory, so a rolled-back transaction still rolls back."""
        for pragma in ("locking_mode = EXCLUSIVE", "journal_mode = MEMORY", "synchronous = OFF"):
            self.conn.execute(f"PRAGMA {pragma}").fetchall()

    @contextmanager
    def transaction(self):
        """BEGIN IMMEDIATE ... COMMIT: one writer at a time, waiting its turn (busy timeout)."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    # -- schema -----------------------------------------------------------------

    def version(self):
        return self.conn.execute("PRAGMA user_version").fetchone()[0]

    def migrate(self):
        """Create or upgrade the schema; safe to run again. Returns (version before, version after).

        Raises:
            SmsbatchError: the database is newer than this smsbatch.
        """
        # A step may rebuild a table that others reference: foreign keys are off while it
        # runs (SQLite ignores this pragma inside a transaction) and checked before COMMIT.
        self.conn.execute("PRAGMA foreign_keys = OFF")
        try:
            with self.transaction() as conn:
                before = conn.execute("PRAGMA user_version").fetchone()[0]
                if before > SCHEMA_VERSION:
                    raise SmsbatchError(
                        f"database schema version {before} is newer than this smsbatch ({SCHEMA_VERSION})")
                if before == 0:
                    for statement in _statements(resources.files("smsbatch").joinpath("schema.sql").read_text()):
                        conn.execute(statement)
                else:
                    for version in range(before + 1, SCHEMA_VERSION + 1):
                        for statement in migrations.STEPS[version]:
                            conn.execute(statement)
                broken = conn.execute("PRAGMA foreign_key_check").fetchone()
                if broken:
                    raise SmsbatchError(f"upgrade stopped: table {broken[0]} has a row whose {broken[2]} is missing")
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        finally:
            self.conn.execute("PRAGMA foreign_keys = ON")
        return before, SCHEMA_VERSION

    def require_schema(self):
        """Raises: SmsbatchError when the database was never migrated."""
        version = self.version()
        if version > SCHEMA_VERSION:
            raise SmsbatchError(f"database {self.path} has schema version {version}, newer than this smsbatch "
                                f"({SCHEMA_VERSION}): upgrade smsbatch")
        if version != SCHEMA_VERSION:
            raise SmsbatchError(f"database {self.path} is not ready: run `smsbatch migrate` first")

    # -- inbound ----------------------------------------------------------------

    def add_message(self, sid, phone, our_number, body, received_at, rules, media=(), carrier_kind=None,
                    scope=None, expired=False):
        """Store one inbound text exactly once and put it in its conversation's open batch.

        A conversation is the person (`phone`) and the number they wrote to (`our_number`).
        Opt-out/opt-in keywords update the opt-out list for `scope` (batching.opt_out_scope;
        default our_number) and get a batch of their own, skipped at once, so they never
        reach the AI. `carrier_kind` ('opt_out'/'opt_in') is Twilio's own verdict
        (OptOutType), for keywords configured in Twilio. `expired`: a text found too late to
        answer (the backfill) is stored in a batch of its own, expired at once.
        """
        kind = carrier_kind or (batching.keyword_kind(body) if not media else None)
        scope = scope or our_number
        with self.transaction() as conn:
            seen = conn.execute("SELECT batch_id FROM messages WHERE sid = ?", (sid,)).fetchone()
            if seen:
                return Added(seen[0], True, kind or "text")
            yes = body.strip().strip(".!").upper() == "YES"
            if kind == "opt_in" and yes and not carrier_kind and not self._opted_out(conn, phone, scope):
                kind = None  # "yes" answering the AI's question is a text, not a re-subscription
            if kind:
                batch_id = self._add_keyword(conn, phone, our_number, scope, body, received_at, kind)
            elif expired:
                batch_id = self._insert_batch(conn, phone, our_number, received_at, State.EXPIRED, None,
                                              reason=LATE_REASON)
            else:
                urgent = batching.is_urgent(body, rules.urgent_keywords)
                batch_id = self._join_open(conn, phone, our_number, received_at, urgent, rules)
            conn.execute(
                "INSERT INTO messages (sid, phone, our_number, body, media, kind, received_at, batch_id)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (sid, phone, our_number, body, json.dumps(list(media)) if media else None,
                 kind or "text", received_at, batch_id),
            )
        return Added(batch_id, False, kind or "text")

    def _add_keyword(self, conn, phone, our_number, scope, body, at, kind):
        word = body.strip().upper()
        if kind == "opt_out":
            conn.execute(
                "INSERT INTO opt_outs (phone, scope, since, keyword) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (phone, scope) DO UPDATE SET since = excluded.since, keyword = excluded.keyword",
                (phone, scope, at, word),
            )
        else:  # opting back in also lifts an opt-out kept from schema 1, which covered every number
            conn.execute("DELETE FROM opt_outs WHERE phone = ? AND scope IN (?, '*')", (phone, scope))
        return self._insert_batch(
            conn, phone, our_number, at, State.SKIPPED, None, reason=f"keyword {word}: not for the AI"
        )

    def _join_open(self, conn, phone, our_number, at, urgent, rules):
        row = conn.execute(
            "SELECT b.id, b.first_at, b.last_at, b.message_count, b.urgent FROM conversations c"
            " JOIN batches b ON b.id = c.open_batch WHERE c.phone = ? AND c.our_number = ? AND b.state = 'open'",
            (phone, our_number),
        ).fetchone()
        quiet = self._quiet(conn, phone, at, rules)
        if row is None:
            due = batching.due_at(rules, at, at, 1, urgent, quiet)
            state = State.QUEUED if rules.max_messages <= 1 else State.OPEN
            batch_id = self._insert_batch(conn, phone, our_number, at, state, due, urgent=urgent, quiet=quiet)
            conn.execute(
                "INSERT INTO conversations (phone, our_number, open_batch) VALUES (?, ?, ?)"
                " ON CONFLICT (phone, our_number) DO UPDATE SET open_batch = excluded.open_batch",
                (phone, our_number, batch_id),
            )
            return batch_id
        first, last = min(row["first_at"], at), max(row["last_at"], at)
        count, urgent = row["message_count"] + 1, bool(row["urgent"]) or urgent
        conn.execute(
            "UPDATE batches SET message_count = ?, first_at = ?, last_at = ?, urgent = ?, due_at = ?,"
            " quiet_seconds = ? WHERE id = ?",
            (count, first, last, int(urgent), batching.due_at(rules, first, last, count, urgent, quiet),
             quiet, row["id"]),
        )
        if count >= rules.max_messages:  # a full batch closes: the next text opens a new one
            self._move(conn, row["id"], State.QUEUED, at, f"full: {count} texts")
        return row["id"]

    def quiet_now(self, phone, now, rules):
        """The quiet period this person's next text would get now (fixed, or fitted to their pace)."""
        return self._quiet(self.conn, phone, now, rules)

    @staticmethod
    def _quiet(conn, phone, at, rules):
        """The quiet period after the phone's text at `at`: fixed, or (adaptive) fitted to the
        gaps between its latest texts up to `at` (batching.quiet_for). Reads at most
        `adaptive_window` index entries of messages_phone: no scan, whatever the history."""
        if not rules.adaptive:
            return rules.quiet_seconds
        # One row for the whole window: half the cost of fetching its rows one by one.
        joined = conn.execute(
            "SELECT group_concat(received_at) FROM (SELECT received_at FROM messages WHERE phone = ?"
            " AND received_at <= ? ORDER BY received_at DESC LIMIT ?)", (phone, at, rules.adaptive_window - 1),
        ).fetchone()[0]
        times = list(map(float, joined.split(","))) if joined else []
        return batching.quiet_for(batching.gaps_between(times + [at]), rules)

    def _insert_batch(self, conn, phone, our_number, at, state, due, urgent=False, reason=None, quiet=None):
        final = due is None
        for _ in range(5):
            batch_id = new_id()
            try:
                conn.execute(
                    "INSERT INTO batches (id, phone, our_number, state, message_count, first_at, last_at,"
                    " urgent, due_at, last_error, completed_at, created_at, quiet_seconds)"
                    " VALUES (?, ?, ?, ?, 1, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (batch_id, phone, our_number, state, at, at, int(urgent), due, reason if final else None,
                     at if final else None, at, quiet),
                )
                break
            except sqlite3.IntegrityError as exc:
                if "batches.id" not in str(exc):
                    raise
        else:
            raise SmsbatchError("could not pick a unique batch id")  # pragma: no cover
        self._record(conn, batch_id, at, None, state, reason or "first text")
        return batch_id

    # -- state moves ------------------------------------------------------------

    @staticmethod
    def _record(conn, batch_id, at, from_state, to_state, reason):
        conn.execute(
            "INSERT INTO batch_events (batch_id, at, from_state, to_state, reason) VALUES (?, ?, ?, ?, ?)",
            (batch_id, at, None if from_state is None else State(from_state).value, State(to_state).value,
             reason),
        )

    def _move(self, conn, batch_id, to, now, reason, assignments="", values=(), claim=None, expect=None):
        """Move one batch to state `to` (with further column `assignments`), recorded in
        batch_events. With `claim`/`expect`, only while that claim holds the batch and it
        is in one of the `expect` states; returns False (nothing changed) otherwise.

        Raises:
            NotFound: no such batch.
            InvalidTransition: TRANSITIONS does not allow this move.
        """
        row = conn.execute("SELECT state, claim FROM batches WHERE id = ?", (batch_id,)).fetchone()
        if row is None:
            raise NotFound(f"no batch with id {batch_id!r}")
        if (claim is not None and row["claim"] != claim) or (expect is not None and row["state"] not in expect):
            return False
        current, to = State(row["state"]), State(to)
        if to not in TRANSITIONS[current]:
            raise InvalidTransition(f"batch {batch_id} cannot move from {current.value} to {to.value}")
        extra = f", {assignments}" if assignments else ""
        conn.execute(f"UPDATE batches SET state = ?{extra} WHERE id = ?", (to.value, *values, batch_id))
        self._record(conn, batch_id, now, current, to, reason)
        return True

    def _update_held(self, conn, batch, to, now, reason, assignments="", values=(),
                     states=(State.PROCESSING, State.SENDING)):
        """One move of a batch by the processor holding it: applied only while the claim is
        still this processor's and the batch is in one of `states`; the claim ends with it.
        Returns False (nothing changed) if the lease was lost."""
        assignments = "claim = NULL" + (f", {assignments}" if assignments else "")
        return self._move(conn, batch["id"], to, now, reason, assignments, values, claim=batch["claim"],
                          expect=[State(x).value for x in states])

    # -- claiming ---------------------------------------------------------------

    def claim_due(self, now, limit, lease, max_age, holder=None, node=None):
        """Atomically claim up to `limit` due batches for `lease` seconds (renewed by the
        holder's heartbeat, see lease.py); returns (claimed rows, expired count).
        `holder` ("host:pid") is recorded for `status`, `node` (lease.node_id) so that a
        processor of the same machine may tell whether the holder still lives.

        Open/queued batches whose last text is older than `max_age` are expired
        instead. A batch found processing or sending past its lease is claimed again
        (its holder died); a sending one keeps its state so it is reconciled, not resent.
        Every claim counts as an attempt.

        One batch per conversation at a time: a batch is not claimed while another batch
        of the same person and number is in flight (lease still running) or an older one
        is also due, so nobody gets two replies racing each other; the later texts fold
        into the newer batch instead (begin_send).
        """
        token = secrets.token_hex(8)
        with self.transaction() as conn:
            expired = self._expire(conn, now, max_age)
            pending = placeholders(PENDING)
            candidates = conn.execute(
                f"SELECT seq, id, state, attempts FROM batches b WHERE state IN ({placeholders(CLAIMABLE)})"
                " AND due_at <= ? AND NOT EXISTS (SELECT 1 FROM batches o"
                f" WHERE o.phone = b.phone AND o.our_number = b.our_number AND o.seq != b.seq"
                f" AND o.state IN ({pending}) AND (o.due_at > ? AND o.state IN ('processing', 'sending')"
                " AND o.claim IS NOT NULL OR o.due_at <= ? AND o.seq < b.seq))"
                " ORDER BY due_at LIMIT ?",
                (*[x.value for x in CLAIMABLE], now, *[x.value for x in PENDING], now, now, limit),
            ).fetchall()
            if not candidates:
                return [], expired
            rows = conn.execute(
                "UPDATE batches SET claim = ?, due_at = ?, started_at = ?, claimed_at = coalesce(claimed_at, ?),"
                " holder = ?, holder_node = ?, heartbeat_at = ?,"
                " state = CASE state WHEN 'sending' THEN 'sending' ELSE 'processing' END,"
                f" attempts = attempts + 1 WHERE seq IN ({placeholders(candidates)}) RETURNING *",
                (token, now + lease, now, now, holder, node, now, *[c["seq"] for c in candidates]),
            ).fetchall()
            for c in candidates:
                taken_over = c["state"] in (State.PROCESSING, State.SENDING)
                how = "lease ran out; taken over" if taken_over else "claimed"
                to = State.SENDING if c["state"] == State.SENDING else State.PROCESSING
                self._record(conn, c["id"], now, c["state"], to, f"{how} (attempt {c['attempts'] + 1})")
        return [dict(r) for r in rows], expired

    def renew_claims(self, claims, due, now):
        """Extend the leases of these claims to `due` (a heartbeat); returns the (claim, batch id)
        pairs renewed. A batch another processor took over, or that ended, is not renewed."""
        with self.transaction() as conn:
            rows = conn.execute(
                f"UPDATE batches SET due_at = ?, heartbeat_at = ? WHERE claim IN ({placeholders(claims)})"
                " AND state IN ('processing', 'sending') RETURNING claim, id",
                (due, now, *claims),
            ).fetchall()
        return {(r[0], r[1]) for r in rows}

    def free_dead_holders(self, now, node, alive):
        """End at once the leases of batches in *processing* held by processes of `node`
        that `alive(holder)` says are gone. Returns how many were freed."""
        rows = self.conn.execute(
            "SELECT id, claim, holder FROM batches WHERE state = 'processing' AND claim IS NOT NULL"
            " AND due_at > ? AND holder_node = ?", (now, node)).fetchall()
        dead = [r for r in rows if r["holder"] and not alive(r["holder"])]
        if not dead:
            return 0
        with self.transaction() as conn:
            for row in dead:
                conn.execute("UPDATE batches SET due_at = ? WHERE id = ? AND claim = ? AND state = 'processing'",
                             (now, row["id"], row["claim"]))
        return len(dead)

    def record_usage(self, batch_id, requests, prompt_tokens, completion_tokens):
        """Add what one AI call cost (HTTP requests, tokens) to the batch's totals."""
        with self.transaction() as conn:
            conn.execute(
                "UPDATE batches SET ai_requests = ai_requests + ?, prompt_tokens = prompt_tokens + ?,"
                " completion_tokens = completion_tokens + ? WHERE id = ?",
                (requests, prompt_tokens, completion_tokens, batch_id),
            )

    def _expire(self, conn, now, max_age):
        """Expire open/queued batches too old to answer. Returns how many."""
        rows = conn.execute(
            # +due_at: search by last_at (index batches_state_last), so the sweep reads only
            # batches old enough to expire, not every due one (flat with a large backlog).
            "SELECT seq, id, state FROM batches WHERE state IN ('open', 'queued') AND +due_at <= ? AND last_at < ?"
            # a batch an operator requeued is answered, however old its texts
            " AND retried_at IS NULL",
            (now, now - max_age),
        ).fetchall()
        reason = "not answered: older than SMSBATCH_MAX_AGE_SECONDS"
        for row in rows:
            self._move(conn, row["id"], State.EXPIRED, now, reason,
                       "due_at = NULL, claim = NULL, completed_at = ?, last_error = ?", (now, reason))
        return len(rows)

    def next_due(self):
        """The earliest due_at among pending batches, or None."""
        row = self.conn.execute(
            "SELECT min(due_at) FROM batches WHERE state IN ('open', 'queued', 'processing', 'sending')"
        ).fetchone()
        return row[0]

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
                "INSERT OR IGNORE INTO opt_outs (phone, scope, since, keyword) VALUES (?, ?, ?, ?)",
                (phone, scope, now, keyword),
            )

    def begin_send(self, batch, response, now, settings, reused=False):
        """Commit the reply as *sending* before Twilio is called.

        In the same transaction: a STOP that arrived meanwhile skips the batch; a newer
        batch of the same conversation that is already answered (this one was backing
        off) takes this batch's texts, since a late, stale reply helps nobody; and (with
        `supersede`) a newer unclaimed batch written after this one was claimed takes
        its texts so the next reply covers both. `reused`: the reply is one stored earlier
        (an operator's retry), not a new answer. Returns the state the batch is now in, or
        None if this processor no longer holds the lease.
        """
        with self.transaction() as conn:
            if not self._holds(conn, batch, State.PROCESSING):
                return None
            scope = batching.opt_out_scope(batch["our_number"], settings.twilio_messaging_service_sid)
            if self._opted_out(conn, batch["phone"], scope):
                self._finish(conn, batch, State.SKIPPED, now, error="opted out before the reply was sent")
                return State.SKIPPED
            hold = self._on_hold(conn, batch["phone"])
            if hold is not None:
                self._finish(conn, batch, State.HELD, now, error=held_reason(hold, "before the reply was sent"))
                return State.HELD
            rules = batching.Rules.from_settings(settings)
            if self._fold_into_answered(conn, batch, now, settings):
                return State.SUPERSEDED
            if settings.supersede and batch["fold_depth"] < settings.max_supersede:
                # Only texts written after this batch was first claimed supersede it (a batch
                # closed by max messages is not held back by texts that were already waiting).
                newer = conn.execute(
                    "SELECT * FROM batches WHERE phone = ? AND our_number = ? AND state IN ('open', 'queued')"
                    " AND seq > ? AND created_at >= ? ORDER BY seq LIMIT 1",
                    (batch["phone"], batch["our_number"], batch["seq"], batch["claimed_at"]),
                ).fetchone()
                if newer:
                    self._fold(conn, batch, newer, now, rules)
                    return State.SUPERSEDED
            how = "sending the stored reply again (no new AI call)" if reused else "AI answered; sending"
            self._move(conn, batch["id"], State.SENDING, now, how,
                       "response_text = ?, send_started_at = ?, due_at = ?",
                       (response, now, now + HEARTBEAT_LEASE_SECONDS), claim=batch["claim"])
        return State.SENDING

    def fold_if_answered(self, batch, now, settings):
        """Before answering an older batch (it was backing off): if a newer batch of the
        conversation already went out with these texts in its prompt, fold into it instead
        of sending a stale reply. Returns True if folded."""
        with self.transaction() as conn:
            return self._holds(conn, batch, State(batch["state"])) and self._fold_into_answered(
                conn, batch, now, settings)

    def _fold_into_answered(self, conn, batch, now, settings):
        if batch["retried_at"] is not None:  # an operator asked for this one to be answered
            return False
        answered = conn.execute(
            "SELECT * FROM batches WHERE phone = ? AND our_number = ? AND seq > ? AND state IN ('sending', 'sent')"
            " ORDER BY seq DESC LIMIT 1",
            (batch["phone"], batch["our_number"], batch["seq"]),
        ).fetchone()
        if answered is None or not self._in_prompt_of(conn, batch, answered, settings.history_messages):
            return False
        self._fold(conn, batch, answered, now, batching.Rules.from_settings(settings))
        return True

    @staticmethod
    def _in_prompt_of(conn, batch, answered, history):
        """Were this batch's texts in the newer batch's prompt (within its history window)?"""
        between = conn.execute(
            "SELECT (SELECT count(*) FROM messages WHERE phone = ? AND our_number = ? AND kind = 'text'"
            " AND batch_id != ? AND received_at >= ? AND received_at <= ?) + (SELECT count(*) FROM outbound"
            " WHERE phone = ? AND our_number = ? AND sent_at >= ? AND sent_at <= ?)",
            (batch["phone"], batch["our_number"], answered["id"], batch["first_at"], answered["first_at"],
             batch["phone"], batch["our_number"], batch["first_at"], answered["first_at"]),
        ).fetchone()[0]
        return 0 < between <= history

    def _fold(self, conn, batch, newer, now, rules):
        conn.execute("UPDATE messages SET batch_id = ? WHERE batch_id = ?", (newer["id"], batch["id"]))
        first = min(newer["first_at"], batch["first_at"])
        count = newer["message_count"] + batch["message_count"]
        urgent = bool(newer["urgent"] or batch["urgent"])
        due = newer["due_at"]
        if newer["state"] == State.OPEN:
            due = batching.due_at(rules, first, newer["last_at"], count, urgent, newer["quiet_seconds"])
        conn.execute(
            "UPDATE batches SET message_count = ?, first_at = ?, urgent = ?, due_at = ?,"
            " fold_depth = max(fold_depth, ?) WHERE id = ?",
            (count, first, int(urgent), due, batch["fold_depth"] + 1, newer["id"]),
        )
        self._record(conn, newer["id"], now, newer["state"], newer["state"],
                     f"took the {batch['message_count']} text(s) of batch {batch['id']}")
        self._move(conn, batch["id"], State.SUPERSEDED, now, f"folded into batch {newer['id']}",
                   "superseded_by = ?, due_at = NULL, claim = NULL, completed_at = ?, last_error = NULL",
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
                "provider_sid = ?, sent_at = ?, completed_at = ?, due_at = NULL, last_error = NULL",
                (provider_sid, now, now), (State.PROCESSING,) if found else (State.SENDING,))
            if moved:
                conn.execute(
                    "INSERT OR IGNORE INTO outbound (sid, batch_id, phone, our_number, body, source, sent_at)"
                    " SELECT provider_sid, id, phone, our_number, response_text, 'ai', sent_at FROM batches"
                    " WHERE id = ?", (batch["id"],))
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
        return self._update_held(conn, batch, state, now, error, "last_error = ?, completed_at = ?, due_at = NULL",
                                 (error, now))

    def requeue(self, batch, due, error, now):
        """Put a claimed batch back in the queue to try again at `due` (backoff)."""
        with self.transaction() as conn:
            return self._update_held(conn, batch, State.QUEUED, now, f"{error}; next try at {_when(due)}",
                                     "due_at = ?, last_error = ?", (due, error))

    def release_sending(self, batch, due, error, now):
        """Leave a batch in *sending* (outcome unknown) to be reconciled at `due`."""
        with self.transaction() as conn:
            return self._update_held(conn, batch, State.SENDING, now, f"{error}; checking at {_when(due)}",
                                     "due_at = ?, last_error = ?", (due, error), (State.SENDING,))

    def _holds(self, conn, batch, state):
        row = conn.execute("SELECT state, claim FROM batches WHERE id = ?", (batch["id"],)).fetchone()
        return row is not None and row["claim"] == batch["claim"] and row["state"] == state

    # -- backfill ---------------------------------------------------------------

    def has_message(self, sid):
        """True if a text with this MessageSid is stored."""
        return self.conn.execute("SELECT 1 FROM messages WHERE sid = ?", (sid,)).fetchone() is not None

    def known_numbers(self):
        """Every number of ours that people have written to."""
        return {r[0] for r in self.conn.execute("SELECT DISTINCT our_number FROM conversations")}

    def claim_backfill(self, now, every):
        """Take the backfill's turn if nobody took it in the last `every` seconds (across
        every processor). Returns (True, checked_until) when the turn is ours, else (False, None)."""
        with self.transaction() as conn:
            conn.execute("INSERT OR IGNORE INTO backfill (id) VALUES (1)")
            taken = conn.execute(
                "UPDATE backfill SET claimed_at = ? WHERE id = 1 AND (claimed_at IS NULL OR claimed_at <= ?"
                " OR claimed_at > ?) RETURNING checked_until", (now, now - every, now)).fetchone()
        return (True, taken[0]) if taken else (False, None)

    def finish_backfill(self, until):
        """Record that Twilio's log was searched up to `until`."""
        with self.transaction() as conn:
            conn.execute("UPDATE backfill SET checked_until = max(coalesce(checked_until, 0), ?) WHERE id = 1",
                         (until,))

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
            batch = self.get_batch(batch_id)
            state = State(batch["state"])
            if state not in RETRYABLE:
                raise InvalidTransition(_why_not_retryable(batch))
            keyword = conn.execute(
                "SELECT 1 FROM messages WHERE batch_id = ? AND kind != 'text'", (batch_id,)
            ).fetchone()
            if keyword:
                raise InvalidTransition(f"batch {batch_id} holds an opt-out/opt-in keyword; nothing to answer")
            if fresh and state == State.UNKNOWN:
                # Its reply may have gone out: only the stored reply can be looked up in Twilio's
                # log before sending, so a fresh one could reach the person as a second reply.
                raise InvalidTransition(f"batch {batch_id} is unknown: its reply may already have been sent; "
                                        "retry it without --fresh (Twilio's log is checked first)")
            fresh_note = "; its stored reply is dropped (--fresh)" if fresh else ""
            self._move(conn, batch_id, State.QUEUED, now, f"requeued by an operator (smsbatch retry){fresh_note}",
                       "due_at = ?, attempts = 0, claim = NULL, last_error = NULL, completed_at = NULL,"
                       " retried_at = ?, response_text = CASE WHEN ? THEN NULL ELSE response_text END",
                       (now, now, int(fresh)))
        return self.get_batch(batch_id)

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
            "SELECT id, state, holder, heartbeat_at, due_at FROM batches"
            " WHERE state IN ('processing', 'sending') AND claim IS NOT NULL ORDER BY seq LIMIT 100"
        ).fetchall()
        in_flight = [dict(r) | {"renewed_seconds_ago": None if r["heartbeat_at"] is None
                                else round(now - r["heartbeat_at"], 1),
                                "lease_left_seconds": round(r["due_at"] - now, 1)} for r in rows]
        cost = self.conn.execute(
            "SELECT coalesce(sum(ai_requests), 0), coalesce(sum(prompt_tokens), 0),"
            " coalesce(sum(completion_tokens), 0) FROM batches"
        ).fetchone()
        return {"in_flight": in_flight,
                "ai": {"requests": cost[0], "prompt_tokens": cost[1], "completion_tokens": cost[2]}}

    # -- delivery receipts ------------------------------------------------------

    def _delivery(self, latest=5):
        """Replies by latest MessageStatus, and the latest undelivered or failed ones."""
        # No receipt yet: Twilio answered the send itself with queued (accepted, with a
        # messaging service); counted as queued until a receipt or a check says more.
        counts = dict(self.conn.execute(
            "SELECT coalesce(status, 'queued'), count(*) FROM outbound GROUP BY 1 ORDER BY 1").fetchall())
        problems = self.conn.execute(
            f"SELECT sid, batch_id, phone, status, error_code, status_at FROM outbound"
            f" WHERE status IN ({placeholders(delivery.PROBLEMS)}) ORDER BY status_at DESC LIMIT ?",
            (*delivery.PROBLEMS, latest)).fetchall()
        return {"delivery": counts,
                "delivery_problems": [dict(r) | {"error": delivery.explain(r["status"], r["error_code"])}
                                      for r in problems]}

    def record_delivery(self, sid, status, error_code, at):
        """Record Twilio's latest MessageStatus (and ErrorCode) of a reply we sent, unless it
        would move the reply backwards. Returns False for a SID we never sent (ignored)."""
        with self.transaction() as conn:
            row = conn.execute("SELECT status FROM outbound WHERE sid = ?", (sid,)).fetchone()
            if row is None:
                return False
            if delivery.moves_forward(row["status"], status):
                conn.execute("UPDATE outbound SET status = ?, error_code = ?, status_at = ? WHERE sid = ?",
                             (status, error_code, at, sid))
            return True

    def deliveries_to_check(self, now, limit):
        """Replies without a final status CHECK_AFTER_SECONDS after sending, never checked yet."""
        return [r[0] for r in self.conn.execute(
            f"SELECT sid FROM outbound WHERE (status IS NULL OR status NOT IN ({placeholders(delivery.FINAL)}))"
            " AND checked_at IS NULL AND sent_at <= ? ORDER BY sent_at LIMIT ?",
            (*sorted(delivery.FINAL), now - delivery.CHECK_AFTER_SECONDS, limit))]

    def mark_checked(self, sid, now):
        with self.transaction() as conn:
            conn.execute("UPDATE outbound SET checked_at = ? WHERE sid = ?", (now, sid))

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
        """Pending count and the oldest pending batch's age, from one cheap query."""
        row = self.conn.execute(
            f"SELECT count(*), min(first_at) FROM batches WHERE state IN ({placeholders(PENDING)})",
            [s.value for s in PENDING],
        ).fetchone()
        return {"pending": row[0], "oldest_pending_age_seconds": None if row[1] is None else round(now - row[1], 1)}

    def record_rejections(self, rows, now):
        """Add (minute, count, last_at, last_url) rows of bad-signature counts; drop old ones."""
        with self.transaction() as conn:
            conn.executemany(
                "INSERT INTO rejections (minute, count, last_at, last_url) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (minute) DO UPDATE SET count = count + excluded.count,"
                " last_at = max(last_at, excluded.last_at),"
                " last_url = CASE WHEN excluded.last_at >= last_at THEN excluded.last_url ELSE last_url END",
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

    # -- operators' tools: check, backup, prune, hold, send (issue 10 "Act") ----------

    def check_writable(self):
        """Take the write lock and let it go, writing nothing.

        Raises:
            sqlite3.OperationalError: the file or its folder is read-only, or the lock is held too long.
        """
        with self.transaction():
            pass

    def copy_to(self, path):
        """Copy the whole database, WAL included, into the empty file at `path` with SQLite's
        backup API: one consistent snapshot, taken in one step so writers are not blocked (WAL)
        and the copy never mixes two moments. The copy is one self-contained file (no -wal).
        Returns counts of what it holds.

        Raises:
            SmsbatchError: the copy fails its integrity check.
        """
        target = sqlite3.connect(path, isolation_level=None)
        try:
            self.conn.backup(target, pages=-1)
            target.execute("PRAGMA journal_mode = DELETE").fetchall()
            verdict = target.execute("PRAGMA quick_check").fetchone()[0]
            if verdict != "ok":
                raise SmsbatchError(f"the copy at {path} failed its integrity check: {verdict}")
            return {"version": target.execute("PRAGMA user_version").fetchone()[0],
                    "texts": target.execute("SELECT count(*) FROM messages").fetchone()[0],
                    "batches": target.execute("SELECT count(*) FROM batches").fetchone()[0]}
        finally:
            target.close()

    def retry_refusal(self, batch_id):
        """Why `retry` would refuse this batch, or None if it can be requeued.

        Raises:
            NotFound: no such batch.
        """
        batch = self.get_batch(batch_id)
        if State(batch["state"]) not in RETRYABLE:
            return _why_not_retryable(batch)
        if self.conn.execute("SELECT 1 FROM messages WHERE batch_id = ? AND kind != 'text'", (batch_id,)).fetchone():
            return f"batch {batch_id} holds an opt-out/opt-in keyword; nothing to answer"
        if self._on_hold(self.conn, batch["phone"]):
            return (f"batch {batch_id}: {batch['phone']} is on hold; `smsbatch release {batch['phone']}` first "
                    "(--answer-pending answers what came meanwhile)")
        return None

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
            " AND phone NOT IN (SELECT phone FROM holds) ORDER BY completed_at, seq", (*values, since))]

    def hold(self, phone, reason, now):
        """Put a person on hold: no AI reply to them until released (their texts are still
        stored). Holding someone already held keeps the start and updates the reason.
        Returns the hold (phone, since, reason)."""
        with self.transaction() as conn:
            conn.execute(
                "INSERT INTO holds (phone, since, reason) VALUES (?, ?, ?)"
                " ON CONFLICT (phone) DO UPDATE SET reason = coalesce(excluded.reason, holds.reason)",
                (phone, now, reason))
            return dict(self._on_hold(conn, phone))

    def find_hold(self, phone):
        """The person's hold (phone, since, reason), or None."""
        row = self._on_hold(self.conn, phone)
        return None if row is None else dict(row)

    @staticmethod
    def _on_hold(conn, phone):
        return conn.execute("SELECT phone, since, reason FROM holds WHERE phone = ?", (phone,)).fetchone()

    def release(self, phone, now, answer_pending=False):
        """End a hold. With `answer_pending`, the batches that ended *held* during it are
        answered: per conversation, the newest is requeued with the older ones' texts folded
        in (one reply covers them all). Returns (the hold with held_batches and held_texts:
        what ended held during it, ids of the requeued batches).

        Raises:
            NotFound: the person is not on hold.
        """
        with self.transaction() as conn:
            hold = self._on_hold(conn, phone)
            if hold is None:
                raise NotFound(f"{phone} is not on hold")
            conn.execute("DELETE FROM holds WHERE phone = ?", (phone,))
            self._hold_waiting(conn, phone, hold, now)
            held = conn.execute("SELECT * FROM batches WHERE phone = ? AND state = 'held' AND completed_at >= ?"
                                " ORDER BY seq", (phone, hold["since"])).fetchall()
            requeued = self._answer_held(conn, held, now) if answer_pending else []
        return dict(hold) | {"held_batches": len(held), "held_texts": sum(r["message_count"] for r in held)}, requeued

    def _hold_waiting(self, conn, phone, hold, now):
        """Texts that came during the hold but whose batches were not yet due (open, queued)
        end *held* like the others: answered only if the operator asks (--answer-pending)."""
        waiting = conn.execute("SELECT id FROM batches WHERE phone = ? AND state IN ('open', 'queued')"
                               " AND created_at >= ? ORDER BY seq", (phone, hold["since"])).fetchall()
        why = f": {hold['reason']}" if hold["reason"] else ""
        reason = f"came while on hold, not answered at its release (smsbatch retry to answer it){why}"
        for row in waiting:
            self._move(conn, row["id"], State.HELD, now, reason,
                       "due_at = NULL, claim = NULL, completed_at = ?, last_error = ?", (now, reason))

    def _answer_held(self, conn, held, now):
        newest = {row["our_number"]: row for row in held}
        for row in newest.values():
            # the stored reply, if any, predates the texts folded in: ask the AI afresh
            self._move(conn, row["id"], State.QUEUED, now, "released: answering the texts that came while held",
                       "due_at = ?, attempts = 0, claim = NULL, last_error = NULL, completed_at = NULL,"
                       " retried_at = ?, response_text = NULL", (now, now))
        for row in held:
            target = newest[row["our_number"]]
            if row["id"] != target["id"]:
                fresh = conn.execute("SELECT * FROM batches WHERE id = ?", (target["id"],)).fetchone()
                self._fold(conn, row, fresh, now, batching.Rules())
        return [row["id"] for row in newest.values()]

    def last_number(self, phone):
        """The number this person last wrote to, or None."""
        row = self.conn.execute("SELECT our_number FROM messages WHERE phone = ? ORDER BY received_at DESC, id DESC"
                                " LIMIT 1", (phone,)).fetchone()
        return None if row is None else row[0]

    def record_manual(self, sid, phone, our_number, body, now):
        """Log a reply an operator sent by hand (`smsbatch send`): the AI sees it as history."""
        with self.transaction() as conn:
            conn.execute("INSERT INTO outbound (sid, batch_id, phone, our_number, body, source, sent_at)"
                         " VALUES (?, NULL, ?, ?, ?, 'manual', ?)", (sid, phone, our_number, body, now))

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
            self.conn.execute("BEGIN")  # one snapshot to count in; nothing is written
            try:
                doomed = self._prunable(self.conn, cutoff, None)
                for i in range(0, len(doomed), chunk):
                    _add(totals, self._prune_counts(self.conn, doomed[i:i + chunk]))
                totals["manual_replies"] = self.conn.execute(
                    f"SELECT count(*) FROM outbound WHERE {_MANUAL_PRUNABLE}", (cutoff,)).fetchone()[0]
            finally:
                self.conn.execute("ROLLBACK")
            return totals
        while limit is None or totals["batches"] < limit:
            with self.transaction() as conn:
                doomed = self._prunable(conn, cutoff, chunk if limit is None else min(chunk, limit - totals["batches"]))
                _add(totals, self._prune_counts(conn, doomed))
                self._delete_batches(conn, doomed)
            if not doomed:
                break
        with self.transaction() as conn:
            totals["manual_replies"] = conn.execute(f"DELETE FROM outbound WHERE {_MANUAL_PRUNABLE}", (cutoff,)).rowcount
        return totals

    @staticmethod
    def _prunable(conn, cutoff, limit):
        """Ids of finished batches older than `cutoff` that no kept batch points at (superseded_by)."""
        finished = [s.value for s in FINAL]
        rows = conn.execute(
            f"SELECT id FROM batches WHERE state IN ({placeholders(finished)}) AND last_at < ?"
            " AND coalesce(completed_at, last_at) < ? AND coalesce(retried_at, 0) < ?"
            " AND phone NOT IN (SELECT phone FROM holds) AND phone NOT IN (SELECT phone FROM opt_outs)"
            + (" LIMIT ?" if limit else ""), (*finished, cutoff, cutoff, cutoff, *([limit] if limit else [])))
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
        if not ids:
            return
        marks = placeholders(ids)
        # children first; a conversation whose (stale) open-batch pointer goes is simply recreated
        # by its next text
        for table, column in (("conversations", "open_batch"), ("outbound", "batch_id"),
                              ("batch_events", "batch_id"), ("messages", "batch_id"), ("batches", "id")):
            conn.execute(f"DELETE FROM {table} WHERE {column} IN ({marks})", ids)

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
            row = conn.execute("SELECT * FROM provider_health WHERE provider = ?", (provider,)).fetchone()
            row = dict(row) if row else {"provider": provider, "failing_since": None, "alerted_at": None}
            if error is None:
                conn.execute(
                    "INSERT INTO provider_health (provider, last_ok_at) VALUES (?, ?) ON CONFLICT (provider)"
                    " DO UPDATE SET failing_since = NULL, alerted_at = NULL, last_ok_at = excluded.last_ok_at",
                    (provider, now))
                return ("recovered", row) if row["alerted_at"] is not None else None
            since = row["failing_since"] if row["failing_since"] is not None else now
            alert = row["alerted_at"] is None and now - since >= alert_after
            conn.execute(
                "INSERT INTO provider_health (provider, failing_since, last_failure_at, last_error, alerted_at)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (provider) DO UPDATE SET failing_since ="
                " excluded.failing_since, last_failure_at = excluded.last_failure_at,"
                " last_error = excluded.last_error, alerted_at = excluded.alerted_at",
                (provider, since, now, error, now if alert else row["alerted_at"]))
            row.update(failing_since=since, last_failure_at=now, last_error=error)
            return ("outage", row) if alert else None

    def _healthy_lately(self, provider, now, within=60.0):
        row = self.conn.execute(
            "SELECT failing_since, last_ok_at FROM provider_health WHERE provider = ?", (provider,)).fetchone()
        return row is not None and row[0] is None and row[1] is not None and now - row[1] < within

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
        again. (due_at, batch id), or None."""
        row = self.conn.execute(
            "SELECT due_at, id FROM batches WHERE (state = 'queued' AND attempts > 0"
            " OR state = 'sending' AND claim IS NULL) AND due_at IS NOT NULL ORDER BY due_at LIMIT 1"
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
            " sid, status FROM outbound WHERE phone = ? ORDER BY sent_at DESC LIMIT ?", (phone, limit))
        unanswered = self.conn.execute(
            "SELECT completed_at AS at, 'note' AS kind, our_number, last_error AS body, id AS batch_id,"
            " state AS detail FROM batches WHERE phone = ? AND state IN ('failed', 'unknown', 'expired', 'held')"
            " AND completed_at IS NOT NULL ORDER BY completed_at DESC LIMIT ?", (phone, limit))
        opt_outs = self.conn.execute(
            "SELECT since AS at, 'opt_out' AS kind, scope AS our_number, keyword AS body FROM opt_outs"
            " WHERE phone = ?", (phone,))
        holds = self.conn.execute(
            "SELECT since AS at, 'hold' AS kind, reason AS body FROM holds WHERE phone = ?", (phone,))
        items = [dict(r) for rows in (texts, sent, unanswered, opt_outs, holds) for r in rows]
        items.sort(key=lambda item: (item["at"], item["kind"] != "in"))
        return items[-limit:]

    def person_flags(self, phone):
        """Is this person on hold ({since, reason} or None), and which scopes did they opt out of."""
        hold = self.conn.execute("SELECT since, reason FROM holds WHERE phone = ?", (phone,)).fetchone()
        outs = self.conn.execute("SELECT scope, since, keyword FROM opt_outs WHERE phone = ? ORDER BY since",
                                 (phone,)).fetchall()
        return {"hold": None if hold is None else dict(hold), "opt_outs": [dict(r) for r in outs]}

    def columns(self, table):
        """The column names of a table (another version may lack some)."""
        return {r[1] for r in self.conn.execute(f"PRAGMA table_info({table})")}

    def stats_rows(self, since, until):
        """What `smsbatch stats` counts, per UTC day, for [since, until): texts in, batches,
        AI requests and tokens, replies; and every reply's latency (seconds from the
        person's last text to the reply)."""
        texts = self.conn.execute(
            "SELECT date(received_at, 'unixepoch') AS day, count(*) AS texts,"
            " sum(kind = 'text') AS answerable FROM messages WHERE received_at >= ? AND received_at < ?"
            " GROUP BY day", (since, until)).fetchall()
        have = self.columns("batches")
        requests = "sum(ai_requests)" if "ai_requests" in have else "sum(response_text IS NOT NULL)"
        tokens = ", ".join(f"sum({c}) AS {c}" if c in have else f"NULL AS {c}"
                           for c in ("prompt_tokens", "completion_tokens"))
        batches = self.conn.execute(
            f"SELECT date(created_at, 'unixepoch') AS day, count(*) AS batches, {requests} AS ai_requests,"
            f" {tokens} FROM batches WHERE created_at >= ? AND created_at < ? GROUP BY day",
            (since, until)).fetchall()
        # Every SMS we sent (the AI's and by hand); latency only for the AI's, from its batch's last text.
        replies = self.conn.execute(
            "SELECT date(o.sent_at, 'unixepoch') AS day, o.sent_at - b.last_at AS latency,"
            " o.status = 'delivered' AS delivered FROM outbound o LEFT JOIN batches b ON b.id = o.batch_id"
            " WHERE o.sent_at >= ? AND o.sent_at < ?", (since, until)).fetchall()
        return {"texts": [dict(r) for r in texts], "batches": [dict(r) for r in batches],
                "replies": [dict(r) for r in replies],
                "ai_requests_exact": "ai_requests" in have, "tokens_known": "prompt_tokens" in have,
                "delivery_known": True}



# Replies sent by hand (no batch) before the cutoff, to people neither held nor opted out.
_MANUAL_PRUNABLE = ("batch_id IS NULL AND sent_at < ? AND phone NOT IN (SELECT phone FROM holds)"
                    " AND phone NOT IN (SELECT phone FROM opt_outs)")


def _chunks(items, size=500):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _add(totals, counts):
    for key, n in counts.items():
        totals[key] += n


def held_reason(hold, when=""):
    """A batch's last_error when it ends held: the operator's reason, if they gave one."""
    why = f": {hold['reason']}" if hold["reason"] else ""
    return f"on hold{' ' + when if when else ''} (smsbatch release to end it){why}"


def _why_not_retryable(batch):
    state = batch["state"]
    if state == State.SENT:
        return f"batch {batch['id']} was already sent ({batch['provider_sid']}); not sending it twice"
    if state == State.SUPERSEDED:
        return f"batch {batch['id']} was folded into batch {batch['superseded_by']}; retry that one"
    return f"batch {batch['id']} is {state}, already waiting to be answered"


def _when(epoch):
    """An epoch time as ISO-8601 UTC, for event reasons a person reads."""
    import datetime

    return datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _statements(script):
    """Split a schema script into statements (sqlite3.complete_statement knows where they end)."""
    statement = ""
    for line in script.splitlines(keepends=True):
        statement += line
        if sqlite3.complete_statement(statement):
            if statement.strip():
                yield statement.strip()
            statement = ""


def _create_private(path):
    """Create the database file readable by its owner only, before SQLite opens it."""
    if path == ":memory:" or os.path.exists(path):
        return
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise SmsbatchError(f"cannot create database {path}: folder {directory} does not exist")
    try:
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    except OSError as exc:
        raise SmsbatchError(f"cannot create database {path}: {exc.strerror}") from None
