"""Benchmark of the stimulus-pass kernels: spatial max/argmax + streaming top-k.

One table: stage, size, this engine, baseline, ratio (medians of ``--repeats`` runs), device named.

Stages, per VGG16 conv layer shape (outputs at ``--resolution``, batch ``--batch``):

* ``update``           -- the whole per-batch kernel (spatial max/argmax + per-channel top-k merge
                          + responsive rows), ``conceptevo.kernels.update`` with the fast backend,
                          against the plain-PyTorch reference backend.
* ``top-k maintenance`` -- only the merge of a batch's B x C maxima into the running state, against
                          a naive baseline that does what the authors' code does: for each channel a
                          ``torch.topk`` over the batch, then a Python insertion of each of the k
                          winners into a sorted list per neuron. The engine does the same work (its
                          per-channel merge; the responsive rows are timed in ``update``). Steady
                          state: both already hold ``--warm-batches`` earlier batches.
* ``spatial max``      -- the reduction alone (with argmax and NaN check) against the authors'
                          values-only ``max(max(x, 2), 2)`` in PyTorch.
* ``overhead``         -- the update against the forward pass of the conv layer (3x3, ReLU) that
                          produces this output: the ratio column is the extraction overhead.
* ``vgg16``            -- a VGG16 feature extractor with every one of its 13 conv outputs folded into
                          a state per layer (``--e2e-batch``, ``--e2e-resolution``), against the
                          plain forward: the time spent inside the hooks (CPU; clocked there) and
                          the total hooked forward; ratio = extraction overhead over plain inference.

With CUDA (``--device cuda`` or auto) the fast backend is the Triton kernel, timed with CUDA events,
and a ``bandwidth`` row gives the kernel's read rate as a fraction of a device-to-device copy's.

Examples::

    python benchmarks/bench_topk.py --quick
    python benchmarks/bench_topk.py --batch 64 --resolution 224 --layers conv1_2,conv3_3,conv5_3
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable

import numpy as np
import torch
from torch import nn

from conceptevo import kernels as K
from conceptevo.kernels import cpu_topk

from _common import machine_line  # benchmarks/ is sys.path[0] when a script is run

# VGG16 conv layers: name -> (input channels, output channels, downsampling of the input resolution)
VGG16_CONVS: dict[str, tuple[int, int, int]] = {
    "conv1_1": (3, 64, 1), "conv1_2": (64, 64, 1),
    "conv2_1": (64, 128, 2), "conv2_2": (128, 128, 2),
    "conv3_1": (128, 256, 4), "conv3_2": (256, 256, 4), "conv3_3": (256, 256, 4),
    "conv4_1": (256, 512, 8), "conv4_2": (512, 512, 8), "conv4_3": (512, 512, 8),
    "conv5_1": (512, 512, 16), "conv5_2": (512, 512, 16), "conv5_3": (512, 512, 16),
}
VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# -- timing ----------------------------------------------------------------------------------------

CLOCK = {"name": "wall"}  # "cpu": process CPU time, robust on a shared machine when single-threaded


def median_time(fn: Callable[[], object], repeats: int, device: torch.device, warmup: int = 1) -> float:
    """Median seconds of ``fn``: wall clock (CUDA: event timing after a synchronisation), or process
    CPU time with ``--clock cpu``."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1e3)
        else:
            clock = time.process_time if CLOCK["name"] == "cpu" else time.perf_counter
            t0 = clock()
            fn()
            times.append(clock() - t0)
    return statistics.median(times)


def device_name(device: torch.device) -> str:
    load = f", load average {os.getloadavg()[0]:.1f} at start" if hasattr(os, "getloadavg") else ""
    return machine_line(device, f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
                                f"numba {cpu_topk.numba.get_num_threads()} threads{load}")


# -- the naive baseline (what the authors' stimulus code does per batch) ----------------------------

class NaiveTopK:
    """Per neuron a sorted Python list of (value, image id), best first, at most k long."""

    def __init__(self, channels: int, k: int):
        self.k = k
        self.vals: list[list[float]] = [[] for _ in range(channels)]
        self.keys: list[list[int]] = [[] for _ in range(channels)]

    def insert(self, n: int, val: float, key: int) -> None:
        vals, keys = self.vals[n], self.keys[n]
        if len(vals) >= self.k and not vals[-1] < val:
            return
        at = len(vals)
        for i, e in enumerate(vals):
            if e < val:
                at = i
                break
        self.vals[n] = (vals[:at] + [val] + vals[at:])[: self.k]
        self.keys[n] = (keys[:at] + [key] + keys[at:])[: self.k]

    def update(self, max_act: torch.Tensor, image_ids: np.ndarray) -> None:
        k = min(self.k, max_act.shape[0])
        for n in range(max_act.shape[1]):
            vals, idx = torch.topk(max_act[:, n], k)
            vals, idx = vals.cpu().numpy(), idx.cpu().numpy()
            for j in range(k):
                self.insert(n, float(vals[j]), int(image_ids[idx[j]]))


# -- rows ------------------------------------------------------------------------------------------

def fmt_time(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    return f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.2f} s"


def layer_rows(name: str, args, device: torch.device, backend: str, rows: list) -> None:
    c_in, c, down = VGG16_CONVS[name]
    h = w = max(1, args.resolution // down)
    b = args.batch
    dtype = DTYPES[args.dtype]
    mem = torch.channels_last if args.channels_last else torch.contiguous_format
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(b, c, h, w, generator=gen).to(device=device, dtype=dtype).contiguous(memory_format=mem)
    size = f"{name} {b}x{c}x{h}x{w} {args.dtype}{' NHWC' if args.channels_last else ''}"
    reps = args.repeats
    n_images = b * (reps + 4)

    # update: fast backend vs reference, on a state that already holds one batch
    def run_update(be: str) -> float:
        state = K.new_state(c, args.k, n_images, args.k_i, device=device)
        K.update(state, x, torch.arange(b), backend=be)
        counter = iter(range(1, reps + 4))

        def step() -> None:
            i = next(counter)  # fresh image ids every call (each image may be fed once)
            K.update(state, x, torch.arange(i * b, (i + 1) * b), backend=be)

        return median_time(step, reps, device)

    t_fast = run_update(backend)
    t_ref = run_update("reference")
    rows.append(("update (max+argmax+top-k)", size, t_fast, f"{fmt_time(t_ref)} reference", f"{t_ref / t_fast:.1f}x"))

    # spatial max alone vs the authors' values-only max of max
    if backend == "cpu":
        t_sm = median_time(lambda: cpu_topk.spatial_max(x), reps, device)
    else:
        t_sm = median_time(lambda: K.spatial_max(x, backend=backend), reps, device)
    t_amax = median_time(lambda: torch.max(torch.max(x, dim=2).values, dim=2).values, reps, device)
    rows.append(("spatial max (+argmax, NaN check)", size, t_sm, f"{fmt_time(t_amax)} torch max(max())",
                 f"{t_amax / t_sm:.2f}x"))

    if device.type == "cuda":
        nbytes = x.numel() * x.element_size()
        y = torch.empty_like(x)
        t_copy = median_time(lambda: y.copy_(x), reps, device)
        copy_bw = 2 * nbytes / t_copy
        read_bw = nbytes / t_sm
        rows.append(("bandwidth (read / copy)", size, t_sm,
                     f"{copy_bw / 1e9:.0f} GB/s d2d copy", f"{read_bw / copy_bw:.2f} ({read_bw / 1e9:.0f} GB/s)"))

    # top-k maintenance only (per-channel merge: the same work as the naive baseline), steady state:
    # the states already hold a batch and every batch brings fresh B x C maxima and image ids
    if not args.no_naive:
        rng = np.random.default_rng(0)
        warm = args.warm_batches
        batches = [torch.from_numpy(rng.standard_normal((b, c)).astype(np.float32)) for _ in range(warm + reps + 2)]
        pos = np.zeros((b, c), np.int32)
        state = K.new_state(c, args.k, b * len(batches), args.k_i)
        naive = NaiveTopK(c, args.k)
        for i in range(warm):
            ids = np.arange(i * b, (i + 1) * b, dtype=np.int64)
            cpu_topk.merge_candidates(state, batches[i], pos, w, ids)
            naive.update(batches[i], ids)
        it = iter(range(warm, len(batches)))

        def engine_step() -> None:
            i = next(it)
            cpu_topk.merge_candidates(state, batches[i], pos, w, np.arange(i * b, (i + 1) * b, dtype=np.int64))

        t_merge = median_time(engine_step, reps, torch.device("cpu"))
        it2 = iter(range(warm, len(batches)))

        def naive_step() -> None:
            i = next(it2)
            naive.update(batches[i], np.arange(i * b, (i + 1) * b))

        t_naive = median_time(naive_step, max(1, min(reps, 3)), torch.device("cpu"))
        rows.append(("top-k maintenance (merge only, CPU)", f"{name} B={b} C={c} k={args.k}", t_merge,
                     f"{fmt_time(t_naive)} naive topk+list", f"{t_naive / t_merge:.0f}x"))

    # overhead over the conv layer that produces this output
    if not args.no_conv:
        conv = nn.Sequential(nn.Conv2d(c_in, c, 3, padding=1), nn.ReLU()).to(device=device, dtype=dtype)
        conv = conv.to(memory_format=mem)
        inp = torch.randn(b, c_in, h, w, generator=gen).to(device=device, dtype=dtype).contiguous(memory_format=mem)
        with torch.inference_mode():
            t_conv = median_time(lambda: conv(inp), max(1, min(reps, 3)), device)
        rows.append(("overhead: update / conv3x3+ReLU forward", size, t_fast, f"{fmt_time(t_conv)} conv forward",
                     f"+{100 * t_fast / t_conv:.1f}%"))


def vgg16_features() -> nn.Sequential:
    layers: list[nn.Module] = []
    c_in = 3
    for v in VGG16_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(c_in, int(v), 3, padding=1), nn.ReLU(inplace=True)]
            c_in = int(v)
    return nn.Sequential(*layers)


def e2e_rows(args, device: torch.device, backend: str, rows: list) -> None:
    """Whole VGG16 forward with all 13 conv outputs folded into states, vs the plain forward.

    On the CPU the time spent inside the hooks is clocked directly (robust against the noise of
    two separate forward timings on a shared machine); on CUDA the overhead is hooked - plain.
    """
    b, r = args.e2e_batch, args.e2e_resolution
    dtype = DTYPES[args.dtype]
    mem = torch.channels_last if args.channels_last else torch.contiguous_format
    model = vgg16_features().to(device=device, dtype=dtype).to(memory_format=mem).eval()
    convs = [m for m in model if isinstance(m, nn.Conv2d)]
    reps = max(1, args.e2e_repeats)
    n_images = b * (reps + 1)
    x = torch.randn(b, 3, r, r).to(device=device, dtype=dtype).contiguous(memory_format=mem)
    states = [K.new_state(m.out_channels, args.k, n_images, args.k_i, device=device) for m in convs]
    current = {"ids": torch.arange(b), "in_hooks": 0.0}
    clock = time.process_time if CLOCK["name"] == "cpu" else time.perf_counter

    def hook_for(state):
        def hook(_module, _inp, out):
            t0 = clock()
            K.update(state, out, current["ids"], backend=backend)
            current["in_hooks"] += clock() - t0
        return hook

    def hooks_on() -> list:
        return [m.register_forward_hook(hook_for(s)) for m, s in zip(convs, states)]

    plain, hooked, in_hooks = [], [], []
    with torch.inference_mode():
        model(x)  # warm-up (allocator, JIT of the kernels for each layer's shape)
        handles = hooks_on()
        model(x)
        for hd in handles:
            hd.remove()
        # plain and hooked runs alternate so that drifting machine load hits both alike
        for i in range(1, reps + 1):
            plain.append(median_time(lambda: model(x), 1, device, warmup=0))
            current["ids"] = torch.arange(i * b, (i + 1) * b)
            current["in_hooks"] = 0.0
            handles = hooks_on()
            try:
                hooked.append(median_time(lambda: model(x), 1, device, warmup=0))
            finally:
                for hd in handles:
                    hd.remove()
            in_hooks.append(current["in_hooks"])
    t_plain, t_hooked = statistics.median(plain), statistics.median(hooked)
    size = f"VGG16 13 convs {b}x3x{r}x{r} {args.dtype}{' NHWC' if args.channels_last else ''}"
    if device.type == "cuda":
        rows.append(("vgg16: hooked - plain forward", size, t_hooked - t_plain, f"{fmt_time(t_plain)} plain forward",
                     f"{100 * (t_hooked - t_plain) / t_plain:+.1f}%"))
    else:
        t_in = statistics.median(in_hooks)
        rows.append(("vgg16: stimuli work in the 13 hooks", size, t_in, f"{fmt_time(t_plain)} plain forward",
                     f"+{100 * t_in / t_plain:.1f}%"))
        rows.append(("vgg16: hooked forward (total)", size, t_hooked, f"{fmt_time(t_plain)} plain forward",
                     f"{100 * (t_hooked - t_plain) / t_plain:+.1f}%"))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small shapes, few repeats (a minute or so)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 64; quick 16)")
    p.add_argument("--resolution", type=int, default=None, help="input resolution (default 224; quick 112)")
    p.add_argument("--layers", default=None,
                   help="comma-separated VGG16 conv names (default conv1_2,conv2_2,conv3_3,conv4_3,conv5_3)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per row (default 5; quick 3)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--k-i", dest="k_i", type=int, default=5)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--backend", default="auto", help="fast backend: auto | cpu | triton")
    p.add_argument("--threads", type=int, default=None, help="torch and numba CPU threads (default: all)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall time, or process CPU time (use with --threads 1 on a busy shared machine)")
    p.add_argument("--no-naive", action="store_true", help="skip the (slow) naive top-k baseline")
    p.add_argument("--warm-batches", type=int, default=20,
                   help="batches folded into the top-k states before the maintenance rows are timed")
    p.add_argument("--no-conv", action="store_true", help="skip the per-layer conv forward rows")
    p.add_argument("--no-e2e", action="store_true", help="skip the whole-VGG16 overhead row")
    p.add_argument("--e2e-batch", type=int, default=None, help="VGG16 row batch (default 16; quick 4)")
    p.add_argument("--e2e-resolution", type=int, default=None, help="VGG16 row resolution (default 112; quick 64)")
    p.add_argument("--e2e-repeats", type=int, default=None, help="VGG16 row timed pairs (default 5; quick 3)")
    args = p.parse_args(argv)
    q = args.quick
    args.batch = args.batch or (16 if q else 64)
    args.resolution = args.resolution or (112 if q else 224)
    args.repeats = args.repeats or (3 if q else 5)
    args.e2e_batch = args.e2e_batch or (4 if q else 16)
    args.e2e_resolution = args.e2e_resolution or (64 if q else 112)
    args.e2e_repeats = args.e2e_repeats or (3 if q else 5)
    layers = (args.layers or ("conv1_2,conv3_3,conv5_3" if q else "conv1_2,conv2_2,conv3_3,conv4_3,conv5_3")).split(",")
    unknown = [n for n in layers if n not in VGG16_CONVS]
    if unknown:
        p.error(f"unknown layers {unknown}; choose from {list(VGG16_CONVS)}")

    CLOCK["name"] = args.clock
    if args.threads:
        torch.set_num_threads(args.threads)
        cpu_topk.numba.set_num_threads(args.threads)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    backend = K.resolve_backend(device, args.backend)
    if backend == "cpu":
        cpu_topk.warmup()  # JIT / cache load outside the timings

    device_line = device_name(device)  # before the work: it records the machine's load average
    rows: list[tuple] = []
    for name in layers:
        layer_rows(name, args, device, backend, rows)
        print(f"  done {name}", file=sys.stderr, flush=True)
    if not args.no_e2e:
        e2e_rows(args, device, backend, rows)

    print(f"\nDevice: {device_line}")
    print(f"Fast backend: {backend}; k={args.k}, k_i={args.k_i}; {args.clock} clock; medians of {args.repeats} runs "
          f"(naive baseline and conv forward: up to 3; VGG16 row: {args.e2e_repeats})\n")
    header = ("stage", "size", "this engine", "baseline", "ratio")
    table = [header] + [(s, z, fmt_time(t), bl, r) for s, z, t, bl, r in rows]
    widths = [max(len(str(row[i])) for row in table) for i in range(5)]
    for i, row in enumerate(table):
        print("| " + " | ".join(str(v).ljust(widths[j]) for j, v in enumerate(row)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (wd + 2) for wd in widths) + "|")


if __name__ == "__main__":
    main()
