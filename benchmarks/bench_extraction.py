"""Stimulus extraction (Step 1.1) against plain inference of the same models over the same data.

The engine's pass (one loader, every checkpoint fed each batch, hooks folding each chosen layer
into the running top-k) is timed against the same loop with no hooks: each batch loaded once and
run through every checkpoint's model in ``torch.inference_mode``. Built-in ``vgg_small`` on the
built-in data (random images if the data module is missing), several random checkpoints, every
Conv2d layer, k=10, k_i=5. The overhead is split into its parts by timing intermediate loops:

    forward to the last chosen layer   the engine stops there (no classifier head)
    + no-op hooks                      Python hook dispatch
    + spatial max only                 reading every activation map once (kernels.spatial_max)
    engine pass                        + per-channel top-k merge + per-image responsive rows
                                       (models prepared once and reused, like the baseline's)
    extract_stimuli call               the whole call: + setup (factory model and its probe
                                       forward, fresh model copies), host copies of the result

``--clock cpu --threads 1`` times this process's CPU time on one thread: on a machine shared with
other jobs it measures the work done rather than the waiting. Repeats are interleaved (one run of
every variant per round) and the table shows medians with the spread (min..max).

    python benchmarks/bench_extraction.py [--images 1200] [--checkpoints 3] [--repeats 5]
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import os
import statistics
import sys
import time
from dataclasses import replace

import torch

from _common import machine_line  # benchmarks/ is sys.path[0] when a script is run

clock = time.perf_counter


def _device_name() -> str:
    return machine_line(None, f"torch threads {torch.get_num_threads()}")


def _dataset(n: int, seed: int):
    try:
        from conceptevo.data import builtin_dataset

        ds = builtin_dataset("train", seed=seed, num_images=n, root=os.environ.get("CONCEPTEVO_DATA_CACHE"))
        return ds, "built-in concept data 32x32"
    except ImportError:
        from conceptevo.data import tensor_dataset

        g = torch.Generator().manual_seed(seed)
        imgs = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
        return tensor_dataset(imgs, torch.zeros(n, dtype=torch.int64)), "random images 32x32"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=1200)
    p.add_argument("--checkpoints", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    p.add_argument("--backend", default="auto")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--k-i", type=int, default=5)
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall: perf_counter; cpu: this process's CPU time (stable on a shared machine with --threads 1)")
    args = p.parse_args(argv)
    global clock
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    if args.threads:
        torch.set_num_threads(args.threads)

    from conceptevo import kernels
    from conceptevo.adapter import ModelAdapter
    from conceptevo.data import indexed_loader
    from conceptevo.models import build_model
    from conceptevo.stimuli import Extraction, StimulusOptions, choose_backend, extract_stimuli

    ds, data_name = _dataset(args.images, seed=0)
    states = []
    for s in range(args.checkpoints):
        torch.manual_seed(1000 + s)
        states.append(build_model("vgg_small").state_dict())
    factory = lambda: build_model("vgg_small")  # noqa: E731
    models = []
    for sd in states:
        m = factory()
        m.load_state_dict(sd)
        models.append(m.eval())
    adapters = [ModelAdapter(m, input_shape=(3, 32, 32)) for m in models]
    layers = adapters[0].layer_names
    backend = choose_backend(torch.device("cpu"), args.backend)
    with contextlib.suppress(Exception):
        from conceptevo.kernels import cpu_topk

        cpu_topk.warmup()
    if args.threads:  # Numba's OpenMP layer resets torch's thread count on its first parallel call
        torch.set_num_threads(args.threads)
    with contextlib.suppress(ImportError):  # the hook-only loops use the kernels as the engine does
        import numba

        numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))

    class Stop(Exception):
        pass

    # vgg_small's features are a Sequential: its prefix up to the last conv is what the engine runs
    last = list(models[0].features._modules).index(layers[-1].split(".", 1)[1])
    prefixes = [torch.nn.Sequential(*list(m.features.children())[: last + 1]) for m in models]

    def loop(hook=None, truncated=False):
        """The baseline loop; with ``hook``, hooks on every conv and a stop after the last one."""
        nets = prefixes if truncated else models
        t0 = clock()
        with torch.inference_mode(), contextlib.ExitStack() as stack:
            fired = set()

            def wrapped(name, out):
                hook(name, out)
                fired.add(name)
                if len(fired) == len(layers):
                    raise Stop

            if hook is not None:
                for a in adapters:
                    stack.enter_context(a.hooks(wrapped))
            for ids, x, _ in indexed_loader(ds, args.batch_size):
                for m in nets:
                    fired.clear()
                    try:
                        m(x)
                    except Stop:
                        pass
        return clock() - t0

    def no_hook(name, out):
        return None

    def max_only(name, out):
        kernels.spatial_max(out, backend=backend)

    # The pass alone reuses one plan and its models across repeats, as the baseline reuses its
    # models; the extract_stimuli row is the whole call (setup, fresh model copies, results).
    plans = {}

    options = StimulusOptions(k=args.k, k_i=args.k_i, batch_size=args.batch_size, backend=args.backend,
                              progress=False)

    def engine_pass(kernel_backend=args.backend):
        if kernel_backend not in plans:
            plan = Extraction(factory, states, ds, options=replace(options, backend=kernel_backend))
            plans[kernel_backend] = (plan, plan.prepare_models(plan.checkpoints))
        plan, prepared = plans[kernel_backend]
        t0 = clock()
        plan.run_shard(plan.checkpoints, progress=False, prepared=prepared)
        return clock() - t0

    def whole_call():
        t0 = clock()
        extract_stimuli(factory, states, ds, options=options)
        return clock() - t0

    def reference_pass():
        return engine_pass("reference")

    variants = {
        "plain inference (baseline)": lambda: loop(None),
        "forward to last conv, no hooks": lambda: loop(truncated=True),
        "+ no-op hooks": lambda: loop(no_hook),
        "+ spatial max only": lambda: loop(max_only),
        f"engine pass ({backend})": engine_pass,
        "engine pass (reference kernels)": reference_pass,
        "extract_stimuli call": whole_call,
    }
    # warm up every variant once (JIT, allocator, caches)
    for fn in variants.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            gc.collect()  # no collection of an earlier variant's garbage inside a timed region
            gc.disable()
            try:
                times[name].append(fn())
            finally:
                gc.enable()
    base = statistics.median(times["plain inference (baseline)"])
    n_img = len(ds) * len(states)
    print(f"device: {_device_name()}")
    print(f"data: {data_name}, {len(ds)} images; vgg_small x {len(states)} checkpoints; "
          f"{len(layers)} conv layers ({adapters[0].num_neurons} neurons); k={args.k}, k_i={args.k_i}, "
          f"batch {args.batch_size}; {args.clock} time, medians of {args.repeats} interleaved runs "
          "(shared machine: see spread)")
    print(f"{'stage':<34} {'size':>16} {'this engine s':>14} {'baseline s':>11} {'ratio':>7} {'overhead':>9} "
          f"{'spread s':>15}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<34} {f'{n_img} img-passes':>16} {med:>14.3f} {base:>11.3f} {med / base:>7.3f} "
              f"{100 * (med / base - 1):>8.1f}% {f'{min(ts):.2f}..{max(ts):.2f}':>15}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
