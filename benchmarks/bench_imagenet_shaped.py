"""ImageNet-shaped stimulus pass: synthetic 224x224 images through VGG16 and a ResNet-50.

Random weights, several checkpoints of each architecture, every Conv2d layer, k=10, k_i=5. For
each model: images/s of the whole stimulus pass (:func:`conceptevo.stimuli.extract_stimuli`, all
checkpoints in one pass), the same loop as plain inference (each batch through every checkpoint,
no hooks) and the overhead; peak memory (process RSS high-water mark, and on a GPU
``torch.cuda.max_memory_allocated`` per variant); the memory of the running stimulus state; and
the time and state memory extrapolated to 128,000 and 1,280,000 images (linear in the images).

torchvision's ``vgg16`` / ``resnet50`` are used when torchvision imports; otherwise equivalent
stacks defined below (same layers and shapes: VGG16 = 13 convs + 3 Linear, ResNet-50 =
bottleneck blocks [3, 4, 6, 3] with batch norm, 53 convs).

    python benchmarks/bench_imagenet_shaped.py --images 16            # CPU: small count
    python benchmarks/bench_imagenet_shaped.py --images 2048 --device cuda --batch-size 128
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import resource
import statistics
import sys
import time

import torch
from torch import nn

from _common import machine_line  # benchmarks/ is sys.path[0] when a script is run


# ------------------------------------------------------------------------------- models
def vgg16_like(num_classes: int = 1000) -> nn.Module:
    """VGG16 (configuration D): 13 3x3 convs with ReLU, 5 max-pools, 7x7 avg-pool, 3 Linear."""
    cfg = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
    layers, c = [], 3
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU(inplace=True)]
            c = v
    model = nn.Sequential()
    model.add_module("features", nn.Sequential(*layers))
    model.add_module("avgpool", nn.AdaptiveAvgPool2d(7))
    model.add_module("flatten", nn.Flatten())
    model.add_module("classifier", nn.Sequential(
        nn.Linear(512 * 7 * 7, 4096), nn.ReLU(inplace=True), nn.Dropout(),
        nn.Linear(4096, 4096), nn.ReLU(inplace=True), nn.Dropout(), nn.Linear(4096, num_classes)))
    return model


class _Bottleneck(nn.Module):
    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        cout = width * 4
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        idt = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + idt)


class ResNet50Like(nn.Module):
    """ResNet-50: 7x7 stem, bottleneck stages [3, 4, 6, 3] of widths 64..512 (x4 out), avg-pool, fc."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        cin, stages = 64, []
        for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            seq = []
            for b in range(blocks):
                seq.append(_Bottleneck(cin, width, stride if b == 0 else 1))
                cin = width * 4
            stages.append(nn.Sequential(*seq))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2048, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _factories() -> dict[str, tuple[str, callable]]:
    try:
        import torchvision.models as tvm

        return {"vgg16": ("torchvision vgg16", lambda: tvm.vgg16(weights=None)),
                "resnet50": ("torchvision resnet50", lambda: tvm.resnet50(weights=None))}
    except ImportError:
        return {"vgg16": ("VGG16 (defined here)", vgg16_like), "resnet50": ("ResNet-50 (defined here)", ResNet50Like)}


# ------------------------------------------------------------------------------ helpers
def _device_name(device: torch.device) -> str:
    return machine_line(device, f"torch threads {torch.get_num_threads()}")


def _rss_mib() -> float:
    """High-water mark of this process's resident memory (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def _fmt_time(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=0, help="images per pass (default: 16 on CPU, 2048 on GPU)")
    p.add_argument("--checkpoints", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=0, help="default: 8 on CPU, 128 on GPU")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--models", default="vgg16,resnet50")
    p.add_argument("--amp", action="store_true", help="also time the pass under autocast (bf16/fp16)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--k-i", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="cpu: this process's CPU time (CPU runs on a shared machine, with --threads 1)")
    args = p.parse_args(argv)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    if args.threads:
        torch.set_num_threads(args.threads)

    from conceptevo.adapter import ModelAdapter
    from conceptevo.data import indexed_loader, tensor_dataset
    from conceptevo.stimuli import Extraction, choose_backend

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    gpu = device.type == "cuda"
    n_img = args.images or (2048 if gpu else 16)
    bs = args.batch_size or (128 if gpu else 8)
    g = torch.Generator().manual_seed(0)
    ds = tensor_dataset(torch.randint(0, 256, (n_img, 3, 224, 224), generator=g, dtype=torch.uint8),
                        torch.zeros(n_img, dtype=torch.int64))
    backend = choose_backend(device, "auto")
    with contextlib.suppress(Exception):
        if backend == "cpu":
            from conceptevo.kernels import cpu_topk

            threads = torch.get_num_threads()
            cpu_topk.warmup()
            torch.set_num_threads(threads)  # Numba's OpenMP layer may have changed it

    print(f"device: {_device_name(device)}; top-k backend: {backend}")
    print(f"{n_img} synthetic 224x224 images, batch {bs}, {args.checkpoints} random checkpoints per model, "
          f"k={args.k}, k_i={args.k_i}, every Conv2d; {args.clock}-time medians of {args.repeats} runs")
    header = (f"{'stage':<34} {'size':>18} {'this engine':>12} {'baseline':>10} {'ratio':>6} {'img/s':>8} "
              f"{'peak mem MiB':>13}")
    rows, notes = [], []
    for key in [m.strip() for m in args.models.split(",") if m.strip()]:
        label, factory = _factories()[key]
        states = []
        for s in range(args.checkpoints):
            torch.manual_seed(s)
            states.append(factory().state_dict())
        models = []
        for sd in states:
            m = factory()
            m.load_state_dict(sd)
            models.append(m.to(device).eval())
        adapter = ModelAdapter(factory(), input_shape=(3, 224, 224))
        n_layers, n_neurons = len(adapter.layer_names), adapter.num_neurons

        def plain() -> float:
            _sync(device)
            t0 = clock()
            with torch.inference_mode():
                for _, x, _ in indexed_loader(ds, bs):
                    x = x.to(device, non_blocking=True)
                    for m in models:
                        m(x)
            _sync(device)
            return clock() - t0

        setup_times: list[float] = []
        plans: dict[bool, tuple] = {}

        def engine(amp: bool = False) -> float:
            """The stimulus pass (hooks, kernels, host copies of the result) over prepared models.

            The setup -- one factory model and its probe forward, checking the checkpoints and
            copying them into one model each -- is paid once per call whatever the number of
            images; it is timed once, apart, and the pass reuses its models across repeats, as
            the baseline reuses its models (freshly allocated weights run a few percent slower
            on their first passes on the CPU, which would otherwise be charged to the engine).
            """
            if amp not in plans:
                t0 = clock()
                plan = Extraction(factory, states, ds, k=args.k, k_i=args.k_i, batch_size=bs, device=device,
                                  amp=amp)
                prepared = plan.prepare_models(plan.checkpoints)
                _sync(device)
                setup_times.append(clock() - t0)
                plans[amp] = (plan, prepared)
            plan, prepared = plans[amp]
            _sync(device)
            t1 = clock()
            out = plan.run_shard(plan.checkpoints, progress=False, prepared=prepared)
            [plan.to_stimuli(spec, st) for spec, st in zip(plan.checkpoints, out)]
            _sync(device)
            return clock() - t1

        variants = {"plain inference": plain, "stimulus pass": engine}
        if args.amp:
            variants["stimulus pass, amp"] = lambda: engine(True)
        times = {k: [] for k in variants}
        peaks = {}
        for name, fn in variants.items():  # warm-up + peak memory per variant
            gc.collect()
            if gpu:
                torch.cuda.reset_peak_memory_stats(device)
            fn()
            peaks[name] = (torch.cuda.max_memory_allocated(device) / 2**20) if gpu else _rss_mib()
        for _ in range(args.repeats):
            for name, fn in variants.items():
                gc.collect()
                times[name].append(fn())
        base = statistics.median(times["plain inference"])
        for name, ts in times.items():
            med = statistics.median(ts)
            rows.append(f"{f'{label}: {name}':<34} {f'{n_img} img x {len(states)} ck':>18} {med:>11.2f}s "
                        f"{base:>9.2f}s {med / base:>6.3f} {n_img / med:>8.2f} {peaks[name]:>13.0f}")
        per_image = statistics.median(times["stimulus pass"]) / n_img
        setup = setup_times[0]
        state_bytes = lambda n: len(states) * (n_neurons * args.k * 20 + n * n_layers * args.k_i * 8)  # noqa: E731
        notes.append(
            f"{label}: {n_layers} conv layers, {n_neurons} neurons; setup {setup:.1f} s per call; stimulus pass "
            f"of {len(states)} checkpoints extrapolated: 128,000 images {_fmt_time(setup + per_image * 128_000)}, "
            f"1,280,000 images {_fmt_time(setup + per_image * 1_280_000)}; running state {state_bytes(n_img) / 2**20:.1f} MiB now, "
            f"{state_bytes(128_000) / 2**20:.0f} MiB / {state_bytes(1_280_000) / 2**30:.2f} GiB at 128k / 1.28M "
            f"images (responsive rows: images x layers x k_i)")
        models, states, plans = [], [], {}  # free this model's copies before the next
        gc.collect()
    print(header)
    for r in rows:
        print(r)
    print("peak mem: " + ("torch.cuda.max_memory_allocated of the variant" if gpu else
                          "process RSS high-water mark so far (grows with each variant; compare the increase)"))
    for n in notes:
        print(n)
    return 0


if __name__ == "__main__":
    sys.exit(main())
