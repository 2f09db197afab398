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
* ``CG kernel: Numba vs NumPy/SciPy`` — the same CG recurrences, the fused Numba kernel (the
  default above the crossover) against the NumPy block CG on SciPy products (the default before).
* ``--crossover``: dense Cholesky vs CG at a range of sizes (VGG16 scaled down), to place
  ``image_embedding.DIRECT_MAX_ROWS``; wall and process CPU times (the machine may be shared).
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
    ap.add_argument("--crossover", action="store_true", help="only time Cholesky vs CG over sizes")
    args = ap.parse_args()
    if args.crossover:
        crossover(args.repeats)
        return

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

    t = time.perf_counter()
    ie.fit(stim[:50], vectors[:50], num_images, method="cg", backend="scipy")  # Numba JIT / disk cache
    console.print(f"first CG call (Numba compile or load from its disk cache): {time.perf_counter() - t:.1f} s")
    t_cg, (u, info) = median_time(lambda: ie.fit(stim, vectors, num_images, backend="scipy"),
                                  args.repeats, "cg")
    console.print(f"default solver: {info.method} ({info.backend}), {info.iterations} iterations, "
                  f"rmse {info.rmse:.4g} "
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
    rows.append(("solve: default vs authors' GD", size, t_cg, t_gd,
                 f"GD extrapolated: 10,000 x {gd_iter * 1e3:.2f} ms"))

    reps_lsqr = max(1, min(args.repeats, 3))
    t_lsqr, (u_l, info_l) = median_time(
        lambda: ie.fit(stim, vectors, num_images, backend="scipy", method="lsqr"), reps_lsqr)
    rows.append(("solve: default vs LSQR per column", size, t_cg, t_lsqr,
                 f"LSQR {info_l.iterations} it/column, max |dU| {np.abs(u_l - u).max():.1e}"))
    t_dir, (u_d, _) = median_time(
        lambda: ie.fit(stim, vectors, num_images, backend="scipy", method="direct"), reps_lsqr)
    rows.append(("solve: default vs direct Cholesky", size, t_cg, t_dir,
                 f"max |dU| {np.abs(u_d - u).max():.1e}"))
    ridge = ie.DEFAULT_RIDGE
    t_nb, (u_nb, it_nb, _, _) = median_time(
        lambda: ie._solve_scipy(ac, v64, ridge, "cg", ie.DEFAULT_TOL, 20_000, engine="numba"), args.repeats,
        "kernel-numba")
    t_np, (u_np, it_np, _, _) = median_time(
        lambda: ie._solve_scipy(ac, v64, ridge, "cg", ie.DEFAULT_TOL, 20_000, engine="numpy"), args.repeats,
        "kernel-numpy")
    rows.append(("CG kernel: Numba vs NumPy/SciPy", size, t_nb, t_np,
                 (f"{it_nb} vs {it_np} it, max |dU| {np.abs(u_nb - u_np).max():.1e}; CPU s "
                  f"{CPU_TIMES['kernel-numba']:.2f} vs {CPU_TIMES['kernel-numpy']:.2f}")))
    try:
        t_torch, (u_t, _) = median_time(
            lambda: ie.fit(stim, vectors, num_images, backend="torch", device="cpu"), reps_lsqr)
        rows.append(("solve: default vs CG (torch, cpu)", size, t_cg, t_torch,
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


def crossover(repeats: int) -> None:
    """Dense Cholesky vs CG (Numba) at VGG16 scaled by 1/16 .. 1: where ``method="auto"`` switches."""
    from rich.console import Console
    from rich.table import Table

    from conceptevo import image_embedding as ie
    from conceptevo import neuron_embedding, pairs

    console = Console(width=200)
    ie.fit(synthetic_stimuli(50, 10, 2000), np.ones((50, 30), np.float32), 2000, method="cg")  # JIT
    table = Table(title=f"Image-embedding solve: Cholesky vs CG by size — {device_name()}, "
                        f"load {os.getloadavg()[0]:.1f}")
    for col in ("neurons", "images", "constrained", "Cholesky wall (s)", "CG wall (s)",
                "Cholesky CPU (s)", "CG CPU (s)", "CG it", "max |dU|"):
        table.add_column(col, justify="right")
    for scale in (16, 8, 4, 2, 1):
        n = sum(c // scale for c in VGG16_CHANNELS)
        num_images = 20_000 // scale
        stim = synthetic_stimuli(n, 10, num_images, seed=scale)
        p = pairs.build_pairs(stim, num_images, repeats=10, seed=0)
        v = neuron_embedding.train(p, n, dim=30, seed=0, progress=False).vectors
        t_d, (u_d, i_d) = median_time(lambda s=stim, v=v, m=num_images: ie.fit(s, v, m, method="direct"),
                                      repeats, "d")
        t_c, (u_c, i_c) = median_time(lambda s=stim, v=v, m=num_images: ie.fit(s, v, m, method="cg"), repeats, "c")
        table.add_row(f"{n:,}", f"{num_images:,}", f"{i_d.n_constrained_images:,}", f"{t_d:.3f}", f"{t_c:.3f}",
                      f"{CPU_TIMES['d']:.3f}", f"{CPU_TIMES['c']:.3f}", str(i_c.iterations),
                      f"{np.abs(u_d - u_c).max():.1e}")
        console.print(table) if scale == 1 else None
    console.print(f"method='auto' uses Cholesky up to DIRECT_MAX_ROWS = {ie.DIRECT_MAX_ROWS} rows")


if __name__ == "__main__":
    main()
