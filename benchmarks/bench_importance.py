"""Benchmark: batched evolution importance (Eq. 2-4) vs the plain per-image, per-neuron loop.

Model: the built-in ``vgg_small`` (7 conv layers, 32x32 inputs) at its default widths
(352 conv neurons) and at VGG16's widths 64-128-256-512 (1,408 conv neurons); the
epoch-t' model is the epoch-t model with perturbed weights (timing does not depend on
what the weights are). Data: random images, ``--classes`` classes x ``--per-class``
images (default 12 x 128 = 1,536 images: the paper samples 128 per class), every conv neuron scored.

* this engine: :func:`conceptevo.importance.evolution_importance` (one forward of
  each model and one backward per batch of ``--batch-size`` images).
* baseline "plain loop": :func:`conceptevo._reference.importance_loop` (per image: a
  forward of both models, ``torch.autograd.grad`` of the class logit w.r.t. each layer,
  then one full-size one-neuron Delta Z and dot product per neuron).
* baseline "authors' loop": the structure of the authors' script (one forward of the
  whole batch, then per image and per layer ``torch.autograd.grad`` of that image's
  logit through the *batch* graph, then per neuron ``sum(grad[n] * delta[n])``),
  written here for timing only.

Both loops are timed on ``--loop-images`` images and EXTRAPOLATED linearly to the full
image count (their cost is per image; the authors' batch forward is timed once and
not scaled); ``--loop-images 0`` times them on every image.

Before timing, the three paths are compared on the loops' images (differences printed).
Timings are medians of ``--repeats`` runs (the loop: of ``--loop-repeats`` runs).

Run:  python benchmarks/bench_importance.py [--repeats 5] [--threads 1] [--device cuda]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import numpy as np
import torch

from conceptevo._reference import importance_loop
from conceptevo.importance import evolution_importance, resolve_pair
from conceptevo.models import build_model

from _common import machine_line  # benchmarks/ is sys.path[0] when a script is run


def device_name(device: str) -> str:
    return machine_line(device, f"torch {torch.get_num_threads()} threads")


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_time(fn, repeats: int, device: str) -> float:
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def authors_loop(ad_t, ad_t2, x, y, rows) -> dict[str, torch.Tensor]:
    """S for images ``rows`` of batch ``x``: per image, per layer autograd.grad through the batch graph."""
    zt2, zt = {}, {}
    with torch.no_grad(), ad_t2.hooks(lambda n, o: zt2.__setitem__(n, o.clone())):
        ad_t2.model(x)

    def keep(n, o):
        zt[n] = o
        return o.clone()

    with ad_t.hooks(keep):
        logits = ad_t.model(x.detach().requires_grad_(True))
    out = {n: torch.zeros(len(rows), ad_t.channels[n]) for n in ad_t.layer_names}
    for r, i in enumerate(rows):
        for name in ad_t.layer_names:
            g = torch.autograd.grad(logits[i, y[i]], zt[name], retain_graph=True)[0][i]
            delta = zt2[name][i] - zt[name][i].detach()
            for n in range(ad_t.channels[name]):
                out[name][r, n] = torch.sum(g[n] * delta[n])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--classes", type=int, default=12)
    ap.add_argument("--per-class", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--loop-images", type=int, default=8, help="images the loops are timed on (0 = all)")
    ap.add_argument("--widths", nargs="+", default=["16,32,64,128", "64,128,256,512"],
                    help="vgg_small channel widths, one table row pair each")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--loop-repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    print(f"device: {device_name(args.device)}")
    print(f"{'stage':<30}{'size':<44}{'this engine':>13}{'baseline':>13}{'ratio':>9}")
    notes = []
    for width in args.widths:
        channels = tuple(int(c) for c in width.split(","))
        torch.manual_seed(0)
        m_t = build_model("vgg_small", num_classes=max(10, args.classes), channels=channels).to(args.device).eval()
        m_t2 = copy.deepcopy(m_t)
        with torch.no_grad():
            for p in m_t2.parameters():
                p.add_(0.05 * torch.randn_like(p))
        ad_t, ad_t2 = resolve_pair(m_t, m_t2, None, input_shape=(3, 32, 32))
        n = args.classes * args.per_class
        g = torch.Generator().manual_seed(1)
        images = torch.randn(n, 3, 32, 32, generator=g)
        labels = torch.arange(args.classes).repeat_interleave(args.per_class)
        data = (images, labels)
        k = n if args.loop_images <= 0 else min(n, args.loop_images)
        loop_idx = np.sort(np.random.default_rng(0).choice(n, size=k, replace=False))

        # The three paths agree on the loop's images (checked once, not timed).
        a, sa = evolution_importance(ad_t, ad_t2, data, indices=loop_idx, batch_size=args.batch_size,
                                     return_scores=True)
        b = importance_loop(ad_t, ad_t2, data, indices=loop_idx)
        # float32: a sensitivity within rounding of 0 may flip sign between summation orders.
        flips = int(np.sum(a["positives"].to_numpy() != b["positives"].to_numpy()))
        xb, yb = images.to(args.device), labels.to(args.device)
        c = authors_loop(ad_t, ad_t2, xb[: args.batch_size], yb, [int(i) for i in loop_idx if i < args.batch_size])
        sel = loop_idx < args.batch_size
        err = max(float(np.max(np.abs(sa.scores[nm][sel] - c[nm].cpu().numpy()))) for nm in c)
        notes.append(f"width {width}: on the {k} checked images, max |S| difference batched vs authors' loop = "
                     f"{err:.1e}; positive counts differing from the plain loop: {flips} of {len(a)}")

        neurons = ad_t.num_neurons
        fast = median_time(lambda: evolution_importance(ad_t, ad_t2, data, batch_size=args.batch_size),
                           args.repeats, args.device)
        plain = median_time(lambda: importance_loop(ad_t, ad_t2, data, indices=loop_idx), args.loop_repeats,
                            args.device) * n / k
        bs = min(args.batch_size, n)
        rows = list(range(min(k, bs)))
        fwd = median_time(lambda: authors_loop(ad_t, ad_t2, xb[:bs], yb, []), args.loop_repeats, args.device)
        auth_part = median_time(lambda: authors_loop(ad_t, ad_t2, xb[:bs], yb, rows), args.loop_repeats,
                                args.device)
        authors = (n / bs) * fwd + (auth_part - fwd) * n / len(rows)
        size = f"{args.classes}x{args.per_class} img, {neurons} conv neurons ({width})"
        print(f"{'importance vs plain loop':<30}{size:<44}{fast:>12.3f}s{plain:>12.3f}s{plain / fast:>8.1f}x")
        print(f"{'importance vs authors loop':<30}{size:<44}{fast:>12.3f}s{authors:>12.3f}s{authors / fast:>8.1f}x")
    print(f"loops timed on {k} of {n} images and extrapolated; batch size {args.batch_size}; "
          f"medians of {args.repeats} (engine) / {args.loop_repeats} (loops) runs")
    for line in notes:
        print(line)


if __name__ == "__main__":
    main()
