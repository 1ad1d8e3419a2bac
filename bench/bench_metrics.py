"""A /metrics scrape is cheap: a few aggregate queries on a database of 50,000 texts.

`serve` answers /metrics on the same server as the texts, so a scrape (every 15 s or so)
must cost a few milliseconds. The history is built directly with executemany: 50,000
texts in 25,000 batches (most sent, each with a stored prompt of about 2 KB, as real ones
have, and its reply in outbound with segments and a price), over 3 business numbers, plus
a few hundred pending batches. Each scrape is the WSGI app's GET /metrics, whole
(database collector, process collector, the exposition text), timed in-process.

Figures:
- one scrape of the 50,000-text database: <= 25 ms (median of 50)

    python bench/run.py metrics [--runs 3]
    python bench/bench_metrics.py          # prints the scrape time
"""

import io
import os
import statistics
import time

from common import T0, Figure, fresh_db, log, tempdir

TEXTS = 50_000
PENDING = 300
NUMBERS = ("+15550000000", "+15550000001", "+15550000002")
SCRAPES = 50
PROMPT = '[{"role": "system", "content": "' + "x" * 2000 + '"}]'


def build(path):
    """TEXTS texts, two per batch, spread over NUMBERS; the last PENDING batches still open."""
    from smsbatch.db import Store

    store = Store(path)
    batches, messages, outbound = [], [], []
    for i in range(TEXTS // 2):
        batch_id, phone, ours, when = f"b{i:09d}", f"+1555{i:07d}", NUMBERS[i % 3], T0 - 86400 + i
        pending = i >= TEXTS // 2 - PENDING
        batches.append((batch_id, phone, ours, "open" if pending else "sent", 2, when, when, None if pending
                        else when, None if pending else PROMPT, 1, 30, 12, when + 10))
        messages += [(f"SMin{i:029d}{j}", phone, ours, f"text {j}", when, batch_id) for j in range(2)]
        if not pending:
            outbound.append((f"SM{i:032d}", batch_id, phone, ours, "hi!", "ai", when, "delivered", 1, "GSM-7",
                             -0.0079, "USD"))
    with store.transaction() as conn:
        conn.executemany("INSERT INTO batches (id, phone, our_number, state, message_count, first_at, last_at,"
                         " completed_at, prompt, ai_requests, prompt_tokens, completion_tokens, closes_at, created_at)"
                         " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", [b + (b[5],) for b in batches])
        conn.executemany("INSERT INTO messages (sid, phone, our_number, body, received_at, batch_id)"
                         " VALUES (?, ?, ?, ?, ?, ?)", messages)
        conn.executemany("INSERT INTO outbound (sid, batch_id, phone, our_number, body, source, sent_at, status,"
                         " segments, encoding, price, price_unit) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                         outbound)
    store.conn.execute("ANALYZE")
    store.close()


def scrape(app):
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/metrics", "wsgi.input": io.BytesIO(b""),
               "SERVER_NAME": "x", "SERVER_PORT": "80", "wsgi.url_scheme": "http"}
    seen = {}
    body = b"".join(app(environ, lambda status, headers: seen.update(status=status)))
    assert seen["status"].startswith("200") and b'smsbatch_texts_stored{our_number="+15550000001"}' in body
    return body


def timed_scrapes(path):
    """Milliseconds of each of SCRAPES scrapes (after one to open the connection)."""
    from smsbatch.config import Settings
    from smsbatch.web import make_app

    app = make_app(Settings(db_path=path, numbers=NUMBERS), clock=lambda: T0, insecure=True)
    scrape(app)
    times = []
    for _ in range(SCRAPES):
        started = time.perf_counter()
        scrape(app)
        times.append((time.perf_counter() - started) * 1000)
    return times


def run(runs=3, **_):
    figure = Figure("metrics", f"GET /metrics, {TEXTS:,} texts", "ms", target=25.0, better="lower")
    with tempdir("metrics") as folder:
        path = fresh_db(folder)
        build(path)
        log(f"metrics: {os.path.getsize(path) // 1024} KiB database built")
        for _ in range(runs):
            figure.values.append(statistics.median(timed_scrapes(path)))
    return [figure]


if __name__ == "__main__":
    with tempdir("metrics") as folder:
        db = fresh_db(folder)
        build(db)
        times = timed_scrapes(db)
        print(f"GET /metrics on {TEXTS:,} texts ({os.path.getsize(db) // 1024} KiB): median "
              f"{statistics.median(times):.1f} ms, worst {max(times):.1f} ms over {SCRAPES} scrapes")
