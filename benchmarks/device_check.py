"""Every GPU verification of the engine in one call (one process, under 8 minutes on one H100/H200).

    python benchmarks/device_check.py [--out DIR] [--budget-s 450]

Checks, in order (each one is timed; one that raises is an error):

* ``environment``          -- torch, CUDA devices, triton / faiss-gpu / cuML, the backends picked.
* ``triton vs reference``  -- the compiled Triton kernel against the plain-PyTorch reference on
  VGG-sized random maps (ties, channels-last, float32 / float16 / bfloat16), bit for bit, and a
  streamed top-k state; then the CUDA cases of ``tests/test_kernels_triton.py`` (pytest, counted).
* ``bench_topk``           -- ``benchmarks/bench_topk.py`` on CUDA: the bandwidth ratio (kernel read
  rate / device copy) and the per-layer and whole-VGG16 extraction overhead rows.
* ``extraction overhead``  -- those overhead rows (hooked forward / plain forward) on CUDA.
* ``imagenet-shaped``      -- ``benchmarks/bench_imagenet_shaped.py`` on CUDA (224x224, VGG16 and
  ResNet-50): throughput and overhead of the stimulus pass.
* ``solve cuda vs cpu``    -- the image-embedding solve with torch on CUDA against the CPU default at
  VGG16 scale (``benchmarks/bench_image_embedding.py``'s stimuli): same vectors, both times.
* ``faiss-gpu``            -- the backend selection, and exact (flat) kNN on the GPU against
  faiss-cpu: the same neighbours and distances.
* ``cuml``                 -- the backend selection, and cuML UMAP against umap-learn on clustered
  data (both must keep the clusters apart).
* ``nccl 2 ranks``         -- with 2+ GPUs: ``torchrun -m conceptevo.distributed`` over NCCL equals a
  single-process extraction.

Writes ``device_check.json`` (every figure and table) and ``device_check.md`` (one table) in
``--out``, prints the table, and exits 1 when any check gave a wrong result or failed to run.
On a machine without CUDA every GPU check is skipped with its reason, and it exits 0.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT / "benchmarks", ROOT / "tests"):  # reuse the benchmarks' and tests' own functions
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))


class Skip(Exception):
    """The check cannot run here (no CUDA, a library missing, one GPU only...): not a failure."""


@dataclass
class Check:
    name: str
    status: str = "ok"  # ok | FAIL (a wrong result) | error (it raised) | skipped
    seconds: float = 0.0
    summary: str = ""
    details: dict = field(default_factory=dict)


@dataclass
class Context:
    out: Path
    budget_s: float
    started: float = field(default_factory=time.perf_counter)
    shared: dict = field(default_factory=dict)  # results one check hands to another

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.started)


def _cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        raise Skip("no CUDA device")


def _captured(fn: Callable[[], object]) -> tuple[object, str]:
    """Run a benchmark's ``main`` and keep what it prints (it is also echoed to stderr)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        out = fn()
    text = buf.getvalue()
    sys.stderr.write(text)
    return out, text


# --------------------------------------------------------------------------------------- checks
def check_environment(ctx: Context) -> tuple[bool, str, dict]:
    import torch

    from conceptevo import backends

    info: dict = {"python": platform.python_version(), "torch": torch.__version__,
                  "cuda_build": torch.version.cuda, "devices": []}
    if torch.cuda.is_available():
        info["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    for mod in ("triton", "faiss", "cuml"):
        try:
            m = __import__(mod)
            info[mod] = getattr(m, "__version__", "present")
        except Exception as exc:  # noqa: BLE001 - any import failure means "not usable here"
            info[mod] = f"not importable ({type(exc).__name__})"
    info["backends"] = backends.report()
    gpus = ", ".join(info["devices"]) or "none"
    return True, f"GPUs: {gpus}; backends {info['backends']}", info


def check_triton(ctx: Context) -> tuple[bool, str, dict]:
    _cuda()
    import numpy as np
    import torch

    from conceptevo import kernels as K
    from conceptevo.kernels import reference, triton_topk

    if triton_topk.available() is not None:
        raise Skip(f"triton unusable: {triton_topk.available()}")
    from test_kernels import assert_same, layout, make_batches, random_maps, stream

    rng = np.random.default_rng(int(np.random.SeedSequence().entropy % 2**32))
    seed = int(rng.integers(2**31))
    rng = np.random.default_rng(seed)
    cases, bad = 0, []
    shapes = [(32, 64, 112, 112), (32, 256, 28, 28), (64, 512, 7, 7), (7, 37, 13, 11), (5, 3, 224, 224)]
    for shape in shapes:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for mem in ("contiguous", "channels_last"):
                x = layout(random_maps(rng, shape, "ties").to(dtype), mem).cuda()
                v, p, nan = triton_topk.spatial_max(x)
                rv, rp = reference.spatial_max(x)
                same = (not bool(nan) and torch.equal(v.float().view(torch.int32), rv.float().view(torch.int32))
                        and torch.equal(p.long(), rp.long()))
                cases += 1
                if not same:
                    bad.append(f"spatial_max {shape} {dtype} {mem}")
    n, c, k, k_i = 301, 48, 10, 5
    for hw, mem, dtype in [((14, 14), "channels_last", torch.float32), ((7, 9), "contiguous", torch.bfloat16)]:
        batches = make_batches(rng, n, c, hw, [64, 64, 64, 64, 45], "ties", dtype=dtype, mem=mem)
        want = stream("reference", batches, c, k, n, k_i)
        state = K.new_state(c, k, n, k_i, device="cuda")
        for x, ids in batches:
            K.update(state, x.cuda(), torch.from_numpy(ids), backend="triton")
        cases += 1
        try:
            assert_same(state.to("cpu"), want)
        except AssertionError as exc:
            bad.append(f"update stream {hw} {dtype} {mem}: {str(exc)[:200]}")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cuda",
                           str(ROOT / "tests" / "test_kernels_triton.py")], cwd=ROOT, capture_output=True, check=False,
                          text=True, timeout=max(60, int(min(300, ctx.left()))))
    passed = int(m.group(1)) if (m := re.search(r"(\d+) passed", proc.stdout)) else 0
    failed = int(m.group(1)) if (m := re.search(r"(\d+) failed", proc.stdout)) else 0
    if proc.returncode != 0 or failed or passed < 4:
        bad.append(f"pytest -k cuda: rc {proc.returncode}, {passed} passed, {failed} failed")
    details = {"seed": seed, "cases": cases, "mismatches": bad, "pytest_cuda_passed": passed,
               "pytest_tail": proc.stdout[-1500:]}
    summary = f"{cases} in-process cases (seed {seed}) + {passed} pytest CUDA cases; {len(bad)} mismatches"
    return not bad, summary, details


def check_bench_topk(ctx: Context) -> tuple[bool, str, dict]:
    _cuda()
    import bench_topk

    _, text = _captured(lambda: bench_topk.main(
        ["--device", "cuda", "--backend", "triton", "--no-naive", "--batch", "64", "--resolution", "224",
         "--layers", "conv1_2,conv3_3,conv5_3", "--repeats", "5", "--e2e-batch", "64",
         "--e2e-resolution", "224", "--e2e-repeats", "5"]))
    rows = [r for r in text.splitlines() if r.startswith("| ")]
    bandwidth = [r for r in rows if "bandwidth" in r]
    overhead = [r for r in rows if "overhead" in r or "vgg16" in r]
    ctx.shared["topk_overhead_rows"] = overhead
    ratios = [r.strip().strip("|").split("|")[-1].strip() for r in bandwidth]  # "0.83 (2500 GB/s)"
    return True, "bandwidth (read / copy): " + ("; ".join(ratios) or "see table"), \
        {"table": text, "bandwidth_rows": bandwidth, "overhead_rows": overhead}


def check_extraction_overhead(ctx: Context) -> tuple[bool, str, dict]:
    _cuda()
    rows = ctx.shared.get("topk_overhead_rows")
    if rows is None:
        raise Skip("bench_topk did not run")
    last = rows[-1].strip("| ").split("|") if rows else []
    return True, ("VGG16 hooked vs plain forward: " + last[-1].strip()) if last else "no overhead rows", \
        {"rows": rows}


def check_imagenet_shaped(ctx: Context) -> tuple[bool, str, dict]:
    _cuda()
    import bench_imagenet_shaped

    rc, text = _captured(lambda: bench_imagenet_shaped.main(
        ["--device", "cuda", "--images", "1024", "--batch-size", "128", "--repeats", "2"]))
    lines = [r for r in text.splitlines() if ":" in r and "img x" in r]
    return rc in (0, None), f"{len(lines)} rows (throughput and overhead per model)", \
        {"table": text, "rc": rc}


def check_solve(ctx: Context) -> tuple[bool, str, dict]:
    _cuda()
    import numpy as np
    from bench_image_embedding import VGG16_CHANNELS, synthetic_stimuli

    from conceptevo import image_embedding as ie
    from conceptevo import neuron_embedding, pairs

    n, k, num_images = sum(VGG16_CHANNELS), 10, 20_000
    stim = synthetic_stimuli(n, k, num_images, seed=0)
    vectors = neuron_embedding.train(pairs.build_pairs(stim, num_images, repeats=10, seed=0), n, dim=30, seed=0,
                                     progress=False).vectors
    ie.fit(stim[:50], vectors[:50], num_images, method="cg")  # Numba JIT / cache, outside the timing
    ie.fit(stim, vectors, num_images, backend="torch", device="cuda")  # CUDA context, kernels
    t = time.perf_counter()
    u_cpu, i_cpu = ie.fit(stim, vectors, num_images)
    t_cpu = time.perf_counter() - t
    t = time.perf_counter()
    u_gpu, i_gpu = ie.fit(stim, vectors, num_images, backend="torch", device="cuda")
    t_gpu = time.perf_counter() - t
    scale = float(np.abs(u_cpu).max())
    diff = float(np.abs(u_gpu - u_cpu).max())
    auto = ie.fit(stim[:200], vectors[:200], num_images)[1].backend
    ok = diff <= 1e-4 * max(1.0, scale) and i_gpu.converged and i_gpu.backend.startswith("torch:cuda")
    return ok, (f"max |dU| {diff:.1e} (|U| <= {scale:.2f}); CPU {i_cpu.method}/{i_cpu.backend} {t_cpu:.3f} s, "
                f"CUDA {i_gpu.method} {t_gpu:.3f} s, {i_gpu.iterations} it; auto picks {auto}"), \
        {"max_abs_diff": diff, "cpu_s": t_cpu, "cuda_s": t_gpu, "cpu": i_cpu.to_dict(), "cuda": i_gpu.to_dict(),
         "auto_backend": auto}


def check_faiss(ctx: Context) -> tuple[bool, str, dict]:
    _cuda()
    import numpy as np

    from conceptevo import backends, space
    from conceptevo.errors import BackendError

    try:
        chosen = backends.select("faiss", "gpu")
    except BackendError as exc:
        raise Skip(str(exc)) from None
    auto = backends.select("faiss", "auto")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50_000, 30)).astype(np.float32)
    q = x[:2_000]
    res = {}
    for be in ("faiss-cpu", "faiss-gpu"):
        t = time.perf_counter()
        d, i = space._flat_index(x, "l2", be).search(q, 10)
        res[be] = (d, i, time.perf_counter() - t)
    (dc, ic, tc), (dg, ig, tg) = res["faiss-cpu"], res["faiss-gpu"]
    recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ic, ig)]))
    dist_ok = bool(np.allclose(np.sort(dc, 1), np.sort(dg, 1), rtol=1e-3, atol=1e-3))
    ok = chosen == "faiss-gpu" and auto == "faiss-gpu" and recall >= 0.999 and dist_ok
    summary = (f"selected {auto}; kNN recall GPU vs CPU {recall:.4f}, distances equal: {dist_ok}; "
               f"CPU {tc:.2f} s, GPU {tg:.2f} s (50k x 30, 2k queries, k=10)")
    return ok, summary, {"recall": recall, "distances_equal": dist_ok, "cpu_s": tc, "gpu_s": tg, "auto": auto}


def check_cuml(ctx: Context) -> tuple[bool, str, dict]:
    _cuda()
    import numpy as np

    from conceptevo import backends, space
    from conceptevo.errors import BackendError

    try:
        backends.select("umap", "gpu")
    except BackendError as exc:
        raise Skip(str(exc)) from None
    auto = backends.select("umap", "auto")
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((8, 30)) * 6
    labels = rng.integers(0, 8, 4_000)
    x = (centres[labels] + rng.standard_normal((4_000, 30))).astype(np.float32)
    out = {}
    for be in ("umap-learn", "cuml"):
        t = time.perf_counter()
        y = space._umap_impl(x, backend=be, seed=0, n_neighbors=15, min_dist=0.1, metric="euclidean", n_epochs=None)
        out[be] = (y, time.perf_counter() - t)

    def purity(y: np.ndarray) -> float:  # fraction of 2-D nearest neighbours with the same cluster
        import faiss

        index = faiss.IndexFlatL2(2)
        index.add(np.ascontiguousarray(y, dtype=np.float32))
        _, nb = index.search(np.ascontiguousarray(y, dtype=np.float32), 11)
        return float(np.mean(labels[nb[:, 1:]] == labels[:, None]))

    pur = {be: purity(y) for be, (y, _) in out.items()}
    finite = all(np.isfinite(y).all() and y.shape == (4_000, 2) for y, _ in out.values())
    ok = auto == "cuml" and finite and pur["cuml"] >= 0.95 and pur["cuml"] >= pur["umap-learn"] - 0.03
    summary = (f"selected {auto}; 2-D cluster purity cuML {pur['cuml']:.3f} vs umap-learn "
               f"{pur['umap-learn']:.3f}; cuML {out['cuml'][1]:.2f} s, umap-learn {out['umap-learn'][1]:.2f} s")
    return ok, summary, {"purity": pur, "seconds": {be: s for be, (_, s) in out.items()}, "auto": auto}


def check_nccl(ctx: Context) -> tuple[bool, str, dict]:
    _cuda()
    import numpy as np
    import torch

    if torch.cuda.device_count() < 2:
        raise Skip(f"{torch.cuda.device_count()} GPU: the NCCL pass needs 2")
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        raise Skip("torchrun is not installed next to this Python")
    from PIL import Image
    from test_stimuli import assert_same

    from conceptevo.data import image_folder
    from conceptevo.models import build_model
    from conceptevo.stimuli import Stimuli, extract_stimuli
    from conceptevo.store import RunStore

    tmp = Path(tempfile.mkdtemp(prefix="device_check_nccl_", dir=ctx.out))
    rng = np.random.default_rng(0)
    for c, count in (("a", 157), ("b", 150)):  # odd sizes: shards end off batch boundaries
        (tmp / "imgs" / c).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp / "imgs" / c / f"{i}.png")
    ckpts = []
    for e in range(2):
        torch.manual_seed(e)
        ckpts.append(str(tmp / f"epoch_{e}.pt"))
        torch.save(build_model("vgg_small", num_classes=2).state_dict(), ckpts[-1])
    cmd = [str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "conceptevo.distributed", "--model",
           "vgg_small", "--checkpoints", *ckpts, "--data", str(tmp / "imgs"), "--image-size", "32",
           "--run-dir", str(tmp / "run"), "--batch-size", "16", "--device", "cuda", "--quiet"]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=max(60, int(min(240, ctx.left()))))
    t_dist = time.perf_counter() - t
    if proc.returncode != 0:
        return False, f"torchrun failed (rc {proc.returncode})", {"stderr": proc.stderr[-4000:]}
    want = extract_stimuli(lambda: build_model("vgg_small", num_classes=2), ckpts,
                           image_folder(tmp / "imgs", size=32), batch_size=16, device="cuda", progress=False)
    store = RunStore(tmp / "run", create=False)
    bad = []
    for name, w in zip(("epoch_0", "epoch_1"), want):
        try:
            assert_same(Stimuli.load(store, f"stimuli/{name}"), w)
        except AssertionError as exc:
            bad.append(f"{name}: {str(exc)[:300]}")
        ws = store.manifest["stages"][f"stimuli/{name}"]["params"].get("world_size")
        if ws != 2:
            bad.append(f"{name}: world_size {ws}")
    return not bad, f"2 NCCL ranks {'equal' if not bad else 'DIFFER from'} one process ({t_dist:.1f} s)", \
        {"mismatches": bad, "stdout": proc.stdout[-1000:]}


CHECKS: list[tuple[str, Callable[[Context], tuple[bool, str, dict]]]] = [
    ("environment", check_environment),
    ("triton vs reference", check_triton),
    ("bench_topk", check_bench_topk),
    ("extraction overhead", check_extraction_overhead),
    ("imagenet-shaped", check_imagenet_shaped),
    ("solve cuda vs cpu", check_solve),
    ("faiss-gpu", check_faiss),
    ("cuml", check_cuml),
    ("nccl 2 ranks", check_nccl),
]


# ----------------------------------------------------------------------------------------- main
def run_checks(ctx: Context) -> list[Check]:
    results = []
    for name, fn in CHECKS:
        c = Check(name)
        t = time.perf_counter()
        if ctx.left() <= 0:
            c.status, c.summary = "skipped", f"time budget of {ctx.budget_s:.0f} s spent"
        else:
            try:
                ok, c.summary, c.details = fn(ctx)
                c.status = "ok" if ok else "FAIL"
            except Skip as exc:
                c.status, c.summary = "skipped", str(exc)
            except Exception as exc:  # noqa: BLE001 - a check that raises is reported, the others still run
                c.status, c.summary = "error", f"{type(exc).__name__}: {exc}"[:500]
                c.details = {"traceback": traceback.format_exc()[-4000:]}
        c.seconds = time.perf_counter() - t
        print(f"[device_check] {name}: {c.status} ({c.seconds:.1f} s) {c.summary}", file=sys.stderr, flush=True)
        results.append(c)
    return results


def markdown(results: list[Check], header: str) -> str:
    lines = [header, "", "| check | status | seconds | result |", "|---|---|---:|---|"]
    for c in results:
        summary = c.summary.replace("|", "/").replace("\n", " ")
        lines.append(f"| {c.name} | {c.status} | {c.seconds:.1f} | {summary} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="device_check_out", help="folder for device_check.json / .md")
    ap.add_argument("--budget-s", type=float, default=450.0,
                    help="checks not started after this many seconds are skipped (default 450)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ctx = Context(out=out, budget_s=args.budget_s)
    import torch

    from _common import machine_line

    device = "cuda" if torch.cuda.is_available() else None
    header = f"Device check — {machine_line(device)}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    results = run_checks(ctx)
    wrong = [c.name for c in results if c.status in ("FAIL", "error")]
    skipped = [f"{c.name} ({c.summary})" for c in results if c.status == "skipped"]
    report = {"header": header, "machine": machine_line(device), "seconds": time.perf_counter() - ctx.started,
              "wrong": wrong, "skipped": skipped, "checks": [asdict(c) for c in results]}
    (out / "device_check.json").write_text(json.dumps(report, indent=1, default=str))
    table = markdown(results, header)
    (out / "device_check.md").write_text(table)
    print(table)
    if skipped:
        print("skipped: " + "; ".join(skipped))
    if wrong:
        print(f"WRONG OR FAILED: {', '.join(wrong)}")
        return 1
    print(f"all checks that ran passed ({report['seconds']:.0f} s); results in {out}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
