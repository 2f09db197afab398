"""Live monitor overhead: the built-in well_trained run trained with and without a Monitor.

Settings: :data:`conceptevo.train.REGIMES` ``["well_trained"]`` on the built-in data (9,600 train /
1,600 test images, 12 epochs), the monitor at its defaults observing every epoch (epoch 0 too).
Its probe, as in ``train_regimes(monitor=True)``: ``--probe eval`` (default) -- the trainer's
evaluation images (its 1,000-image train-accuracy sample, then the 1,600 test images), the
monitor riding the trainer's evaluation forward (``Monitor.riding``); ``--probe N`` -- the first N
training images, through the monitor's own forward (the earlier default, N = 2,000). The plain
and the monitored run start from the same initial weights and seed and alternate ``--repeats``
times (the machine's drift hits both alike); the weights at the end are compared bitwise (the
monitor must not change the training). Numba / import warm-up is done first (a throwaway monitor
on a tiny model).

Reported: wall time of each run and the overhead ``monitored / plain - 1`` (median over the
repeats, and each pair); the same overhead measured inside the monitored runs (monitor seconds /
the rest of the run); and per monitor call, the median seconds of each stage (checkpoint,
stimuli, space, layout, diagnostics, logs; riding: ``stimuli`` is the top-k work done in the
hooks during the trainer's pass).

    python benchmarks/bench_monitor.py --threads 1 --repeats 2   # full size, the demo's 1 thread per run
    python benchmarks/bench_monitor.py --probe 2000              # the monitor's own forward on 2,000 images
    python benchmarks/bench_monitor.py --quick                   # 600 images, 2 epochs
    python benchmarks/bench_monitor.py --regimes                 # when each alert fires on the three regimes
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from conceptevo.data import builtin_dataset
from conceptevo.models import build_model
from conceptevo.monitor import Monitor
from conceptevo.train import REGIMES, train_run

from _common import machine_line  # benchmarks/ is sys.path[0] when a script is run

STAGES = ("checkpoint", "stimuli", "space", "layout", "diagnostics", "logs")


def warm_up(tmp: Path) -> None:
    ds = builtin_dataset("test", seed=9, num_images=32)
    m = build_model("vgg_small", num_classes=ds.num_classes, channels=(4, 8, 8, 8), hidden=16)
    m = m.to(memory_format=torch.channels_last)  # as the trainer's model: Numba compiles per layout
    mon = Monitor(m, ds, out=tmp / "warm", k=5, k_i=3, tensorboard=False)
    for e in range(3):
        mon.epoch_end(e)
    mon.close()


def regimes(args) -> None:
    """Train the built-in regimes with a Monitor each; print every alert with its epoch and accuracies."""
    from conceptevo.train import train_regimes  # noqa: F401  (the settings are REGIMES)

    n_train = args.train_images
    train = builtin_dataset("train", seed=args.seed, root=args.data_root, num_images=n_train)
    test = builtin_dataset("test", seed=args.seed, root=args.data_root)
    probe = train.subset(np.arange(min(2000 if args.probe == "eval" else int(args.probe), len(train))))
    root = Path(args.out or tempfile.mkdtemp())
    for name in args.regime_names.split(","):
        cfg = dict(REGIMES[name])
        if "train_subset" in cfg and n_train is not None:
            cfg["train_subset"] = max(1, round(cfg["train_subset"] * len(train) / 6000))
        model_name = cfg.pop("model_name")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed)
            kw = {"dropout": cfg.pop("dropout")} if "dropout" in cfg else {}
            net = build_model(model_name, num_classes=train.num_classes, **kw)
        mon = Monitor(net, probe, out=root / name / "monitor", layout=args.layout, resume=False)
        t = time.perf_counter()
        train_run(root / name, model_name, train, test, seed=args.seed, model=net, monitor=mon, progress=False,
                  resume=False, overwrite=True, **cfg)
        tab = mon.table
        print(f"\n{name} ({len(train)} train images, probe {len(probe)}, layout {args.layout}; "
              f"{time.perf_counter() - t:.0f} s)")
        print(tab[["epoch", "train_top1", "test_top1", "diversity", "movement", "alerts"]].to_string(index=False))
        for a in mon.alerts:
            print(f"  ALERT {a.kind} at epoch {a.epoch} (margin {a.margin:.3f}): {a.message}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--train-images", type=int, default=None)
    ap.add_argument("--probe", default="eval", help="'eval' (ride the trainer's evaluation pass) or a number")
    ap.add_argument("--repeats", type=int, default=1, help="plain / monitored pairs, alternating")
    ap.add_argument("--layout", default="pca")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--out", default=None, help="keep the runs here (default: a temporary folder)")
    ap.add_argument("--regimes", action="store_true", help="alerts on the built-in regimes instead")
    ap.add_argument("--regime-names", default="high_lr,well_trained,overfit")
    args = ap.parse_args()
    if args.regimes:
        if args.threads:
            torch.set_num_threads(args.threads)
        regimes(args)
        return
    n_train = args.train_images or (600 if args.quick else None)
    riding = args.probe == "eval"
    probe_n = None if riding else int(args.probe)
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = dict(REGIMES["well_trained"])
    if args.epochs or args.quick:
        cfg["epochs"] = args.epochs or 2
        cfg["warmup_epochs"] = min(cfg.get("warmup_epochs", 0), cfg["epochs"])
        cfg["save_epochs"] = [e for e in cfg["save_epochs"] if e <= cfg["epochs"]]
    model_name = cfg.pop("model_name")
    train = builtin_dataset("train", seed=args.seed, root=args.data_root, num_images=n_train)
    test = builtin_dataset("test", seed=args.seed, root=args.data_root)

    def fresh_model():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed)
            return build_model(model_name, num_classes=train.num_classes, dropout=cfg["dropout"])

    plains, watcheds, per_call, inside_totals, sames = [], [], [], [], []
    with tempfile.TemporaryDirectory() as td:
        root = Path(args.out) if args.out else Path(td)
        warm_up(root)
        kw = {k: v for k, v in cfg.items() if k != "dropout"}
        for rep in range(args.repeats):
            m0 = fresh_model()
            t = time.perf_counter()
            train_run(root / "plain", model_name, train, test, seed=args.seed, model=m0, progress=False,
                      resume=False, overwrite=True, **kw)
            plains.append(time.perf_counter() - t)

            m1 = fresh_model()
            built = []
            if riding:
                def factory(net, resume, probe, built=built):
                    built.append(Monitor(net, probe, out=root / "mon", layout=args.layout, resume=False))
                    return built[-1]
                watch = factory
            else:
                watch = Monitor(m1, train.subset(np.arange(min(probe_n, len(train)))), out=root / "mon",
                                layout=args.layout, resume=False)
                built.append(watch)
            t = time.perf_counter()
            train_run(root / "watched", model_name, train, test, seed=args.seed, model=m1, monitor=watch,
                      progress=False, resume=False, overwrite=True, **kw)
            watcheds.append(time.perf_counter() - t)
            mon = built[-1]
            mon.close()
            calls = [e["seconds"] for e in mon.entries]
            per_call += calls
            inside_totals.append(sum(sum(s.values()) for s in calls))
            sames.append(all(torch.equal(a, b) for a, b in zip(m0.state_dict().values(), m1.state_dict().values())))
            print(f"repeat {rep}: plain {plains[-1]:.1f} s, monitored {watcheds[-1]:.1f} s "
                  f"({watcheds[-1] / plains[-1] - 1:+.1%})", flush=True)
        import pandas as pd

        secs = pd.read_parquet(root / "plain" / "log.parquet")["seconds"].to_numpy()
        epoch_plain = float(np.median(np.diff(secs)))  # one epoch: training + the trainer's own evaluation
        n_probe = len(mon.probe)
        alerts = [(a.kind, a.epoch) for a in mon.alerts]
    same = all(sames)
    plain, watched = statistics.median(plains), statistics.median(watcheds)
    mon_total = statistics.median(inside_totals)
    n_calls = len(per_call) // args.repeats

    dev = machine_line(None, f"torch threads {torch.get_num_threads()}")
    how = "riding the trainer's evaluation pass" if riding else "its own forward"
    print(f"\nmonitor overhead -- well_trained ({len(train)} train images, {cfg['epochs']} epochs), "
          f"probe {n_probe} images ({how}), every epoch, layout {args.layout}; {args.repeats} pair(s); {dev}")
    print(f"{'stage':<28}{'size':<26}{'seconds':>10}{'share of training':>20}")
    rows = [("training, no monitor", f"{cfg['epochs']} epochs, median", plain, None),
            ("training + monitor", f"{n_calls} calls, median", watched, watched / plain - 1)]
    for name, size, sec, share in rows:
        print(f"{name:<28}{size:<26}{sec:>10.2f}{'' if share is None else f'{share:+.1%}':>20}")
    pairs = ", ".join(f"{w / p - 1:+.1%}" for p, w in zip(plains, watcheds))
    print(f"{'  each pair':<28}{pairs}")
    inside = mon_total / max(1e-9, watched - mon_total)
    print(f"{'monitor (inside the run)':<28}{f'{n_calls} calls, median':<26}{mon_total:>10.2f}{f'{inside:+.1%}':>20}")
    for st in STAGES:
        vals = [s.get(st, 0.0) for s in per_call]
        med = statistics.median(vals)
        print(f"{'  per call: ' + st:<28}{'median (max ' + f'{max(vals):.3f}' + ')':<26}{med:>10.3f}"
              f"{med * n_calls / max(1e-9, watched - mon_total):>+20.1%}")
    total_med = statistics.median([sum(s.values()) for s in per_call])
    print(f"{'  per call: total':<28}{'median':<26}{total_med:>10.3f}")
    print(f"{'epoch, no monitor':<28}{'median':<26}{epoch_plain:>10.2f}"
          f"{f'{total_med / epoch_plain:+.1%}':>20}  (one monitor call per epoch)")
    print(f"weights bitwise equal with and without the monitor: {same}; alerts: {alerts or 'none'}")


if __name__ == "__main__":
    main()
