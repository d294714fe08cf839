#!/usr/bin/env python3
"""How often a full comparison meets the bulk CPU goal, from the repetitions of several runs.

    benches/odds.py results.jsonl [results.jsonl ...] [--label stickylb] [--reference haproxy-splice]
                    [--bound 0.8] [--reps 3] [--draws 20000]

compare.sh decides the bulk goal (the balancer's CPU per GB at most `bound` times forced-splice
HAProxy's) on the medians of a few repetitions, and under four streams each repetition lands in
a cheap or a dear regime by where the scheduler puts the balancer (docs/benchmarks.md, "Which
core the balancer shares"). One run's verdict is then a draw. This pools the repetitions of the
runs given (results.jsonl files of compare.sh, one JSON line per run) per scenario and balancer,
and estimates by resampling (seeded, so the same files give the same figures):

  P(meet)   the chance that a run of `reps` repetitions per balancer meets the goal: the median
            of `reps` draws from the label's pool at most `bound` times the median of `reps`
            draws from the reference's
  A/A       the 5th and 95th percentiles of the ratio of two such medians drawn from the same
            balancer's pool: how far apart two runs of one unchanged build land

and the pooled medians and their ratio. Bulk scenarios only (those with `lb_cpu_per_gb`).
"""
import argparse
import json
import random
import statistics


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+")
    parser.add_argument("--label", default="stickylb")
    parser.add_argument("--reference", default="haproxy-splice")
    parser.add_argument("--bound", type=float, default=0.8)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--draws", type=int, default=20000)
    args = parser.parse_args()

    pool = {}
    order = []
    for path in args.results:
        with open(path) as f:
            for line in f:
                run = json.loads(line)
                if run.get("lb_cpu_per_gb") is None or run.get("label") not in (args.label, args.reference):
                    continue
                if run["scenario"] not in order:
                    order.append(run["scenario"])
                pool.setdefault((run["scenario"], run["label"]), []).append(run["lb_cpu_per_gb"])

    print(f"Pooled from {len(args.results)} file(s); medians of {args.reps} draws, {args.draws} draws per figure.")
    print()
    print(f"| scenario | {args.label} reps: min / median / max | {args.reference} reps: min / median / max "
          f"| pooled ratio | P(meet ≤ {args.bound}) | A/A 5–95 % |")
    print("|---|---|---|---|---|---|")
    rng = random.Random(1)
    med = statistics.median
    for scenario in order:
        a = pool.get((scenario, args.label))
        b = pool.get((scenario, args.reference))
        if not a or not b:
            continue
        meet = 0
        same = []
        for _ in range(args.draws):
            ma = med(rng.choices(a, k=args.reps))
            mb = med(rng.choices(b, k=args.reps))
            meet += ma <= args.bound * mb
            same.append(med(rng.choices(a, k=args.reps)) / med(rng.choices(a, k=args.reps)))
        same.sort()
        lo, hi = same[len(same) // 20], same[-(len(same) // 20) - 1]
        print(f"| {scenario} | {len(a)}: {min(a):.3f} / {med(a):.3f} / {max(a):.3f} "
              f"| {len(b)}: {min(b):.3f} / {med(b):.3f} / {max(b):.3f} "
              f"| ×{med(a) / med(b):.2f} | {meet / args.draws:.2f} | ×{lo:.2f}–×{hi:.2f} |")


if __name__ == "__main__":
    main()
