"""Traces: JSONL files of inbound texts, one object a line (`from`, `to`, `body`, `sid`, `at`).

The format is the one `smsbatch ingest --jsonl` reads (see inputs.parse_record). This
module reads traces for `simulate`, writes them from the store for `export` (optionally
anonymized) and generates synthetic ones for people who have no traffic yet.

Anonymizing (`export --anonymize`):
  - phone numbers become pseudonyms `+1555` + 7 digits from a keyed hash (HMAC-SHA256).
    The same number always gets the same pseudonym within one export, and across exports
    made with the same key; two numbers never share one (a collision is hashed again).
    Without a key, a random one is drawn, so nobody can test guesses against the output.
  - message sids become keyed hashes too (still unique, so a repeat is still a repeat).
  - bodies become same-length placeholders (`x`), with two exceptions that would change
    what a replay does: carrier keywords (STOP, START, ...) stay as they are, since they
    hold nothing personal and decide opt-outs and batching; and an urgent text keeps its
    urgent keyword in front (`urgent xxxx`) so it still closes its batch at once.
  - times are kept exactly: they are what a simulation needs.

The generator's burst model (`simulate --generate`), per phone, independently:
  - the first burst starts at a uniform moment within the first `pause_mean` seconds;
  - a burst holds K texts, K geometric with mean `burst_mean` (P(K=k) = p(1-p)^(k-1), p = 1/mean);
  - gaps between texts of a burst are 1 s plus an exponential, so they average `gap_mean`;
    with `pace_spread` S > 1 each person has their own pace: their mean gap is `gap_mean`
    times S to a power drawn uniformly from [-1, 1] (log-uniform between gap_mean/S and
    gap_mean*S, at least 1 s), drawn from a second random stream so that without it the
    trace is what it always was;
  - the pause from a burst's last text to the next burst's first is exponential, mean `pause_mean`;
  - texts stop at `minutes`. Same arguments and seed, same trace.
"""

import hashlib
import hmac
import json
import random
import secrets

from smsbatch import batching
from smsbatch.errors import CONTROL, InvalidInput
from smsbatch.inputs import parse_record

OUR_NUMBER = "+15550000000"
MIN_GAP = 1.0  # nobody types a new text faster than this
WORDS = ("hi", "hello", "quick", "question", "about", "my", "order", "claim", "is", "it", "ready",
         "when", "can", "you", "call", "me", "thanks", "please", "the", "address", "and", "what",
         "time", "do", "open", "tomorrow", "ok", "sorry", "one", "more", "thing", "photo", "sent")


def read_trace(lines, name="trace"):
    """Parse a JSONL trace into records (see inputs.parse_record), in time order.

    `lines` are str, or bytes (decoded here, so one line that is not UTF-8 is named).
    Blank lines are skipped; a repeated sid is kept once (the first), as ingest would.
    Returns (records, number of repeats).

    Raises:
        InvalidInput: '<name> line N: reason' for the first bad line, or no texts at all.
    """
    records, seen, repeats = [], set(), 0
    for number, line in enumerate(lines, 1):
        try:
            line = line.decode("utf-8") if isinstance(line, bytes) else line
        except UnicodeDecodeError:
            raise InvalidInput(f"{name} line {number}: not UTF-8") from None
        if not line.strip():
            continue
        try:
            record = parse_record(line)
        except InvalidInput as exc:
            raise InvalidInput(f"{name} line {number}: {exc}") from None
        if record["sid"] in seen:
            repeats += 1
            continue
        seen.add(record["sid"])
        records.append(record)
    if not records:
        raise InvalidInput(f"{name}: no texts in the trace")
    records.sort(key=lambda r: r["at"])  # stable: equal times keep file order
    return records, repeats


def trace_line(phone, our_number, body, sid, at):
    """One trace line (no newline), in the key order ingest's users expect.

    Letters stay as written (café, emoji); the characters a terminal would obey or that
    reorder a line (DEL, C1 controls such as the one-byte CSI, bidi controls), which JSON
    would leave raw, are written as \\uXXXX escapes: the line reads back the same."""
    line = json.dumps({"from": phone, "to": our_number, "body": body, "sid": sid, "at": at},
                      ensure_ascii=False)
    return CONTROL.sub(lambda m: f"\\u{ord(m.group()):04x}", line)


def export_lines(rows, anonymizer=None):
    """Stored texts (rows of Store.messages_since) -> trace lines, anonymized if asked.

    Media URLs are not exported: the trace format has no field for them.
    """
    for row in rows:
        phone, our_number, body, sid = row["phone"], row["our_number"], row["body"], row["sid"]
        if anonymizer is not None:
            phone, our_number = anonymizer.phone(phone), anonymizer.phone(our_number)
            body, sid = anonymizer.body(body), anonymizer.sid(sid)
        yield trace_line(phone, our_number, body, sid, row["received_at"])


class Anonymizer:
    """Keyed, stable pseudonyms for numbers and sids; same-length placeholders for bodies."""

    def __init__(self, key=None, urgent_keywords=("urgent", "emergency")):
        self.key = key.encode() if isinstance(key, str) else (key or secrets.token_bytes(16))
        self.urgent_keywords = tuple(urgent_keywords)
        self._numbers, self._taken = {}, set()

    def _digest(self, text):
        return hmac.new(self.key, text.encode(), hashlib.sha256).hexdigest()

    def phone(self, number):
        """A pseudonym like +15553141592 (keeping a `whatsapp:` prefix), unique per number."""
        if number in self._numbers:
            return self._numbers[number]
        prefix, bare = ("whatsapp:", number[9:]) if number.startswith("whatsapp:") else ("", number)
        for attempt in range(1000):
            fake = f"{prefix}+1555{int(self._digest(f'{bare}#{attempt}'), 16) % 10**7:07d}"
            if fake not in self._taken:
                break
        else:  # pragma: no cover - 1000 collisions in a row cannot happen below ten million numbers
            raise InvalidInput("too many phone numbers to anonymize")
        self._taken.add(fake)
        self._numbers[number] = fake
        return fake

    def sid(self, sid):
        """A keyed hash of the sid, shaped like a Twilio MessageSid."""
        return "SM" + self._digest("sid:" + sid)[:32]

    def body(self, text):
        """Same length as `text`; carrier keywords kept, urgent keywords kept in front."""
        if batching.keyword_kind(text):
            return text
        if batching.is_urgent(text, self.urgent_keywords):
            word = next(k for k in self.urgent_keywords if batching.is_urgent(text, (k,)))
            return (word + " " + "x" * len(text))[: len(text)]
        return "x" * len(text)


def generate(phones, minutes, seed, burst_mean=2.5, gap_mean=4.0, pause_mean=600.0, start=0.0, pace_spread=1.0):
    """Synthetic trace lines from the burst model in this module's docstring, in time order.

    Raises:
        InvalidInput: burst_mean below 1, gap_mean below 1 s or pace_spread below 1.
    """
    for line, _ in generate_labelled(phones, minutes, seed, burst_mean, gap_mean, pause_mean, start, pace_spread):
        yield line


def generate_labelled(phones, minutes, seed, burst_mean=2.5, gap_mean=4.0, pause_mean=600.0, start=0.0,
                      pace_spread=1.0):
    """generate's lines, each with the burst the model made it in, (phone, n): the true
    bursts, for measuring a design against what people meant (bench/bench_adaptive_quality.py).

    Raises:
        InvalidInput: as generate.
    """
    if burst_mean < 1 or gap_mean < MIN_GAP or pause_mean <= 0 or not pace_spread >= 1:
        raise InvalidInput("need --burst-mean >= 1, --gap-mean >= 1, --pause-mean > 0 and --pace-spread >= 1")
    rng, paces = random.Random(seed), random.Random(f"pace:{seed}")
    end = minutes * 60.0
    texts = []
    for index in range(phones):
        phone = f"+1555{2000000 + index:07d}"
        mean = gap_mean if pace_spread == 1 else max(MIN_GAP, gap_mean * pace_spread ** paces.uniform(-1, 1))
        texts += [(at, index, phone, n) for at, n in _phone_times(rng, end, burst_mean, mean, pause_mean)]
    texts.sort()
    for number, (at, _, phone, burst) in enumerate(texts):
        body = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 8)))
        yield trace_line(phone, OUR_NUMBER, body, f"SMgen{seed}x{number:09d}", round(start + at, 3)), (phone, burst)


def _phone_times(rng, end, burst_mean, gap_mean, pause_mean):
    """One phone's texts under the burst model: (seconds from the start, burst number)."""
    times, at, burst = [], rng.uniform(0, pause_mean), 0
    while at < end:
        times.append((at, burst))
        while rng.random() > 1 / burst_mean:  # geometric burst size
            at += MIN_GAP + (rng.expovariate(1 / (gap_mean - MIN_GAP)) if gap_mean > MIN_GAP else 0.0)
            if at >= end:
                return times
            times.append((at, burst))
        at += rng.expovariate(1 / pause_mean)
        burst += 1
    return times
