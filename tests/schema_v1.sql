-- smsbatch schema, version 1. Applied by `smsbatch migrate`; later versions add
-- migrations in smsbatch/db.py and bump PRAGMA user_version.

-- One row per batch: a person's burst of texts, answered by one reply.
-- state: open -> processing -> sending -> sent, with side exits
-- (queued for retry, superseded, skipped, expired, failed, unknown); see README.
CREATE TABLE IF NOT EXISTS batches (
    seq             INTEGER PRIMARY KEY,      -- arrival order of batches
    id              TEXT NOT NULL UNIQUE,     -- short id an operator types
    phone           TEXT NOT NULL,            -- the person (Twilio "From")
    our_number      TEXT NOT NULL,            -- the number they wrote to (Twilio "To")
    state           TEXT NOT NULL CHECK (state IN ('open', 'queued', 'processing',
                        'sending', 'sent', 'superseded', 'skipped', 'expired',
                        'failed', 'unknown')),
    message_count   INTEGER NOT NULL DEFAULT 0,
    first_at        REAL NOT NULL,            -- epoch seconds of the first text
    last_at         REAL NOT NULL,            -- epoch seconds of the latest text
    urgent          INTEGER NOT NULL DEFAULT 0,
    -- The next moment a processor must act: closing time while open, retry time
    -- while queued, lease expiry while processing or sending; NULL when finished.
    due_at          REAL,
    claim           TEXT,                     -- token of the current lease holder
    attempts        INTEGER NOT NULL DEFAULT 0,
    claimed_at      REAL,                     -- first claimed: texts after this are "late"
    started_at      REAL,                     -- processing started (latest claim)
    completed_at    REAL,                     -- reached a final state
    response_text   TEXT,                     -- the AI reply
    send_started_at REAL,                     -- committed before Twilio was called
    sent_at         REAL,
    provider_sid    TEXT,                     -- Twilio's message SID for the reply
    last_error      TEXT,                     -- why it failed, was skipped or expired
    fold_depth      INTEGER NOT NULL DEFAULT 0, -- superseded batches folded into this one, in a row
    superseded_by   TEXT REFERENCES batches(id),
    retried_at      REAL,                     -- last requeued by `smsbatch retry`
    created_at      REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS batches_state_due ON batches(state, due_at);
CREATE INDEX IF NOT EXISTS batches_state_last ON batches(state, last_at);  -- expiry sweep: O(expired), not O(backlog)
CREATE INDEX IF NOT EXISTS batches_phone ON batches(phone);  -- no state: claiming and finishing do not rewrite it

-- Each phone's open batch. Texts join it while that batch is still open; claiming a
-- batch does not touch this table (a pointer to a closed batch is simply stale), so
-- claims stay cheap however many batches wait. One row per phone: one open batch.
CREATE TABLE IF NOT EXISTS phones (
    phone       TEXT PRIMARY KEY,
    open_batch  TEXT NOT NULL REFERENCES batches(id)
);

-- Every inbound text, stored once per Twilio MessageSid.
CREATE TABLE IF NOT EXISTS messages (
    id          INTEGER PRIMARY KEY,
    sid         TEXT NOT NULL UNIQUE,
    phone       TEXT NOT NULL,
    our_number  TEXT NOT NULL,
    body        TEXT NOT NULL,
    media       TEXT,                         -- JSON list of MediaUrl{N}, or NULL
    kind        TEXT NOT NULL DEFAULT 'text' CHECK (kind IN ('text', 'opt_out', 'opt_in')),
    received_at REAL NOT NULL,
    batch_id    TEXT NOT NULL REFERENCES batches(id)
);
CREATE INDEX IF NOT EXISTS messages_batch ON messages(batch_id);
CREATE INDEX IF NOT EXISTS messages_phone ON messages(phone, received_at);
CREATE INDEX IF NOT EXISTS messages_received ON messages(received_at);

-- Numbers that texted STOP (and have not texted START since).
CREATE TABLE IF NOT EXISTS opt_outs (
    phone   TEXT PRIMARY KEY,
    since   REAL NOT NULL,
    keyword TEXT NOT NULL
);
