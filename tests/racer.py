"""One side of a race, as an OS process: `python racer.py ACTION DB JSON-ARGS`.

It opens the database, prints "ready", waits for a line on stdin (the start signal every
racer gets at once), does ACTION through the real Store and prints its result as JSON.
tests/test_pg_races.py runs several at once against one database.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from smsbatch.batching import Rules  # noqa: E402
from smsbatch.config import Settings  # noqa: E402
from smsbatch.db import Store  # noqa: E402


def claim(store, args):
    """Claim until two rounds in a row find nothing; finish nothing (every claim stays in flight)."""
    claimed, empty = [], 0
    while empty < 2:
        rows, _ = store.claim_due(args["now"], args["limit"], 60, 10 ** 9, holder=f"racer:{os.getpid()}")
        claimed += [[r["id"], r["phone"]] for r in rows]
        empty = 0 if rows else empty + 1
    return claimed


def late_moves(store, args):
    """A processor whose lease ran out records its sends: True where the move was applied."""
    return {b["id"]: bool(store.mark_sent(b, f"SMlate{b['id']}", args["now"])) for b in args["batches"]}


def takeover(store, args):
    rows, _ = store.claim_due(args["now"], 1000, 60, 10 ** 9, holder=f"racer:{os.getpid()}")
    return [r["id"] for r in rows]


def receipts(store, args):
    for sid in args["sids"]:
        for status in args["statuses"]:
            store.record_delivery(sid, status, None, args["now"])
    return True


def texts(store, args):
    """Store texts as the webhook does (one transaction each)."""
    rules = Rules.from_settings(Settings(db_path=store.path))
    return [store.add_message(sid, phone, args["to"], body, args["now"], rules).batch_id
            for sid, phone, body in args["texts"]]


def migrate(store, args):
    return list(store.migrate())


ACTIONS = {"claim": claim, "late_moves": late_moves, "takeover": takeover, "receipts": receipts,
           "texts": texts, "migrate": migrate}

if __name__ == "__main__":
    action, db, args = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    store = Store(db)
    print("ready", flush=True)
    sys.stdin.readline()
    json.dump(ACTIONS[action](store, args), sys.stdout)
    store.close()
