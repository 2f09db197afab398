"""Co-activated pairs + negative-sampling trainer: throughput on a VGG16-scale input.

Input: 4,224 neurons (the 13 conv layers of VGG16), k = 10 random distinct stimuli
each over 20,000 images, E repeats of the pair sampling. Baselines are the plain
per-item Python/NumPy versions of the same work: ``build_pairs_reference`` (one
dict of lists, ``random.shuffle`` per image) and a per-pair NumPy SGD step written
the straightforward way (``np.dot``, ``np.exp``, as in the authors' code). Baselines
run on a slice of the input and their rate is extrapolated.

    python benchmarks/bench_trainer.py            # full size
    python benchmarks/bench_trainer.py --quick    # smaller, fewer runs
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

from conceptevo import _C
from conceptevo._reference import build_pairs_reference
from conceptevo.neuron_embedding import train
from conceptevo.pairs import build_pairs

from _common import machine_line  # benchmarks/ is sys.path[0] when a script is run

VGG16_CHANNELS = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]


def device_name() -> str:
    return machine_line(None, f"OpenMP threads {_C.max_threads()}")


def median_time(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def baseline_sgd(
    pairs: np.ndarray, num_neurons: int, dim: int, lr: float, negatives: int, seed: int
) -> np.ndarray:
    """One epoch of the same update, one pair at a time with NumPy (the obvious implementation)."""
    rng = np.random.default_rng(seed)
    W = (rng.random((num_neurons, dim), dtype=np.float32) - np.float32(0.5)).astype(np.float32)
    lr32 = np.float32(lr)
    for a, b in pairs.tolist():
        va, vb = W[a], W[b]
        gp = np.float32(1.0 / (1.0 + np.exp(-np.dot(va, vb)))) - np.float32(1)
        ga, gb = gp * vb, gp * va
        for r in rng.integers(0, num_neurons, size=negatives).tolist():
            vr = W[r]
            ga = ga + np.float32(1.0 / (1.0 + np.exp(-np.dot(vr, va)))) * vr
            gb = gb + np.float32(1.0 / (1.0 + np.exp(-np.dot(vr, vb)))) * vr
        W[a] = va - lr32 * ga
        W[b] = W[b] - lr32 * gb
    return W


def fmt_rate(rate: float, seconds: float) -> str:
    return f"{rate / 1e6:7.3f} M pairs/s ({seconds:.3f} s)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=20_000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=50, help="E, pair-sampling repeats")
    ap.add_argument("--epochs", type=int, default=3, help="trainer epochs per timed run")
    ap.add_argument("--runs", type=int, default=5, help="timed runs per measurement (median)")
    ap.add_argument("--dim", type=int, default=30)
    ap.add_argument("--negatives", type=int, default=3)
    ap.add_argument("--baseline-pairs", type=int, default=20_000, help="pairs the NumPy SGD baseline runs on")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.repeats, args.runs, args.baseline_pairs, args.epochs = 10, 3, 5_000, 2

    n = sum(VGG16_CHANNELS)
    rng = np.random.default_rng(0)
    stim = np.stack([rng.choice(args.images, size=args.k, replace=False) for _ in range(n)]).astype(np.int64)

    rows = []
    # Stage 1: pairs.
    pairs = build_pairs(stim, args.images, repeats=args.repeats, seed=1)
    P = pairs.shape[0]
    t_fast = median_time(lambda: build_pairs(stim, args.images, repeats=args.repeats, seed=1), args.runs)
    ref_repeats = max(1, args.repeats // 10)
    t_ref = median_time(lambda: build_pairs_reference(stim, args.images, repeats=ref_repeats, seed=1),
                        max(1, args.runs // 2))
    r_fast = P / t_fast
    r_ref = (P * ref_repeats / args.repeats) / t_ref
    rows.append((
        "build_pairs (NumPy, vectorised)",
        f"{n} neurons, k={args.k}, {args.images} images, E={args.repeats} -> {P} pairs",
        fmt_rate(r_fast, t_fast),
        fmt_rate(r_ref, t_ref) + f" on E={ref_repeats}",
        f"{r_fast / r_ref:6.1f}x",
    ))

    # Stage 2: trainer (threads = 1 and all), baseline on a slice of the pairs.
    nb = min(args.baseline_pairs, P)
    t_base = median_time(lambda: baseline_sgd(pairs[:nb], n, args.dim, 0.05, args.negatives, 0),
                         max(1, args.runs // 2))
    r_base = nb / t_base
    size = f"P={P}, dim={args.dim}, R={args.negatives}, {args.epochs} epochs"
    cpu_rate = float("nan")
    for threads in sorted({1, _C.max_threads()}):
        def run(threads=threads):
            return train(pairs, n, dim=args.dim, negatives=args.negatives, epochs=args.epochs, seed=0,
                         threads=threads, progress=False)
        if threads == 1:  # CPU time of one thread: what an idle core would give when the machine is busy
            c0 = time.process_time()
            run()
            cpu_rate = P * args.epochs / (time.process_time() - c0)
        t = median_time(run, args.runs)
        rate = P * args.epochs / t
        rows.append((
            f"train_sgns, threads={threads}",
            size,
            fmt_rate(rate, t),
            fmt_rate(r_base, t_base) + f" on {nb} pairs",
            f"{rate / r_base:6.1f}x",
        ))

    head = ("stage", "size", "this engine", "baseline (per-item Python/NumPy)", "ratio")
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    line = " | ".join
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    print(f"device: {device_name()}; load average {load}")
    print(f"medians of {args.runs} runs; baselines run on a slice and are extrapolated by rate")
    print(line(h.ljust(w) for h, w in zip(head, widths)))
    print("-+-".join("-" * w for w in widths))
    for r in rows:
        print(line(str(c).ljust(w) for c, w in zip(r, widths)))
    print(f"train_sgns threads=1 per CPU-second (insensitive to other load): {cpu_rate / 1e6:.3f} M pairs/s")


if __name__ == "__main__":
    main()
