"""A populated database of schema version 1 (the first release), as found in the field.

Built from tests/data/schema_v1.sql, the released DDL, with rows written the way the
first release wrote them: a burst still open, a sent reply, a failed batch, a batch
superseded into a newer one, a STOP keyword batch and its opt-out.
"""

import os
import sqlite3

V1_SCHEMA = os.path.join(os.path.dirname(__file__), "data", "schema_v1.sql")
T = 1_790_000_000.0
US = "+15550000000"
OPEN, SENT, FAILED, OLD, NEWER, STOP = ("open222222", "sent222222", "fail222222", "old2222222",
                                       "new2222222", "stop222222")
# (id, phone, state, message_count, extra columns)
BATCHES = [
    (SENT, "+15551110001", "sent", 2, {"response_text": "Sure, 9 to 5.", "provider_sid": "SM" + "a" * 32,
                                       "sent_at": T + 20, "completed_at": T + 20, "attempts": 1}),
    (FAILED, "+15551110002", "failed", 1, {"last_error": "AI returned HTTP 400: bad", "attempts": 1,
                                           "completed_at": T + 15}),
    (NEWER, "+15551110003", "queued", 2, {"due_at": T + 40, "attempts": 0, "fold_depth": 1}),
    (OLD, "+15551110003", "superseded", 1, {"superseded_by": NEWER, "completed_at": T + 12, "attempts": 1}),
    (STOP, "+15551110004", "skipped", 1, {"last_error": "keyword STOP: not for the AI", "completed_at": T}),
    (OPEN, "+15551110005", "open", 1, {"due_at": T + 60}),
]
# (sid, phone, body, kind, batch)
MESSAGES = [
    ("SMv1m1", "+15551110001", "hi", "text", SENT), ("SMv1m2", "+15551110001", "opening hours?", "text", SENT),
    ("SMv1m3", "+15551110002", "help me", "text", FAILED),
    ("SMv1m4", "+15551110003", "first", "text", NEWER), ("SMv1m5", "+15551110003", "second", "text", NEWER),
    ("SMv1m6", "+15551110004", "STOP", "opt_out", STOP), ("SMv1m7", "+15551110005", "still typing", "text", OPEN),
]


def make_v1_database(path):
    """Write a version-1 database at `path` with the rows above. Returns the row counts."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.executescript(open(V1_SCHEMA).read())
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA user_version = 1")
    conn.execute("BEGIN")
    for seq, (batch_id, phone, state, count, extra) in enumerate(BATCHES, 1):
        columns = {"seq": seq, "id": batch_id, "phone": phone, "our_number": US, "state": state,
                   "message_count": count, "first_at": T + seq, "last_at": T + seq + 1, "created_at": T + seq,
                   **extra}
        names = ", ".join(columns)
        conn.execute(f"INSERT INTO batches ({names}) VALUES ({', '.join('?' for _ in columns)})",
                     tuple(columns.values()))
    for n, (sid, phone, body, kind, batch_id) in enumerate(MESSAGES):
        conn.execute("INSERT INTO messages (sid, phone, our_number, body, kind, received_at, batch_id)"
                     " VALUES (?, ?, ?, ?, ?, ?, ?)", (sid, phone, US, body, kind, T + n, batch_id))
    conn.execute("INSERT INTO phones (phone, open_batch) VALUES (?, ?)", ("+15551110005", OPEN))
    conn.execute("INSERT INTO opt_outs (phone, since, keyword) VALUES (?, ?, ?)", ("+15551110004", T, "STOP"))
    conn.execute("COMMIT")
    conn.close()
    return {"batches": len(BATCHES), "messages": len(MESSAGES), "opt_outs": 1}
