"""Storing inbound texts: the store's half of smsbatch.intake (a mixin of Store).

Texts are stored in few statements whatever their number, so the webhook's group commit
costs a handful of round trips per group on PostgreSQL, not several per text:

1. the conversations' locks (Database.lock_conversations: in an order that cannot
   deadlock two groups), then what is known of the texts (stored
   or pruned MessageSids, opt-outs, the person's recent times for the adaptive quiet
   period) and their conversations' open batches, locked (FOR UPDATE: a claim cannot close
   one between this read and the update): one round trip (Connection.execute_all);
2. smsbatch.intake.Plan decides, in Python, where each text goes;
3. the writes: new batches, the open batches joined (a compare-and-set on state = 'open',
   checked by rowcount, a full one closed by the same statement), the conversations' open
   batch, the texts, the history rows: one round trip.

Up to ROWS_PER_STATEMENT rows go in one statement, on both engines (on SQLite, in-process,
too: measured with groups of 1-12 texts, 100 rows a statement cost less CPU than one, even
though statements of new lengths are parsed anew).

Each read runs after the locks were taken (PostgreSQL takes a new snapshot per statement
in READ COMMITTED), so it sees every text another writer of these conversations committed.

The PostgreSQL webhook goes further when it can (add_texts_guessed): it plans from what it
remembers of the conversations (intake.Memory) instead of reading first, and sends the
BEGIN, the locks, a check of every guess and the writes, each write checked by the server
too, and the COMMIT in ONE round trip. A guess found wrong aborts that transaction, so
nothing of it is stored, and the group is then stored the ordinary way above.
"""

import functools

from smsbatch.engine import Named, StoreConflict
from smsbatch.errors import SmsbatchError
from smsbatch.intake import Added, Facts, Memory, OpenBatch, Plan, Text
from smsbatch.states import State

ID_ATTEMPTS = 5
ROWS_PER_STATEMENT = 100  # keeps a statement's parameters few (SQLite allows 32,766)


class GuessedWrong(SmsbatchError):
    """A fact add_texts_guessed planned with was not so: nothing of the group is stored."""


class _Duplicate(Exception):
    """Rolls back the transaction: another writer stored one of the MessageSids meanwhile."""


class _IdTaken(Exception):
    """Rolls back the transaction: a random batch id was already taken."""


class Intake:
    """Store's inbound texts (see the module docstring)."""

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
        database (Database.lock_conversations; one open batch per conversation is also a
        unique index). A MessageSid stored meanwhile by another writer (a second webhook,
        the backfill) is a duplicate, never an error.
        """
        return self.add_texts([Text(sid, phone, our_number, body, received_at, rules, media, carrier_kind, scope,
                                    expired, answered)])[0]

    def add_texts(self, texts):
        """Store `texts` (intake.Text, in arrival order) in one transaction; their Added.

        Inside the webhook's group (its writers' `_grouped` stores) this joins the group's
        transaction, and anything that goes wrong is raised for the group to be run again
        text by text. Alone, a batch id found taken is picked again and a MessageSid another
        writer stored meanwhile is a duplicate."""
        if getattr(self, "_grouped", False):
            with self.transaction() as conn:
                return self._store_texts(conn, texts)
        for _ in range(ID_ATTEMPTS):
            try:
                with self.transaction() as conn:
                    return self._store_texts(conn, texts)
            except _IdTaken:
                continue
            except _Duplicate:
                if len(texts) > 1:
                    return [added for text in texts for added in self.add_texts([text])]
                found = self.conn.execute("SELECT batch_id FROM messages WHERE sid = ?", (texts[0].sid,)).fetchone()
                return [Added(found[0] if found else None, True, texts[0].stated_kind or "text")]
        raise SmsbatchError("could not pick a unique batch id")  # pragma: no cover

    def add_texts_guessed(self, texts, facts, open_batches, seconds):
        """Store `texts` in ONE round trip, BEGIN to COMMIT, planned from guessed facts
        (intake.Memory.guess) instead of read ones; PostgreSQL only (Database.prepares). Every
        statement gives up after `seconds`; the transaction is over when this returns or
        raises. Every guess is checked by the server in the same transaction (_GUARD, and
        the writes' compare-and-sets: see _guarded_writes); a wrong one raises GuessedWrong
        with nothing stored. Returns their Added, and remembers the plan (last_intake).
        Raises: GuessedWrong, StoreError."""
        conversations = sorted({text.conversation for text in texts})
        was = {b.id: (b.count, b.first_at, b.last_at, int(b.urgent)) for b in open_batches.values()}
        plan = Plan(open_batches)
        added = [plan.add(text, fact) for text, fact in zip(texts, facts)]
        # A conversation guessed to have no open batch, where the plan inserts an open one: the
        # one-open-batch index refuses it if one exists. Elsewhere the check must look.
        inserted_open = {(b.phone, b.our_number) for b in plan.batches.values() if b.created and b.state is State.OPEN}
        unsure = [c for c in conversations if c not in open_batches and c not in inserted_open]
        statements = self.db.lock_conversations(conversations) + [_guard(texts, facts, unsure)]
        statements += _guarded_writes(plan, was)
        self.db.begin(seconds)
        try:
            self.conn.execute_all(statements, commit=True)
        except StoreConflict as exc:
            raise GuessedWrong(str(exc)) from None
        self.last_intake = (texts, facts, plan)
        return added

    def quiet_now(self, phone, now, rules):
        """The quiet period this person's next text would get now (fixed, or fitted to their pace)."""
        probe = Text("", phone, "", "", now, rules)
        facts = self._read_facts(self.conn, [probe])[0]
        return Plan({})._quiet(probe, facts)

    # -- 1. read --------------------------------------------------------------------

    def _store_texts(self, conn, texts):
        per = ROWS_PER_STATEMENT
        conversations = sorted({text.conversation for text in texts})
        locks = self.db.lock_conversations(conversations) if conversations else []
        chunks = [texts[i:i + per] for i in range(0, len(texts), per)]
        reads = [self._facts_statement(chunk) for chunk in chunks]
        reads += [self._open_statement(conversations[i:i + per]) for i in range(0, len(conversations), per)]
        results = conn.execute_all(locks + reads)[len(locks):]
        facts = [f for result, chunk in zip(results, chunks) for f in self._facts(result, chunk)]
        plan = Plan(self._open_batches(results[len(chunks):]))
        added = [plan.add(text, fact) for text, fact in zip(texts, facts)]
        self._write(conn, plan, per)
        self.last_intake = (texts, facts, plan)
        return added

    def _read_facts(self, conn, texts):
        return self._facts(conn.execute_all([self._facts_statement(texts)])[0], texts)

    def _facts_statement(self, texts):
        """What is known of each text: its MessageSid stored (batch id) or pruned, its phone
        opted out of its scope, and (adaptive) the phone's latest times up to the text."""
        window = max((t.rules.adaptive_window for t in texts if t.rules.adaptive), default=0) - 1
        if self.db.prepares:
            return (_named_facts(self.db.join_times("received_at")),
                    [[t.sid for t in texts], [t.phone for t in texts], [t.scope for t in texts],
                     [float(t.at) for t in texts], max(window, 0)])
        values = ", ".join(["(?, ?, ?, ?, ?)"] * len(texts))
        recent = "NULL"
        if window > 0:
            # Reads at most `window` index entries of messages_phone per text: no scan, whatever the history.
            recent = (f"(SELECT {self.db.join_times('received_at')} FROM (SELECT received_at FROM messages"
                      " WHERE phone = t.phone AND received_at <= t.at ORDER BY received_at DESC LIMIT ?) w)")
        params = [v for i, t in enumerate(texts) for v in (i, t.sid, t.phone, t.scope, t.at)]
        return (f"WITH t(k, sid, phone, scope, at) AS (VALUES {values})"
                " SELECT t.k, m.batch_id, (SELECT count(*) FROM pruned_sids p WHERE p.sid = t.sid),"
                " (SELECT count(*) FROM opt_outs o WHERE o.phone = t.phone AND o.scope IN (t.scope, '*')),"
                f" {recent} FROM t LEFT JOIN messages m ON m.sid = t.sid",
                params + ([window] if window > 0 else []))

    @staticmethod
    def _facts(result, texts):
        facts = []
        rows = sorted(result.fetchall(), key=lambda row: row[0])  # by k: the texts' order
        for row, text in zip(rows, texts):
            seen = (None,) if row[2] else None if row[1] is None else (row[1],)  # pruned: a duplicate, in no batch
            recent = tuple(map(float, row[4].split(","))) if row[4] else ()
            facts.append(Facts(seen, bool(row[3]), recent if text.rules.adaptive else ()))
        return facts

    def _open_statement(self, conversations):
        if self.db.prepares:
            return _OPEN_BATCHES, [[c[0] for c in conversations], [c[1] for c in conversations]]
        values = ", ".join(["(?, ?)"] * len(conversations))
        # A join from the VALUES (not `(phone, our_number) IN (VALUES ...)`, which SQLite answers
        # by scanning every open batch): one index search per conversation on both engines.
        return (f"WITH v(phone, our_number) AS (VALUES {values})"
                " SELECT c.phone, c.our_number, b.id, b.first_at, b.last_at, b.message_count, b.urgent,"
                " b.quiet_seconds FROM v JOIN conversations c ON c.phone = v.phone AND c.our_number = v.our_number"
                " JOIN batches b ON b.id = c.open_batch WHERE b.state = 'open'" + self.db.for_update,
                [v for conversation in conversations for v in conversation])

    @staticmethod
    def _open_batches(results):
        return {(r[0], r[1]): OpenBatch(r[2], r[3], r[4], r[5], bool(r[6]), State.OPEN, r[7])
                for result in results for r in result.fetchall()}

    # -- 3. write ---------------------------------------------------------------------

    @staticmethod
    def _write(conn, plan, per):
        """The plan's writes in one round trip, `per` rows a statement; raises _IdTaken,
        _Duplicate, or SmsbatchError if an open batch was no longer open (cannot happen
        while its row is locked)."""
        created = [b for b in plan.batches.values() if b.created]
        joined = [b for b in plan.batches.values() if not b.created]
        writes = {
            "opt_outs": [_opt_change(*change) for change in plan.opt_changes],
            # a full batch closes before the batch that follows it opens (one open batch each)
            "joined": [_update_batch(b) for b in joined],
            "created": _rows(_INSERT_BATCHES, [_batch_row(b) for b in created], per),
            "conversations": _conversation_rows(plan, per),
            "stored": _rows(_INSERT_MESSAGES, _message_rows(plan), per),
            "events": _rows(_INSERT_EVENTS, _event_rows(plan), per),
        }
        results = iter(conn.execute_all([statement for group in writes.values() for statement in group]))
        counts = {name: [next(results).rowcount for _ in group] for name, group in writes.items()}
        if sum(counts["created"]) != len(created):
            raise _IdTaken()
        if any(count != 1 for count in counts["joined"]):
            raise SmsbatchError("an open batch was closed while a text joined it")
        if sum(counts["stored"]) != len(plan.stored):
            raise _Duplicate()  # stored by another writer since the read: undo this transaction


# The reads on engines that prepare (PostgreSQL): fixed shapes, the group's rows as arrays,
# parsed and planned once per connection (measured: a third of the reads' round trip and
# of the server's CPU for them). Each row of the arrays is looked up by its own index
# search (LATERAL): a plan made without statistics (a new database) cannot scan every
# open batch instead.
@functools.lru_cache(maxsize=4)
def _named_facts(join_times):
    return Named(
        "smsbatch_text_facts", ("text[]", "text[]", "text[]", "double precision[]", "bigint"),
        "SELECT t.k, (SELECT m.batch_id FROM messages m WHERE m.sid = t.sid),"
        " (SELECT count(*) FROM pruned_sids p WHERE p.sid = t.sid),"
        " (SELECT count(*) FROM opt_outs o WHERE o.phone = t.phone AND o.scope IN (t.scope, '*')),"
        f" (SELECT {join_times} FROM (SELECT received_at FROM messages WHERE phone = t.phone"
        " AND received_at <= t.at ORDER BY received_at DESC LIMIT $5) w)"
        " FROM unnest($1, $2, $3, $4) WITH ORDINALITY t(sid, phone, scope, at, k)")


# An open batch is locked (FOR UPDATE): a claim cannot close it between this read and the
# update. Its conversation's row needs no lock: the conversation's advisory lock is held.
_OPEN_BATCHES = Named(
    "smsbatch_open_batches", ("text[]", "text[]"),
    "SELECT v.phone, v.our_number, b.id, b.first_at, b.last_at, b.message_count, b.urgent, b.quiet_seconds"
    " FROM unnest($1, $2) v(phone, our_number)"
    " CROSS JOIN LATERAL (SELECT c.open_batch FROM conversations c"
    " WHERE c.phone = v.phone AND c.our_number = v.our_number) c"
    " CROSS JOIN LATERAL (SELECT b.id, b.first_at, b.last_at, b.message_count, b.urgent, b.quiet_seconds"
    " FROM batches b WHERE b.id = c.open_batch AND b.state = 'open' FOR UPDATE) b")


# What add_texts_guessed guessed, checked by the server: no MessageSid of the group pruned;
# each adaptive person's latest times ($6: the window), newest first, exactly those guessed
# (person $5[i]'s are $4[$2[i]:$3[i]], an empty slice for none); no open batch in the
# conversations guessed to have none ($7, $8: the one-open-batch index alone would not say so
# where the plan inserts no open batch: one text a batch, or a batch it filled). Each row is
# looked up by an index search (LATERAL ... LIMIT 1: an EXISTS would become a hash join over
# every open batch). A check that fails divides by zero: the transaction aborts, and engine_pg
# says StoreConflict. (The times compared as arrays: measured, a ranked FULL JOIN of the rows
# made this check most of the server's work for a group.) `_v2`: its parameters' types changed,
# and a session an older smsbatch prepared the old shape in must not run this one by that name.
_GUARD = Named(
    "smsbatch_guessed_v2", ("text[]", "integer[]", "integer[]", "double precision[]", "text[]", "bigint",
                         "text[]", "text[]"),
    "SELECT 1 / (NOT EXISTS (SELECT 1 FROM pruned_sids WHERE sid = ANY($1))"
    " AND NOT EXISTS (SELECT 1 FROM unnest($7, $8) v(phone, our_number) CROSS JOIN LATERAL (SELECT 1 FROM batches b"
    " WHERE b.phone = v.phone AND b.our_number = v.our_number AND b.state = 'open' LIMIT 1) o)"
    " AND NOT EXISTS (SELECT 1 FROM unnest($5, $2, $3) p(phone, lo, hi) WHERE ARRAY(SELECT received_at"
    " FROM messages WHERE phone = p.phone ORDER BY received_at DESC LIMIT $6) IS DISTINCT FROM $4[p.lo:p.hi]))::integer")


def _guard(texts, facts, none_open):
    people, window = {}, 0
    for text, fact in zip(texts, facts):
        if text.rules.adaptive:
            people[text.phone] = fact.recent
            window = max(window, Memory.window(text.rules))
    times, first, last = [], [], []
    for recent in people.values():  # each person's slice of `times` (lo > hi: none)
        first.append(len(times) + 1)
        times += [float(at) for at in recent]
        last.append(len(times))
    return _GUARD, [[t.sid for t in texts], first, last, times, list(people), window,
                    [c[0] for c in none_open], [c[1] for c in none_open]]


def _guarded_writes(plan, was):
    """The plan's writes, each checked by the server: a joined batch by a compare-and-set on
    everything the plan read of it (`was`: count, first and last time, urgent), a new batch
    by the one-open-batch index and its id's uniqueness, a text by its MessageSid's."""
    statements = [_checked_update(*_update_batch(b), was[b.id]) for b in plan.batches.values() if not b.created]
    created = [_batch_row(b) for b in plan.batches.values() if b.created]
    per = ROWS_PER_STATEMENT
    statements += _rows(_INSERT_BATCHES_CHECKED, created, per)
    statements += _conversation_rows(plan, per)
    statements += _rows(_INSERT_MESSAGES_CHECKED, _message_rows(plan), per)
    statements += _rows(_INSERT_EVENTS, _event_rows(plan), per)
    return statements


def _rows(sql, rows, per):
    """Statements of `sql` with `VALUES {}` filled with up to `per` rows each, with their parameters."""
    statements = []
    for i in range(0, len(rows), per):
        chunk = rows[i:i + per]
        one = "(" + ", ".join(["?"] * len(chunk[0])) + ")"
        statements.append((sql.format(", ".join([one] * len(chunk))), [v for row in chunk for v in row]))
    return statements


def _opt_change(kind, phone, scope, at, word):
    if kind == "opt_out":
        return ("INSERT INTO opt_outs (phone, scope, since, keyword) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (phone, scope) DO UPDATE SET since = excluded.since, keyword = excluded.keyword",
                (phone, scope, at, word))
    # opting back in also lifts an opt-out kept from schema 1, which covered every number
    return "DELETE FROM opt_outs WHERE phone = ? AND scope IN (?, '*')", (phone, scope)


# The guessed writes use the _CHECKED forms: a MessageSid or batch id already stored must
# raise (the guess was wrong), not be skipped in silence as the ordinary way's rowcounts allow.
_INSERT_MESSAGES_CHECKED = ("INSERT INTO messages (sid, phone, our_number, body, media, kind, received_at, batch_id)"
                            " VALUES {}")
_INSERT_MESSAGES = _INSERT_MESSAGES_CHECKED + " ON CONFLICT (sid) DO NOTHING"
_INSERT_EVENTS = "INSERT INTO batch_events (batch_id, at, from_state, to_state, reason) VALUES {}"


def _conversation_rows(plan, per):
    return _rows("INSERT INTO conversations (phone, our_number, open_batch) VALUES {}"
                 " ON CONFLICT (phone, our_number) DO UPDATE SET open_batch = excluded.open_batch",
                 [(*conversation, batch_id) for conversation, batch_id in plan.conversations.items()], per)


def _message_rows(plan):
    return [(t.sid, t.phone, t.our_number, t.body, t.media_json, kind, t.at, batch_id)
            for t, batch_id, kind in plan.stored]


def _event_rows(plan):
    return [(b.id, at, None if was is None else was.value, to.value, reason)
            for b in plan.batches.values() for at, was, to, reason in b.moves]


_INSERT_BATCHES_CHECKED = ("INSERT INTO batches (id, phone, our_number, state, message_count, first_at, last_at,"
                           " urgent, closes_at, last_error, completed_at, created_at, quiet_seconds) VALUES {}")
_INSERT_BATCHES = _INSERT_BATCHES_CHECKED + " ON CONFLICT (id) DO NOTHING"


def _batch_row(b):
    """A batch this plan opened, as it stands after the plan's texts."""
    final = b.reason is not None
    return (b.id, b.phone, b.our_number, b.state.value, b.count, b.first_at, b.last_at, int(b.urgent),
            None if final else Plan.closes_at(b), b.reason, b.created_at if final else None, b.created_at, b.quiet)


def _checked_update(sql, params, was):
    """_update_batch's compare-and-set, on what the plan read of the batch too (`was`), made
    to fail on the server (1 / 0) when it matches no row."""
    return (f"WITH j AS ({sql} AND message_count = ? AND first_at = ? AND last_at = ? AND urgent = ?"
            " RETURNING 1) SELECT 1 / count(*) FROM j", (*params, *was))


def _update_batch(b):
    """An open batch joined (and closed, if full): a compare-and-set on its state."""
    return ("UPDATE batches SET message_count = ?, first_at = ?, last_at = ?, urgent = ?, closes_at = ?,"
            " quiet_seconds = ?, state = ? WHERE id = ? AND state = 'open'",
            (b.count, b.first_at, b.last_at, int(b.urgent), Plan.closes_at(b), b.quiet, b.state.value, b.id))

