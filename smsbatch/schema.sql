-- smsbatch schema: the current version in full (PRAGMA user_version says which).
-- A new database is made from this file; an older one is brought here by the frozen
-- steps in smsbatch/migrations.py. tests/test_migrations.py checks that both give the
-- same tables, columns and indexes, so a change here needs a migration step too.

-- One row per batch: a person's burst of texts to one of our numbers, answered by one reply.
-- state: open -> processing -> sending -> sent, with side exits (queued for retry,
-- superseded, skipped, held, expired, failed, unknown); db.TRANSITIONS lists every move.
CREATE TABLE IF NOT EXISTS batches (
    seq             INTEGER PRIMARY KEY,      -- arrival order of batches
    id              TEXT NOT NULL UNIQUE,     -- short id an operator types
    phone           TEXT NOT NULL,            -- the person (Twilio "From")
    our_number      TEXT NOT NULL,            -- the number they wrote to (Twilio "To"); replies come from it
    state           TEXT NOT NULL CHECK (state IN ('open', 'queued', 'processing',
                        'sending', 'sent', 'superseded', 'skipped', 'held', 'expired',
                        'failed', 'unknown')),
    message_count   INTEGER NOT NULL DEFAULT 0,
    first_at        REAL NOT NULL,            -- epoch seconds of the first text
    last_at         REAL NOT NULL,            -- epoch seconds of the latest text
    urgent          INTEGER NOT NULL DEFAULT 0,
    -- When a processor must next act on a pending batch is the first of these that is set
    -- (states.acts_at, index batches_state_acts_at): its lease's end while claimed, else its retry
    -- time, else its closing time.
    closes_at       REAL,                     -- an open (or queued) batch closes: it may be answered
    retry_at        REAL,                     -- a failed attempt, or a send to check, may be tried again
    lease_expires_at REAL,                    -- the claim's holder owns it until then (the database's clock)
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
    created_at      REAL NOT NULL,
    prompt          TEXT,                     -- JSON of the chat messages last sent to the AI (`show --prompt`)
    quiet_seconds   REAL,                     -- the quiet period this batch was given (fixed or adaptive)
    holder          TEXT,                     -- host:pid of the processor holding it (latest claim)
    holder_node     TEXT,                     -- the holder's boot id/pid namespace: its pid can be checked there
    heartbeat_at    REAL,                     -- its holder last renewed the lease (lease.py)
    ai_requests     INTEGER NOT NULL DEFAULT 0, -- HTTP requests to the AI, its client's retries included
    prompt_tokens   INTEGER NOT NULL DEFAULT 0, -- tokens billed, every answer received for it
    completion_tokens INTEGER NOT NULL DEFAULT 0
);
-- claim, idle wait, /health: pending batches by the moment a processor must act (states.acts_at)
CREATE INDEX IF NOT EXISTS batches_state_acts_at ON batches (state, (coalesce(lease_expires_at, retry_at, closes_at)));
CREATE INDEX IF NOT EXISTS batches_state_last ON batches(state, last_at);  -- expiry sweep: O(expired), not O(backlog)
CREATE INDEX IF NOT EXISTS batches_conversation ON batches(phone, our_number);  -- no state: claiming does not rewrite it
CREATE INDEX IF NOT EXISTS batches_superseded_by ON batches(superseded_by) WHERE superseded_by IS NOT NULL;  -- prune
CREATE INDEX IF NOT EXISTS batches_created ON batches(created_at);  -- `stats` over a window
-- /metrics and /health: totals by state, and the oldest pending batch, without reading rows
CREATE INDEX IF NOT EXISTS batches_usage ON batches(state, first_at, ai_requests, prompt_tokens, completion_tokens);
-- Exclusion in the database (several writers): one open batch per conversation, and at
-- most one claim (one batch in flight) per conversation.
CREATE UNIQUE INDEX IF NOT EXISTS batches_one_open ON batches(phone, our_number) WHERE state = 'open';
CREATE UNIQUE INDEX IF NOT EXISTS batches_one_claim ON batches(phone, our_number) WHERE claim IS NOT NULL;

-- Every state change of every batch, oldest first: `smsbatch show` reads it, `retry`
-- adds to it. from_state is NULL for the move that created the batch.
CREATE TABLE IF NOT EXISTS batch_events (
    id          INTEGER PRIMARY KEY,
    batch_id    TEXT NOT NULL REFERENCES batches(id),
    at          REAL NOT NULL,
    from_state  TEXT,
    to_state    TEXT NOT NULL,
    reason      TEXT
);
CREATE INDEX IF NOT EXISTS batch_events_batch ON batch_events(batch_id, id);

-- Each conversation's open batch: a person and the number they wrote to. Texts join it
-- while that batch is still open; claiming does not touch this table (a pointer to a
-- closed batch is simply stale), so claims stay cheap however many batches wait.
CREATE TABLE IF NOT EXISTS conversations (
    phone       TEXT NOT NULL,
    our_number  TEXT NOT NULL,
    open_batch  TEXT NOT NULL REFERENCES batches(id),
    PRIMARY KEY (phone, our_number)
);
CREATE INDEX IF NOT EXISTS conversations_open_batch ON conversations(open_batch);  -- prune: who points at a batch

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
CREATE INDEX IF NOT EXISTS messages_number ON messages(our_number);  -- /metrics: texts per business number

-- Every SMS we sent: AI replies (recorded when Twilio accepted them) and replies an
-- operator sent by hand. The AI sees both as the conversation so far. status and
-- error_code are Twilio's latest MessageStatus / ErrorCode (NULL: no receipt yet).
CREATE TABLE IF NOT EXISTS outbound (
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
    checked_at  REAL,                         -- last asked Twilio (no status callbacks)
    reported_at REAL,                         -- `process` reported it undelivered/failed
    segments    INTEGER,                      -- SMS segments the body is billed as (NULL: not counted)
    encoding    TEXT,                         -- 'GSM-7' or 'UCS-2'
    price       REAL,                         -- Twilio's price for it (negative: a charge), when known
    price_unit  TEXT                          -- its currency, e.g. 'USD'
);
CREATE INDEX IF NOT EXISTS outbound_conversation ON outbound(phone, our_number, sent_at);
CREATE INDEX IF NOT EXISTS outbound_batch ON outbound(batch_id);
CREATE INDEX IF NOT EXISTS outbound_sent ON outbound(sent_at);  -- `stats` over a window
CREATE INDEX IF NOT EXISTS outbound_status ON outbound(status, sent_at);
CREATE INDEX IF NOT EXISTS outbound_billing ON outbound(status, encoding, price_unit, segments, price);  -- /metrics

-- Numbers that texted STOP (and have not texted START since). scope: the number they
-- wrote to, the messaging service when one is used (Twilio opts out of the whole
-- service), or '*' for every number (opt-outs kept from schema version 1).
CREATE TABLE IF NOT EXISTS opt_outs (
    phone   TEXT NOT NULL,
    scope   TEXT NOT NULL,
    since   REAL NOT NULL,
    keyword TEXT NOT NULL,
    PRIMARY KEY (phone, scope)
);

-- Every hold and release, kept after the release so `show PHONE` still tells them.
CREATE TABLE IF NOT EXISTS hold_log (
    id      INTEGER PRIMARY KEY,
    phone   TEXT NOT NULL,
    at      REAL NOT NULL,
    kind    TEXT NOT NULL CHECK (kind IN ('hold', 'release')),
    reason  TEXT
);
CREATE INDEX IF NOT EXISTS hold_log_phone ON hold_log(phone, at);

-- People an operator put on hold (`smsbatch hold`): no AI reply until released.
CREATE TABLE IF NOT EXISTS holds (
    phone   TEXT PRIMARY KEY,
    since   REAL NOT NULL,
    reason  TEXT
);

-- Our numbers an operator paused (`smsbatch hold --number`): texts to them are stored and
-- their batches end held, until `smsbatch release --number`.
CREATE TABLE IF NOT EXISTS number_holds (
    number  TEXT PRIMARY KEY,
    since   REAL NOT NULL,
    reason  TEXT
);

-- The backfill's progress (one row): texts in Twilio's log up to checked_until were
-- looked for; claimed_at is when a processor last took the turn (once a minute, for all).
CREATE TABLE IF NOT EXISTS backfill (
    id              INTEGER PRIMARY KEY CHECK (id = 1),
    checked_until   REAL,
    claimed_at      REAL
);

-- Each provider's health ('ai', 'sms'), kept across `process` runs (each cron run is a new
-- process): failing since when (NULL: healthy) and when the outage was announced on stderr.
CREATE TABLE IF NOT EXISTS provider_health (
    provider        TEXT PRIMARY KEY,
    failing_since   REAL,
    last_failure_at REAL,
    last_error      TEXT,
    alerted_at      REAL,
    last_ok_at      REAL
);

-- Webhook requests refused for a bad signature, counted per minute (/health, status --json):
-- a wrong SMSBATCH_PUBLIC_URL shows up on our side. Rows older than a day are dropped.
CREATE TABLE IF NOT EXISTS rejections (
    minute   INTEGER PRIMARY KEY,   -- epoch seconds // 60
    count    INTEGER NOT NULL,
    last_at  REAL NOT NULL,         -- epoch seconds of the latest one that minute
    last_url TEXT NOT NULL          -- the URL its signature was checked against
);

-- When each host's processor last ran (one row a host): `status` and /health say when a
-- processor last ran, and warn when none has while batches wait.
CREATE TABLE IF NOT EXISTS processors (
    host        TEXT PRIMARY KEY,
    started_at  REAL NOT NULL,                -- its latest run began
    finished_at REAL                          -- its latest run ended (NULL: running, or killed)
);

-- Alerts posted to SMSBATCH_ALERT_WEBHOOK_URL that must go out once per episode, whoever
-- notices: event 'stalled' (no processor ran while batches waited), episode = the time of the
-- last run before it (a later run starts a new episode).
CREATE TABLE IF NOT EXISTS alerts (
    event    TEXT PRIMARY KEY,
    episode  REAL NOT NULL,
    sent_at  REAL NOT NULL
);

-- The MessageSid of every text `prune` deleted, and when it came: no number, no body. Twilio's
-- signatures carry no time, so a captured webhook request stays valid for ever; this keeps
-- its replay a duplicate (add_message) after the text itself is gone. Kept for ever (about
-- 60 bytes a text).
CREATE TABLE IF NOT EXISTS pruned_sids (
    sid          TEXT PRIMARY KEY,
    received_at  REAL NOT NULL
);
