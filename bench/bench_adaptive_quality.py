"""Adaptive vs fixed quiet periods on generated traffic where each person has their own pace,
counted against the bursts people really typed (the generator's, not a gap threshold).

For each seed: `tracegen.generate_labelled(PHONES, MINUTES, seed, pace_spread=3)` (mean
gaps log-uniform from 1.33 s to 12 s), replayed by `simulate.replay` (the production
store and processor on a virtual clock, tick 1 s, AI 0 s) under each design. A burst is
split when its texts were answered by more than one reply. Latency is simulate's (last
text to reply). The reference is the issue's clamp(2.5 x median of recent gaps, 4 s,
20 s): to replay it, batching.quiet_for is swapped for it during that replay only.

    python bench/bench_adaptive_quality.py [--phones 60] [--minutes 120] [--seeds 1,2,3,4,5] [--spread 3]
"""

import argparse
import json
import os
import statistics
import sys
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402,F401  (puts the project on sys.path)
from smsbatch import batching  # noqa: E402
from smsbatch.config import Settings  # noqa: E402
from smsbatch.simulate import Setup, measure, replay  # noqa: E402
from smsbatch.tracegen import generate_labelled, read_trace  # noqa: E402


def reference(gaps, rules):
    """The issue's reference model: clamp(2.5 x median of the recent typing gaps, min, max)."""
    typing = [g for g in gaps if g < rules.adaptive_pause_seconds]
    if len(typing) < rules.adaptive_min_gaps:
        return rules.quiet_seconds
    return min(max(2.5 * statistics.median(typing), rules.adaptive_min_seconds), rules.adaptive_max_seconds)


DESIGNS = {
    "fixed 10 s": (Settings(adaptive=False), None),
    "fixed 15 s": (Settings(adaptive=False, quiet_seconds=15.0), None),
    "reference 2.5 x median": (Settings(adaptive=True), reference),
    "adaptive (smsbatch)": (Settings(adaptive=True), None),
}


def split_bursts(outcome, burst_of):
    replies = defaultdict(set)
    for i, (_, _, sids) in enumerate(outcome.replies):
        for sid in sids:
            replies[burst_of[sid]].add(i)
    return sum(1 for r in replies.values() if len(r) > 1), len(set(burst_of.values()))


def one(records, burst_of, settings, rule):
    production = batching.quiet_for
    if rule is not None:
        batching.quiet_for = rule
    try:
        outcome = replay(records, Setup(settings=settings))
    finally:
        batching.quiet_for = production
    split, bursts = split_bursts(outcome, burst_of)
    m = measure(outcome)
    return {"split": split, "bursts": bursts, "replies": m["replies"], "ai_calls": m["ai_calls"],
            "p50": m["latency"]["p50"], "p95": m["latency"]["p95"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phones", type=int, default=60)
    parser.add_argument("--minutes", type=float, default=120.0)
    parser.add_argument("--seeds", default="1,2,3,4,5")
    parser.add_argument("--spread", type=float, default=3.0)
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = defaultdict(list)
    for seed in seeds:
        labelled = list(generate_labelled(args.phones, args.minutes, seed, pace_spread=args.spread))
        records = read_trace([line for line, _ in labelled])[0]
        burst_of = {json.loads(line)["sid"]: burst for line, burst in labelled}
        print(f"seed {seed}: {len(records)} texts, {args.phones} phones", file=sys.stderr)
        for name, (settings, rule) in DESIGNS.items():
            rows[name].append(one(records, burst_of, settings, rule))
    print(f"{args.phones} phones x {args.minutes:g} min, pace spread {args.spread:g}, seeds {args.seeds}")
    print(f"{'design':24s} {'split bursts per seed':28s} {'sum':>5s} {'p50 per seed':34s} {'p95 per seed':34s}")
    for name, results in rows.items():
        splits = [r["split"] for r in results]
        print(f"{name:24s} {str(splits):28s} {sum(splits):5d} {str([r['p50'] for r in results]):34s} "
              f"{str([r['p95'] for r in results]):34s}")
    print(f"(bursts per seed: {[r['bursts'] for r in rows['fixed 10 s']]}; "
          f"AI calls per seed, fixed 10 s vs adaptive: {[r['ai_calls'] for r in rows['fixed 10 s']]} vs "
          f"{[r['ai_calls'] for r in rows['adaptive (smsbatch)']]})")


if __name__ == "__main__":
    main()
