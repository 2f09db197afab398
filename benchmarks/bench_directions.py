"""Concept directions (conceptevo.directions): the three costs of the issue's performance goals.

1. Gram accumulation inside the stimulus pass: ImageNet-shaped VGG16 / ResNet-50 (synthetic
   224x224 images, random weights, every Conv2d), the pass with ``observer=gram_observer()``
   against the same pass without it (goal: <= 5% more).
2. ``eigh`` of 13 layers x 100 checkpoints of VGG16 widths (64..512), batched per width
   (:func:`conceptevo.directions.batched_directions`; goal: <= 10 s on 2 CPU cores): the top
   ``--top`` directions (partial ``syevr``), against the full float64 solve of the same matrices;
   accuracy against that full solve (principal angles, singular values) is printed.
3. The relevance (gradient) pass against the importance stage on the same images (goal: no
   slower): the built-in small VGG, every Conv2d, 12 classes x ``--per-class`` images.

    python benchmarks/bench_directions.py --threads 2
    python benchmarks/bench_directions.py --device cuda --images 256 --batch-size 64
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from _common import machine_line  # benchmarks/ is sys.path[0] when a script is run


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=0, help="224x224 images of part 1 (default 16 CPU, 256 GPU)")
    p.add_argument("--batch-size", type=int, default=0, help="default 8 CPU, 64 GPU")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--models", default="vgg16,resnet50")
    p.add_argument("--checkpoints", type=int, default=100, help="checkpoints of part 2")
    p.add_argument("--per-class", type=int, default=32, help="images per class of part 3")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="cpu: this process's CPU time (a shared machine; use with --threads 1)")
    p.add_argument("--parts", default="1,2,3")
    p.add_argument("--precision", default="float64", help="eigh precision of part 2: float64 or float32")
    p.add_argument("--top", type=int, default=32, help="part 2: leading directions per matrix (0 = all)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    gpu = device.type == "cuda"
    parts = {int(x) for x in args.parts.split(",") if x.strip()}

    from conceptevo import directions as D

    print(f"device: {machine_line(device, f'torch threads {torch.get_num_threads()}')}; "
          f"{args.clock}-time medians of {args.repeats} runs")
    rows = []

    def timed(fn) -> float:
        _sync(device)
        t0 = clock()
        fn()
        _sync(device)
        return clock() - t0

    def median_of(fn) -> float:
        fn()  # warm-up
        return statistics.median(timed(fn) for _ in range(args.repeats))

    # 1. Gram in the stimulus pass ---------------------------------------------------------
    if 1 in parts:
        from bench_imagenet_shaped import _factories

        from conceptevo.data import tensor_dataset
        from conceptevo.stimuli import Extraction

        n_img = args.images or (256 if gpu else 16)
        bs = args.batch_size or (64 if gpu else 8)
        g = torch.Generator().manual_seed(0)
        ds = tensor_dataset(torch.randint(0, 256, (n_img, 3, 224, 224), generator=g, dtype=torch.uint8),
                            torch.zeros(n_img, dtype=torch.int64))
        for key in [m.strip() for m in args.models.split(",") if m.strip()]:
            label, factory = _factories()[key]
            torch.manual_seed(0)
            state = factory().state_dict()
            plan = Extraction(factory, [state], ds, k=10, k_i=5, batch_size=bs, device=device)
            prepared = plan.prepare_models(plan.checkpoints)

            def without():
                plan.run_shard(plan.checkpoints, progress=False, prepared=prepared)

            def with_gram():
                obs, accs = D.gram_observer()
                plan.run_shard(plan.checkpoints, progress=False, prepared=prepared, observer=obs)
                for acc in accs.values():
                    acc.flush()  # the buffered rows' GEMM is part of the cost

            t_plain, t_gram = [], []
            without(); with_gram()  # noqa: E702 warm-up
            for _ in range(args.repeats):  # interleaved: the load of a shared machine hits both alike
                t_plain.append(timed(without))
                t_gram.append(timed(with_gram))
            a, b = statistics.median(t_plain), statistics.median(t_gram)
            rows.append((f"Gram in stimulus pass, {label}", f"{n_img} img, {len(plan.layer_names)} layers",
                         b, a, b / a))

    # 2. eigh ------------------------------------------------------------------------------
    if 2 in parts:
        from scipy.linalg import subspace_angles

        widths = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
        rng = np.random.default_rng(0)
        items = []
        for _ in range(args.checkpoints):
            for c in widths:
                a = rng.standard_normal((c + 8, c))
                items.append((a.T @ a, a.sum(0), c + 8))
        top = args.top or None
        label = f"eigh {args.precision}" + (f", top {top}" if top else ", full") + ", batched"
        t_eng = median_of(lambda: D.batched_directions(items, device=device, precision=args.precision, top=top))
        # baseline: the full float64 solve of the same matrices (the engine's path before partial solves)
        t_full = timed(lambda: D.batched_directions(items, device=device)) if args.repeats else float("nan")
        rows.append((label, f"13 layers x {args.checkpoints} ck", t_eng, t_full, t_eng / t_full))
        # accuracy against the float64 full solve (one checkpoint's 13 matrices): the largest principal
        # angle between single directions and between the top-r subspaces, and the singular values
        got = D.batched_directions(items[:13], precision=args.precision, top=top)
        ref = D.batched_directions(items[:13])
        one = max(float(subspace_angles(v[j][:, None], r[0][j][:, None]).max())
                  for (v, _s), r in zip(got, ref) for j in range(len(v)))
        sub = max(float(subspace_angles(v.T, r[0][:len(v)].T).max()) for (v, _s), r in zip(got, ref))
        srel = max(float(np.max(np.abs(s - r[1][:len(s)]) / r[1][:len(s)])) for (_v, s), r in zip(got, ref))
        print(f"{label}: accuracy vs float64 full solve: max principal angle per direction {one:.1e} rad, "
              f"of the top subspaces {sub:.1e} rad, singular values max rel. error {srel:.1e}")

    # 3. relevance pass vs importance stage ---------------------------------------------------
    if 3 in parts:
        from conceptevo.data import tensor_dataset
        from conceptevo.importance import evolution_importance
        from conceptevo.models import build_model

        k = 12
        n = k * args.per_class
        g = torch.Generator().manual_seed(1)
        ds = tensor_dataset(torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8),
                            torch.arange(n) % k)
        torch.manual_seed(0)
        m1, m2 = build_model("vgg_small", num_classes=k).to(device), build_model("vgg_small", num_classes=k).to(device)
        cd = D.ConceptDirections(batch_size=64, device=device).fit(m1, ds)
        t_rel = median_of(lambda: cd.relevance(m1, ds))
        t_imp = median_of(lambda: evolution_importance(m1, m2, ds, batch_size=64, device=device))
        rows.append(("relevance pass (vs importance stage)", f"{n} img, {len(cd.vh)} layers", t_rel, t_imp,
                     t_rel / t_imp))

    print(f"{'stage':<44} {'size':>24} {'this engine':>12} {'baseline':>10} {'ratio':>7}")
    for stage, size, a, b, r in rows:
        print(f"{stage:<44} {size:>24} {a:>11.3f}s {b:>9.3f}s {r:>7.3f}")
    print("baselines: 1 = the same stimulus pass without the Gram observer; 2 = the full float64 eigh; "
          "3 = conceptevo.importance.evolution_importance on the same images and layers")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
