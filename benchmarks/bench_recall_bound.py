"""How often the neighbour graph's recall bound is wrong: calibration of ``recall_lower_bound``.

``build_graph`` widens an approximate search until a lower confidence bound on the sampled recall
reaches the target, and promises that the recall of *all* rows then reaches it with one-sided
confidence 97.7% (z = 2). That promise fails exactly when the bound lands above the true recall.
This script measures how often it does, on real per-query recalls:

1. it builds ``--graphs`` IVF graphs on clustered points and records every row's recall@10 at
   nprobe 1, 2 and 4 (recall about 0.77, 0.95 and 0.995-0.999: many, some and rare misses);
2. for each population and sample size it draws ``--trials`` samples (with replacement, as from a
   graph much larger than its sample) and counts the samples whose bound exceeds the population's
   recall. Nominal: 1 - Phi(2) = 2.28%.

It prints the engine's bound beside the plain normal one (mean - 2 standard errors), which
``build_graph`` used before: a sample that happens to hold few misses has both a high mean and a
small spread, so the normal bound is too optimistic when misses are rare.

    python benchmarks/bench_recall_bound.py [--graphs 12] [--trials 4000] [--sizes 300,1000,3000]
"""
from __future__ import annotations

import argparse
import math
import time

import numpy as np

from conceptevo import neighbours as nbm

from _common import machine_line  # benchmarks/ is sys.path[0] when a script is run

NOMINAL = 0.5 * math.erfc(nbm.RECALL_Z / math.sqrt(2))


def populations(graphs: int, rows: int = 5000, k: int = 10) -> list[np.ndarray]:
    """Every row's recall@k at nprobe 1, 2 and 4, for ``graphs`` IVF graphs on clustered points."""
    out = []
    for g_seed in range(graphs):
        rng = np.random.default_rng(777 + g_seed)
        centres = rng.normal(size=(60, 16)) * 4
        x = (centres[rng.integers(0, 60, rows)] + rng.normal(size=(rows, 16))).astype(np.float32)
        graph = nbm.build_graph(x, k, exact_max_rows=1000, recall_sample=500, seed=1)
        _, exact = nbm.brute_force_knn(x, k)
        for nprobe in (1, 2, 4):
            graph._index.nprobe = nprobe
            d2, ids = graph._index.search(x, k + 1)
            not_self = np.argsort(ids == np.arange(rows)[:, None], axis=1, kind="stable")[:, :k]
            found = np.sqrt(np.maximum(np.take_along_axis(d2, not_self, axis=1), 0))
            short = (ids < 0).any(axis=1)
            found[short] = exact[short]  # as the graph does: rows with short lists are searched exactly
            out.append(nbm.recall_per_query(found, exact))
    return out


def normal_bound(v: np.ndarray) -> float:
    return float(v.mean() - nbm.RECALL_Z * v.std(ddof=1) / math.sqrt(v.size))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--graphs", type=int, default=12)
    ap.add_argument("--trials", type=int, default=4000)
    ap.add_argument("--sizes", default="300,1000,3000", help="sample sizes (rows queried), comma-separated")
    args = ap.parse_args()
    t0 = time.perf_counter()
    pops = populations(args.graphs)
    rng = np.random.default_rng(0)
    print(f"# {machine_line()}; {args.graphs} graphs x nprobe 1/2/4, {args.trials:,} samples each; "
          f"nominal miss rate {NOMINAL:.4f}")
    print("| sample | recall | populations | engine bound: miss rate (range, mean) | normal bound |")
    print("|---|---|---|---|---|")
    for n in (int(s) for s in args.sizes.split(",")):
        groups: dict[str, list[tuple[float, float]]] = {}
        for pop in pops:
            mu = float(pop.mean())
            if mu > nbm.max_certifiable_recall(n):
                continue  # build_graph refuses a target this sample size cannot certify
            band = "0.75-0.80" if mu < 0.9 else ("0.93-0.97" if mu < 0.99 else "0.99-0.999")
            engine = normal = 0
            for _ in range(args.trials):
                v = pop[rng.integers(0, len(pop), n)]
                engine += nbm.recall_lower_bound(v) >= mu
                normal += normal_bound(v) >= mu
            groups.setdefault(band, []).append((engine / args.trials, normal / args.trials))
        for band, rates in groups.items():
            a = np.array(rates)
            print(f"| {n:,} | {band} | {len(a)} | {a[:, 0].min():.4f}-{a[:, 0].max():.4f}, {a[:, 0].mean():.4f} "
                  f"| {a[:, 1].min():.4f}-{a[:, 1].max():.4f}, {a[:, 1].mean():.4f} |", flush=True)
    print(f"# {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
