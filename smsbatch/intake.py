"""Where inbound texts go: pure decisions, no I/O.

The store (smsbatch.db_intake) reads what it knows of the texts' conversations (`Facts`),
hands them to a `Plan` with the texts in arrival order, and writes what the plan decided:
new batches, batches joined (and closed when full), texts, opt-out changes, each move
checked against states.TRANSITIONS. A plan covers many texts at once (the webhook stores
the texts that arrived together in one transaction), so each decision also sees the texts
planned before it: a second text of a person joins the batch the first one opened, a YES
after a STOP in the same group is a re-subscription, the adaptive quiet period counts the
earlier texts' times.
"""

import collections
import json
import re
import secrets
import threading
from dataclasses import dataclass, field

from smsbatch import batching
from smsbatch.errors import InvalidTransition
from smsbatch.states import TRANSITIONS, State

# What no database here can store in a text column: NUL (PostgreSQL refuses it, libpq would cut
# the string there) and lone surrogates (not UTF-8). A body holding them is stored with each one
# replaced by U+FFFD, on both engines, rather than refused: Twilio does not send a text again.
UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
ID_ALPHABET = "23456789abcdefghjkmnpqrstuvwxyz"  # no 0/o, 1/l/i: easy to read aloud and type
LATE_REASON = "found in Twilio's message log, older than SMSBATCH_MAX_AGE_SECONDS: not answered late"


@dataclass(frozen=True)
class Added:
    """What storing one inbound text did. batch_id is None for a duplicate of a pruned text."""

    batch_id: str
    duplicate: bool
    kind: str


@dataclass
class Text:
    """One inbound text to store. Calling it stores it (the webhook's writers run their
    writes as `work(store)`; texts that arrived together are stored together, see
    Store.add_texts). `carrier_kind`: Twilio's own opt-out verdict; `scope`: what an opt-out
    covers (batching.opt_out_scope; default our_number); `expired`/`answered`: the backfill's
    verdicts (stored in a batch of their own, never answered)."""

    sid: str
    phone: str
    our_number: str
    body: str
    at: float
    rules: batching.Rules
    media: tuple = ()
    carrier_kind: str = None
    scope: str = None
    expired: bool = False
    answered: str = None

    def __post_init__(self):
        self.body = storable(self.body)
        self.scope = self.scope or self.our_number
        self.media = tuple(self.media or ())

    def __call__(self, store):
        return store.add_texts([self])[0]

    @property
    def stated_kind(self):
        """'opt_out'/'opt_in' by Twilio's verdict, else by its keyword (a text with pictures is
        never a keyword), or None."""
        return self.carrier_kind or (batching.keyword_kind(self.body) if not self.media else None)

    @property
    def conversation(self):
        return self.phone, self.our_number

    @property
    def media_json(self):
        return json.dumps(list(self.media)) if self.media else None


def storable(body):
    """`body` with what cannot be stored (UNSTORABLE) replaced by U+FFFD."""
    return UNSTORABLE.sub("\ufffd", body) if UNSTORABLE.search(body) else body


def new_id():
    """A short random batch id such as 'b7k2mq9xza': ten letters of ID_ALPHABET, uniform, from
    one draw of the system's randomness (ten draws cost more than the rest of a text's plan)."""
    n, letters = secrets.randbelow(len(ID_ALPHABET) ** 10), []
    for _ in range(10):
        n, i = divmod(n, len(ID_ALPHABET))
        letters.append(ID_ALPHABET[i])
    return "".join(letters)


@dataclass
class OpenBatch:
    """A batch this plan writes: an open batch read (locked) by the store, or one it opens."""

    id: str
    first_at: float
    last_at: float
    count: int
    urgent: bool
    state: State = State.OPEN
    quiet: float = None
    created: bool = False  # opened by this plan (inserted), not read from the database
    phone: str = None  # (created ones) the conversation, and when its first text came
    our_number: str = None
    created_at: float = None
    reason: str = None  # why a batch created final (skipped, expired) is
    rules: batching.Rules = None  # the rules of the latest text in it (when it closes)
    moves: list = field(default_factory=list)  # (at, from, to, reason) this plan made


@dataclass
class Facts:
    """What the store read for one text before any of the plan's texts were written."""

    seen: tuple = None  # (batch_id,) if this MessageSid is stored ((None,) if pruned)
    opted_out: bool = False  # the phone has opted out of the text's scope
    recent: tuple = ()  # the phone's latest received_at up to the text (adaptive: its window)


class Plan:
    """Decisions for texts in arrival order; afterwards the writes they need.

    `open_batches`: {(phone, our_number): OpenBatch} read (locked) by the store. `make_id`:
    makes a batch id. After add() for every text: `batches` (every batch written: created
    ones to insert, final ones among them for keyword, late or answered texts; read ones to
    update), `stored` (texts to insert, with their batch id and kind),
    `opt_changes` ((kind 'opt_out'/'opt_in', phone, scope, at, word), in order),
    `conversations` ({conversation: batch id} whose open batch changed).
    """

    def __init__(self, open_batches, make_id=new_id):
        self.open = dict(open_batches)
        self.make_id = make_id
        self.batches, self.stored = {}, []
        self.opt_changes, self.conversations = [], {}
        self._sids = {}  # sid: batch id, for a text that comes twice in one plan
        self._opted = {}  # (phone, scope): opted out?, as changed by this plan's keywords
        self._times = {}  # phone: received_at of this plan's texts so far

    def add(self, text, facts):
        """Decide where `text` goes; returns its Added."""
        if facts.seen is not None:
            return Added(facts.seen[0], True, text.stated_kind or "text")
        if text.sid in self._sids:
            return Added(self._sids[text.sid], True, text.stated_kind or "text")
        kind = text.stated_kind
        if kind == "opt_in" and not text.carrier_kind and _is_yes(text.body) \
                and not self._opted.get((text.phone, text.scope), facts.opted_out):
            kind = None  # "yes" answering the AI's question is a text, not a re-subscription
        if kind:
            batch_id = self._keyword(text, kind)
        elif text.answered:
            batch_id = self._final_batch(text, State.SKIPPED, text.answered)
        elif text.expired:
            batch_id = self._final_batch(text, State.EXPIRED, LATE_REASON)
        else:
            batch_id = self._join(text, facts)
        self._times.setdefault(text.phone, []).append(text.at)
        self._sids[text.sid] = batch_id
        self.stored.append((text, batch_id, kind or "text"))
        return Added(batch_id, False, kind or "text")

    def _keyword(self, text, kind):
        word = text.body.strip().upper()
        self.opt_changes.append((kind, text.phone, text.scope, text.at, word))
        self._opted[(text.phone, text.scope)] = kind == "opt_out"
        return self._final_batch(text, State.SKIPPED, f"keyword {word}: not for the AI")

    def _final_batch(self, text, state, reason):
        batch = self._new(text, state, False, None, reason=reason)
        batch.moves.append((text.at, None, state, reason))
        self.batches[batch.id] = batch
        return batch.id

    def _join(self, text, facts):
        """The text joins its conversation's open batch, or opens one."""
        rules, at = text.rules, text.at
        urgent = batching.is_urgent(text.body, rules.urgent_keywords)
        quiet = self._quiet(text, facts)
        batch = self.open.get(text.conversation)
        if batch is None:
            state = State.QUEUED if rules.max_messages <= 1 else State.OPEN
            batch = self._new(text, state, urgent, quiet, rules=rules)
            batch.moves.append((at, None, state, "first text"))
            self.batches[batch.id] = batch
            if state == State.OPEN:  # a batch of one text is closed at once: the next opens another
                self.open[text.conversation] = batch
            self.conversations[text.conversation] = batch.id
            return batch.id
        batch.first_at, batch.last_at = min(batch.first_at, at), max(batch.last_at, at)
        batch.count, batch.urgent, batch.quiet = batch.count + 1, batch.urgent or urgent, quiet
        batch.rules = rules
        self.batches[batch.id] = batch
        if batch.count >= rules.max_messages:  # a full batch closes: the next text opens a new one
            self._move(batch, State.QUEUED, at, f"full: {batch.count} texts")
            del self.open[text.conversation]
        return batch.id

    def _new(self, text, state, urgent, quiet, rules=None, reason=None):
        return OpenBatch(self.make_id(), text.at, text.at, 1, urgent, state, quiet, created=True, rules=rules,
                         reason=reason, phone=text.phone, our_number=text.our_number, created_at=text.at)

    @staticmethod
    def _move(batch, to, at, reason):
        if to not in TRANSITIONS[batch.state]:
            raise InvalidTransition(f"batch {batch.id} cannot move from {batch.state.value} to {to.value}")
        batch.moves.append((at, batch.state, to, reason))
        batch.state = to

    def _quiet(self, text, facts):
        """The quiet period after this text: fixed, or fitted to the gaps between the
        person's latest texts up to it (batching.quiet_for), this plan's earlier ones included."""
        rules = text.rules
        if not rules.adaptive:
            return rules.quiet_seconds
        earlier = [t for t in self._times.get(text.phone, ()) if t <= text.at]
        window = sorted([*facts.recent, *earlier])[-(rules.adaptive_window - 1):] if rules.adaptive_window > 1 else []
        return batching.quiet_for(batching.gaps_between(window + [text.at]), rules)

    @staticmethod
    def closes_at(batch):
        """When a batch this plan wrote closes (batching.due_at)."""
        return batching.due_at(batch.rules, batch.first_at, batch.last_at, batch.count, batch.urgent, batch.quiet)


def _is_yes(body):
    return body.strip().strip(".!").upper() == "YES"


class Memory:
    """What this process last wrote of each conversation, to guess a group's facts without
    reading them first (the webhook on PostgreSQL: Store.add_texts_guessed, one round trip).

    A guess is only a guess: the store's statements check on the server that every fact the
    plan rests on is what it was guessed to be (an open batch by a compare-and-set on what
    the plan read of it, no open batch by the one-open-batch index where the plan opens one
    and by a look-up where it does not, a MessageSid not yet stored by its unique key, not
    pruned, the person's latest times equal to those guessed),
    and a wrong guess rolls the whole group back, to be stored the ordinary way. Unknown
    conversations are guessed new (no open batch, no earlier texts). An open batch past its
    closing time is no guess (a processor may have claimed it), nor a conversation or person
    whose guess was wrong within FORGET_SECONDS (another host writes it too, or a text came
    out of order). Keywords and the backfill's late or answered texts are never guessed.
    Bounded: the SIZE conversations and people most recently written. Thread-safe (the
    webhook's two committers share one); a person with two of our numbers written by both
    at once may be guessed wrong, which only costs the ordinary way."""

    SIZE = 10_000
    FORGET_SECONDS = 30.0

    def __init__(self, size=SIZE):
        self.size = size
        self._open = collections.OrderedDict()  # conversation: (OpenBatch fields, closes_at) or None
        self._recent = collections.OrderedDict()  # phone: (window, latest times, newest first)
        self._wrong = {}  # conversation or phone: monotonic time its guess was last wrong
        self._lock = threading.Lock()

    def guess(self, texts, now):
        """(facts of each text, {conversation: OpenBatch}) to plan `texts` with, or None
        when one of them cannot be guessed. `now`: monotonic time (FORGET_SECONDS)."""
        with self._lock:
            return self._guess(texts, now)

    def _guess(self, texts, now):
        opens, facts = {}, []
        for text in texts:
            if text.stated_kind or text.expired or text.answered or self._was_wrong(text, now):
                return None
            conversation = text.conversation
            if conversation not in opens:
                known = self._open.get(conversation)
                if known is not None:
                    fields, closes_at = known
                    if text.at >= closes_at:
                        return None
                    known = OpenBatch(*fields)
                opens[conversation] = known
            recent = self._recent_for(text)
            if recent is None:
                return None
            facts.append(Facts(None, False, recent))
        return facts, {c: b for c, b in opens.items() if b is not None}

    def _was_wrong(self, text, now):
        return any(now - self._wrong.get(key, -self.FORGET_SECONDS) < self.FORGET_SECONDS
                   for key in (text.conversation, text.phone))

    def _recent_for(self, text):
        """The person's latest times the plan needs (adaptive rules), or None if unknown for sure."""
        rules = text.rules
        if not rules.adaptive:
            return ()
        window, times = self._recent.get(text.phone, (Memory.window(rules), ()))
        if window != Memory.window(rules) or (times and times[0] > text.at):
            return None  # learned for another window, or a text older than one stored: read them
        return times

    @staticmethod
    def window(rules):
        """How many of a person's latest times a plan reads (the store's facts: the window minus one)."""
        return max(rules.adaptive_window - 1, 0)

    def learn(self, texts, facts, plan):
        """After `plan` was committed: what it left of the texts' conversations and people."""
        with self._lock:
            self._learn(texts, facts, plan)

    def _learn(self, texts, facts, plan):
        last = {}
        for text, fact in zip(texts, facts):
            if text.phone not in last or text.at >= last[text.phone][0].at:
                last[text.phone] = (text, fact)
        for text in texts:
            batch = plan.open.get(text.conversation)
            known = None
            if batch is not None:
                known = ((batch.id, batch.first_at, batch.last_at, batch.count, batch.urgent, State.OPEN,
                          batch.quiet), Plan.closes_at(batch) if batch.rules else batch.last_at)
            self._put(self._open, text.conversation, known)
        stored = collections.defaultdict(list)  # phone: times of its texts stored (not a repeated MessageSid)
        for t, _, _ in plan.stored:
            stored[t.phone].append(t.at)
        for phone, (text, fact) in last.items():
            if text.rules.adaptive:
                window = Memory.window(text.rules)
                times = sorted([*fact.recent, *stored[phone]], reverse=True)  # each time as often as stored
                self._put(self._recent, phone, (window, tuple(times[:window])))

    def forget(self, texts, now):
        """The guess for these texts was wrong (or their group failed): no guess for a while."""
        with self._lock:
            self._forget(texts, now)

    def _forget(self, texts, now):
        for text in texts:
            self._open.pop(text.conversation, None)
            self._recent.pop(text.phone, None)
            self._wrong[text.conversation] = self._wrong[text.phone] = now
        if len(self._wrong) > self.size:
            self._wrong = {k: at for k, at in self._wrong.items() if now - at < self.FORGET_SECONDS}

    def _put(self, table, key, value):
        table[key] = value
        table.move_to_end(key)
        while len(table) > self.size:
            table.popitem(last=False)
