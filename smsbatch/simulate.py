"""`smsbatch simulate`: replay a trace on a virtual clock and measure what batching does.

smsbatch is replayed through the code production runs: each text goes in with
Store.add_message when virtual time reaches it, and each processing run claims with
Processor.claim and answers with Processor.handle, in a throwaway SQLite database,
with the offline responder and a quiet console sender. Nothing here decides when a
batch is due; the store does.

How time moves:
  - Processing runs happen on a grid of `tick` seconds (1: `process --for`, 60: plain
    cron), aligned to the epoch like cron. Runs where nothing can be due are skipped:
    the clock jumps to the next text or to the grid point at or after Store.next_due().
  - A run claims up to `concurrency` due batches and answers them together (a wave);
    each answer takes `ai_latency` virtual seconds, and texts that arrive meanwhile
    are stored before the reply is committed, so Store.begin_send sees them
    (superseding). When the wave is done the run claims again at the new time, until
    nothing is due. A batch that waits for a free slot, or falls due during a wave, is
    claimed when the wave ends. (`process` polls about every second while answers are
    in flight, so with a long `ai_latency` the simulation is pessimistic by up to one
    answer for such a batch; a finer model would need a claim in the middle of another
    batch's answer, which a replay in one thread cannot do.)
  - Replies are sent the moment the AI answers (sending takes no virtual time).

The seed design (`--compare`) is NOT smsbatch; it is modelled separately in
`replay_seed` from its write-up: fixed 15-second slots per phone (phone:floor(t/15)),
a cron run every 60 s (plus `offset`), slots whose first text is at least 10 s old
answered oldest first, at most 5 per run, one after another, and a text landing in a
slot already answered never answered. Carrier keywords (STOP, START, ...) are left
out of its slots, as smsbatch leaves them out of the AI.

Metrics (the same for both models). Carrier keyword texts count in `texts` only.
  - burst: a phone's texts separated by gaps shorter than `burst_gap` (default 10 s,
    smsbatch's default quiet period). It is fixed across a sweep and a comparison so
    every row measures the same bursts.
  - reply while typing: a reply sent at S when the same phone sent a text newer than
    every text the reply covers, within `burst_gap` before S (in (S - burst_gap, S]).
  - split texts: texts of bursts whose texts were answered by more than one reply.
  - latency: from the phone's last text at or before S to S.
  - never answered: texts (not keywords) no sent reply covers.
"""

import bisect
import math
import os
import tempfile
from collections import defaultdict, deque
from dataclasses import dataclass, field, replace

from smsbatch.ai import OfflineResponder
from smsbatch.batching import Rules, keyword_kind
from smsbatch.config import Settings
from smsbatch.db import Store
from smsbatch.errors import InvalidInput
from smsbatch.processor import Processor
from smsbatch.sms import ConsoleSender

SEED_SLOT, SEED_CRON, SEED_MIN_AGE, SEED_PER_RUN = 15.0, 60.0, 10.0, 5
HISTOGRAM_EDGES = (0, 5, 10, 15, 20, 30, 45, 60, 90, 120, 180)
# --sweep NAME: (attribute of Setup or of its Settings, type, smallest value allowed)
SWEEPABLE = {"quiet": ("quiet_seconds", float, 0), "max-wait": ("max_wait_seconds", float, 0),
             "max-messages": ("max_messages", int, 1), "tick": ("tick", float, 0.01),
             "ai-latency": ("ai_latency", float, 0), "concurrency": ("concurrency", int, 1)}
# Adaptive quiet periods (batching.quiet_for): on/off and its bounds.
SWEEPABLE.update({"adaptive": ("adaptive", int, 0), "adaptive-min": ("adaptive_min_seconds", float, 0),
                  "adaptive-max": ("adaptive_max_seconds", float, 0)})

# The same upper bounds as the `simulate` options of those names.
SWEEP_MOST = {"tick": 3600, "ai-latency": 300, "concurrency": 64}


def parse_sweep(text):
    """'quiet=4,6,8' -> ('quiet', [4.0, 6.0, 8.0]).

    Raises:
        InvalidInput: unknown name, or a value that is not a number in range.
    """
    name, _, values = str(text).partition("=")
    name = name.strip()
    if name not in SWEEPABLE or not values.strip():
        raise InvalidInput(f"bad sweep {text!r}: use NAME=V1,V2,... with NAME one of {', '.join(SWEEPABLE)}")
    _, kind, least = SWEEPABLE[name]
    parsed = []
    for raw in values.split(","):
        try:
            value = kind(raw.strip())
        except ValueError:
            noun = "a whole number" if kind is int else "a number"
            raise InvalidInput(f"bad {name} value {raw.strip()!r}: expected {noun}") from None
        if not math.isfinite(value):
            raise InvalidInput(f"bad {name} value {raw.strip()!r}: expected a finite number")
        if value < least:
            raise InvalidInput(f"bad {name} value {raw.strip()}: must be at least {least}")
        if value > SWEEP_MOST.get(name, math.inf):
            raise InvalidInput(f"bad {name} value {raw.strip()}: must be at most {SWEEP_MOST[name]}")
        parsed.append(value)
    return name, parsed


@dataclass(frozen=True)
class Setup:
    """One simulated deployment: smsbatch's settings plus how processing is run."""

    settings: Settings = field(default_factory=Settings)
    tick: float = 1.0
    ai_latency: float = 0.0
    concurrency: int = 4

    def vary(self, name, value):
        """A copy with one sweepable setting (see SWEEPABLE) changed."""
        attr, kind, _ = SWEEPABLE[name]
        value = bool(value) if attr == "adaptive" else kind(value)
        if hasattr(self, attr):
            return replace(self, **{attr: value})
        return replace(self, settings=self.settings.replace(**{attr: value}))

    def describe(self):
        """The settings a report shows, by their CLI names."""
        s = self.settings
        return {"quiet": s.quiet_seconds, "max_wait": s.max_wait_seconds, "max_messages": s.max_messages,
                "tick": self.tick, "ai_latency": self.ai_latency, "concurrency": self.concurrency,
                "adaptive": s.adaptive, "adaptive_min": s.adaptive_min_seconds, "adaptive_max": s.adaptive_max_seconds}


@dataclass
class Outcome:
    """What a model did with a trace, in neutral terms the metrics read."""

    texts: list  # (sid, phone, at, is_keyword), time order
    replies: list  # (phone, sent_at, sids covered)
    batches: int
    ai_calls: int
    superseded: object = None  # None for the seed model, which has no such thing
    groups: list = field(default_factory=list)  # sids of each batch holding texts (smsbatch only)


class VirtualClock:
    """A clock the simulation moves by hand."""

    def __init__(self, now=0.0):
        self.now = now

    def __call__(self):
        return self.now


class Arrivals:
    """The trace's texts, stored as the webhook would once virtual time reaches them."""

    def __init__(self, store, records, rules):
        self.store, self.records, self.rules = store, records, rules
        self.next = 0
        self.batch_of = {}  # sid -> the batch add_message put it in
        self.keywords = set()

    def next_at(self):
        """When the next text not stored yet arrives (infinity when none is left)."""
        return self.records[self.next]["at"] if self.next < len(self.records) else math.inf

    def until(self, now):
        """Store every text with `at` <= now not stored yet."""
        while self.next < len(self.records) and self.records[self.next]["at"] <= now:
            r = self.records[self.next]
            added = self.store.add_message(r["sid"], r["phone"], r["our_number"], r["body"], r["at"], self.rules)
            self.batch_of[r["sid"]] = added.batch_id
            if added.kind != "text":
                self.keywords.add(r["sid"])
            self.next += 1


class SlowResponder:
    """Wraps a responder so each answer takes `latency` virtual seconds, during which
    the texts that arrive are stored before the reply is committed."""

    def __init__(self, inner, clock, arrivals, latency):
        self.inner, self.clock, self.arrivals, self.latency = inner, clock, arrivals, latency

    @property
    def calls(self):
        return self.inner.calls

    def answer(self, messages):
        """The inner responder's answer, `latency` virtual seconds later."""
        self.clock.now += self.latency
        self.arrivals.until(self.clock.now)
        return self.inner.answer(messages)


def grid_ceil(moment, tick):
    """The first point of the `tick` grid at or after `moment`."""
    point = math.ceil(moment / tick) * tick
    return point + tick if point < moment else point  # float rounding must never go back in time


class Replay:
    """One smsbatch simulation over one trace, in its own throwaway database."""

    def __init__(self, folder, records, setup):
        settings = setup.settings.replace(db_path=os.path.join(folder, "simulate.db"),
                                          test_number="", enabled=True, alert_webhook_url="")  # no real alerts
        self.setup, self.clock = setup, VirtualClock()
        setup_store = Store(settings.db_path)
        setup_store.migrate()
        setup_store.close()
        self.processor = Processor(settings.db_path, settings, None, ConsoleSender(quiet=True), clock=self.clock)
        # One connection for texts and processing alike: SQLite drops a connection's page
        # cache whenever another one writes, which would double the cost of every step.
        self.store = self.processor.store()
        self.store.make_throwaway()
        self.arrivals = Arrivals(self.store, records, Rules.from_settings(settings))
        self.processor.responder = SlowResponder(OfflineResponder(), self.clock, self.arrivals, setup.ai_latency)
        self.sent, self.folded = {}, {}  # batch id -> sent_at / -> the batch it was folded into

    def run(self):
        """Replay every text and every processing run until nothing is pending."""
        while True:
            due = self.store.next_due()
            start = math.inf if due is None else grid_ceil(due, self.setup.tick)
            arrival = self.arrivals.next_at()
            if arrival == start == math.inf:
                return
            if arrival <= start:
                self.arrivals.until(arrival)
            else:
                self.run_once(start)

    def run_once(self, now):
        """One processing run from `now`: waves of due batches until a claim finds none."""
        while True:
            self.clock.now = now
            self.arrivals.until(now)
            due = self.store.next_due()
            if due is None or due > now:  # a claim would find nothing: skip its write
                return
            rows, _ = self.processor.claim(self.setup.concurrency)
            for row in rows:
                self.clock.now = now
                self._handle(row)
            now += self.setup.ai_latency

    def _handle(self, row):
        outcome = self.processor.handle(row)
        if outcome == "sent":
            self.sent[row["id"]] = self.clock.now
        elif outcome == "superseded":
            self.folded[row["id"]] = self.store.get_batch(row["id"])["superseded_by"]

    def outcome(self):
        """The replay's Outcome: which batch finally held each text, and the replies."""
        groups = defaultdict(list)
        for record in self.arrivals.records:
            groups[self._final(self.arrivals.batch_of[record["sid"]])].append(record)
        replies = [(texts[0]["phone"], self.sent[batch], tuple(r["sid"] for r in texts))
                   for batch, texts in groups.items() if batch in self.sent]
        replies.sort(key=lambda r: r[1])
        texts = [(r["sid"], r["phone"], r["at"], r["sid"] in self.arrivals.keywords) for r in self.arrivals.records]
        return Outcome(texts, replies, len(set(self.arrivals.batch_of.values())), self.processor.responder.calls,
                       len(self.folded), [[r["sid"] for r in g] for g in groups.values()])

    def _final(self, batch):
        while batch in self.folded:
            batch = self.folded[batch]
        return batch

    def close(self):
        """Close the database connection (the folder is the caller's to remove)."""
        self.store.close()


def replay(records, setup):
    """Replay `records` (read_trace's) through smsbatch under `setup`; returns an Outcome."""
    with tempfile.TemporaryDirectory(prefix="smsbatch-simulate-") as folder:
        sim = Replay(folder, records, setup)
        try:
            sim.run()
            return sim.outcome()
        finally:
            sim.close()


def replay_seed(records, ai_latency=0.0, offset=0.0):
    """Replay `records` through a model of the seed design (see the module docstring)."""
    texts = [(r["sid"], r["phone"], r["at"], bool(keyword_kind(r["body"]))) for r in records]
    todo = deque(t for t in texts if not t[3])
    slots, pending, replies = {}, deque(), []
    run = -math.inf
    while todo or pending:
        oldest = slots[pending[0]]["first"] if pending else todo[0][2]
        # Runs are every minute; skip the ones that cannot find a slot old enough.
        run = max(run + SEED_CRON, grid_ceil(oldest + SEED_MIN_AGE - offset, SEED_CRON) + offset)
        now = run
        _seed_arrive(todo, slots, pending, now)
        for _ in range(SEED_PER_RUN):
            if not pending or slots[pending[0]]["first"] > run - SEED_MIN_AGE:
                break
            _seed_arrive(todo, slots, pending, now)
            key = pending.popleft()
            slots[key]["done"] = True
            now += ai_latency
            replies.append((key[0], now, tuple(slots[key]["sids"])))
    return Outcome(texts, replies, len(slots), len(replies))


def _seed_arrive(todo, slots, pending, now):
    """Texts up to `now` join their 15-second slot; one already answered drops them."""
    while todo and todo[0][2] <= now:
        sid, phone, at, _ = todo.popleft()
        key = (phone, math.floor(at / SEED_SLOT))
        if key not in slots:
            slots[key] = {"first": at, "sids": [], "done": False}
            pending.append(key)
        if not slots[key]["done"]:
            slots[key]["sids"].append(sid)


def measure(outcome, burst_gap=10.0):
    """The metrics of the module docstring, as a JSON-ready dict."""
    texts = [t for t in outcome.texts if not t[3]]
    at_of = {sid: at for sid, _, at, _ in texts}
    times = defaultdict(list)
    for _, phone, at, _ in texts:
        times[phone].append(at)
    reply_of = {sid: i for i, (_, _, sids) in enumerate(outcome.replies) for sid in sids}
    latencies, typing = [], 0
    for phone, sent_at, sids in outcome.replies:
        mine = times[phone]
        upto = bisect.bisect_right(mine, sent_at)
        latencies.append(sent_at - mine[upto - 1])
        since = max(max(at_of[s] for s in sids), sent_at - burst_gap)
        typing += upto > bisect.bisect_right(mine, since)
    n = len(outcome.texts)
    return {
        "texts": n, "batches": outcome.batches, "ai_calls": outcome.ai_calls,
        "ai_calls_per_text": round(outcome.ai_calls / n, 3) if n else 0.0,
        "replies": len(outcome.replies), "superseded": outcome.superseded,
        "replies_while_typing": typing,
        "split_texts": _split_texts(texts, reply_of, burst_gap),
        "never_answered": sum(1 for t in texts if t[0] not in reply_of),
        "latency": _latency(latencies),
    }


def bursts(texts, burst_gap):
    """Texts (sid, phone, at, _) in time order -> bursts: lists of one phone's sids,
    cut wherever that phone's texts are `burst_gap` seconds or more apart."""
    last_at, current, found = {}, {}, []
    for sid, phone, at, _ in texts:
        if phone not in last_at or at - last_at[phone] >= burst_gap:
            current[phone] = []
            found.append(current[phone])
        current[phone].append(sid)
        last_at[phone] = at
    return found


def _split_texts(texts, reply_of, burst_gap):
    """Texts of bursts answered by more than one reply."""
    return sum(len(b) for b in bursts(texts, burst_gap) if len({reply_of.get(s) for s in b} - {None}) > 1)


def _latency(values):
    """p50, p95, max (nearest rank) and a histogram over HISTOGRAM_EDGES, in seconds."""
    values = sorted(values)
    edges = HISTOGRAM_EDGES + (math.inf,)
    counts = [0] * len(HISTOGRAM_EDGES)
    for value in values:
        counts[bisect.bisect_right(edges, value) - 1] += 1
    histogram = [{"from": lo, "to": None if hi == math.inf else hi, "replies": c}
                 for lo, hi, c in zip(edges, edges[1:], counts)]
    return {"p50": _rank(values, 0.5), "p95": _rank(values, 0.95), "max": _rank(values, 1.0),
            "histogram": histogram}


def _rank(ordered, share):
    """The nearest-rank percentile of sorted values, to 0.1 s (None for no values)."""
    if not ordered:
        return None
    return round(ordered[max(math.ceil(share * len(ordered)) - 1, 0)], 1)


def summarize(records, repeats=0):
    """The trace at a glance: texts, phones, first and last time, span in minutes."""
    first, last = records[0]["at"], records[-1]["at"]
    return {"texts": len(records), "repeats": repeats, "phones": len({r["phone"] for r in records}),
            "first": first, "last": last, "minutes": round((last - first) / 60, 1)}


def simulate(records, setup, compare=False, sweep=None, burst_gap=10.0, seed_offset=0.0, repeats=0):
    """Every simulation asked for over one trace: one row, or one per `sweep` value
    (sweep = (name, values), name in SWEEPABLE), plus the seed design with `compare`.

    Returns a JSON-ready report: {"trace", "burst_gap", "sweep", "results": [...]}.
    """
    runs = [(f"{sweep[0]}={v:g}", setup.vary(sweep[0], v)) for v in sweep[1]] if sweep else [("smsbatch", setup)]
    results = [{"label": label, "model": "smsbatch", "settings": s.describe(),
                **measure(replay(records, s), burst_gap)} for label, s in runs]
    if compare:
        seed = replay_seed(records, setup.ai_latency, seed_offset)
        settings = {"slot": SEED_SLOT, "cron": SEED_CRON, "min_age": SEED_MIN_AGE, "per_run": SEED_PER_RUN,
                    "offset": seed_offset, "ai_latency": setup.ai_latency}
        results.append({"label": "seed design", "model": "seed", "settings": settings, **measure(seed, burst_gap)})
    return {"trace": summarize(records, repeats), "burst_gap": burst_gap,
            "sweep": sweep[0] if sweep else None, "results": results}
