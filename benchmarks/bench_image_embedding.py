"""Benchmark: image embedding (Step 2.1) and projection (Step 2.2) at VGG16 scale.

Size: the 13 conv layers of VGG16 (4,224 neurons), k = 10 stimuli per neuron,
20,000 candidate images. The stimuli are synthetic but structured like real ones:
300 latent concepts, every image carries 1-3 of them with Zipf-like popularity,
every neuron draws its 10 stimuli from one concept's images. The base neuron
vectors are learned from those stimuli by this engine's own pairs + SGNS stages,
so the least-squares problem has the structure of a real run.

Rows (medians of ``--repeats`` runs):

* ``solve: CG`` vs ``authors' GD`` — the authors fit image vectors by gradient
  descent on the same loss (sum of squared errors, learning rate 0.002, up to
  10,000 iterations). The baseline here is that descent *vectorised* with the same
  sparse matrices (faster than a per-neuron Python loop); a few iterations are
  timed and the time is EXTRAPOLATED to 10,000 iterations. The rmse that descent
  reaches after ``--gd-iters`` iterations is printed below the table.
* ``solve: CG`` vs ``LSQR`` (SciPy, one column at a time, same ridge, same tol).
* ``solve: direct`` — dense Cholesky of the smaller Gram matrix, for reference.
* ``projection`` of 20 checkpoints (84,480 neurons) by one sparse product vs a
  per-neuron NumPy loop (timed on one checkpoint, scaled by 20).

Run:  python benchmarks/bench_image_embedding.py [--quick] [--repeats 5]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
from _common import machine_line  # benchmarks/ is sys.path[0] when a script is run

VGG16_CHANNELS = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]


def device_name() -> str:
    return machine_line()


def synthetic_stimuli(n: int, k: int, num_images: int, concepts: int = 300, seed: int = 0) -> np.ndarray:
    """(n, k) distinct image ids per neuron with concept structure (see the module docstring)."""
    rng = np.random.default_rng(seed)
    per_image = rng.integers(1, 4, size=num_images)
    img = np.repeat(np.arange(num_images), per_image)
    con = rng.integers(0, concepts, size=img.size)
    pop = 1.0 / (rng.permutation(num_images) + 10.0)  # Zipf-like popularity of images
    order = np.argsort(con, kind="stable")
    img, con = img[order], con[order]
    starts = np.searchsorted(con, np.arange(concepts + 1))
    cp = 1.0 / (np.arange(concepts) + 5.0)
    cp /= cp.sum()
    out = np.empty((n, k), np.int64)
    for i in range(n):
        while True:
            c = rng.choice(concepts, p=cp)
            pool = np.unique(img[starts[c]:starts[c + 1]])
            if pool.size >= k:
                break
        w = pop[pool] / pop[pool].sum()
        out[i] = rng.choice(pool, size=k, replace=False, p=w)
    return out


CPU_TIMES: dict[str, float] = {}


def median_time(fn, repeats: int, label: str | None = None) -> tuple[float, object]:
    """Median wall time of ``repeats`` calls (and, under ``label``, the median process CPU time)."""
    times, cpu, out = [], [], None
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    if label:
        CPU_TIMES[label] = statistics.median(cpu)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="quarter size (a smoke run)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--gd-iters", type=int, default=300, help="gradient-descent iterations run for its rmse")
    ap.add_argument("--checkpoints", type=int, default=20)
    args = ap.parse_args()

    from rich.console import Console
    from rich.table import Table

    from conceptevo import image_embedding as ie
    from conceptevo import neuron_embedding, pairs

    scale = 4 if args.quick else 1
    channels = [c // scale for c in VGG16_CHANNELS]
    n, k, num_images, d = sum(channels), 10, 20_000 // scale, 30
    console = Console(width=200)
    console.print(f"[bold]image embedding benchmark[/bold]  device: {device_name()}")
    t = time.perf_counter()
    stim = synthetic_stimuli(n, k, num_images, seed=0)
    p = pairs.build_pairs(stim, num_images, repeats=10, seed=0)
    vectors = neuron_embedding.train(p, n, dim=d, seed=0, progress=False).vectors
    console.print(f"setup (stimuli + {len(p):,} pairs + SGNS): {time.perf_counter() - t:.1f} s")

    rows = []
    size = f"{n:,} neurons x k={k}, {num_images:,} images, d={d}"

    t_cg, (u, info) = median_time(lambda: ie.fit(stim, vectors, num_images, backend="scipy"),
                                  args.repeats, "cg")
    console.print(f"CG: {info.method}, {info.iterations} iterations, rmse {info.rmse:.4g} "
                  f"(relative {info.rel_rmse:.3%}), {info.n_constrained_images:,} constrained images; "
                  f"median wall {t_cg:.3f} s, process CPU {CPU_TIMES['cg']:.3f} s "
                  f"(load average now {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")

    # Authors' baseline: gradient descent on sum ||A U - V||^2, lr 0.002, 10,000 iterations.
    a = ie.design_matrix(stim, num_images)
    cidx = np.unique(stim[stim >= 0])
    ac = a[:, cidx].tocsr()
    act = ac.T.tocsr()
    v64 = vectors.astype(np.float64)
    rng = np.random.default_rng(0)
    u_gd = rng.uniform(-0.5, 0.5, size=(cidx.size, d))

    def gd_step(u_):
        return u_ - 0.002 * 2.0 * (act @ (ac @ u_ - v64))

    step_times = []
    for it in range(args.gd_iters):
        t = time.perf_counter()
        u_gd = gd_step(u_gd)
        step_times.append(time.perf_counter() - t)
    gd_iter = statistics.median(step_times)
    gd_rmse = float(np.sqrt(np.mean((ac @ u_gd - v64) ** 2)))
    t_gd = gd_iter * 10_000
    rows.append(("solve: CG (scipy) vs authors' GD", size, t_cg, t_gd, "GD extrapolated: 10,000 x "
                 f"{gd_iter * 1e3:.2f} ms"))

    reps_lsqr = max(1, min(args.repeats, 3))
    t_lsqr, (u_l, info_l) = median_time(
        lambda: ie.fit(stim, vectors, num_images, backend="scipy", method="lsqr"), reps_lsqr)
    rows.append(("solve: CG (scipy) vs LSQR per column", size, t_cg, t_lsqr,
                 f"LSQR {info_l.iterations} it/column, max |dU| {np.abs(u_l - u).max():.1e}"))
    t_dir, (u_d, _) = median_time(
        lambda: ie.fit(stim, vectors, num_images, backend="scipy", method="direct"), reps_lsqr)
    rows.append(("solve: CG (scipy) vs direct Cholesky", size, t_cg, t_dir,
                 f"max |dU| {np.abs(u_d - u).max():.1e}"))
    try:
        t_torch, (u_t, _) = median_time(
            lambda: ie.fit(stim, vectors, num_images, backend="torch", device="cpu"), reps_lsqr)
        rows.append(("solve: CG (scipy) vs CG (torch, cpu)", size, t_cg, t_torch,
                     f"max |dU| {np.abs(u_t - u).max():.1e}"))
    except ImportError:
        pass

    # Projection: many checkpoints at once vs a per-neuron loop.
    ck = [synthetic_stimuli(n, k, num_images, seed=s + 1) for s in range(min(args.checkpoints, 3))]
    allstim = np.concatenate([ck[i % len(ck)] for i in range(args.checkpoints)])
    t_proj, proj = median_time(lambda: ie.project(allstim, u), args.repeats)

    def loop_one():
        out = np.empty((n, d), np.float32)
        for i, row in enumerate(ck[0]):
            ids = row[row >= 0]
            out[i] = u[ids].mean(axis=0)
        return out

    t_loop1, ref = median_time(loop_one, max(1, args.repeats // 2))
    assert np.allclose(ref, proj[:n], atol=1e-5)
    rows.append(("projection: sparse product vs loop", f"{args.checkpoints} checkpoints x {n:,} neurons",
                 t_proj, t_loop1 * args.checkpoints, "loop timed on 1 checkpoint, x checkpoints"))

    table = Table(title=f"Image embedding + projection — {device_name()}")
    for col in ("stage", "size", "this engine (s)", "baseline (s)", "ratio", "note"):
        numeric = col in ("this engine (s)", "baseline (s)", "ratio")
        table.add_column(col, justify="right" if numeric else "left")
    for stage, sz, mine, base, note in rows:
        table.add_row(stage, sz, f"{mine:.3f}", f"{base:.3f}", f"{base / mine:.1f}x", note)
    console.print(table)
    console.print(f"GD after {args.gd_iters} iterations: rmse {gd_rmse:.4g} vs CG {info.rmse:.4g} "
                  f"(GD starts from uniform(-0.5, 0.5) like the authors' vectors)")
    console.print(f"unconstrained images placed: {info.n_unconstrained}, fallback: {info.n_fallback} "
                  "(no responsive neurons in this synthetic set)")


if __name__ == "__main__":
    main()
