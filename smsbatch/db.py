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
from dataclasses import dataclass

from smsbatch import batching, engine, migrations
from smsbatch.db_life import BatchLife
from smsbatch.db_ops import OperatorActions
from smsbatch.db_report import OperatorReports
from smsbatch.engine import StoreConflict
from smsbatch.errors import InvalidTransition, NotFound, SmsbatchError
# State, PENDING and TRANSITIONS are imported from here by the rest of smsbatch, as before.
from smsbatch.states import CLAIM_MOVES, PENDING, PENDING_SQL, TRANSITIONS, State, acts_at, placeholders

SCHEMA_VERSION = migrations.LATEST
ID_ALPHABET = "23456789abcdefghjkmnpqrstuvwxyz"  # no 0/o, 1/l/i: easy to read aloud and type
BUSY_TIMEOUT_SECONDS = 30.0
LATE_REASON = "found in Twilio's message log, older than SMSBATCH_MAX_AGE_SECONDS: not answered late"


@dataclass(frozen=True)
class Added:
    """What storing one inbound text did. batch_id is None for a duplicate of a pruned text."""

    batch_id: str
    duplicate: bool
    kind: str


class _Duplicate(Exception):
    """Rolls back add_message's transaction: another writer stored the same MessageSid."""


def new_id():
    """A short random batch id such as 'b7k2mq9xza'."""
    return "".join(secrets.choice(ID_ALPHABET) for _ in range(10))


class Store(BatchLife, OperatorActions, OperatorReports):
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

        The text and its batch are one transaction, serialised per conversation by the
        database (Database.conversation_lock; one open batch per conversation is also a
        unique index). A MessageSid stored meanwhile by another writer (a second webhook,
        the backfill) is a duplicate, never an error.
        """
        kind = carrier_kind or (batching.keyword_kind(body) if not media else None)
        scope = scope or our_number
        try:
            with self.transaction() as conn:
                seen = self._lock_and_find(conn, phone, our_number, sid)
                if seen:
                    return Added(seen[0], True, kind or "text")
                batch_id, kind = self._batch_for(conn, phone, our_number, scope, body, received_at, rules, kind,
                                                 carrier_kind, expired, answered)
                stored = conn.execute(
                    "INSERT INTO messages (sid, phone, our_number, body, media, kind, received_at, batch_id)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (sid) DO NOTHING",
                    (sid, phone, our_number, body, json.dumps(list(media)) if media else None,
                     kind or "text", received_at, batch_id),
                ).rowcount
                if not stored:  # stored by another writer since the check: undo this transaction
                    raise _Duplicate
        except _Duplicate:
            seen = self.conn.execute("SELECT batch_id FROM messages WHERE sid = ?", (sid,)).fetchone()
            return Added(seen[0], True, kind or "text")
        return Added(batch_id, False, kind or "text")

    def _lock_and_find(self, conn, phone, our_number, sid):
        """Take the conversation's lock (Database.conversation_lock) and look for the sid, in
        one statement; a pruned text's sid (pruned_sids) is found as (None,). The look may
        miss a text another writer stored while this one waited for the lock: the
        INSERT ... ON CONFLICT (sid) then finds it (see add_message)."""
        lock = self.db.conversation_lock
        find = ("(SELECT batch_id FROM messages WHERE sid = ?),"
                " (SELECT count(*) FROM pruned_sids WHERE sid = ?)")
        if lock is None:
            row = conn.execute(f"SELECT 0, {find}", (sid, sid)).fetchone()
        else:
            row = conn.execute(f"SELECT {lock}, {find}", (phone, our_number, sid, sid)).fetchone()
        if row[2]:  # pruned (db_ops.prune): still a duplicate, in no batch any more
            return (None,)
        return None if row[1] is None else (row[1],)

    def _batch_for(self, conn, phone, our_number, scope, body, at, rules, kind, carrier_kind, expired, answered):
        """(The batch a new text goes in, opening or closing batches as needed; the text's kind)."""
        yes = body.strip().strip(".!").upper() == "YES"
        if kind == "opt_in" and yes and not carrier_kind and not self._opted_out(conn, phone, scope):
            kind = None  # "yes" answering the AI's question is a text, not a re-subscription
        if kind:
            return self._add_keyword(conn, phone, our_number, scope, body, at, kind), kind
        if answered:
            return self._insert_batch(conn, phone, our_number, at, State.SKIPPED, None, reason=answered), kind
        if expired:
            return self._insert_batch(conn, phone, our_number, at, State.EXPIRED, None, reason=LATE_REASON), kind
        urgent = batching.is_urgent(body, rules.urgent_keywords)
        return self._join_open(conn, phone, our_number, at, urgent, rules), kind

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
        # Locked (PostgreSQL): a claim cannot close this batch between this read and the update.
        row = conn.execute(
            "SELECT b.id, b.first_at, b.last_at, b.message_count, b.urgent FROM conversations c"
            " JOIN batches b ON b.id = c.open_batch WHERE c.phone = ? AND c.our_number = ? AND b.state = 'open'"
            + self.db.for_update,
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
            "UPDATE batches SET message_count = ?, first_at = ?, last_at = ?, urgent = ?, closes_at = ?,"
            " quiet_seconds = ? WHERE id = ? AND state = 'open'",
            (count, first, last, int(urgent), batching.due_at(rules, first, last, count, urgent, quiet),
             quiet, row["id"]),
        )
        if count >= rules.max_messages:  # a full batch closes: the next text opens a new one
            self._move(conn, row["id"], State.QUEUED, at, f"full: {count} texts")
        return row["id"]

    def quiet_now(self, phone, now, rules):
        """The quiet period this person's next text would get now (fixed, or fitted to their pace)."""
        return self._quiet(self.conn, phone, now, rules)

    def _quiet(self, conn, phone, at, rules):
        """The quiet period after the phone's text at `at`: fixed, or (adaptive) fitted to the
        gaps between its latest texts up to `at` (batching.quiet_for). Reads at most
        `adaptive_window` index entries of messages_phone: no scan, whatever the history."""
        if not rules.adaptive:
            return rules.quiet_seconds
        # One row for the whole window: half the cost of fetching its rows one by one.
        joined = conn.execute(
            f"SELECT {self.db.group_concat('received_at')} FROM (SELECT received_at FROM messages WHERE phone = ?"
            " AND received_at <= ? ORDER BY received_at DESC LIMIT ?) w", (phone, at, rules.adaptive_window - 1),
        ).fetchone()[0]
        times = list(map(float, joined.split(","))) if joined else []
        return batching.quiet_for(batching.gaps_between(times + [at]), rules)

    def _insert_batch(self, conn, phone, our_number, at, state, due, urgent=False, reason=None, quiet=None):
        final = due is None
        for _ in range(5):
            batch_id = new_id()
            # ON CONFLICT (id): a random id already taken is picked again, without an error
            # (which would end a PostgreSQL transaction)
            if conn.execute(
                "INSERT INTO batches (id, phone, our_number, state, message_count, first_at, last_at,"
                " urgent, closes_at, last_error, completed_at, created_at, quiet_seconds)"
                " VALUES (?, ?, ?, ?, 1, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
                (batch_id, phone, our_number, state, at, at, int(urgent), due, reason if final else None,
                 at if final else None, at, quiet),
            ).rowcount:
                break
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
        # Due: the moment to act (acts_at: closing time, retry time or a lease's end, whichever
        # the batch's state and claim make it) has come; found by batches_state_acts_at.
        picked = conn.execute(
            f"SELECT seq, id, state, attempts FROM batches b WHERE {PENDING_SQL}"
            f" AND {acts_at()} <= ? AND NOT EXISTS (SELECT 1 FROM batches o"
            " WHERE o.phone = b.phone AND o.our_number = b.our_number AND o.seq != b.seq"
            f" AND o.{PENDING_SQL} AND (o.claim IS NOT NULL"
            f" OR b.claim IS NULL AND {acts_at('o')} <= ? AND o.seq < b.seq))"
            f" ORDER BY {acts_at()} LIMIT ?" + self.db.skip_locked,
            (now, now, limit),
        ).fetchall()
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
