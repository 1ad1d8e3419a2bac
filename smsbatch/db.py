"""The store: connection setup, migrations, transactions, storing texts, state moves, claiming.

Every SQL statement lives in the store. Store is one class assembled from this module and
four others, each a mixin of methods on the same connection: db_intake (storing inbound
texts, with the decisions in smsbatch.intake), db_life (one batch's life,
the backfill), db_ops (operators' actions: retry, hold, send, prune, backup) and db_report
(what operators read: status, show, stats, delivery receipts). The states and their allowed
moves are in smsbatch.states.
"""

import os
import secrets

from smsbatch import engine, migrations
from smsbatch.db_intake import Intake
from smsbatch.db_life import BatchLife
from smsbatch.db_ops import OperatorActions
from smsbatch.db_report import OperatorReports
from smsbatch.engine import StoreConflict
from smsbatch.errors import InvalidTransition, NotFound, SmsbatchError
# Added, ID_ALPHABET, LATE_REASON and new_id are imported from here by the rest of smsbatch, as before.
from smsbatch.intake import ID_ALPHABET, LATE_REASON, Added, new_id  # noqa: F401
# State, PENDING and TRANSITIONS are imported from here by the rest of smsbatch, as before.
from smsbatch.states import CLAIM_MOVES, PENDING, PENDING_SQL, TRANSITIONS, State, acts_at, placeholders

SCHEMA_VERSION = migrations.LATEST
# The batches a claim takes (parameters: now, now, limit): due, that is the moment to act
# (acts_at: closing time, retry time or a lease's end, whichever the batch's state and claim
# make it) has come, found in that order by batches_state_acts_at (SQLite) or
# batches_pending_acts_at (PostgreSQL); and no other batch of the conversation claimed, nor an
# older one due and unclaimed (its texts are answered first).
CANDIDATES = (
    f"SELECT seq, id, state, attempts FROM batches b WHERE {PENDING_SQL}"
    f" AND {acts_at()} <= ? AND NOT EXISTS (SELECT 1 FROM batches o"
    " WHERE o.phone = b.phone AND o.our_number = b.our_number AND o.seq != b.seq"
    f" AND o.{PENDING_SQL} AND (o.claim IS NOT NULL"
    f" OR b.claim IS NULL AND {acts_at('o')} <= ? AND o.seq < b.seq))"
    f" ORDER BY {acts_at()} LIMIT ?"
)
BUSY_TIMEOUT_SECONDS = 30.0


class Store(Intake, BatchLife, OperatorActions, OperatorReports):
    """One database connection (SQLite file or PostgreSQL, see smsbatch.engine) and the
    statements smsbatch runs on it. Not thread-safe."""

    def __init__(self, path, busy_timeout=BUSY_TIMEOUT_SECONDS, durable=True):
        self.path, self.busy_timeout = str(path), busy_timeout
        self.db = engine.connect(self.path, busy_timeout, durable)
        self.conn = self.db.conn

    @classmethod
    def on(cls, database):
        """A Store on a Database opened elsewhere (the webhook's pooled connections)."""
        store = cls.__new__(cls)
        store.path, store.busy_timeout, store.db, store.conn = database.path, database.busy_timeout, database, \
            database.conn
        return store

    @classmethod
    def open_ready(cls, path, busy_timeout=BUSY_TIMEOUT_SECONDS):
        """Open an existing, migrated database (never creates one).

        Raises:
            SmsbatchError: missing, not a database, or not migrated.
        """
        if not engine.is_postgres(path) and str(path) != ":memory:" and not os.path.exists(path):
            raise SmsbatchError(f"database {path} does not exist: run `smsbatch migrate` first")
        store = cls(path, busy_timeout=busy_timeout)
        try:
            store.require_schema()
        except Exception:
            store.close()
            raise
        return store

    @property
    def shown(self):
        """The database's name as it may be printed (a URL without its password)."""
        return engine.shown_target(self.path)

    def close(self):
        self.db.close()

    def make_throwaway(self):
        """Make a scratch SQLite database (simulate's) fast: it need not survive a crash nor be shared."""
        self.db.make_throwaway()

    def durable_transaction(self):
        """transaction(), committed so that what it commits survives power loss."""
        return self.db.durable_transaction()

    def write_blocked(self, seconds):
        """Why a write could not start within `seconds`, or None (writes nothing)."""
        return self.db.write_blocked(seconds)

    def transaction(self):
        """One transaction (SQLite: BEGIN IMMEDIATE, one writer at a time, waiting its turn)."""
        return self.db.transaction()

    def db_now(self):
        """The database's clock (epoch seconds): every host agrees on it (leases)."""
        return self.db.now()

    # -- schema -----------------------------------------------------------------

    def version(self):
        return self.db.version()

    def migrate(self):
        """Create or upgrade the schema; safe to run again, also from two hosts at once.
        Returns (version before, version after).

        Raises:
            SmsbatchError: the database is newer than this smsbatch.
        """
        return self.db.migrate(SCHEMA_VERSION), SCHEMA_VERSION

    def require_schema(self):
        """Raises: SmsbatchError when the database was never migrated."""
        version = self.version()
        if version > SCHEMA_VERSION:
            raise SmsbatchError(f"database {self.shown} has schema version {version}, newer than this smsbatch "
                                f"({SCHEMA_VERSION}): upgrade smsbatch")
        if version != SCHEMA_VERSION:
            raise SmsbatchError(f"database {self.shown} is not ready: run `smsbatch migrate` first")

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
        batch_events: a compare-and-set on the state (and `claim`) read, checked by rowcount,
        with the row locked (PostgreSQL) from the read to the update. With `claim`/`expect`,
        only while that claim holds the batch and it is in one of the `expect` states;
        returns False (nothing changed) otherwise, or if another writer moved it first.

        Raises:
            NotFound: no such batch.
            InvalidTransition: TRANSITIONS does not allow this move.
        """
        row = conn.execute("SELECT state, claim FROM batches WHERE id = ?" + self.db.for_update,
                           (batch_id,)).fetchone()
        if row is None:
            raise NotFound(f"no batch with id {batch_id!r}")
        if (claim is not None and row["claim"] != claim) or (expect is not None and row["state"] not in expect):
            return False
        current, to = State(row["state"]), State(to)
        if to not in TRANSITIONS[current]:
            raise InvalidTransition(f"batch {batch_id} cannot move from {current.value} to {to.value}")
        extra = f", {assignments}" if assignments else ""
        held = " AND claim = ?" if claim is not None else ""
        moved = conn.execute(f"UPDATE batches SET state = ?{extra} WHERE id = ? AND state = ?{held}",
                             (to.value, *values, batch_id, current.value, *([claim] if claim is not None else [])))
        if moved.rowcount != 1:
            return False  # another writer moved it since the read (SQLite: cannot happen, one writer)
        self._record(conn, batch_id, now, current, to, reason)
        return True

    def _update_held(self, conn, batch, to, now, reason, assignments="", values=(),
                     states=(State.PROCESSING, State.SENDING)):
        """One move of a batch by the processor holding it: applied only while the claim is
        still this processor's and the batch is in one of `states`; the claim ends with it.
        Returns False (nothing changed) if the lease was lost."""
        assignments = "claim = NULL, lease_expires_at = NULL" + (f", {assignments}" if assignments else "")
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

        One batch per conversation at a time, enforced by the database (the unique index
        batches_one_claim): a batch is not claimed while another batch of the same person
        and number holds a claim (a dead holder's is taken over first) or an older one is
        also due, so nobody gets two replies racing each other; the later texts fold into
        the newer batch instead (begin_send). Several processors claim at once without
        waiting for each other (SKIP LOCKED on PostgreSQL); one that loses a race for a
        conversation tries again and skips it.
        """
        for attempt in range(3):
            try:
                with self.transaction() as conn:
                    expired = self._expire(conn, now, max_age)
                    return self._claim(conn, now, limit, lease, holder, node), expired
            except StoreConflict:  # another processor claimed a batch of the same conversation
                if attempt == 2:
                    raise
        return [], 0  # pragma: no cover

    def _claim(self, conn, now, limit, lease, holder, node):
        """Pick and claim (compare-and-set on each row's state, moves from CLAIM_MOVES)."""
        picked = conn.execute(CANDIDATES + self.db.skip_locked, (now, now, limit)).fetchall()
        if not picked:
            return []
        token = secrets.token_hex(8)
        to_state = " ".join(f"WHEN '{s.value}' THEN '{t.value}'" for s, t in CLAIM_MOVES.items())
        rows = conn.execute(
            # the retry (if any) is being made: retry_at is spent
            "UPDATE batches SET claim = ?, lease_expires_at = ?, retry_at = NULL, started_at = ?,"
            " claimed_at = coalesce(claimed_at, ?),"
            f" holder = ?, holder_node = ?, heartbeat_at = ?, state = CASE state {to_state} END,"
            f" attempts = attempts + 1 WHERE {' OR '.join(['(seq = ? AND state = ?)'] * len(picked))} RETURNING *",
            (token, now + lease, now, now, holder, node, now, *[v for c in picked for v in (c["seq"], c["state"])]),
        ).fetchall()
        claimed = {r["seq"] for r in rows}
        for c in picked:
            if c["seq"] in claimed:
                taken_over = c["state"] in (State.PROCESSING, State.SENDING)
                how = "lease ran out; taken over" if taken_over else "claimed"
                self._record(conn, c["id"], now, c["state"], CLAIM_MOVES[State(c["state"])],
                             f"{how} (attempt {c['attempts'] + 1})")
        return [dict(r) for r in rows]

    def renew_claims(self, claims, due, now):
        """Extend the leases of these claims to `due` (a heartbeat); returns the (claim, batch id)
        pairs renewed. A batch another processor took over, or that ended, is not renewed."""
        with self.transaction() as conn:
            rows = conn.execute(
                f"UPDATE batches SET lease_expires_at = ?, heartbeat_at = ? WHERE claim IN ({placeholders(claims)})"
                " AND state IN ('processing', 'sending') RETURNING claim, id",
                (due, now, *claims),
            ).fetchall()
        return {(r[0], r[1]) for r in rows}

    def free_dead_holders(self, now, node, alive):
        """End at once the leases of batches in *processing* held by processes of `node`
        that `alive(holder)` says are gone. Returns how many were freed."""
        rows = self.conn.execute(
            "SELECT id, claim, holder FROM batches WHERE state = 'processing' AND claim IS NOT NULL"
            " AND lease_expires_at > ? AND holder_node = ?", (now, node)).fetchall()
        dead = [r for r in rows if r["holder"] and not alive(r["holder"])]
        if not dead:
            return 0
        with self.transaction() as conn:
            for row in dead:
                conn.execute("UPDATE batches SET lease_expires_at = ? WHERE id = ? AND claim = ?"
                             " AND state = 'processing'",
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
            # +acts_at: search by last_at (index batches_state_last), so the sweep reads only
            # batches old enough to expire, not every due one (flat with a large backlog).
            f"SELECT seq, id, state FROM batches WHERE state IN ('open', 'queued') AND +{acts_at()} <= ?"
            " AND last_at < ?"
            # a batch an operator requeued is answered, however old its texts
            " AND retried_at IS NULL" + self.db.skip_locked,
            (now, now - max_age),
        ).fetchall()
        reason = "not answered: older than SMSBATCH_MAX_AGE_SECONDS"
        return sum(self._move(conn, row["id"], State.EXPIRED, now, reason,
                              "retry_at = NULL, claim = NULL, lease_expires_at = NULL, completed_at = ?,"
                              " last_error = ?", (now, reason),
                              expect=("open", "queued")) for row in rows)

    def next_due(self):
        """The earliest moment a processor must act on a pending batch (acts_at), or None."""
        row = self.conn.execute(f"SELECT min({acts_at()}) FROM batches WHERE {PENDING_SQL}").fetchone()
        return row[0]
