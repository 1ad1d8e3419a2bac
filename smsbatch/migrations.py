"""Schema migrations: frozen steps that bring an older database to the current schema.

A new SQLite database is made from schema.sql in one go. An existing one is at the version
in PRAGMA user_version, and every step above it runs in order, in one transaction with
foreign keys off (a step may rebuild a table). Steps are frozen: once released, a step
is never edited, because databases in the field have already run it; a later change
gets a new step (and the same change in schema.sql). tests/test_migrations.py builds
a version-1 database, upgrades it, and checks it against a fresh one.

PostgreSQL starts from schema_pg.sql, version 9 (PG_BASELINE) in meaning, and goes up by
the `postgres` statements of every later Step; its version is in the schema_version table.
A new step must be a Step, written for both engines.
"""

# Version 1 (the first release) had: batches (state without 'held'), phones (one open
# batch per phone), messages, opt_outs (one row per phone, every number).
_V2_BATCHES = """
CREATE TABLE batches_v2 (
    seq             INTEGER PRIMARY KEY,
    id              TEXT NOT NULL UNIQUE,
    phone           TEXT NOT NULL,
    our_number      TEXT NOT NULL,
    state           TEXT NOT NULL CHECK (state IN ('open', 'queued', 'processing',
                        'sending', 'sent', 'superseded', 'skipped', 'held', 'expired',
                        'failed', 'unknown')),
    message_count   INTEGER NOT NULL DEFAULT 0,
    first_at        REAL NOT NULL,
    last_at         REAL NOT NULL,
    urgent          INTEGER NOT NULL DEFAULT 0,
    due_at          REAL,
    claim           TEXT,
    attempts        INTEGER NOT NULL DEFAULT 0,
    claimed_at      REAL,
    started_at      REAL,
    completed_at    REAL,
    response_text   TEXT,
    send_started_at REAL,
    sent_at         REAL,
    provider_sid    TEXT,
    last_error      TEXT,
    fold_depth      INTEGER NOT NULL DEFAULT 0,
    superseded_by   TEXT REFERENCES batches(id),
    retried_at      REAL,
    created_at      REAL NOT NULL
)"""

_V1_BATCH_COLUMNS = (
    "seq, id, phone, our_number, state, message_count, first_at, last_at, urgent, due_at, claim,"
    " attempts, claimed_at, started_at, completed_at, response_text, send_started_at, sent_at,"
    " provider_sid, last_error, fold_depth, superseded_by, retried_at, created_at"
)

V2 = (
    # batches: the state 'held' needs a new CHECK, which SQLite can only get by a rebuild.
    _V2_BATCHES,
    f"INSERT INTO batches_v2 ({_V1_BATCH_COLUMNS}) SELECT {_V1_BATCH_COLUMNS} FROM batches",
    "DROP TABLE batches",
    "ALTER TABLE batches_v2 RENAME TO batches",
    "CREATE INDEX batches_state_due ON batches(state, due_at)",
    "CREATE INDEX batches_state_last ON batches(state, last_at)",
    "CREATE INDEX batches_conversation ON batches(phone, our_number)",
    # Every batch's history starts with the state it had at the upgrade.
    """CREATE TABLE batch_events (
        id          INTEGER PRIMARY KEY,
        batch_id    TEXT NOT NULL REFERENCES batches(id),
        at          REAL NOT NULL,
        from_state  TEXT,
        to_state    TEXT NOT NULL,
        reason      TEXT
    )""",
    "CREATE INDEX batch_events_batch ON batch_events(batch_id, id)",
    "INSERT INTO batch_events (batch_id, at, from_state, to_state, reason)"
    " SELECT id, coalesce(completed_at, last_at), NULL, state, 'state when upgraded to schema version 2'"
    " FROM batches ORDER BY seq",
    # phones -> conversations: a person and the number they wrote to.
    """CREATE TABLE conversations (
        phone       TEXT NOT NULL,
        our_number  TEXT NOT NULL,
        open_batch  TEXT NOT NULL REFERENCES batches(id),
        PRIMARY KEY (phone, our_number)
    )""",
    "INSERT OR IGNORE INTO conversations (phone, our_number, open_batch)"
    " SELECT p.phone, b.our_number, p.open_batch FROM phones p JOIN batches b ON b.id = p.open_batch",
    "DROP TABLE phones",
    # Every SMS we sent; version 1 kept AI replies on their batch only.
    """CREATE TABLE outbound (
        sid         TEXT PRIMARY KEY,
        batch_id    TEXT REFERENCES batches(id),
        phone       TEXT NOT NULL,
        our_number  TEXT NOT NULL,
        body        TEXT NOT NULL,
        source      TEXT NOT NULL CHECK (source IN ('ai', 'manual')),
        sent_at     REAL NOT NULL,
        status      TEXT,
        error_code  INTEGER,
        status_at   REAL,
        checked_at  REAL
    )""",
    "CREATE INDEX outbound_conversation ON outbound(phone, our_number, sent_at)",
    "CREATE INDEX outbound_batch ON outbound(batch_id)",
    "INSERT OR IGNORE INTO outbound (sid, batch_id, phone, our_number, body, source, sent_at)"
    " SELECT provider_sid, id, phone, our_number, coalesce(response_text, ''), 'ai', coalesce(sent_at, last_at)"
    " FROM batches WHERE state = 'sent' AND provider_sid IS NOT NULL",
    # opt_outs per scope; a version-1 opt-out covered every number, and still does.
    """CREATE TABLE opt_outs_v2 (
        phone   TEXT NOT NULL,
        scope   TEXT NOT NULL,
        since   REAL NOT NULL,
        keyword TEXT NOT NULL,
        PRIMARY KEY (phone, scope)
    )""",
    "INSERT INTO opt_outs_v2 (phone, scope, since, keyword) SELECT phone, '*', since, keyword FROM opt_outs",
    "DROP TABLE opt_outs",
    "ALTER TABLE opt_outs_v2 RENAME TO opt_outs",
    """CREATE TABLE holds (
        phone   TEXT PRIMARY KEY,
        since   REAL NOT NULL,
        reason  TEXT
    )""",
    """CREATE TABLE backfill (
        id              INTEGER PRIMARY KEY CHECK (id = 1),
        checked_until   REAL,
        claimed_at      REAL
    )""",
)

# Version 3: indexes on the two references to a batch that had none, so deleting a batch
# (`smsbatch prune`) finds the rows pointing at it without reading the whole table
# (SQLite looks up the children of every deleted parent row).
V3 = (
    "CREATE INDEX IF NOT EXISTS batches_superseded_by ON batches(superseded_by) WHERE superseded_by IS NOT NULL",
    "CREATE INDEX IF NOT EXISTS conversations_open_batch ON conversations(open_batch)",
)

# Version 4, issue 10 (see): the prompt each batch sent the AI (`show --prompt`), indexes for `stats`,
# and each provider's health across runs (outages). Only ADD COLUMN / CREATE: no rebuild.
V4 = (
    "ALTER TABLE batches ADD COLUMN prompt TEXT",
    "CREATE INDEX batches_created ON batches(created_at)",
    "CREATE INDEX outbound_sent ON outbound(sent_at)",
    """CREATE TABLE provider_health (
        provider        TEXT PRIMARY KEY,
        failing_since   REAL,
        last_failure_at REAL,
        last_error      TEXT,
        alerted_at      REAL,
        last_ok_at      REAL
    )""",
)

# {version: statements that bring version - 1 to it}, applied in order.
V5 = (
    # the quiet period each batch was given (fixed, or fitted to the person's pace)
    "ALTER TABLE batches ADD COLUMN quiet_seconds REAL",
)

V6 = (
    # Webhook requests refused for a bad signature, counted per minute (/health, status
    # --json): a wrong SMSBATCH_PUBLIC_URL shows up on our side.
    """CREATE TABLE rejections (
        minute   INTEGER PRIMARY KEY,
        count    INTEGER NOT NULL,
        last_at  REAL NOT NULL,
        last_url TEXT NOT NULL
    )""",
)

# Version 7: heartbeat leases, what the AI cost, delivery receipts reported (issue 9).
V7 = (
    # Heartbeat leases: who holds a batch in flight (host:pid) and when it last renewed.
    "ALTER TABLE batches ADD COLUMN holder TEXT",
    "ALTER TABLE batches ADD COLUMN heartbeat_at REAL",
    # ...and its machine's process-id space, so a processor there can see the holder is gone.
    "ALTER TABLE batches ADD COLUMN holder_node TEXT",
    # What the AI cost per batch: HTTP requests made (the client's retries included), tokens.
    "ALTER TABLE batches ADD COLUMN ai_requests INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE batches ADD COLUMN prompt_tokens INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE batches ADD COLUMN completion_tokens INTEGER NOT NULL DEFAULT 0",
    # Delivery receipts: when `process` reported a reply's failure (once), and a quick way
    # to the replies whose fate is not final yet.
    "ALTER TABLE outbound ADD COLUMN reported_at REAL",
    "CREATE INDEX outbound_status ON outbound(status, sent_at)",
)

V8 = (
    # Holds and releases, kept after a release so `show PHONE` still tells them.
    """CREATE TABLE hold_log (
        id      INTEGER PRIMARY KEY,
        phone   TEXT NOT NULL,
        at      REAL NOT NULL,
        kind    TEXT NOT NULL CHECK (kind IN ('hold', 'release')),
        reason  TEXT
    )""",
    "CREATE INDEX hold_log_phone ON hold_log(phone, at)",
    "INSERT INTO hold_log (phone, at, kind, reason) SELECT phone, since, 'hold', reason FROM holds",
)

V9 = (
    # What a reply is billed as (segments, encoding) and what Twilio charged for it.
    "ALTER TABLE outbound ADD COLUMN segments INTEGER",
    "ALTER TABLE outbound ADD COLUMN encoding TEXT",
    "ALTER TABLE outbound ADD COLUMN price REAL",
    "ALTER TABLE outbound ADD COLUMN price_unit TEXT",
    # When each host's processor last ran: status and /health warn when none has.
    """CREATE TABLE processors (
        host        TEXT PRIMARY KEY,
        started_at  REAL NOT NULL,
        finished_at REAL
    )""",
)


class Step:
    """A schema step written for both engines (steps from 10 on): `sqlite` and `postgres`
    are the statements that bring version - 1 to it on each. Steps 2-9 are plain tuples:
    SQLite only, since PostgreSQL starts at version 9 (schema_pg.sql, PG_BASELINE)."""

    def __init__(self, sqlite, postgres):
        self.sqlite, self.postgres = tuple(sqlite), tuple(postgres)


# Version 10, issue 14: exclusion lives in the database, for several writers on any engine.
# One open batch per conversation (texts join it, under the conversation's lock), and at
# most one claim per conversation (one batch in flight: no two replies racing each other).
# An older database could hold a second open batch or a second claim of a conversation
# (a stale claim); an open batch its conversation does not point at is closed (queued,
# answered as usual: texts join the one it points at) and the later claims dropped (their batches are claimed again when due) before the indexes go up.
_V10 = (
    "UPDATE batches SET state = 'queued' WHERE state = 'open' AND id NOT IN (SELECT open_batch FROM conversations)",
    "UPDATE batches SET claim = NULL WHERE claim IS NOT NULL AND seq NOT IN"
    " (SELECT min(seq) FROM batches WHERE claim IS NOT NULL GROUP BY phone, our_number)",
    "CREATE UNIQUE INDEX batches_one_open ON batches(phone, our_number) WHERE state = 'open'",
    "CREATE UNIQUE INDEX batches_one_claim ON batches(phone, our_number) WHERE claim IS NOT NULL",
)


def _v10_tables(real):
    """Step 10's new tables, with the engine's type for epoch seconds."""
    return (
        # Business numbers paused by an operator (`smsbatch hold --number`): texts to them are
        # stored, their batches end held, until `release --number`.
        f"""CREATE TABLE number_holds (
        number  TEXT PRIMARY KEY,
        since   {real} NOT NULL,
        reason  TEXT
    )""",
        # Alerts sent once per episode (SMSBATCH_ALERT_WEBHOOK_URL), whichever process notices first.
        f"""CREATE TABLE alerts (
        event    TEXT PRIMARY KEY,
        episode  {real} NOT NULL,
        sent_at  {real} NOT NULL
    )""",
        # The MessageSid of every pruned text (pruned_sids, db_ops.prune): a captured webhook
        # request stays validly signed for ever, and this keeps its replay a duplicate.
        f"""CREATE TABLE pruned_sids (
        sid          TEXT PRIMARY KEY,
        received_at  {real} NOT NULL
    )""",
        # /metrics reads totals on every scrape: covering indexes keep that to a few ms on 50,000
        # texts (bench/bench_metrics.py) instead of scans of rows that hold prompts and bodies.
        "CREATE INDEX batches_usage ON batches(state, first_at, ai_requests, prompt_tokens, completion_tokens)",
        "CREATE INDEX messages_number ON messages(our_number)",
        "CREATE INDEX outbound_billing ON outbound(status, encoding, price_unit, segments, price)",
    )


V10 = Step(sqlite=_V10 + _v10_tables("REAL"), postgres=_V10 + _v10_tables("double precision"))


# Version 11, issue 14: batches.due_at meant three things by state (an open or queued batch's
# closing time, a failed attempt's retry time, a claim's lease expiry); each gets a column of
# its own. Every pending batch gets exactly the one its due_at meant, so the moment a processor
# must act (coalesce(lease_expires_at, retry_at, closes_at), states.acts_at) is what due_at was
# and nothing becomes claimable that was not. A queued batch's due_at was its closing time
# unless it was tried before (attempts) or requeued by an operator (retried_at); a batch
# in *sending* without a claim waits to be checked again; processing (even without a claim:
# step 10 dropped a second claim, leaving the lease to run out) or claimed: a lease.
def _v11(real):
    return (
        f"ALTER TABLE batches ADD COLUMN closes_at {real}",
        f"ALTER TABLE batches ADD COLUMN retry_at {real}",
        f"ALTER TABLE batches ADD COLUMN lease_expires_at {real}",
        "UPDATE batches SET closes_at = due_at WHERE state = 'open'"
        " OR state = 'queued' AND attempts = 0 AND retried_at IS NULL",
        "UPDATE batches SET retry_at = due_at WHERE state = 'queued' AND (attempts > 0 OR retried_at IS NOT NULL)"
        " OR state = 'sending' AND claim IS NULL",
        "UPDATE batches SET lease_expires_at = due_at WHERE state = 'processing'"
        " OR state = 'sending' AND claim IS NOT NULL",
        "DROP INDEX batches_state_due",  # SQLite drops no column an index uses
        "ALTER TABLE batches DROP COLUMN due_at",
        # What batches_state_due was to due_at: the claim, the processor's idle wait, /health
        # and the stall alert find pending batches by state and the moment a processor must act
        # on them, in that order (per state: SQLite's ORDER BY ... LIMIT stops early, no stats needed).
        "CREATE INDEX batches_state_acts_at ON batches (state, (coalesce(lease_expires_at, retry_at, closes_at)))",
    )


# PostgreSQL also gets the moment to act across all pending states in one order: the claim's
# ORDER BY ... LIMIT then walks this index and stops early, where (state, acts_at) made the
# planner anti-join and sort the whole backlog (100,000 due batches: 200-260 ms a claim, 5 ms
# with it). SQLite would only pick it after an ANALYZE, which smsbatch never runs.
_PG_PENDING_ACTS_AT = ("CREATE INDEX batches_pending_acts_at ON batches ((coalesce(lease_expires_at, retry_at,"
                       " closes_at))) WHERE state IN ('open', 'queued', 'processing', 'sending')")
V11 = Step(sqlite=_v11("REAL"), postgres=_v11("double precision") + (_PG_PENDING_ACTS_AT,))

STEPS = {2: V2, 3: V3, 4: V4, 5: V5, 6: V6, 7: V7, 8: V8, 9: V9, 10: V10, 11: V11}
LATEST = max(STEPS)
PG_BASELINE = 9  # schema_pg.sql: today's schema at version 9; later steps carry a `postgres` variant


def sqlite_step(version):
    """The statements of step `version` on SQLite."""
    step = STEPS[version]
    return step.sqlite if isinstance(step, Step) else step


def postgres_step(version):
    """The statements of step `version` on PostgreSQL (only steps after PG_BASELINE have them)."""
    return STEPS[version].postgres
