"""Crash recovery: how soon a killed processor's batch is answered by another running one.

Two `smsbatch process --for` subprocesses run side by side with the real openai and
twilio clients against tests/fakes.py's stand-ins (started in this process). Each round
one text arrives; its AI request hangs; the processor holding it (batches.holder says
which pid) is hit at a random moment 0-1 s into the call (so at a random point of its
1 s heartbeat), and a fresh processor is started in its place for the next round.
Rounds alternate:

- kill (SIGKILL): the other processor, on the same machine, sees the holder's pid is
  gone and takes the batch at its next poll (within about a second);
- freeze (SIGSTOP): the holder is alive but renews nothing, as a dead processor on
  another host would be: the batch is taken when its 4 s heartbeat lease ends.

Measured: to the reply reaching the Twilio stand-in (the other processor's AI answer
included: the stand-in answers at once); to the other processor's claim; and, for
freezes, from the lease's end (batches.lease_expires_at, which nobody renews any more) to the
claim, i.e. how long an expired lease lies unnoticed.

Targets: kill -> reply within 5 s (the issue's bound, with an instant AI). Anchors from job
queues: pgqueuer 30 s, Procrastinate 30 s + a sweep, rq about 90 s, River and Oban 1 h.

    python bench/bench_takeover.py [--kills 6]       # on its own, with the anchors
    python bench/run.py takeover [--runs 8]
"""

import argparse
import os
import random
import signal
import subprocess
import sys
import time

from common import OUR_NUMBER, Figure, clean_env, fakes, fmt, fresh_db, log, print_table, smsbatch_cmd, tempdir

KILLS = 6
TARGET = 5.0
ANCHORS = "pgqueuer 30 s, Procrastinate 30 s + sweep, rq ~90 s, River/Oban 1 h"
ROUND_TIMEOUT = 30.0


def env_for(db, openai, twilio):
    return clean_env(
        SMSBATCH_DB=db, OPENAI_API_KEY="sk-bench", OPENAI_BASE_URL=openai.url + "/v1",
        TWILIO_ACCOUNT_SID=twilio.ACCOUNT, TWILIO_AUTH_TOKEN=twilio.TOKEN, TWILIO_FROM_NUMBER=OUR_NUMBER,
        SMSBATCH_TWILIO_BASE_URL=twilio.url, SMSBATCH_AI_CLIENT_RETRIES=0, SMSBATCH_AI_TIMEOUT_SECONDS=20,
    )


def start(env):
    return subprocess.Popen(smsbatch_cmd() + ["process", "--for", "600", "--concurrency", "1"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait(predicate, timeout=ROUND_TIMEOUT, step=0.002):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise RuntimeError("timed out waiting")


def one_round(store, openai, twilio, procs, env, n, freeze):
    """One round: a text, its holder killed (or frozen) mid-AI-call.
    Returns (to reply, to takeover, lease end to takeover) in seconds."""
    from smsbatch.batching import Rules

    phone = f"+1555880{n:04d}"
    openai.script = ["hang"]  # the first AI request for this text never answers
    added = store.add_message(f"SMbenchkill{n:06d}", phone, OUR_NUMBER, "are you open?", time.time() - 60, Rules())
    row = wait(lambda: _held(store, added.batch_id))
    wait(lambda: len(openai.requests) > 0 and openai.script == [])
    time.sleep(random.uniform(0, 1.0))
    pid = int(store.get_batch(added.batch_id)["holder"].rsplit(":", 1)[1])
    victim = next(p for p in procs if p.pid == pid)
    os.kill(pid, signal.SIGSTOP if freeze else signal.SIGKILL)
    hit, hit_wall = time.monotonic(), time.time()
    if not freeze:
        victim.wait()
    lease_end = store.get_batch(added.batch_id)["lease_expires_at"]  # nobody renews it any more
    wait(lambda: twilio.bodies_to(phone))
    replied = time.monotonic()
    claimed_at = store.get_batch(added.batch_id)["started_at"]
    if freeze:
        victim.kill()
        victim.wait()
    procs[procs.index(victim)] = start(env)
    assert row["claim"] != store.get_batch(added.batch_id)["claim"] and len(twilio.bodies_to(phone)) == 1
    return replied - hit, claimed_at - hit_wall, max(0.0, claimed_at - lease_end)


def _held(store, batch_id):
    row = store.get_batch(batch_id)
    return row if row["state"] == "processing" and row["holder"] else None


def run(runs=KILLS, **_):
    """Figures over `runs` kills and `runs` freezes (seconds, one value per round)."""
    from smsbatch.db import Store

    f = fakes()
    figures = {
        "kill": (Figure("takeover", "kill -> reply", "s", target=TARGET, better="lower", note=f"anchors: {ANCHORS}"),
                 Figure("takeover", "kill -> takeover (claim)", "s")),
        "freeze": (Figure("takeover", "freeze -> reply", "s", target=TARGET, better="lower",
                          note="SIGSTOP: alive, not renewing; as a dead processor on another host"),
                   Figure("takeover", "freeze -> takeover (claim)", "s")),
    }
    stale = Figure("takeover", "stale lease -> takeover", "s", note="lease end (lease_expires_at) to the claim")
    with tempdir("takeover") as folder, f.FakeOpenAI() as openai, f.FakeTwilio() as twilio:
        db = fresh_db(folder, "takeover.db")
        env = env_for(db, openai, twilio)
        procs = [start(env), start(env)]
        store = Store(db)
        try:
            time.sleep(2.0)  # both processors up
            for n in range(2 * runs):
                how = "freeze" if n % 2 else "kill"
                reply, takeover, after_lease = one_round(store, openai, twilio, procs, env, n, how == "freeze")
                figures[how][0].values.append(reply)
                figures[how][1].values.append(takeover)
                if how == "freeze":
                    stale.values.append(after_lease)
                log(f"{how} {n // 2 + 1}/{runs}: reply {reply:.2f} s, takeover {takeover:.2f} s")
                time.sleep(1.5)  # the replacement processor starts
        finally:
            for proc in procs:
                proc.kill()
                proc.wait()
            store.close()
    return [*figures["kill"], *figures["freeze"], stale]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=KILLS, help=f"kills, and as many freezes (default {KILLS})")
    args = parser.parse_args(argv)
    figures = run(max(1, args.kills))
    print()
    print_table(figures)
    for figure in figures:
        print(f"  {figure.name}: median {fmt(figure.median)} s, worst {fmt(max(figure.values))} s")
    print(f"  anchors (dead worker's job picked up again): {ANCHORS}")
    return 0 if figures[0].ok and figures[2].ok else 1


if __name__ == "__main__":
    sys.exit(main())
