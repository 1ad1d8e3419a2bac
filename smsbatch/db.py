"""The store: connection setup, migrations, transactions, storing texts, state moves, claiming.

Every SQL statement lives in the store. Store is one class assembled from this module and
three others, each a mixin of methods on the same connection: db_life (one batch's life,
the backfill), db_ops (operators' actions: retry, hold, send, prune, backup) and db_report
(what operators read: status, show, stats, delivery receipts). The states and their allowed
moves are in smsbatch.states.
"""

import json
import os
import secrets
import sqlite3
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources

from smsbatch import batching, migrations
from smsbatch.db_life import BatchLife
from smsbatch.db_ops import OperatorActions
from smsbatch.db_report import OperatorReports
from smsbatch.errors import InvalidTransition, NotFound, SmsbatchError
# State, PENDING and TRANSITIONS are imported from here by the rest of smsbatch, as before.
from smsbatch.states import CLAIMABLE, PENDING, TRANSITIONS, State, placeholders

SCHEMA_VERSION = migrations.LATEST
ID_ALPHABET = "23456789abcdefghjkmnpqrstuvwxyz"  # no 0/o, 1/l/i: easy to read aloud and type
BUSY_TIMEOUT_SECONDS = 30.0
LATE_REASON = "found in Twilio's message log, older than SMSBATCH_MAX_AGE_SECONDS: not answered late"


@dataclass(frozen=True)
class Added:
    """What storing one inbound text did."""

    batch_id: str
    duplicate: bool
    kind: str


def new_id():
    """A short random batch id such as 'b7k2mq9xza'."""
    return "".join(secrets.choice(ID_ALPHABET) for _ in range(10))


class Store(BatchLife, OperatorActions, OperatorReports):
    """One SQLite connection and the statements smsbatch runs on it. Not thread-safe."""

    def __init__(self, path, busy_timeout=BUSY_TIMEOUT_SECONDS, durable=True):
        self.path, self.busy_timeout = str(path), busy_timeout
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
        # The processor's connections are not `durable`: a claim or a *sent* mark lost to power
        # loss is made good by the lease and by reconcile; the one move whose loss would send a
        # reply twice, *sending*, commits through durable_transaction(). A FULL commit in WAL
        # mode syncs every frame before it, so nothing committed earlier is left behind.
        self.synchronous = "FULL" if durable else "NORMAL"
        self.conn.execute(f"PRAGMA synchronous = {self.synchronous}")
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
        self.synchronous = "OFF"

    @contextmanager
    def durable_transaction(self):
        """transaction(), committed with synchronous = FULL whatever this connection's setting
        (a throwaway database stays as it is): what it commits survives power loss."""
        upgrade = self.synchronous == "NORMAL"
        if upgrade:
            self.conn.execute("PRAGMA synchronous = FULL")
        try:
            with self.transaction() as conn:
                yield conn
        finally:
            if upgrade:
                self.conn.execute("PRAGMA synchronous = NORMAL")

    def write_blocked(self, seconds):
        """Why a write could not start within `seconds` (another connection holds the write
        lock), or None. Takes the lock for an instant and writes nothing."""
        self.conn.execute(f"PRAGMA busy_timeout = {int(seconds * 1000)}")
        try:
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.execute("ROLLBACK")
            return None
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
            return f"another process holds the database's write lock (waited {seconds:g} s)"
        finally:
            self.conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")

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
                    scope=None, expired=False, answered=None):
        """Store one inbound text exactly once and put it in its conversation's open batch.

        A conversation is the person (`phone`) and the number they wrote to (`our_number`).
        Opt-out/opt-in keywords update the opt-out list for `scope` (batching.opt_out_scope;
        default our_number) and get a batch of their own, skipped at once, so they never
        reach the AI. `carrier_kind` ('opt_out'/'opt_in') is Twilio's own verdict
        (OptOutType), for keywords configured in Twilio. `expired`: a text found too late to
        answer (the backfill) is stored in a batch of its own, expired at once. `answered`: a
        text found already answered (the backfill: our reply after it is in Twilio's log) is
        stored in a batch of its own, skipped at once, with this reason.
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
            elif answered:
                batch_id = self._insert_batch(conn, phone, our_number, received_at, State.SKIPPED, None,
                                              reason=answered)
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
