"""Tracing (Pfahler & Morik): class-level recording cost, storage, and explain time.

* **Recording cost**: optimisation steps of the built-in ``well_trained`` settings (vgg_small,
  dropout 0.3, SGD lr 0.04 momentum 0.9, weight decay 5e-4, gradient clip 5, batch 64, the
  built-in 32x32 data), plain vs with a class :class:`~conceptevo.tracing.Tracer` on every conv
  layer (and on every conv + Linear layer). Blocks of steps alternate plain / traced on the same
  model so machine load hits both alike; the median block time is reported. Only the steps are
  timed (no evaluation, no checkpoint writing): that is the part tracing adds to.
* **Storage**: class accumulators (classes + 3 extra sources) x parameters x 4 B per window,
  against the original's per-step float32 weight deltas of the same layers (xai_tracking's HDF5
  format: one full ΔW per step and layer), per epoch of 6,000 images.
* **Explain**: one input against all sources of one layer, for a traced run of the built-in model
  (median of several calls; includes building the model and loading its checkpoint), and the
  scoring alone with the number of sources a full 12-epoch well_trained run has per window.

    python benchmarks/bench_tracing.py            # 12 blocks of 5 steps each way
    python benchmarks/bench_tracing.py --quick
    python benchmarks/bench_tracing.py --quick --tracer-threads 1   # the tracer's work on one thread
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from conceptevo import tracing
from conceptevo.data import builtin_dataset
from conceptevo.models import build_model
from conceptevo.train import REGIMES, train_run

from _common import machine_line  # benchmarks/ is sys.path[0] when a script is run

TRACER_THREADS = None


def step_loop(net, opt, data, steps, start, tracer=None, clip=5.0, batch=64):
    n = len(data)
    for s in range(steps):
        lo = ((start + s) * batch) % (n - batch)
        ids = torch.arange(lo, lo + batch)
        x, y = data.batch(ids)
        x = x.contiguous(memory_format=torch.channels_last)
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(net.parameters(), clip)
        opt.step()
        if tracer is not None:
            tracer.after_step(y, ids)


def recording_cost(data, blocks, steps, layers):
    cfg = REGIMES["well_trained"]
    torch.manual_seed(0)
    net = build_model(cfg["model_name"], num_classes=data.num_classes, dropout=cfg["dropout"])
    net = net.to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(net.parameters(), lr=cfg["lr"], momentum=0.9, weight_decay=cfg["weight_decay"])
    tr = tracing.Tracer(layers=layers, num_classes=data.num_classes, verbose=False, threads=TRACER_THREADS)
    step_loop(net, opt, data, 3, 0)                          # warm-up (allocator, kernels)
    tr.attach(net, opt)
    step_loop(net, opt, data, 2, 3, tr)
    tr.detach()
    plain, traced, plain_cpu, traced_cpu = [], [], [], []
    pos = 5
    for _ in range(blocks):
        t, c = time.perf_counter(), time.process_time()
        step_loop(net, opt, data, steps, pos)
        plain.append(time.perf_counter() - t)
        plain_cpu.append(time.process_time() - c)
        pos += steps
        tr._handles = []
        mods = dict(net.named_modules())
        for n in tr.layers:                                   # re-hook (detached during plain blocks)
            tr._handles.append(mods[n].register_forward_hook(tr._hook(n)))
        for n, ps in tr.params.items():                       # plain steps moved the weights meanwhile
            for k, p in ps.items():
                tr.prev[n][k] = p.detach().double().clone()
        t, c = time.perf_counter(), time.process_time()
        step_loop(net, opt, data, steps, pos, tr)
        traced.append(time.perf_counter() - t)
        traced_cpu.append(time.process_time() - c)
        pos += steps
        tr.detach()
    params = sum(p.numel() for ps in tr.params.values() for p in ps.values())
    med = statistics.median
    return (med(plain) / steps, med(traced) / steps, params, tr, med(plain_cpu) / steps, med(traced_cpu) / steps)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tracer-threads", type=int, default=None,
                    help="Tracer(threads=...): torch threads for the tracer's own work (default: leave alone)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    global TRACER_THREADS
    TRACER_THREADS = args.tracer_threads
    blocks, steps = (4, 3) if args.quick else (12, 5)
    data = builtin_dataset("train", seed=0, num_images=640 if args.quick else 1280)
    classes = data.num_classes
    steps_per_epoch = -(-6000 // 64)
    rows = []
    print(f"# device: {machine_line(None, f'torch threads {args.threads}, tracer threads {args.tracer_threads}')}",
          file=sys.stderr)
    for label, layers in (("conv layers", None), ("conv + linear", (nn.Conv2d, nn.Linear))):
        p, t, params, _, pc, tc = recording_cost(data, blocks, steps, layers)
        rows.append((f"class tracing, {label}: wall s/step", f"{params:,} params", f"{t:.4f}", f"{p:.4f}",
                     f"{t / p:.2f}x (goal <= 1.5x)"))
        rows.append((f"class tracing, {label}: CPU s/step", f"{params:,} params", f"{tc:.4f}", f"{pc:.4f}",
                     f"{tc / pc:.2f}x (goal <= 1.5x)"))
        acc = tracing.storage_bytes(params, classes + 3)
        orig = tracing.original_storage_bytes(params, steps_per_epoch)
        rows.append((f"storage per epoch, {label}", f"{classes}+3 sources, {steps_per_epoch} steps",
                     f"{acc / 2**20:.1f} MiB", f"{orig / 2**20:.1f} MiB (per-step fp32, original)",
                     f"{orig / acc:.1f}x less"))
        bf = tracing.original_storage_bytes(params, steps_per_epoch, bytes_per=2)
        rows.append((f"optional per-step deltas (bf16), {label}", f"{steps_per_epoch} steps",
                     f"{bf / 2**20:.1f} MiB", f"{orig / 2**20:.1f} MiB", f"{orig / bf:.1f}x less"))

    # explain one input: a short traced run of the built-in model (every epoch a window)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = dict(REGIMES["well_trained"])
        name = cfg.pop("model_name")
        tr_set = builtin_dataset("train", seed=0, num_images=256)
        te_set = builtin_dataset("test", seed=0, num_images=32)
        train_run(Path(tmp) / "run", name, tr_set, te_set, epochs=3, lr=cfg["lr"], weight_decay=cfg["weight_decay"],
                  dropout=cfg["dropout"], save_epochs=[0, 1, 2, 3], grad_clip=5.0, progress=False,
                  eval_train_max=32, tracer=tracing.Tracer(verbose=False))
        run = tracing.TraceRun(Path(tmp) / "run")
        x = te_set[0][0]
        for layer in ("features.conv1_2", "features.conv4_1"):
            tracing.explain(run, x, layer, 0, 3)
            times, cpu = [], []
            for _ in range(5):
                t, c = time.perf_counter(), time.process_time()
                tab = tracing.explain(run, x, layer, 0, 3)
                times.append(time.perf_counter() - t)
                cpu.append(time.process_time() - c)
            rows.append((f"explain one input, {layer}", f"{len(tab)} sources (3 windows)",
                         f"{statistics.median(times):.3f} s wall, {statistics.median(cpu):.3f} s CPU", "goal 1 s",
                         f"residual {tab.attrs['residual']:.1e}"))
        # scoring alone with a full run's worth of sources: 12 epoch windows x 15 sources
        model = run.model(3)
        for layer in ("features.conv1_2", "features.conv4_1"):
            info = tracing.layer_info(model, layer)
            s = 12 * (classes + 3)
            src = tracing.LayerSources(layer, torch.randn(s, *info.weight_shape, dtype=torch.float64),
                                       torch.randn(s, info.weight_shape[0], dtype=torch.float64),
                                       tracing._meta([{"source": str(i), "kind": "class", "class": 0,
                                                       "epoch_from": 0, "epoch_to": 1, "exact": True,
                                                       "example": -1} for i in range(s)]))
            a = tracing.layer_input(model, layer, x[None])
            times, cpu = [], []
            for _ in range(5):
                t, c = time.perf_counter(), time.process_time()
                tracing.decompose(info, a, src)
                times.append(time.perf_counter() - t)
                cpu.append(time.process_time() - c)
            rows.append((f"score sources, {layer}", f"{s} sources (12 epochs)",
                         f"{statistics.median(times):.3f} s wall, {statistics.median(cpu):.3f} s CPU", "goal 1 s", ""))

    head = ("stage", "size", "this engine", "baseline", "ratio / note")
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(5)]
    for r in [head] + rows:
        print("  ".join(str(v).ljust(w) for v, w in zip(r, widths)))


if __name__ == "__main__":
    main()
