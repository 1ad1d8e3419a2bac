"""The store: connection setup, migrations, every SQL statement, transactions, claiming."""

import json
import os
import secrets
import sqlite3
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from importlib import resources

from smsbatch import batching
from smsbatch.errors import InvalidTransition, NotFound, SmsbatchError

# Later schema versions go here as {version: "SQL"}; migrate() applies them in order.
MIGRATIONS = {
    # Webhook requests refused for a bad signature, counted per minute (webhook /health,
    # status --json): a wrong SMSBATCH_PUBLIC_URL shows up on our side.
    2: """
    CREATE TABLE IF NOT EXISTS rejections (
        minute   INTEGER PRIMARY KEY,   -- epoch seconds // 60
        count    INTEGER NOT NULL,
        last_at  REAL NOT NULL,         -- epoch seconds of the latest one that minute
        last_url TEXT NOT NULL          -- the URL its signature was checked against
    );
    """,
}
SCHEMA_VERSION = max(MIGRATIONS, default=1)
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
    FAILED = "failed"  # gave up; `smsbatch retry` brings it back
    UNKNOWN = "unknown"  # send outcome cannot be checked; a person decides


PENDING = (State.OPEN, State.QUEUED, State.PROCESSING, State.SENDING)
RETRYABLE = (State.FAILED, State.SKIPPED, State.EXPIRED, State.UNKNOWN)


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
        """Create or upgrade the schema; safe to run again. Returns the schema version."""
        with self.transaction() as conn:
            current = conn.execute("PRAGMA user_version").fetchone()[0]
            if current > SCHEMA_VERSION:
                raise SmsbatchError(
                    f"database schema version {current} is newer than this smsbatch ({SCHEMA_VERSION})"
                )
            if current == 0:
                for statement in _statements(resources.files("smsbatch").joinpath("schema.sql").read_text()):
                    conn.execute(statement)
                current = 1
            for version in sorted(v for v in MIGRATIONS if v > current):
                for statement in _statements(MIGRATIONS[version]):
                    conn.execute(statement)
                current = version
            conn.execute(f"PRAGMA user_version = {current}")
        return current

    def require_schema(self):
        """Raises: SmsbatchError when the database was never migrated."""
        version = self.version()
        if version > SCHEMA_VERSION:
            raise SmsbatchError(f"database {self.path} has schema version {version}, newer than this smsbatch "
                                f"({SCHEMA_VERSION}): upgrade smsbatch")
        if version != SCHEMA_VERSION:
            raise SmsbatchError(f"database {self.path} is not ready: run `smsbatch migrate` first")

    # -- inbound ----------------------------------------------------------------

    def add_message(self, sid, phone, our_number, body, received_at, rules, media=(), carrier_kind=None):
        """Store one inbound text exactly once and put it in its phone's open batch.

        Opt-out/opt-in keywords update the opt-out list and get a batch of their own,
        skipped at once, so they never reach the AI. `carrier_kind` ('opt_out'/'opt_in')
        is Twilio's own verdict (OptOutType), for keywords configured in Twilio.
        """
        kind = carrier_kind or (batching.keyword_kind(body) if not media else None)
        with self.transaction() as conn:
            seen = conn.execute("SELECT batch_id FROM messages WHERE sid = ?", (sid,)).fetchone()
            if seen:
                return Added(seen[0], True, kind or "text")
            yes = body.strip().strip(".!").upper() == "YES"
            if kind == "opt_in" and yes and not carrier_kind and not self._opted_out(conn, phone):
                kind = None  # "yes" answering the AI's question is a text, not a re-subscription
            if kind:
                batch_id = self._add_keyword(conn, phone, our_number, body, received_at, kind)
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

    def _add_keyword(self, conn, phone, our_number, body, at, kind):
        word = body.strip().upper()
        if kind == "opt_out":
            conn.execute(
                "INSERT INTO opt_outs (phone, since, keyword) VALUES (?, ?, ?)"
                " ON CONFLICT (phone) DO UPDATE SET since = excluded.since, keyword = excluded.keyword",
                (phone, at, word),
            )
        else:
            conn.execute("DELETE FROM opt_outs WHERE phone = ?", (phone,))
        return self._insert_batch(
            conn, phone, our_number, at, State.SKIPPED, None, last_error=f"keyword {word}: not for the AI"
        )

    def _join_open(self, conn, phone, our_number, at, urgent, rules):
        row = conn.execute(
            "SELECT b.id, b.first_at, b.last_at, b.message_count, b.urgent FROM phones p"
            " JOIN batches b ON b.id = p.open_batch WHERE p.phone = ? AND b.state = 'open'",
            (phone,),
        ).fetchone()
        if row is None:
            due = batching.due_at(rules, at, at, 1, urgent)
            state = State.QUEUED if rules.max_messages <= 1 else State.OPEN
            batch_id = self._insert_batch(conn, phone, our_number, at, state, due, urgent=urgent)
            conn.execute(
                "INSERT INTO phones (phone, open_batch) VALUES (?, ?)"
                " ON CONFLICT (phone) DO UPDATE SET open_batch = excluded.open_batch",
                (phone, batch_id),
            )
            return batch_id
        first, last = min(row["first_at"], at), max(row["last_at"], at)
        count, urgent = row["message_count"] + 1, bool(row["urgent"]) or urgent
        # A full batch closes: the next text opens a new one.
        state = State.QUEUED if count >= rules.max_messages else State.OPEN
        conn.execute(
            "UPDATE batches SET message_count = ?, first_at = ?, last_at = ?, urgent = ?, due_at = ?,"
            " state = ? WHERE id = ?",
            (count, first, last, int(urgent), batching.due_at(rules, first, last, count, urgent),
             state, row["id"]),
        )
        return row["id"]

    def _insert_batch(self, conn, phone, our_number, at, state, due, urgent=False, last_error=None):
        final = due is None
        for _ in range(5):
            batch_id = new_id()
            try:
                conn.execute(
                    "INSERT INTO batches (id, phone, our_number, state, message_count, first_at, last_at,"
                    " urgent, due_at, last_error, completed_at, created_at)"
                    " VALUES (?, ?, ?, ?, 1, ?, ?, ?, ?, ?, ?, ?)",
                    (batch_id, phone, our_number, state, at, at, int(urgent), due, last_error,
                     at if final else None, at),
                )
                return batch_id
            except sqlite3.IntegrityError as exc:
                if "batches.id" not in str(exc):
                    raise
        raise SmsbatchError("could not pick a unique batch id")  # pragma: no cover

    # -- claiming ---------------------------------------------------------------

    def claim_due(self, now, limit, lease, max_age):
        """Atomically claim up to `limit` due batches; returns (claimed rows, expired count).

        Open/queued batches whose last text is older than `max_age` are expired
        instead. A batch found processing or sending past its lease is claimed again
        (its holder died); a sending one keeps its state so it is reconciled, not resent.
        Every claim counts as an attempt.

        One batch per phone at a time: a batch is not claimed while another batch of
        its phone is in flight (lease still running) or an older one is also due, so
        a phone never gets two replies racing each other; the later texts fold into
        the newer batch instead (begin_send).
        """
        token = secrets.token_hex(8)
        with self.transaction() as conn:
            expired = conn.execute(
                "UPDATE batches SET state = 'expired', due_at = NULL, claim = NULL, completed_at = ?,"
                " last_error = 'not answered: older than SMSBATCH_MAX_AGE_SECONDS'"
                # +due_at: search by last_at (index batches_state_last), so the sweep reads only
                # batches old enough to expire, not every due one (flat with a large backlog).
                " WHERE state IN ('open', 'queued') AND +due_at <= ? AND last_at < ?"
                # a batch an operator requeued is answered, however old its texts
                " AND retried_at IS NULL",
                (now, now, now - max_age),
            ).rowcount
            rows = conn.execute(
                "UPDATE batches SET claim = ?, due_at = ?, started_at = ?, claimed_at = coalesce(claimed_at, ?),"
                " state = CASE state WHEN 'sending' THEN 'sending' ELSE 'processing' END,"
                " attempts = attempts + 1"
                " WHERE seq IN (SELECT seq FROM batches b WHERE state IN ('open', 'queued', 'processing',"
                " 'sending') AND due_at <= ? AND NOT EXISTS (SELECT 1 FROM batches o"
                " WHERE o.phone = b.phone AND o.seq != b.seq AND o.state IN ('open', 'queued', 'processing',"
                " 'sending') AND (o.due_at > ? AND o.state IN ('processing', 'sending') AND o.claim IS NOT NULL"
                " OR o.due_at <= ? AND o.seq < b.seq))"
                " ORDER BY due_at LIMIT ?) RETURNING *",
                (token, now + lease, now, now, now, now, now, limit),
            ).fetchall()
        return [dict(r) for r in rows], expired

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

    def history(self, phone, batch_id, before, limit):
        """The phone's recent conversation before this batch: (time, role, text), oldest first."""
        texts = self.conn.execute(
            "SELECT received_at, 'user', body, media FROM messages WHERE phone = ? AND batch_id != ?"
            " AND kind = 'text' AND received_at <= ? ORDER BY received_at DESC LIMIT ?",
            (phone, batch_id, before, limit),
        ).fetchall()
        replies = self.conn.execute(
            "SELECT sent_at, 'assistant', response_text, NULL FROM batches WHERE phone = ?"
            " AND state = 'sent' AND sent_at <= ? ORDER BY sent_at DESC LIMIT ?",
            (phone, before, limit),
        ).fetchall()
        merged = sorted([tuple(r) for r in texts] + [tuple(r) for r in replies], key=lambda r: r[0])
        return merged[-limit:] if limit else []

    def reply_sids(self, phone):
        """The provider SIDs already recorded for replies to this phone."""
        return {r[0] for r in self.conn.execute(
            "SELECT provider_sid FROM batches WHERE phone = ? AND provider_sid IS NOT NULL", (phone,))}

    def is_opted_out(self, phone):
        return self._opted_out(self.conn, phone)

    @staticmethod
    def _opted_out(conn, phone):
        return conn.execute("SELECT 1 FROM opt_outs WHERE phone = ?", (phone,)).fetchone() is not None

    def record_opt_out(self, phone, now, keyword="21610"):
        with self.transaction() as conn:
            conn.execute(
                "INSERT OR IGNORE INTO opt_outs (phone, since, keyword) VALUES (?, ?, ?)", (phone, now, keyword)
            )

    def begin_send(self, batch, response, now, settings):
        """Commit the reply as *sending* before Twilio is called.

        In the same transaction: a STOP that arrived meanwhile skips the batch; a newer
        batch of the same phone that is already answered (this one was backing off)
        takes this batch's texts, since a late, stale reply helps nobody; and (with
        `supersede`) a newer unclaimed batch written after this one was claimed takes
        its texts so the next reply covers both. Returns the state the batch is now
        in, or None if this processor no longer holds the lease.
        """
        with self.transaction() as conn:
            if not self._holds(conn, batch, State.PROCESSING):
                return None
            if self._opted_out(conn, batch["phone"]):
                self._finish(conn, batch, State.SKIPPED, now, error="opted out before the reply was sent")
                return State.SKIPPED
            rules = batching.Rules.from_settings(settings)
            if self._fold_into_answered(conn, batch, now, settings):
                return State.SUPERSEDED
            if settings.supersede and batch["fold_depth"] < settings.max_supersede:
                # Only texts written after this batch was first claimed supersede it (a batch
                # closed by max messages is not held back by texts that were already waiting).
                newer = conn.execute(
                    "SELECT * FROM batches WHERE phone = ? AND state IN ('open', 'queued') AND seq > ?"
                    " AND created_at >= ? ORDER BY seq LIMIT 1",
                    (batch["phone"], batch["seq"], batch["claimed_at"]),
                ).fetchone()
                if newer:
                    self._fold(conn, batch, newer, now, rules)
                    return State.SUPERSEDED
            conn.execute(
                "UPDATE batches SET state = 'sending', response_text = ?, send_started_at = ?, due_at = ?"
                " WHERE id = ? AND claim = ?",
                (response, now, now + settings.lease, batch["id"], batch["claim"]),
            )
        return State.SENDING

    def fold_if_answered(self, batch, now, settings):
        """Before answering an older batch (it was backing off): if a newer batch of the
        phone already went out with these texts in its prompt, fold into it instead of
        sending a stale reply. Returns True if folded."""
        with self.transaction() as conn:
            return self._holds(conn, batch, State(batch["state"])) and self._fold_into_answered(
                conn, batch, now, settings)

    def _fold_into_answered(self, conn, batch, now, settings):
        if batch["retried_at"] is not None:  # an operator asked for this one to be answered
            return False
        answered = conn.execute(
            "SELECT * FROM batches WHERE phone = ? AND seq > ? AND state IN ('sending', 'sent')"
            " ORDER BY seq DESC LIMIT 1",
            (batch["phone"], batch["seq"]),
        ).fetchone()
        if answered is None or not self._in_prompt_of(conn, batch, answered, settings.history_messages):
            return False
        self._fold(conn, batch, answered, now, batching.Rules.from_settings(settings))
        return True

    @staticmethod
    def _in_prompt_of(conn, batch, answered, history):
        """Were this batch's texts in the newer batch's prompt (within its history window)?"""
        between = conn.execute(
            "SELECT (SELECT count(*) FROM messages WHERE phone = ? AND kind = 'text' AND batch_id != ?"
            " AND received_at >= ? AND received_at <= ?) + (SELECT count(*) FROM batches WHERE phone = ?"
            " AND state = 'sent' AND sent_at >= ? AND sent_at <= ?)",
            (batch["phone"], answered["id"], batch["first_at"], answered["first_at"],
             batch["phone"], batch["first_at"], answered["first_at"]),
        ).fetchone()[0]
        return 0 < between <= history

    def _fold(self, conn, batch, newer, now, rules):
        conn.execute("UPDATE messages SET batch_id = ? WHERE batch_id = ?", (newer["id"], batch["id"]))
        first = min(newer["first_at"], batch["first_at"])
        count = newer["message_count"] + batch["message_count"]
        urgent = bool(newer["urgent"] or batch["urgent"])
        due = newer["due_at"]
        if newer["state"] == State.OPEN:
            due = batching.due_at(rules, first, newer["last_at"], count, urgent)
        conn.execute(
            "UPDATE batches SET message_count = ?, first_at = ?, urgent = ?, due_at = ?,"
            " fold_depth = max(fold_depth, ?) WHERE id = ?",
            (count, first, int(urgent), due, batch["fold_depth"] + 1, newer["id"]),
        )
        conn.execute(
            "UPDATE batches SET state = 'superseded', superseded_by = ?, due_at = NULL, claim = NULL,"
            " completed_at = ?, last_error = NULL WHERE id = ?",
            (newer["id"], now, batch["id"]),
        )

    def mark_sent(self, batch, provider_sid, now):
        """Record that the reply went out. Returns False if the lease was lost."""
        with self.transaction() as conn:
            return self._update_held(
                conn, batch, "state = 'sent', provider_sid = ?, sent_at = ?, completed_at = ?, due_at = NULL,"
                " last_error = NULL", (provider_sid, now, now), (State.SENDING,))

    def finish(self, batch, state, now, error=None):
        """Move a claimed batch to a final state (skipped, failed, expired, unknown).

        Returns False if this processor no longer holds the lease.
        """
        with self.transaction() as conn:
            return self._finish(conn, batch, state, now, error)

    def _finish(self, conn, batch, state, now, error):
        return self._update_held(conn, batch, "state = ?, last_error = ?, completed_at = ?, due_at = NULL",
                                 (State(state).value, error, now))

    def requeue(self, batch, due, error):
        """Put a claimed batch back in the queue to try again at `due` (backoff)."""
        with self.transaction() as conn:
            return self._update_held(conn, batch, "state = 'queued', due_at = ?, last_error = ?", (due, error))

    def release_sending(self, batch, due, error):
        """Leave a batch in *sending* (outcome unknown) to be reconciled at `due`."""
        with self.transaction() as conn:
            return self._update_held(conn, batch, "due_at = ?, last_error = ?", (due, error), (State.SENDING,))

    @staticmethod
    def _update_held(conn, batch, assignments, values, states=(State.PROCESSING, State.SENDING)):
        """One move of a batch by the processor holding it: applied only while the claim is
        still this processor's and the batch is in one of `states`; the claim ends with it.
        Returns False (nothing changed) if the lease was lost."""
        cur = conn.execute(
            f"UPDATE batches SET {assignments}, claim = NULL"
            f" WHERE id = ? AND claim = ? AND state IN ({placeholders(states)})",
            (*values, batch["id"], batch["claim"], *[State(x).value for x in states]),
        )
        return cur.rowcount == 1

    def _holds(self, conn, batch, state):
        row = conn.execute("SELECT state, claim FROM batches WHERE id = ?", (batch["id"],)).fetchone()
        return row is not None and row["claim"] == batch["claim"] and row["state"] == state

    # -- operators --------------------------------------------------------------

    def get_batch(self, batch_id):
        """Raises: NotFound."""
        row = self.conn.execute("SELECT * FROM batches WHERE id = ?", (batch_id,)).fetchone()
        if row is None:
            raise NotFound(f"no batch with id {batch_id!r}")
        return dict(row)

    def retry(self, batch_id, now):
        """Requeue a failed, skipped, expired or unknown batch, due at once.

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
            conn.execute(
                "UPDATE batches SET state = 'queued', due_at = ?, attempts = 0, claim = NULL,"
                " last_error = NULL, completed_at = NULL, retried_at = ? WHERE id = ?",
                (now, now, batch_id),
            )
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
            "SELECT id, phone, message_count, state, first_at, last_at, attempts, last_error, provider_sid"
            " FROM batches ORDER BY seq DESC LIMIT ?",
            (latest,),
        ).fetchall()
        last_hour = self.conn.execute(
            "SELECT count(*) FROM messages WHERE received_at >= ?", (now - 3600,)
        ).fetchone()[0]
        return {
            "counts": counts,
            "pending": sum(counts[s.value] for s in PENDING),
            "oldest_pending_age_seconds": None if oldest is None else round(now - oldest, 1),
            "messages_last_hour": last_hour,
            "latest": [dict(r) | {"age_seconds": round(now - r["last_at"], 1)} for r in rows],
        }

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


def _why_not_retryable(batch):
    state = batch["state"]
    if state == State.SENT:
        return f"batch {batch['id']} was already sent ({batch['provider_sid']}); not sending it twice"
    if state == State.SUPERSEDED:
        return f"batch {batch['id']} was folded into batch {batch['superseded_by']}; retry that one"
    return f"batch {batch['id']} is {state}, already waiting to be answered"


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
