"""`smsbatch simulate` on a 100,000-text trace: target under a minute (2 cores).

    python bench/bench_simulate.py                 # 100,000 texts, 1 run
    python bench/bench_simulate.py --texts 20000 --runs 3

The trace comes from the built-in burst model (`simulate --generate`, seed 7, 5 hours
of traffic), cut to exactly `--texts` lines. Figures, wall clock:
  - the whole command, `smsbatch simulate TRACE --json`, in a subprocess (start-up,
    parsing, replay, metrics): the target;
  - the library replay alone (simulate.replay) at tick 1 s, tick 60 s, and tick 1 s
    with a 2 s AI answer and --concurrency 16 (texts arriving mid-answer supersede);
  - the seed design's model, for scale.
Progress goes to stderr, the table to stdout. Exit status 1 if the target was missed.
Also a part of bench/run.py's table if registered there as "simulate".
"""

import argparse
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import T0, Figure, clean_env, log, print_table, smsbatch_cmd, tempdir  # noqa: E402

TEXTS = 100_000
TARGET_SECONDS = 60.0
MINUTES = 300


def make_trace(texts, seed=7):
    """Exactly `texts` generated lines: the earliest of a trace long enough."""
    from smsbatch.tracegen import generate

    phones = texts // 70 + 1  # about 70 texts per phone in 5 hours with the default model
    while True:
        lines = list(generate(phones, MINUTES, seed, start=T0))
        if len(lines) >= texts:
            return lines[:texts]
        phones = phones * 3 // 2 + 1


def seconds_of(function, *args, **kwargs):
    """(wall seconds, result) of one call."""
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return time.perf_counter() - start, result


def run(runs=1, texts=TEXTS, **_):
    """The figures: whole command (with its target), replays and the seed model (informational)."""
    from smsbatch.simulate import Setup, replay, replay_seed
    from smsbatch.tracegen import read_trace

    part = "simulate"
    command = Figure(part, f"smsbatch simulate, {texts:,} texts", "s", target=TARGET_SECONDS, better="lower")
    replays = {label: Figure(part, f"replay, {label}", "s", better="lower") for label in
               ("tick 1 s", "tick 60 s", "tick 1 s, AI 2 s, concurrency 16")}
    seed = Figure(part, "seed design model", "s", better="lower")
    setups = dict(zip(replays, (Setup(), Setup(tick=60), Setup(ai_latency=2, concurrency=16))))
    log(f"simulate: generating {texts:,} texts")
    lines = make_trace(texts)
    records, _ = read_trace(lines)
    with tempdir("simulate") as folder:
        path = os.path.join(folder, "trace.jsonl")
        with open(path, "w") as out:
            out.write("\n".join(lines) + "\n")
        for n in range(runs):
            log(f"simulate: run {n + 1}/{runs}")
            whole = [*smsbatch_cmd(), "simulate", path, "--json"]
            command.values.append(seconds_of(subprocess.run, whole, env=clean_env(), capture_output=True,
                                             check=True)[0])
            for label, setup in setups.items():
                replays[label].values.append(seconds_of(replay, records, setup)[0])
            seed.values.append(seconds_of(replay_seed, records)[0])
    command.note = (f"{texts:,} texts from {len({r['phone'] for r in records}):,} phones over "
                    f"{(records[-1]['at'] - records[0]['at']) / 60:.0f} minutes; {os.cpu_count()} CPUs")
    return [command, *replays.values(), seed]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", type=int, default=TEXTS, help=f"trace length (default {TEXTS})")
    parser.add_argument("--runs", type=int, default=1, help="repetitions (default 1)")
    args = parser.parse_args(argv)
    figures = run(runs=max(1, args.runs), texts=args.texts)
    print_table(figures)
    return 0 if figures[0].ok else 1


if __name__ == "__main__":
    sys.exit(main())
