"""The space at ImageNet-run size: fit, projection, neighbour graph, layout and groups from 4k to 1M neurons.

Synthetic stimuli shaped like a VGG16 run: 13 conv layers (4,224 neurons per checkpoint), k = 10,
20,000 images, 300 concepts with Zipf popularity (each image shows one concept; a neuron's stimuli
are a window of its concept's images plus some noise), the window drifting from epoch to epoch
and 2% of the neurons switching concept each epoch. ``N`` neurons = ``N / 4224`` checkpoints of
one run (1M = 237 checkpoints, the base is the last one).

Stages timed (each size in a fresh process, so its peak RSS is its own):

* ``fit``        UnifiedSpace.fit on the base checkpoint (pairs, SGNS, image-embedding solve)
* ``add``        projecting every other checkpoint (Step 2.2)
* ``neighbours`` the one neighbour graph, k = 10 (exact below 20k live rows, IVF above; recall on 1,000 queries)
* ``layout``     layout_2d (one UMAP fit up to 50k rows, a sampled fit + transform above)
* ``groups``     FAISS k-means, 30 groups
The synthesis of the stimuli is reported but is not a stage of the engine. The report is not timed
here (the folder report is another branch's work).

    python benchmarks/bench_space_scale.py --quick                      # tiny sizes, seconds (the test)
    python benchmarks/bench_space_scale.py --sizes 4k,25k,100k,400k,1m  # the table (long)
    python benchmarks/bench_space_scale.py --quality 100k               # sampled vs full UMAP at 100k

``--quality N`` fits the layout twice on the same N-neuron space, once over every row and once
sampled + transformed, and reports trustworthiness (sklearn, on a 5,000-row subsample), kNN
preservation (share of each row's 10 nearest neighbours in the space that are among its 10 nearest
in 2-D, 2,000 query rows) and the alignment lift of the concept tags measured in 2-D and in the space.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_line

VGG16_CHANNELS = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
STAGES = ["fit", "add", "neighbours", "layout", "groups"]


def parse_size(text: str) -> int:
    t = text.strip().lower()
    mult = 1_000_000 if t.endswith("m") else 1_000 if t.endswith("k") else 1
    return int(float(t.rstrip("mk")) * mult)


# ------------------------------------------------------------------------------ synthetic run
class SyntheticRun:
    """Stimuli of one run, checkpoint by checkpoint (deterministic in ``seed``)."""

    def __init__(self, channels=VGG16_CHANNELS, images=20_000, concepts=300, k=10, seed=0,
                 drift=2, switch=0.02, noise=0.1):
        self.rng = np.random.default_rng(seed)
        rng = self.rng
        self.m, self.k, self.images, self.concepts = int(sum(channels)), k, images, concepts
        self.channels = channels
        pop = 1.0 / np.arange(1, concepts + 1)  # Zipf popularity
        self.pop = pop / pop.sum()
        self.image_concept = rng.choice(concepts, images, p=self.pop)
        order = rng.permutation(images)
        order = order[np.argsort(self.image_concept[order], kind="stable")]
        self.by_concept = order
        self.size = np.bincount(self.image_concept, minlength=concepts)
        self.start = np.concatenate([[0], np.cumsum(self.size)[:-1]])
        self.concept = rng.choice(concepts, self.m, p=self.pop)
        self.offset = rng.integers(0, 1 << 30, self.m)
        self.drift, self.switch, self.noise = drift, switch, noise

    def step(self) -> None:
        """One epoch later: windows move on, a few neurons change concept."""
        rng = self.rng
        self.offset = self.offset + rng.integers(0, self.drift + 1, self.m)
        sw = rng.random(self.m) < self.switch
        self.concept[sw] = rng.choice(self.concepts, int(sw.sum()), p=self.pop)

    def stimuli(self) -> np.ndarray:
        rng = self.rng
        c = self.concept
        size = np.maximum(self.size[c], 1)
        idx = self.start[c][:, None] + (self.offset[:, None] + np.arange(self.k)) % size[:, None]
        ids = self.by_concept[np.minimum(idx, self.images - 1)].astype(np.int64)
        noisy = rng.random(ids.shape) < self.noise
        ids[noisy] = rng.integers(0, self.images, int(noisy.sum()))
        ids.sort(axis=1)  # repeated ids (small concepts, noise) become empty slots
        dup = np.zeros_like(ids, bool)
        dup[:, 1:] = ids[:, 1:] == ids[:, :-1]
        ids[dup] = -1
        return ids


def build_space(n_neurons: int, *, channels=VGG16_CHANNELS, images=20_000, concepts=300, seed=0, runs=1,
                threads=2, times=None):
    """A UnifiedSpace of about ``n_neurons`` rows; returns (space, tags, seconds of synthesis)."""
    from conceptevo.space import UnifiedSpace

    times = {} if times is None else times
    per = int(sum(channels))
    n_ckpt = max(1, round(n_neurons / per))
    per_run = [n_ckpt // runs + (1 if r < n_ckpt % runs else 0) for r in range(runs)]
    t = time.perf_counter()
    stims = {}
    gens = []
    for r, n_e in enumerate(per_run):
        g = SyntheticRun(channels, images, concepts, seed=seed + r)
        if r:  # the other runs see the same images (same concepts), their neurons differ
            g.image_concept, g.by_concept, g.size, g.start = (gens[0].image_concept, gens[0].by_concept,
                                                              gens[0].size, gens[0].start)
        gens.append(g)
        for e in range(n_e):
            stims[(f"run{r}", e)] = g.stimuli()
            g.step()
    times["synthesis"] = time.perf_counter() - t
    base_key = ("run0", per_run[0] - 1)
    t = time.perf_counter()
    space = UnifiedSpace.fit(stims[base_key], num_images=images, seed=seed, threads=1,
                             model=base_key[0], epoch=base_key[1], progress=False)
    times["fit"] = time.perf_counter() - t
    t = time.perf_counter()
    for key, s in stims.items():
        if key != base_key:
            space.add(key[0], key[1], s)
    times["add"] = time.perf_counter() - t
    del stims
    return space, {"concept": gens[0].image_concept.astype(np.int64)}


def set_threads(n: int) -> None:
    import faiss
    import torch

    torch.set_num_threads(n)
    faiss.omp_set_num_threads(n)
    try:
        import numba

        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    except ImportError:  # pragma: no cover
        pass


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def run_size(n: int, args) -> dict:
    """Every stage at one size, in this process (wall seconds, and CPU seconds of all threads)."""
    set_threads(args.threads)
    times: dict[str, float] = {}
    cpu: dict[str, float] = {}
    shape = dict(channels=args.channels, images=args.images, concepts=args.concepts)
    c = time.process_time()
    space, _tags = build_space(n, seed=args.seed, runs=args.runs, threads=args.threads, times=times, **shape)
    cpu["synthesis+fit+add"] = time.process_time() - c

    def stage(name, fn):
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        times[name], cpu[name] = time.perf_counter() - t, time.process_time() - c
        print(f"  {n:,}: {name} {times[name]:.1f} s wall, {cpu[name]:.1f} s CPU", file=sys.stderr, flush=True)
        return out

    g = stage("neighbours", lambda: space.neighbour_graph(k=10, **args.graph_kw))
    stage("layout", lambda: space.layout_2d(args.layout, seed=args.seed,
                                             **(args.layout_kw if args.layout == "umap" else {})))
    stage("groups", lambda: space.groups(min(30, int(space.valid.sum())), seed=args.seed))
    return {"neurons": len(space), "live": int(space.valid.sum()), "checkpoints": len(space.checkpoints),
            "seconds": times, "cpu_seconds": cpu, "peak_rss_gib": round(peak_rss_gib(), 3), "graph": g.to_dict(),
            "layout": {k: v for k, v in space.layout_params.items() if k != "params"}}


# ------------------------------------------------------------------------------ quality
def _as_space_with(space, vectors):
    """A copy of ``space`` whose rows have ``vectors`` (e.g. the 2-D map) instead of their own."""
    from conceptevo.space import UnifiedSpace, _Checkpoint

    out = UnifiedSpace(space.image_vectors[:, : vectors.shape[1]])
    off = space._offsets()
    for i, c in enumerate(space._ckpts):
        out._ckpts.append(_Checkpoint(c.model, c.epoch, c.layers, c.channels, c.stimuli,
                                      np.asarray(vectors[off[i]:off[i + 1]], np.float32), c.source))
    return out


def layout_quality(space, xy, graph, tags, seed=0, n_trust=5000, n_knn=2000, n_align=5000) -> dict:
    import faiss
    from sklearn.manifold import trustworthiness

    from conceptevo.alignment import alignment_report

    rng = np.random.default_rng(seed)
    live = np.flatnonzero(space.valid)
    sub = np.sort(rng.choice(live, min(n_trust, live.size), replace=False))
    trust = float(trustworthiness(space.vectors[sub], xy[sub], n_neighbors=10))
    q = np.sort(rng.choice(live, min(n_knn, live.size), replace=False))
    flat = faiss.IndexFlatL2(2)
    flat.add(np.ascontiguousarray(xy[live], np.float32))
    _, pos = flat.search(np.ascontiguousarray(xy[q], np.float32), 11)
    nb2 = live[pos]
    hd = graph.ids[q, :10]
    pres = float(np.mean([len(set(a[a != r]) & set(b)) / 10 for a, b, r in zip(nb2, hd, q)]))
    queries = np.sort(rng.choice(live, min(n_align, live.size), replace=False))
    s2 = _as_space_with(space, xy)
    rep = alignment_report(s2, tags, k=10, queries=queries, scopes=("within", "across_epochs"), shuffles=0)
    lift = {r.scope: round(float(r.lift), 3) for r in rep.table.itertuples()}
    return {"trustworthiness@10": round(trust, 4), "knn_preservation@10": round(pres, 4), "alignment_lift_2d": lift}


def run_quality(n: int, args) -> dict:
    from conceptevo.alignment import alignment_report

    set_threads(args.threads)
    times: dict[str, float] = {}
    space, tags = build_space(n, seed=args.seed, runs=args.runs, times=times, channels=args.channels,
                              images=args.images, concepts=args.concepts)
    graph = space.neighbour_graph(k=10)
    rng = np.random.default_rng(args.seed)
    live = np.flatnonzero(space.valid)
    queries = np.sort(rng.choice(live, min(5000, live.size), replace=False))
    rep = alignment_report(space, tags, k=10, queries=queries, scopes=("within", "across_epochs"), shuffles=0)
    out = {"neurons": len(space), "checkpoints": len(space.checkpoints), "graph": graph.to_dict(),
           "alignment_lift_space": {r.scope: round(float(r.lift), 3) for r in rep.table.itertuples()}}
    variants = [("sampled+knn", {"transform": "knn"}), ("sampled+umap", {"transform": "umap"}),
                ("full", {"full_fit_max_rows": 10**9})]
    if args.quality_variants:
        variants = [v for name in args.quality_variants for v in variants if v[0] == name]
    for name, kw in variants:
        space._layout = None
        t = time.perf_counter()
        xy = space.layout_2d(seed=args.seed, **{**args.layout_kw, **kw})
        sec = time.perf_counter() - t
        out[name] = {"seconds": round(sec, 1), **layout_quality(space, xy, graph, tags, seed=args.seed),
                     "layout": {k: v for k, v in space.layout_params.items() if k != "params"}}
        print(json.dumps({name: out[name]}), file=sys.stderr, flush=True)
    out["peak_rss_gib"] = round(peak_rss_gib(), 3)
    return out


# ------------------------------------------------------------------------------ table
def exponents(results: list[dict]) -> dict[str, float]:
    """Growth exponent of each stage: least-squares slope of log(seconds) on log(neurons), sizes >= 2 points."""
    out = {}
    for st in STAGES:
        pts = [(r["neurons"], r["seconds"][st]) for r in results if r["seconds"].get(st, 0) > 0]
        if len(pts) >= 2:
            x, y = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
            out[st] = float(np.polyfit(x, y, 1)[0]) if np.ptp(x) > 0 else float("nan")
    return out


def table(results: list[dict]) -> str:
    cols = [f"{r['neurons']:,}" for r in results]
    exp = exponents(results)
    lines = ["| stage | " + " | ".join(cols) + " | exponent |", "|---" * (len(cols) + 2) + "|"]
    for st in ["synthesis", *STAGES]:
        vals = [f"{r['seconds'].get(st, float('nan')):.2f} s" for r in results]
        e = f"{exp[st]:.2f}" if st in exp else "-"
        lines.append(f"| {st} | " + " | ".join(vals) + f" | {e} |")
    tot = [sum(r["seconds"].get(s, 0) for s in STAGES) for r in results]
    lines.append("| **fit+add+neighbours+layout+groups** | " + " | ".join(f"{t:.1f} s" for t in tot) + " | |")
    lines.append("| CPU seconds (all threads) | " + " | ".join(
        f"{sum(r.get('cpu_seconds', {}).values()):.1f} s" for r in results) + " | |")
    lines.append("| peak RSS | " + " | ".join(f"{r['peak_rss_gib']:.2f} GiB" for r in results) + " | |")
    lines.append("| neighbours method | " + " | ".join(
        f"{r['graph']['method']}" + (f" (recall@10 {r['graph']['recall_at_k']:.3f})"
                                     if r['graph']['method'] != 'exact' else "") for r in results) + " | |")
    lines.append("| layout | " + " | ".join(
        (f"sampled {r['layout'].get('sample_rows', 0):,} + {r['layout'].get('transform')}"
         if r["layout"].get("sampled") else "full fit") for r in results) + " | |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="4k,25k,100k,400k,1m", help="neurons, comma-separated (k/m suffixes)")
    p.add_argument("--quick", action="store_true", help="tiny shape and sizes with low thresholds (seconds)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=1, help="training runs the checkpoints are spread over")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layout", choices=["umap", "pca"], default="umap")
    p.add_argument("--transform", choices=["umap", "knn"], default="umap")
    p.add_argument("--sample-rows", type=int, default=None, help="rows of the sampled UMAP fit")
    p.add_argument("--quality", default=None, help="a size: full vs sampled layout quality at that size")
    p.add_argument("--quality-variants", default=None, help="comma-separated: sampled+knn,sampled+umap,full")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--in-process", action="store_true", help="no subprocess per size (RSS is cumulative)")
    p.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.channels, args.images, args.concepts = VGG16_CHANNELS, 20_000, 300
    args.graph_kw, args.layout_kw = {}, {"transform": args.transform}
    if args.sample_rows:
        args.layout_kw["sample_rows"] = args.sample_rows
    if args.quick:  # VGG16 / 16 per checkpoint, 2,000 images; thresholds low so every path runs
        args.channels, args.images, args.concepts = [c // 16 for c in VGG16_CHANNELS], 2_000, 30
        args.graph_kw = {"exact_max_rows": 400, "recall_sample": 200}
        args.layout_kw.update(full_fit_max_rows=500, sample_rows=300)
        if args.sizes == p.get_default("sizes"):
            args.sizes = "264,1056"
        args.in_process = True
        if args.layout == "umap" and "--layout" not in (argv or sys.argv):
            args.layout = "pca"  # UMAP's JIT compile alone takes longer than the whole quick run
    args.quality_variants = args.quality_variants.split(",") if args.quality_variants else None
    if args.one is not None:
        print(json.dumps(run_size(args.one, args)))
        return 0
    load = os.getloadavg()
    header = machine_line(None, f"{args.threads} threads, load average {load[0]:.1f} at start")
    if args.quality:
        res = run_quality(parse_size(args.quality), args)
        res["machine"] = header
        print(json.dumps(res, indent=1))
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=1))
        return 0
    results = []
    for n in [parse_size(s) for s in args.sizes.split(",")]:
        if args.in_process:
            r = run_size(n, args)
        else:
            cmd = [sys.executable, __file__, "--one", str(n), "--threads", str(args.threads), "--runs",
                   str(args.runs), "--seed", str(args.seed), "--layout", args.layout, "--transform", args.transform]
            if args.sample_rows:
                cmd += ["--sample-rows", str(args.sample_rows)]
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "NUMBA_NUM_THREADS": str(args.threads)}
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env, check=False)  # stderr: progress
            if proc.returncode:
                return proc.returncode
            r = json.loads(proc.stdout.strip().splitlines()[-1])
        r["load_after"] = round(os.getloadavg()[0], 1)
        results.append(r)
        print(f"{r['neurons']:,} neurons: " + ", ".join(f"{k} {v:.2f} s" for k, v in r["seconds"].items())
              + f"; peak RSS {r['peak_rss_gib']:.2f} GiB; load {r['load_after']}", file=sys.stderr, flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps({"machine": header, "results": results}, indent=1))
    print(header)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
