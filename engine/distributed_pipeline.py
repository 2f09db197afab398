"""The whole pipeline under torchrun: every rank runs ``conceptevo run config.toml``.

Launch (every rank runs the same command; CPU ranks use gloo, GPU ranks nccl on ``cuda:LOCAL_RANK``)::

    torchrun --standalone --nproc_per_node=4 -m conceptevo run config.toml

Rank 0 drives :func:`conceptevo.pipeline.run_pipeline`; the other ranks serve it. At each stage that
is spread over the ranks, rank 0 broadcasts a small job (the run, the epochs, the parameters -- never
models or data: every rank builds those itself from the same config) and all ranks work on it:

* **stimulus pass** -- :func:`conceptevo.distributed.distributed_extract` (contiguous shards of whole
  batches, merged exactly);
* **importance** (Eq. 2-4) -- the batches of the chosen images are dealt round robin (rank r takes
  batches r, r + W, ...); each round rank 0 gathers the W batches' per-image sensitivities and adds
  them in the single-process order, so the counts and the float64 sums are bit-identical to one
  process;
* **reversion check** (Fig. 7) -- its repeats (independent samples, each seeded by ``[seed, repeat]``)
  are dealt round robin and the tables concatenated in repeat order: identical to one process.

Everything else (space, layout, alignment, diagnostics, report) runs on rank 0 while the others wait
for the next job. Stages already done in the run directory are skipped by rank 0 and so never sent.
When rank 0 ends -- normally or with an error -- it tells the others, which then exit (with an error
naming rank 0's failure if it failed). The wait for a job has a long timeout
(``CONCEPTEVO_DIST_TIMEOUT_S``, default 6 h) since the space and layout of a large run take a while.
"""
from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist

from .errors import ConceptEvoError

__all__ = ["PipelineWorld", "pipeline_world", "distributed_importance", "distributed_reversion"]


def pipeline_world() -> PipelineWorld | None:
    """The world of this process under torchrun (``WORLD_SIZE`` > 1), else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 and not (dist.is_available() and dist.is_initialized()):
        return None
    if dist.is_initialized() and dist.get_world_size() <= 1:
        return None
    return PipelineWorld()


class PipelineWorld:
    """Rank 0 drives the pipeline, the other ranks serve its distributed stages."""

    def __init__(self, device: str = "auto"):
        from .distributed import _rank_device

        self.owns_group = not dist.is_initialized()
        timeout = float(os.environ.get("CONCEPTEVO_DIST_TIMEOUT_S", 6 * 3600))
        if self.owns_group:
            if "RANK" not in os.environ:
                raise ConceptEvoError("WORLD_SIZE > 1 but no RANK: launch with torchrun")
            self._device_pref = device
            dev = _rank_device(device, int(os.environ.get("LOCAL_RANK", "0")))
            backend = "nccl" if dev.type == "cuda" else "gloo"
            if dev.type == "cuda":
                torch.cuda.set_device(dev)
            dist.init_process_group(backend=backend, timeout=_dt.timedelta(seconds=timeout))
        self.rank, self.size = dist.get_rank(), dist.get_world_size()
        self.jobs: list[str] = []

    def device(self, name: str) -> torch.device:
        """This rank's device for the config's ``device`` ("auto"/"cuda" -> ``cuda:LOCAL_RANK``)."""
        from .distributed import _rank_device

        return _rank_device(name, int(os.environ.get("LOCAL_RANK", str(self.rank))))

    # ------------------------------------------------------------------ driving (rank 0)
    def _send(self, job: Any) -> None:
        if job[0] not in ("done", "abort"):
            self.jobs.append(job[0] if job[0] == "stimuli" else f"{job[0]} {job[1]} {job[2]}->{job[3]}")
        box = [job]
        dist.broadcast_object_list(box, src=0)

    def extractor(self, run: str) -> Callable:
        """Rank 0: a drop-in for :func:`~conceptevo.stimuli.extract_stimuli` over all ranks."""
        from .distributed import distributed_extract

        def extract(factory, checkpoints, dataset, **kw):
            self._send(("stimuli", run, [str(c) for c in checkpoints], _portable(kw)))
            return distributed_extract(factory, checkpoints, dataset, **kw)
        return extract

    def importance(self, run: str, t: int, t2: int) -> Callable:
        """Rank 0: a drop-in for :func:`~conceptevo.importance.evolution_importance` over all ranks."""
        def run_it(model_t, model_t2, data, **kw):
            self._send(("importance", run, t, t2, _portable(kw)))
            return distributed_importance(model_t, model_t2, data, **kw)
        return run_it

    def reversion(self, run: str, t: int, t2: int) -> Callable:
        """Rank 0: a drop-in for :func:`~conceptevo.reversion.reversion_check` over all ranks."""
        def run_it(model_t, model_t2, train_data, test_data=None, **kw):
            self._send(("reversion", run, t, t2, _portable(kw)))
            return distributed_reversion(model_t, model_t2, train_data, test_data, **kw)
        return run_it

    def run(self, cfg, drive: Callable[[], Any], serve_ctx: Callable[[], dict]) -> Any:
        """Rank 0: ``drive()`` then release the others; other ranks: serve jobs until released."""
        try:
            if self.rank == 0:
                try:
                    result = drive()
                except BaseException as exc:
                    self._send(("abort", f"{type(exc).__name__}: {exc}"))
                    raise
                self._send(("done",))
                from .store import RunStore

                RunStore(cfg.out).update_manifest(distributed={"world_size": self.size, "backend": dist.get_backend(),
                                                               "stages_over_all_ranks": self.jobs})
                return result
            return self._serve(cfg, serve_ctx)
        finally:
            if self.owns_group and dist.is_initialized():
                dist.destroy_process_group()

    # ------------------------------------------------------------------ serving (other ranks)
    def _serve(self, cfg, ctx_fn: Callable[[], dict]):
        from .distributed import distributed_extract
        from .pipeline import RunResult, _load_model
        from .store import RunStore

        ctx = None
        while True:
            box = [None]
            dist.broadcast_object_list(box, src=0)
            job = box[0]
            kind = job[0]
            if kind == "done":
                return RunResult(cfg.out, None, {}, {})
            if kind == "abort":
                raise ConceptEvoError(f"rank 0 failed: {job[1]}")
            if ctx is None:
                ctx = ctx_fn()
            dev = self.device(cfg.device)
            if kind == "stimuli":
                _, run, ckpts, kw = job
                spec = ctx["runs"][run]
                kw = {**kw, "store": RunStore(cfg.out)}
                kw.update({"options": replace(kw["options"], device=dev)} if "options" in kw else {"device": dev})
                distributed_extract(spec.factory, ckpts, ctx["train_set"], **kw)
            elif kind in ("importance", "reversion"):
                _, run, t, t2, kw = job
                spec = ctx["runs"][run]
                m_t, m_t2 = _load_model(spec, t, dev), _load_model(spec, t2, dev)
                kw = {**kw, "device": dev}
                if kind == "importance":
                    distributed_importance(m_t, m_t2, ctx["train_set"], **kw)
                else:
                    distributed_reversion(m_t, m_t2, ctx["train_set"], ctx["test_set"], **kw)
            else:
                raise ConceptEvoError(f"unknown job {kind!r} from rank 0")


def _portable(kw: dict) -> dict:
    """Keyword arguments a job can carry: no device (each rank has its own; also not inside stimulus
    options) and no store object."""
    out = {k: v for k, v in kw.items() if k not in ("device", "store")}
    if out.get("options") is not None:
        out["options"] = replace(out["options"], device=None)
    return out


# ---------------------------------------------------------------------- importance over ranks
def distributed_importance(model_t, model_t2, data, classes=None, layers=None, batch_size: int = 64,
                           device=None, max_images_per_class=None, seed: int = 0, indices=None,
                           progress: bool = False, gradient_at: str = "t", group=None) -> pd.DataFrame | None:
    """:func:`~conceptevo.importance.evolution_importance` over the ranks of the default group.

    Every rank calls it with the same arguments; rank 0 returns the table (identical to one process),
    the others None. Batches are dealt round robin and their sensitivities reduced on rank 0 in the
    single-process order.
    """
    from .adapter import EvalMode, model_device_dtype
    from .errors import ActivationError
    from .importance import _prepare, batch_sensitivities, importance_table, load_batch

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if gradient_at not in ("t", "t_prime"):
        raise ValueError(f"gradient_at must be 't' or 't_prime', got {gradient_at!r}")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    data, ad_t, ad_t2, labels_all, idx, cls = _prepare(model_t, model_t2, data, classes, layers,
                                                       max_images_per_class, seed, indices, device)
    dev, dtype = model_device_dtype(ad_t.model)
    lut = {c: i for i, c in enumerate(cls)}
    row_of = torch.as_tensor(np.array([lut[int(v)] for v in labels_all[idx]], dtype=np.int64))
    ncls = len(cls)
    if rank == 0:
        pos = {n: torch.zeros(ncls, ad_t.channels[n], dtype=torch.int64, device=dev) for n in ad_t.layer_names}
        sums = {n: torch.zeros(ncls, ad_t.channels[n], dtype=torch.float64, device=dev) for n in ad_t.layer_names}
    starts = list(range(0, len(idx), batch_size))
    rounds = -(-len(starts) // world)
    with EvalMode(ad_t.model, ad_t2.model):
        for i in range(rounds):
            b = i * world + rank
            mine = None
            if b < len(starts):
                s = starts[b]
                b_idx = idx[s: s + batch_size]
                x, y = load_batch(data, b_idx, labels_all[b_idx])
                x, y = x.to(dev, dtype), y.to(dev)
                if gradient_at == "t":
                    sens = batch_sensitivities(ad_t, ad_t2, x, y)
                else:
                    sens = {n: -v for n, v in batch_sensitivities(ad_t2, ad_t, x, y).items()}
                mine = {n: v.detach().cpu() for n, v in sens.items()}
            got: list[Any] | None = [None] * world if rank == 0 else None
            dist.gather_object(mine, got, dst=0, group=group)
            if rank == 0:
                for r, sens in enumerate(got):  # batch order of one process: i * world + r
                    if sens is None:
                        continue
                    s = starts[i * world + r]
                    rows = row_of[s: s + batch_size].to(dev)
                    for name, S in sens.items():
                        S = S.to(dev)
                        pos[name].index_add_(0, rows, (S > 0).to(torch.int64))
                        sums[name].index_add_(0, rows, S.to(torch.float64))
    if rank != 0:
        return None
    for name, v in sums.items():
        if not torch.isfinite(v).all():
            raise ActivationError(f"non-finite sensitivity at layer {name!r} (NaN/inf activations or gradients)")
    return importance_table(cls, ad_t, {n: p.cpu().numpy() for n, p in pos.items()},
                            torch.bincount(row_of, minlength=ncls).numpy(),
                            {n: v.cpu().numpy() for n, v in sums.items()})


def distributed_reversion(model_t, model_t2, train_data, test_data=None, repeats: int = 5, group=None, **kw):
    """:func:`~conceptevo.reversion.reversion_check` with its repeats dealt over the ranks.

    Rank 0 returns the :class:`~conceptevo.reversion.ReversionResult` (identical to one process),
    the others None.
    """
    from .reversion import ReversionResult, reversion_check, summarize_reversion

    rank, world = dist.get_rank(group), dist.get_world_size(group)
    mine = list(range(rank, repeats, world))
    part = None
    if mine:
        res = reversion_check(model_t, model_t2, train_data, test_data, repeats=repeats, samples=mine, **kw)
        part = (res.long, res.importance)
    got: list[Any] | None = [None] * world if rank == 0 else None
    dist.gather_object(part, got, dst=0, group=group)
    if rank != 0:
        return None
    longs = [p[0] for p in got if p is not None]
    imps = [p[1] for p in got if p is not None]
    order = lambda df: df["sample"].to_numpy()  # noqa: E731
    long = pd.concat(longs, ignore_index=True)
    long = long.iloc[np.argsort(order(long), kind="stable")].reset_index(drop=True)
    imp = pd.concat(imps, ignore_index=True)
    imp = imp.iloc[np.argsort(order(imp), kind="stable")].reset_index(drop=True)
    long.attrs["topk"] = longs[0].attrs.get("topk", kw.get("topk", 5))
    return ReversionResult(long=long, summary=summarize_reversion(long), importance=imp)
