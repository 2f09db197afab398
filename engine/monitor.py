"""Live concept monitoring inside a training loop (DESIGN section 5).

One object in the user's loop::

    mon = Monitor(model, probe, out="runs/mon")          # probe: ImageSet, Dataset or image folder
    for epoch in range(1, epochs + 1):
        train_one_epoch(model)
        alerts = mon.epoch_end(epoch, train_acc=tr, test_acc=te)
        if any(a.kind == "lr_too_high" for a in alerts):
            lower_the_learning_rate()

Or, when the probe IS the loop's evaluation set, ride the evaluation forward instead of running
a second one (the monitor's hooks read the chosen layers while the loop evaluates)::

    mon = Monitor(model, val_set, out="runs/mon")
    for epoch in range(1, epochs + 1):
        train_one_epoch(model)
        with mon.riding(epoch) as rp:                     # the val set's images, in order
            te = evaluate(model, val_set)
            rp.set_accuracy(train_acc=tr, test_acc=te)
        alerts = rp.alerts

The observation is the same as ``epoch_end``'s (``tests/test_monitor.py`` checks equal stimuli,
positions and diagnostics): on the CPU a layer's output for an image does not depend on the
batch it came in, except in a batch of ONE image, which takes another convolution path whose
float rounding differs by ~1e-6 (so may a different memory format, e.g. channels-last); only
step 2's forward is the caller's. The built-in trainer does this by default
(:func:`conceptevo.train.train_regimes`, ``monitor_probe="eval"``), so the monitor's cost there
is its top-k, space, diagnostics and logs, not a forward over the probe.

Each observation (``epoch_end(epoch)``, or ``step(step)`` every ``every`` steps):

1. **checkpoint** -- the model's weights as ``checkpoints/<unit>_<index>.safetensors``
   (weights only, one host copy written atomically);
2. **stimuli** -- the streaming stimulus pass of :mod:`conceptevo.stimuli` over the probe set
   *on the live model itself* (no copy of the training state): the model is put in eval mode
   for the pass and every submodule's own mode is restored afterwards; the pass runs under
   ``torch.inference_mode`` so gradients are not touched; the Python, NumPy and torch
   (CPU and CUDA) random states are saved and restored around the whole observation. The
   forward runs to the logits, so the probe's top-1 accuracy comes for free;
3. **space** -- the first checkpoint at index ``>= base_from`` becomes the base of a
   :class:`~conceptevo.space.UnifiedSpace` (Steps 1.2-2.1, seeded, single-threaded SGNS, so a
   post-hoc fit over the same stimuli gives the same vectors); later checkpoints are projected
   (Step 2.2); the earlier ones are projected when the base is fitted. ``refit_every=N``
   refits the base to the newest checkpoint every N observations and re-projects all the
   past ones (a sparse product each). The 2-D layout (``layout="pca"`` by default: cheap
   and deterministic; ``"umap"`` as in the paper) is one fit over every checkpoint;
4. **diagnostics** -- :func:`conceptevo.diagnostics.diagnose` with the run as its own
   reference: concept diversity, evolution speed (movement between observations) and
   movement per accuracy gain, and the post-hoc too-high-learning-rate verdict;
5. **alerts** -- :func:`decide_alerts` (one small function, so it follows the post-hoc verdicts):
   ``lr_too_high`` (diversity collapses while accuracy falls: the verdict of
   :func:`~conceptevo.diagnostics.diagnose`), ``overfitting`` (concepts barely move while
   training accuracy climbs and held-out accuracy stalls) and ``diverged`` (NaN/inf in the
   weights, the activations or the logits: an alert, never a crash). Alerts are returned and
   logged;
6. **logs** -- ``metrics.jsonl`` (append-only: one line per observation, as it was then; a
   re-observed index appears again) and ``metrics.parquet`` (the whole current table: past
   rows change when a refit re-projects them), ``alerts.jsonl``, a self-refreshing ``monitor.html``, TensorBoard scalars
   and the map image when ``tensorboard`` is importable; :func:`lightning_callback` adapts
   the monitor to Lightning when ``lightning`` (or ``pytorch_lightning``) is importable.

Resume: the monitor's state (``monitor_state.json``, written atomically) and the per-checkpoint
stimuli live in ``out``; a restarted loop constructing a Monitor with the same ``out`` and
settings continues where it stopped. An observation at an index already seen (a loop
restarted from an earlier checkpoint) replaces it and drops the later ones.

Equality with a post-hoc run: ``extract_stimuli`` over the saved safetensors checkpoints with
the same probe, layers, ``k``, ``k_i`` and ``batch_size``, ``UnifiedSpace.fit`` on the base
with the monitor's space parameters, ``add`` of the others in index order, the same layout and
:func:`conceptevo.diagnostics.diagnose` give the same stimuli, positions and diagnostics
(``tests/test_monitor.py`` checks it).
"""
from __future__ import annotations

import base64
import contextlib
import html as _html
import io
import json
import logging
import math
import random
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from . import diagnostics
from .errors import ActivationError, ConceptEvoError, DataError, EmbeddingError
from .store import RunStore, atomic_write, json_default

__all__ = [
    "Alert",
    "AlertParams",
    "Monitor",
    "RidingPass",
    "alert_summary",
    "alerts_report_section",
    "chance_band",
    "decide_alerts",
    "lightning_available",
    "lightning_callback",
    "tensorboard_available",
]

log = logging.getLogger(__name__)

_STATE_FORMAT = 1
_STATE = "monitor_state.json"


# =================================================================================== alerts
@dataclass
class Alert:
    """One alert: what fired, at which observation, why (numbers and epochs) and by how much.

    ``margin`` > 0 is how far past its threshold the signature is (the same quantities as the
    post-hoc verdicts: for ``lr_too_high`` the smaller of ``collapse_fraction - spread`` and
    ``accuracy_fall - accuracy_drop``; for ``overfitting`` ``slow_ratio - speed_ratio``; for
    ``diverged`` the fraction of non-finite weight values, or 1.0 when only activations or
    logits were non-finite).
    """

    kind: str  # "lr_too_high" | "overfitting" | "diverged"
    epoch: int  # the observation's index (an epoch, or a step in step mode)
    message: str
    evidence: dict[str, Any] = field(default_factory=dict)
    margin: float = float("nan")

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self), default=json_default))


@dataclass
class AlertParams:
    """Thresholds of :func:`decide_alerts` (the first four as in :func:`diagnostics.diagnose`)."""

    collapse_fraction: float = 0.75
    accuracy_drop: float = 0.05
    slow_ratio: float = 0.85
    min_gain: float = 0.05
    #: observations over which "training accuracy climbs / held-out accuracy stalls" is judged
    window: int = 3
    #: held-out accuracy stalls when it gains less than this over the window
    stall_gain: float = 0.01
    #: movement per +1.0 training accuracy of a healthy run (e.g. a well-trained run's monitor);
    #: None: the run's own early climb (first observation >= peak_from -> start of the window)
    reference_movement_per_gain: float | None = None
    #: first index that may be the diversity peak (None: the monitor's ``base_from``)
    peak_from: int | None = None


def decide_alerts(diag: diagnostics.Diagnosis | None, name: str, index: int, params: AlertParams,
                  peak_from: int) -> list[Alert]:
    """The alert decision from the diagnostics of the run so far (one place, mirrors the verdicts).

    ``diag``: :func:`diagnostics.diagnose` of the monitored run with itself as reference.
    ``lr_too_high`` is its ``diversity_collapses`` verdict. ``overfitting``: over the last
    ``params.window`` observations training accuracy gains >= ``min_gain``, held-out accuracy
    gains < ``stall_gain``, and the movement per unit of training-accuracy gain is below
    ``slow_ratio`` times the reference's (``reference_movement_per_gain``, or the run's own
    from its first observation >= ``peak_from`` to the start of the window).
    """
    alerts: list[Alert] = []
    if diag is None:
        return alerts
    v = diag.verdicts.get(name, {})
    if v.get("diversity_collapses"):
        spread, fall = float(v["spread_vs_peak"]), float(v["accuracy_fall"])
        margins = v.get("margins") or {}
        margin = margins.get("diversity_collapses") if isinstance(margins, dict) else None
        if margin is None:
            margin = min(params.collapse_fraction - spread, fall - params.accuracy_drop)
        alerts.append(Alert(
            kind="lr_too_high", epoch=index,
            message=(f"concept diversity fell from {v['diversity_peak']:.2f} (epoch {v['diversity_peak_epoch']}) to "
                     f"{v['diversity_last']:.2f} (epoch {v['last_epoch']}), {spread:.0%} of its peak spread, while "
                     f"training accuracy fell from {v['train_top1_best']:.3f} to {v['train_top1_last']:.3f}: "
                     "learning rate too high? Consider stopping or lowering it."),
            evidence={"diversity_peak": v["diversity_peak"], "diversity_peak_epoch": int(v["diversity_peak_epoch"]),
                      "diversity_last": v["diversity_last"], "last_epoch": int(v["last_epoch"]),
                      "spread_vs_peak": spread, "collapse_fraction": params.collapse_fraction,
                      "train_top1_best": v["train_top1_best"], "train_top1_last": v["train_top1_last"],
                      "accuracy_fall": fall, "accuracy_drop": params.accuracy_drop},
            margin=float(margin)))

    t = diag.table
    if t is None or t.empty or "movement" not in t or "test_top1" not in t:
        return alerts
    t = t[t["model"] == name].sort_values("epoch").reset_index(drop=True)
    w = int(params.window)
    if len(t) < w + 1:
        return alerts
    last, prev = t.iloc[-1], t.iloc[-1 - w]
    train_gain = float(last["train_top1"] - prev["train_top1"])
    test_gain = float(last["test_top1"] - prev["test_top1"])
    if not (np.isfinite(train_gain) and np.isfinite(test_gain)):
        return alerts
    moved = float(t["movement"].iloc[-w:].sum(min_count=w))
    if not (train_gain >= params.min_gain and test_gain < params.stall_gain and np.isfinite(moved)):
        return alerts
    mpg = moved / train_gain
    ref = params.reference_movement_per_gain
    ref_from = ref_to = None
    if ref is None:
        early = t[(t["epoch"] >= peak_from) & (t["epoch"] <= prev["epoch"])]
        if len(early) < 2:
            return alerts
        gain0 = float(early["train_top1"].iloc[-1] - early["train_top1"].iloc[0])
        moved0 = float(early["movement"].iloc[1:].sum(min_count=len(early) - 1))
        if not (gain0 >= params.min_gain and np.isfinite(moved0)):
            return alerts
        ref, ref_from, ref_to = moved0 / gain0, int(early["epoch"].iloc[0]), int(early["epoch"].iloc[-1])
    if not ref > 0:
        return alerts
    ratio = mpg / ref
    if ratio < params.slow_ratio:
        alerts.append(Alert(
            kind="overfitting", epoch=index,
            message=(f"concepts barely move: {mpg:.2f} units per +1.0 training accuracy over epochs "
                     f"{int(prev['epoch'])}->{int(last['epoch'])} against {ref:.2f} "
                     f"{'(reference)' if ref_from is None else f'over epochs {ref_from}->{ref_to}'} "
                     f"(ratio {ratio:.2f}), while training accuracy climbs {train_gain:+.3f} and held-out "
                     f"accuracy {test_gain:+.3f}: overfitting? Consider more regularisation or stopping."),
            evidence={"epoch_from": int(prev["epoch"]), "epoch_to": int(last["epoch"]), "movement": moved,
                      "train_gain": train_gain, "test_gain": test_gain, "movement_per_gain": mpg,
                      "reference_movement_per_gain": ref, "reference_epochs": [ref_from, ref_to],
                      "speed_ratio": ratio, "slow_ratio": params.slow_ratio, "min_gain": params.min_gain,
                      "stall_gain": params.stall_gain},
            margin=float(params.slow_ratio - ratio)))
    return alerts


# ============================================================================ small helpers
@contextlib.contextmanager
def _rng_guard() -> Iterator[None]:
    """Save and restore the Python, NumPy and torch (CPU and initialised CUDA) random states."""
    py, npst, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npst)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


@contextlib.contextmanager
def _keep_modes(model: nn.Module) -> Iterator[None]:
    """Restore every submodule's own ``training`` flag afterwards."""
    modes = {m: m.training for m in model.modules()}
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode


def tensorboard_available() -> bool:
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except Exception:  # noqa: BLE001 -- ImportError, or a broken install
        return False
    return True


def _lightning():
    try:
        import lightning.pytorch as pl
    except ImportError:
        try:
            import pytorch_lightning as pl
        except ImportError:
            return None
    return pl


def lightning_available() -> bool:
    return _lightning() is not None


def _finite(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _map_image(xy: np.ndarray, epochs: np.ndarray, size: int = 256) -> np.ndarray:
    """uint8 (size, size, 3): the 2-D map rasterised, coloured from blue (early) to red (latest)."""
    img = np.full((size, size, 3), 255, np.uint8)
    ok = np.isfinite(xy).all(axis=1)
    if not ok.any():
        return img
    p, e = xy[ok].astype(np.float64), epochs[ok].astype(np.float64)
    lo, hi = p.min(axis=0), p.max(axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    q = ((p - lo) / span * (size - 5) + 2).astype(int)
    t = (e - e.min()) / (e.max() - e.min()) if e.max() > e.min() else np.ones_like(e)
    col = np.stack([255 * t, 60 + 0 * t, 255 * (1 - t)], axis=1).astype(np.uint8)
    order = np.argsort(t, kind="stable")  # latest drawn last (on top)
    for dx in (0, 1):
        for dy in (0, 1):
            img[q[order, 1] + dy, q[order, 0] + dx] = col[order]
    return img[::-1].copy()  # y up


def _png_base64(img: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _save_stimuli(path: Path, stim: Any) -> None:
    """One checkpoint's stimuli as ONE ``.npz`` (one atomic write, not a file per array)."""
    from .stimuli import FIELDS

    arrays = {f"{li}.{f}": np.ascontiguousarray(getattr(s, f)) for li, s in enumerate(stim.layers.values())
              for f in FIELDS}
    meta = {"name": stim.name, "num_images": int(stim.num_images), "layers": list(stim.layers)}
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    atomic_write(path, lambda tmp: np.savez(tmp, **arrays))


def _load_stimuli(path: Path) -> Any:
    """Read :func:`_save_stimuli`'s file back as a :class:`~conceptevo.stimuli.Stimuli`."""
    from .stimuli import FIELDS, LayerStimuli, Stimuli

    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(bytes(z["meta"]).decode())
        layers = {n: LayerStimuli(**{f: z[f"{li}.{f}"] for f in FIELDS}) for li, n in enumerate(meta["layers"])}
    return Stimuli(layers=layers, num_images=meta["num_images"], name=meta["name"])


def _load_probe(probe: Any, image_size: int):
    """Probe -> ImageSet; every image of a folder is decoded now (errors name the files)."""
    from .data import as_image_set, image_folder

    if isinstance(probe, (str, Path)):
        ds = image_folder(probe, size=image_size, check="decode")
    else:
        try:
            ds = as_image_set(probe)
        except ConceptEvoError:
            raise
        except Exception as exc:
            raise DataError(f"probe: cannot use {type(probe).__name__} as an image set: {exc}") from exc
    if len(ds) == 0:
        raise DataError("probe: the probe set is empty")
    for i in sorted({0, len(ds) - 1}):
        try:
            x = ds[i][0]
        except Exception as exc:
            raise DataError(f"probe: image {i} cannot be loaded: {exc}") from exc
        if not torch.is_tensor(x) or x.dim() != 3 or not x.is_floating_point():
            raise DataError(f"probe: image {i} is a {type(x).__name__} of shape {getattr(x, 'shape', None)}, "
                            "expected a float (C, H, W) tensor")
    return ds


# ================================================================================= monitor
class RidingPass:
    """What :meth:`Monitor.riding` yields: set the accuracies (or add logits) during the pass;
    ``alerts`` holds the observation's alerts after the block."""

    def __init__(self, active: bool) -> None:
        self.active = active
        self.train_acc: float | None = None
        self.test_acc: float | None = None
        self.alerts: list[Alert] = []
        self._seen = self._correct = 0

    def set_accuracy(self, train_acc: float | None = None, test_acc: float | None = None) -> None:
        """The caller's accuracies for this observation (as ``epoch_end(train_acc=, test_acc=)``)."""
        self.train_acc = None if train_acc is None else float(train_acc)
        self.test_acc = None if test_acc is None else float(test_acc)

    def add_logits(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Count a batch's top-1 hits for the probe accuracy (used when no ``train_acc`` is set)."""
        if logits.dim() == 2:
            self._correct += int((logits.detach().argmax(dim=1).cpu() == torch.as_tensor(labels).cpu()).sum())
            self._seen += int(logits.shape[0])

    def probe_top1(self) -> float | None:
        return self._correct / self._seen if self._seen else None


class Monitor:
    """Live concept monitor for one model in a training loop (see the module docstring).

    Args:
        model: the model being trained (any ``nn.Module`` returning logits); never copied.
        probe: an :class:`~conceptevo.data.ImageSet`, any Dataset returning ``(image, label)``,
            or an image folder path (``<class>/<file>``, decoded at construction).
        layers: None (every Conv2d), module names, a module type or a regex; unknown names are an
            error at construction naming them.
        every: observe every this many epochs (``epoch_end``) or steps (``step``).
        out: the monitor's folder (checkpoints, stimuli, logs, state).
        name: the run's name in the tables (``model`` column).
        k, k_i, batch_size, backend: the stimulus pass (as :func:`conceptevo.stimuli.extract_stimuli`).
        base_from: the first observation at an index >= this becomes the base of the space.
        refit_every: refit the base to the newest checkpoint every this many observations after
            the last fit (None: keep the first base).
        layout: "pca" (default, cheap) or "umap" (the paper; seconds per observation).
        seed: the space's and the layout's seed.
        space_kw: more keywords for :meth:`UnifiedSpace.fit` (dim, repeats, epochs, lr, ...).
        alerts: :class:`AlertParams`.
        tensorboard: None = when importable; False = never; True = required.
        html_refresh: seconds between the report page's refreshes.
        resume: continue the state found in ``out`` (False: start afresh, clearing it).
        image_size: size of images decoded from a probe folder.
        probe_accuracy: run the probe's forward to the logits for its top-1 accuracy. None
            (default): only when the caller passes no ``train_acc`` (the stimuli need no logits,
            and the head is skipped otherwise).
        tracer: a :class:`conceptevo.tracing.Tracer` observing the same training: every
            observation logs its top 3 classes by share of the traced layers' update since the
            previous observation (``trace_top_classes`` in the entry and ``metrics.jsonl``).
    """

    def __init__(
        self,
        model: nn.Module,
        probe: Any,
        layers: Any = None,
        *,
        every: int = 1,
        out: str | Path = "conceptevo-monitor",
        name: str = "run",
        k: int = 10,
        k_i: int = 5,
        batch_size: int = 128,
        backend: str = "auto",
        base_from: int = 1,
        refit_every: int | None = None,
        layout: str = "pca",
        seed: int = 0,
        space_kw: dict[str, Any] | None = None,
        alerts: AlertParams | None = None,
        tensorboard: bool | None = None,
        html_refresh: int = 10,
        resume: bool = True,
        image_size: int = 32,
        probe_accuracy: bool | None = None,
        tracer: Any | None = None,
    ) -> None:
        from .stimuli import Extraction, StimulusOptions

        if not isinstance(model, nn.Module):
            raise ConceptEvoError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ConceptEvoError(f"every must be an integer >= 1, got {every!r}")
        if refit_every is not None and (not isinstance(refit_every, int) or refit_every < 1):
            raise ConceptEvoError(f"refit_every must be None or an integer >= 1, got {refit_every!r}")
        if layout not in ("pca", "umap"):
            raise ConceptEvoError(f"layout must be 'pca' or 'umap', got {layout!r}")
        self.model = model
        self.tracer = tracer
        self.every, self.name, self.layout = int(every), str(name), layout
        self.base_from, self.refit_every, self.seed = int(base_from), refit_every, int(seed)
        self.space_kw = {"threads": 1, "progress": False, **dict(space_kw or {})}
        self.alert_params = alerts or AlertParams()
        self.peak_from = self.base_from if self.alert_params.peak_from is None else int(self.alert_params.peak_from)
        self.html_refresh = int(html_refresh)
        self.probe_accuracy = probe_accuracy
        self.probe = _load_probe(probe, image_size)
        param = next(model.parameters(), None)
        self.device = param.device if param is not None else torch.device("cpu")
        # The plan of the stimulus pass, on the live model (the factory returns the model itself;
        # the adapter's probe forward restores every module's mode). Layer names are checked here.
        with _rng_guard(), _keep_modes(model):
            self._plan = Extraction(lambda: model, [{}], self.probe, names=["live"], options=StimulusOptions(
                layers=layers, k=k, k_i=k_i, batch_size=batch_size, device=self.device, backend=backend))
        self.layers = list(self._plan.layer_names)
        self.store = RunStore(out)
        self.out = self.store.root
        self.params = {"name": self.name, "k": self._plan.k, "k_i": self._plan.k_i, "layers": self.layers,
                       "channels": [self._plan.channels[n] for n in self.layers], "num_images": len(self.probe),
                       "batch_size": self._plan.batch_size, "base_from": self.base_from,
                       "refit_every": refit_every, "layout": layout, "seed": self.seed,
                       "space_kw": json.loads(json.dumps(self.space_kw, default=json_default))}
        self.entries: list[dict[str, Any]] = []  # one per observation, index ascending
        self.alerts: list[Alert] = []
        self.unit: str | None = None
        self.base: int | None = None
        self.fitted_at_call = 0
        self.calls = 0
        self.space = None
        self.diagnosis: diagnostics.Diagnosis | None = None
        self._stimuli: dict[int, Any] = {}
        self._diag_cache: dict = {}  # k-NN diversity of unchanged checkpoints (exact reuse, see diagnostics)
        self._writer = None
        if tensorboard is True and not tensorboard_available():
            raise ConceptEvoError("tensorboard=True but tensorboard is not installed (pip install tensorboard)")
        self._tb = tensorboard_available() if tensorboard is None else bool(tensorboard)
        if resume:
            self._restore()
        else:
            self._clear()

    # ------------------------------------------------------------------ public
    def epoch_end(self, epoch: int, train_acc: float | None = None, test_acc: float | None = None) -> list[Alert]:
        """Observe at the end of ``epoch`` (every ``every`` epochs); returns this observation's alerts."""
        return self._maybe("epoch", epoch, train_acc, test_acc)

    def step(self, step: int, train_acc: float | None = None, test_acc: float | None = None) -> list[Alert]:
        """Observe at training step ``step`` when ``step % every == 0``; returns the alerts."""
        return self._maybe("step", step, train_acc, test_acc)

    @contextlib.contextmanager
    def riding(self, epoch: int, *, unit: str = "epoch") -> Iterator[RidingPass]:
        """Observe ``epoch`` on the caller's own forward pass over the probe (no forward of its own).

        Inside the block, the caller runs the model over the probe's images *in probe order*
        (ids ``0..N-1``, any batch sizes) -- typically its evaluation pass, when the probe IS the
        evaluation set. Forward hooks on the chosen layers feed the streaming top-k; at the end
        of the block the observation continues as in :meth:`epoch_end` (checkpoint, space,
        diagnostics, alerts) and its alerts are in ``.alerts`` of the yielded object. Pass the
        accuracies with ``set_accuracy`` (or the logits with ``add_logits`` for the probe's
        top-1). The hooks only read the layers' outputs: the caller's results, gradients, modes
        and random streams are untouched. ``every`` applies (an off epoch yields an inactive
        pass). An error inside the block observes nothing; a pass that fed another number of
        images than the probe has is a :class:`DataError` naming both. The whole probe must pass
        through this process: under DDP, where each rank evaluates a shard, use ``epoch_end``.
        """
        from . import kernels
        from .stimuli import _kernel_threads, _layer_hooks

        index = int(epoch)
        self._check_unit(unit)
        rp = RidingPass(active=index % self.every == 0)
        if not rp.active:
            yield rp
            return
        plan, n_images = self._plan, len(self.probe)
        states = {n: kernels.new_state(plan.channels[n], plan.k, n_images, plan.k_i, plan.device)
                  for n in self.layers}
        seen = {n: 0 for n in self.layers}
        bad: dict[str, str] = {}
        spent = [0.0]

        def hook(layer: str, out: torch.Tensor) -> None:
            if bad:
                return
            t = time.perf_counter()
            lo, b = seen[layer], int(out.shape[0])
            if lo + b > n_images:
                raise DataError(f"monitor.riding: the pass fed more images than the probe's {n_images} "
                                f"(layer {layer!r} saw {lo + b}); feed exactly the probe, in order")
            ids = torch.arange(lo, lo + b)
            try:
                with torch.no_grad():
                    kernels.update(states[layer], out.detach(), ids, backend=plan.backend)
            except ActivationError:
                from .stimuli import _first_bad_ids

                bad["why"] = f"NaN activations in layer {layer!r}, {_first_bad_ids(out.detach(), ids)}"
            seen[layer] = lo + b
            spent[0] += time.perf_counter() - t

        with _kernel_threads(plan.backend), _layer_hooks(self.model, self.layers, hook):
            yield rp
        short = {n: c for n, c in seen.items() if c != n_images}
        if short and not bad:
            raise DataError(f"monitor.riding at {unit} {index}: the pass fed {min(short.values())} images, the "
                            f"probe has {n_images}; feed exactly the probe's images, in order")
        self.unit = unit
        with _rng_guard(), _keep_modes(self.model):
            rp.alerts = self._observe(index, rp.train_acc, rp.test_acc,
                                      shared=(states, bad.get("why"), rp.probe_top1(), spent[0]))

    @property
    def table(self) -> pd.DataFrame:
        """The current metrics table (one row per observation)."""
        return self._metrics_table()

    # ------------------------------------------------------------------ state
    def _clear(self) -> None:
        for sub in ("checkpoints", "stimuli", "space_base", "tensorboard"):
            shutil.rmtree(self.store.path(sub), ignore_errors=True)
        for f in (_STATE, "metrics.jsonl", "metrics.parquet", "alerts.jsonl", "monitor.html"):
            with contextlib.suppress(FileNotFoundError):
                self.store.path(f).unlink()

    def _save_state(self) -> None:
        doc = {"format": _STATE_FORMAT, "params": self.params, "unit": self.unit, "base": self.base,
               "fitted_at_call": self.fitted_at_call, "calls": self.calls, "entries": self.entries,
               "alerts": [a.to_dict() for a in self.alerts], "saved_at": time.time()}
        text = json.dumps(doc, indent=1, default=json_default)
        atomic_write(self.store.path(_STATE), lambda tmp: tmp.write_text(text, encoding="utf-8"))

    def _restore(self) -> None:
        from .space import UnifiedSpace

        p = self.store.path(_STATE)
        if not p.exists():
            return
        try:
            doc = json.loads(p.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise ConceptEvoError(f"{p} is not readable ({exc}); pass resume=False to start afresh") from None
        old = json.loads(json.dumps(doc.get("params", {})))
        now = json.loads(json.dumps(self.params))
        if doc.get("format") != _STATE_FORMAT or old != now:
            diff = sorted(k for k in set(old) | set(now) if old.get(k) != now.get(k))
            raise ConceptEvoError(f"{self.out} holds a monitor with other settings ({', '.join(diff) or 'format'}); "
                                  "pass resume=False to start afresh or choose another out")
        self.unit, self.base = doc["unit"], doc["base"]
        self.fitted_at_call, self.calls = int(doc["fitted_at_call"]), int(doc["calls"])
        self.entries = list(doc["entries"])
        self.alerts = [Alert(**a) for a in doc["alerts"]]
        for e in self.entries:
            if e.get("stimuli"):
                self._stimuli[e["index"]] = _load_stimuli(self.store.path(e["stimuli"]))
        if self.base is not None and self.store.exists("space_base/space.json"):
            self.space = UnifiedSpace.load(self.store.path("space_base"))
            for e in self.entries:
                if e["index"] != self.base and e["index"] in self._stimuli:
                    self.space.add(self.name, e["index"], self._stimuli[e["index"]], replace=True)
        elif self.base is not None:
            self.base = None  # the base's space is missing: refit at the next observation
        log.info("monitor: resumed %d observations from %s", len(self.entries), self.out)

    # ------------------------------------------------------------------ one observation
    def _check_unit(self, unit: str) -> None:
        if self.unit is not None and unit != self.unit:
            raise ConceptEvoError(f"this monitor observes by {self.unit}; do not mix epoch_end() and step()")

    def _maybe(self, unit: str, index: int, train_acc, test_acc) -> list[Alert]:
        index = int(index)
        self._check_unit(unit)
        if index % self.every:
            return []
        self.unit = unit
        return self.observe(index, train_acc, test_acc)

    def observe(self, index: int, train_acc: float | None = None, test_acc: float | None = None) -> list[Alert]:
        """One observation at ``index`` regardless of ``every`` (``epoch_end``/``step`` call this)."""
        index = int(index)
        self.unit = self.unit or "epoch"
        with _rng_guard(), _keep_modes(self.model):
            return self._observe(index, train_acc, test_acc)

    def _observe(self, index: int, train_acc, test_acc, shared: tuple | None = None) -> list[Alert]:
        """One observation; ``shared`` = (top-k states, why diverged, probe top-1, hook seconds) of a
        :meth:`riding` pass (the caller's forward), else the monitor runs its own probe pass."""
        from .stimuli import CheckpointSpec

        seconds: dict[str, float] = {}
        t = time.perf_counter()
        self._forget_from(index)
        label = f"{self.unit}_{index:06d}"
        # 1. weights-only checkpoint
        ckpt = self.store.path(f"checkpoints/{label}.safetensors")
        nonfinite, bad_values, total_values = self._save_checkpoint(ckpt)
        seconds["checkpoint"] = time.perf_counter() - t

        # 2. stimulus pass on the live model
        t = time.perf_counter()
        alerts: list[Alert] = []
        stim, probe_acc, why = None, None, None
        spec = CheckpointSpec(label, f"the live model at {self.unit} {index}", None, path=ckpt)
        if nonfinite:
            why = f"non-finite weights in {nonfinite[:5]}{' ...' if len(nonfinite) > 5 else ''}"
        elif shared is not None:
            states, why, probe_acc, hook_seconds = shared
            t -= hook_seconds  # the top-k work done during the caller's pass counts here
            if why is None:
                self._plan.diverged = {}
                stim = self._plan.to_stimuli(spec, states)
                infs = [n for n, s in stim.layers.items() if not np.isfinite(s.values[s.ids >= 0]).all()]
                if infs:
                    why = f"infinite activations in layer(s) {infs}"
        else:
            counts = {"correct": 0, "seen": 0, "nonfinite": 0}

            def on_logits(_j, _ids, logits, y):
                if logits.dim() != 2:
                    return
                counts["nonfinite"] += int((~torch.isfinite(logits)).any(dim=1).sum())
                counts["correct"] += int((logits.argmax(dim=1).cpu() == y).sum())
                counts["seen"] += int(y.shape[0])

            self.model.eval()
            try:
                want = self.probe_accuracy if self.probe_accuracy is not None else train_acc is None
                states = self._plan.run_shard([spec], prepared=([self.model], []), progress=False,
                                              on_logits=on_logits if want else None, desc="monitor")
                stim = self._plan.to_stimuli(spec, states[0])
            except ActivationError as exc:
                why = str(exc)
            if stim is not None:
                if counts["seen"]:
                    probe_acc = counts["correct"] / counts["seen"]
                if counts["nonfinite"]:
                    why = f"non-finite logits for {counts['nonfinite']} probe images"
                infs = [n for n, s in stim.layers.items() if not np.isfinite(s.values[s.ids >= 0]).all()]
                if infs:
                    why = f"infinite activations in layer(s) {infs}"
        if why is not None:
            frac = bad_values / total_values if nonfinite and total_values else 1.0
            alerts.append(Alert(kind="diverged", epoch=index,
                                message=f"diverged at {self.unit} {index}: {why}; the concept pass is skipped. "
                                        "Lower the learning rate or restart from an earlier checkpoint.",
                                evidence={"reason": why, "nonfinite_tensors": nonfinite[:20],
                                          "nonfinite_values": bad_values, "values": total_values},
                                margin=float(frac)))
            stim = None
        key = None
        if stim is not None:
            key = f"stimuli/{label}.npz"
            _save_stimuli(self.store.path(key), stim)
            self._stimuli[index] = stim
        seconds["stimuli"] = time.perf_counter() - t

        entry = {"index": index, "checkpoint": f"checkpoints/{label}.safetensors", "stimuli": key,
                 "train_top1": _finite(train_acc) if train_acc is not None else _finite(probe_acc),
                 "test_top1": _finite(test_acc), "probe_top1": _finite(probe_acc),
                 "train_acc_source": "caller" if train_acc is not None else "probe", "diverged": why is not None,
                 "probe_pass": "caller" if shared is not None else "monitor"}
        if self.tracer is not None and getattr(self.tracer, "model", None) is not None:
            entry["trace_top_classes"] = self.tracer.class_update_shares(top=3)
        self.entries.append(entry)
        self.calls += 1

        # 3. space: fit / refit the base, project, lay out
        t = time.perf_counter()
        first = self.space is None and index >= self.base_from
        due = (self.space is not None and self.refit_every is not None
               and self.calls - self.fitted_at_call >= self.refit_every)
        refit = stim is not None and (first or due)
        try:
            if refit:
                self._fit_base(index)
            elif stim is not None and self.space is not None:
                self.space.add(self.name, index, stim, replace=True)
        except EmbeddingError as exc:
            log.warning("monitor: the unified space could not be updated at %s %d: %s", self.unit, index, exc)
        seconds["space"] = time.perf_counter() - t
        t = time.perf_counter()
        emb = None
        if self.space is not None:
            try:
                self.space.layout_2d(self.layout, seed=self.seed)
                emb = self.space.embeddings()
            except EmbeddingError as exc:
                log.warning("monitor: no 2-D layout at %s %d: %s", self.unit, index, exc)
        seconds["layout"] = time.perf_counter() - t

        # 4. diagnostics and alerts
        t = time.perf_counter()
        self.diagnosis = None
        if emb is not None:
            try:
                p = self.alert_params
                self.diagnosis = diagnostics.diagnose(
                    emb, {self.name: self._log_frame()}, reference=self.name,
                    collapse_fraction=p.collapse_fraction, accuracy_drop=p.accuracy_drop, slow_ratio=p.slow_ratio,
                    min_gain=p.min_gain, peak_from_epoch=self.peak_from, cache=self._diag_cache)
            except (EmbeddingError, DataError, ValueError) as exc:
                log.warning("monitor: diagnostics skipped at %s %d: %s", self.unit, index, exc)
        alerts += decide_alerts(self.diagnosis, self.name, index, self.alert_params, self.peak_from)
        seconds["diagnostics"] = time.perf_counter() - t

        # 5. logs
        t = time.perf_counter()
        for a in alerts:
            log.warning("conceptevo monitor alert [%s] at %s %d: %s", a.kind, self.unit, index, a.message)
        self.alerts.extend(alerts)
        entry["alerts"] = [a.kind for a in alerts]
        entry["seconds"] = seconds
        self._write_logs(index, entry, alerts, emb)
        seconds["logs"] = time.perf_counter() - t
        entry["seconds"] = seconds
        self._save_state()
        return alerts

    def _forget_from(self, index: int) -> None:
        """A re-observed index (a restarted loop): drop it and every later observation."""
        if not self.entries or index > self.entries[-1]["index"]:
            return
        dropped = [e["index"] for e in self.entries if e["index"] >= index]
        self.entries = [e for e in self.entries if e["index"] < index]
        self.alerts = [a for a in self.alerts if a.epoch < index]
        for i in dropped:
            self._stimuli.pop(i, None)
        if self.base is not None and self.base >= index:
            self.space, self.base = None, None
        elif self.space is not None:
            self._rebuild_space(self.base)
        log.info("monitor: %s %d observed again; dropped observations %s", self.unit, index, dropped)

    def _save_checkpoint(self, path: Path) -> tuple[list[str], int, int]:
        """Weights-only safetensors of the model; (non-finite tensor names, bad values, all values)."""
        from safetensors.torch import save_file

        state, bad, nonfinite, total = {}, 0, [], 0
        seen: dict[int, str] = {}
        with torch.no_grad():
            for k, v in self.model.state_dict().items():
                v = v.detach()
                if v.is_floating_point() or v.is_complex():
                    nb = int((~torch.isfinite(v)).sum())
                    total += v.numel()
                    if nb:
                        bad += nb
                        nonfinite.append(k)
                host = v.to("cpu", copy=True).contiguous()
                ptr = v.data_ptr()
                if ptr in seen and v.numel():  # tied weights: safetensors refuses shared storage
                    host = host.clone()
                seen[ptr] = k
                state[k] = host
        atomic_write(path, lambda tmp: save_file(state, str(tmp)))
        return nonfinite, bad, total

    def _fit_base(self, index: int) -> None:
        from .space import UnifiedSpace

        space = UnifiedSpace.fit(self._stimuli[index], model=self.name, epoch=index, seed=self.seed,
                                 **self.space_kw)
        shutil.rmtree(self.store.path("space_base"), ignore_errors=True)
        space.save(self.store.path("space_base"))
        self.space, self.base, self.fitted_at_call = space, index, self.calls
        self._rebuild_space(index)

    def _rebuild_space(self, base: int | None) -> None:
        """Project every other observed checkpoint again (index order) into the current space."""
        from .space import UnifiedSpace

        if base is None:
            return
        space = UnifiedSpace.load(self.store.path("space_base"))
        for i in sorted(self._stimuli):
            if i != base:
                space.add(self.name, i, self._stimuli[i], replace=True)
        self.space = space

    # ------------------------------------------------------------------ logs
    def _log_frame(self) -> pd.DataFrame:
        rows = [{"epoch": e["index"], "train_top1": e["train_top1"], "test_top1": e["test_top1"]}
                for e in self.entries]
        df = pd.DataFrame(rows, columns=["epoch", "train_top1", "test_top1"]).astype(
            {"epoch": np.int64, "train_top1": np.float64, "test_top1": np.float64})
        return df

    def _metrics_table(self) -> pd.DataFrame:
        base = pd.DataFrame([{"epoch": e["index"], "train_top1": e["train_top1"], "test_top1": e["test_top1"],
                              "probe_top1": e["probe_top1"], "diverged": e["diverged"],
                              "alerts": ",".join(e.get("alerts", [])),
                              **{f"seconds_{k}": v for k, v in e.get("seconds", {}).items()}}
                             for e in self.entries])
        if base.empty:
            return base
        base = base.astype({"train_top1": np.float64, "test_top1": np.float64, "probe_top1": np.float64})
        if self.diagnosis is not None:
            d = self.diagnosis.table
            cols = [c for c in ("diversity", "diversity_knn", "diversity_knn_se", "entropy_x", "entropy_y",
                                "n_neurons", "n_dead", "movement",
                                "movement_2d", "train_gain", "movement_per_gain") if c in d]
            base = base.merge(d[d["model"] == self.name][["epoch", *cols]], on="epoch", how="left")
        base.insert(0, "model", self.name)
        base.insert(1, "unit", self.unit)
        return base

    def _write_logs(self, index: int, entry: dict, alerts: list[Alert], emb: pd.DataFrame | None) -> None:
        table = self._metrics_table()
        row = table[table["epoch"] == index].iloc[-1].to_dict() if not table.empty else {}
        rec = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        rec.update({"time": time.time(), "base": self.base, "seconds": entry["seconds"],
                    "alerts": [a.to_dict() for a in alerts]})
        if "trace_top_classes" in entry:
            rec["trace_top_classes"] = entry["trace_top_classes"]
        rec.pop("alerts_str", None)
        if self.diagnosis is not None and not self.diagnosis.speed.empty:
            rec["milestone_speed"] = self.diagnosis.speed.drop(columns=["model"]).to_dict("records")
        line = json.dumps(rec, default=json_default) + "\n"
        with open(self.store.path("metrics.jsonl"), "a", encoding="utf-8") as fh:
            fh.write(line)
        if alerts:
            with open(self.store.path("alerts.jsonl"), "a", encoding="utf-8") as fh:
                fh.writelines(json.dumps(a.to_dict()) + "\n" for a in alerts)
        self.store.save_table("metrics", table)
        img = None
        if emb is not None and {"x", "y"} <= set(emb.columns):
            img = _map_image(emb[["x", "y"]].to_numpy(np.float64), emb["epoch"].to_numpy())
        if self._tb:
            self._tensorboard(index, rec, alerts, img)
        self._write_html(table, img)

    def _tensorboard(self, index: int, rec: dict, alerts: list[Alert], img: np.ndarray | None) -> None:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.store.path("tensorboard")))
        w = self._writer
        for col in ("diversity", "movement", "movement_2d", "movement_per_gain", "train_top1", "test_top1",
                    "probe_top1", "n_dead"):
            v = _finite(rec.get(col))
            if v is not None:
                w.add_scalar(f"conceptevo/{col}", v, index)
        for stage, s in rec["seconds"].items():
            w.add_scalar(f"conceptevo/seconds_{stage}", s, index)
        if img is not None:
            w.add_image("conceptevo/map", img, index, dataformats="HWC")
        for a in alerts:
            w.add_text(f"conceptevo/alert_{a.kind}", a.message, index)
        w.flush()

    def _write_html(self, table: pd.DataFrame, img: np.ndarray | None) -> None:
        esc = _html.escape
        cols = [c for c in ("epoch", "train_top1", "test_top1", "probe_top1", "diversity", "movement",
                            "movement_per_gain", "n_dead", "alerts") if c in table]
        head = "".join(f"<th>{esc('step' if c == 'epoch' and self.unit == 'step' else c)}</th>" for c in cols)
        body = []
        for _, r in table.iterrows():
            cells = []
            for c in cols:
                v = r[c]
                cells.append(f"<td>{v:.4g}</td>" if isinstance(v, float) and math.isfinite(v)
                             else f"<td>{esc('' if v is None or (isinstance(v, float) and not math.isfinite(v)) else str(v))}</td>")
            body.append("<tr>" + "".join(cells) + "</tr>")
        alerts = "".join(f"<li><b>{esc(a.kind)}</b> at {esc(str(self.unit))} {a.epoch} (margin {a.margin:.3g}): "
                         f"{esc(a.message)}</li>" for a in reversed(self.alerts)) or "<li>none</li>"
        charts = "".join(_svg_chart(table, c) for c in ("diversity", "movement", "train_top1", "test_top1")
                         if c in table and table[c].notna().any())
        mapimg = f'<img alt="2-D map" src="data:image/png;base64,{_png_base64(img)}">' if img is not None else ""
        doc = f"""<!doctype html><html><head><meta charset="utf-8">
<meta http-equiv="refresh" content="{self.html_refresh}">
<title>ConceptEvo monitor: {esc(self.name)}</title>
<style>body{{font-family:sans-serif;margin:1.5em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 6px;text-align:right}}li{{margin:.3em 0}}svg{{margin:4px}}</style>
</head><body><h1>ConceptEvo monitor: {esc(self.name)}</h1>
<p>{len(self.entries)} observations; base {esc(str(self.unit))} {self.base}; layout {esc(self.layout)};
updated {time.strftime('%Y-%m-%d %H:%M:%S')}; refreshes every {self.html_refresh} s.</p>
<h2>Alerts</h2><ul>{alerts}</ul><h2>Metrics</h2><div>{charts}</div>
<table><tr>{head}</tr>{''.join(body)}</table>
<h2>Map (blue: early, red: latest)</h2>{mapimg}</body></html>
"""
        atomic_write(self.store.path("monitor.html"), lambda tmp: tmp.write_text(doc, encoding="utf-8"))

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _svg_chart(table: pd.DataFrame, col: str, w: int = 260, h: int = 120) -> str:
    d = table[["epoch", col]].astype({col: np.float64})
    d = d[np.isfinite(d[col].to_numpy())]
    if d.empty:
        return ""
    x, y = d["epoch"].to_numpy(np.float64), d[col].to_numpy(np.float64)
    x0, x1 = x.min(), x.max() if x.max() > x.min() else x.min() + 1
    y0, y1 = y.min(), y.max() if y.max() > y.min() else y.min() + 1
    px = 30 + (x - x0) / (x1 - x0) * (w - 40)
    py = h - 20 - (y - y0) / (y1 - y0) * (h - 35)
    pts = " ".join(f"{a:.1f},{b:.1f}" for a, b in zip(px, py))
    return (f'<svg width="{w}" height="{h}" style="border:1px solid #ddd"><text x="4" y="12" font-size="11">'
            f'{_html.escape(col)}: {y[-1]:.3g} (min {y.min():.3g}, max {y.max():.3g})</text>'
            f'<polyline fill="none" stroke="#36c" stroke-width="1.5" points="{pts}"/></svg>')


# ================================================================================ Lightning
def lightning_callback(monitor: Monitor, train_metric: str = "train_acc", test_metric: str = "val_acc",
                       stop_on: Sequence[str] = ("diverged",), ride_validation: bool = False):
    """A Lightning ``Callback`` that calls ``monitor.epoch_end`` after every training epoch.

    Accuracies are read from ``trainer.callback_metrics[train_metric / test_metric]`` when logged
    (else the probe's accuracy is used). Epochs are counted from 1 (``current_epoch + 1``).
    An alert whose kind is in ``stop_on`` sets ``trainer.should_stop``. The alerts of the last
    epoch are in ``callback.last_alerts``. Needs ``lightning`` or ``pytorch_lightning``.

    ``ride_validation=True``: the monitor's probe IS the validation set, fed by one dataloader in
    order (``shuffle=False``), one validation pass per epoch; the monitor then rides the validation pass (:meth:`Monitor.riding`)
    instead of running its own forward, and observes at the epoch's end with the logged
    accuracies. The sanity-check pass is not observed; an epoch without a validation pass is
    observed with the monitor's own forward. A validation pass over other images than the probe
    is a :class:`DataError` naming the counts.
    """
    pl = _lightning()
    if pl is None:
        raise ConceptEvoError("lightning_callback needs lightning (pip install lightning) or pytorch_lightning")

    class ConceptEvoCallback(pl.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.monitor = monitor
            self.last_alerts: list[Alert] = []
            self._ride: tuple[Any, RidingPass] | None = None  # (context, pass) while riding

        def on_validation_epoch_start(self, trainer, pl_module) -> None:
            if ride_validation and not trainer.sanity_checking and self._ride is None:
                ctx = self.monitor.riding(int(trainer.current_epoch) + 1)
                self._ride = (ctx, ctx.__enter__())

        def on_exception(self, trainer, pl_module, exception) -> None:
            if self._ride is not None:  # remove the hooks, observe nothing
                ctx, self._ride = self._ride[0], None
                with contextlib.suppress(Exception):
                    ctx.__exit__(type(exception), exception, exception.__traceback__)

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            m = trainer.callback_metrics
            tr = _finite(m[train_metric]) if train_metric in m else None
            te = _finite(m[test_metric]) if test_metric in m else None
            if self._ride is not None:
                (ctx, rp), self._ride = self._ride, None
                rp.set_accuracy(train_acc=tr, test_acc=te)
                ctx.__exit__(None, None, None)  # the observation (or the count error)
                self.last_alerts = rp.alerts
            else:
                self.last_alerts = self.monitor.epoch_end(int(trainer.current_epoch) + 1, train_acc=tr, test_acc=te)
            if any(a.kind in stop_on for a in self.last_alerts):
                trainer.should_stop = True

    return ConceptEvoCallback()


# ====================================================================== a run's alerts, after it
def chance_band(num_classes: int, n_eval: int, sigmas: float = 3.0) -> float:
    """Top-1 accuracy indistinguishable from guessing: ``1/C + sigmas * sqrt(p (1 - p) / n)``.

    ``n_eval`` is the number of images the accuracy was measured on; the band is the binomial
    upper ``sigmas`` bound of a chance-level classifier (no run-specific constant)."""
    p = 1.0 / max(1, int(num_classes))
    return float(p + sigmas * math.sqrt(p * (1.0 - p) / max(1, int(n_eval))))


def alert_summary(run_dir: str | Path) -> dict[str, Any] | None:
    """What the live monitor of a built-in training run (``<run>/monitor``) said, and when.

    Reads the run's ``run.json`` and ``log.parquet`` (:func:`conceptevo.train.train_run`) and the
    monitor's ``metrics.parquet`` and its current alerts (``monitor_state.json``; else the
    append-only ``alerts.jsonl``). Returns None when the run had no monitor,
    else ``run, observations, alerts`` (kind, epoch, margin, message and the training top-1 at that
    epoch), ``first`` (kind -> first epoch), ``peak_epoch`` / ``peak_top1`` (best training top-1),
    ``chance_band`` (:func:`chance_band` over the trainer's accuracy sample) and ``chance_epoch``:
    the first epoch after the peak whose training top-1 is within that band (None: never).
    """
    run_dir = Path(run_dir)
    mdir = run_dir / "monitor"
    if not (mdir / "metrics.parquet").exists():
        return None
    metrics = pd.read_parquet(mdir / "metrics.parquet")
    alerts = []
    state = mdir / _STATE
    if state.exists():  # the current alerts (a re-observed index drops the later ones; the log keeps them)
        alerts = json.loads(state.read_text(encoding="utf-8")).get("alerts", [])
    elif (mdir / "alerts.jsonl").exists():
        alerts = [json.loads(line) for line in (mdir / "alerts.jsonl").read_text(encoding="utf-8").splitlines()
                  if line.strip()]
    out: dict[str, Any] = {"run": run_dir.name, "observations": int(len(metrics)), "alerts": [], "first": {},
                           "peak_epoch": None, "peak_top1": None, "chance_band": None, "chance_epoch": None}
    acc = None
    if (run_dir / "log.parquet").exists() and (run_dir / "run.json").exists():
        card = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
        log_df = pd.read_parquet(run_dir / "log.parquet").sort_values("epoch")
        hyper = card.get("hyper", {})
        n_train = hyper.get("train_subset") or card.get("train_data", {}).get("size") or 0
        n_eval = n_train if hyper.get("eval_train_max") is None else min(n_train, int(hyper["eval_train_max"]))
        band = chance_band(int(card["num_classes"]), n_eval)
        acc = dict(zip(log_df["epoch"].astype(int), log_df["train_top1"].astype(float)))
        peak = log_df.loc[log_df["train_top1"].idxmax()]
        after = log_df[(log_df["epoch"] > peak["epoch"]) & (log_df["train_top1"] <= band)]
        out.update(peak_epoch=int(peak["epoch"]), peak_top1=float(peak["train_top1"]), chance_band=band,
                   chance_epoch=int(after["epoch"].iloc[0]) if len(after) else None)
    for a in alerts:
        e = int(a["epoch"])
        out["alerts"].append({"kind": a["kind"], "epoch": e, "margin": a.get("margin"), "message": a["message"],
                              "train_top1": None if acc is None else acc.get(e)})
        out["first"].setdefault(a["kind"], e)
    return out


def alerts_report_section(summaries: Sequence[dict[str, Any]]) -> str:
    """An HTML section of the report: each monitored run's alerts, with the epoch and accuracy."""
    rows = []
    for s in summaries:
        chance = ("never" if s.get("chance_epoch") is None else f"epoch {s['chance_epoch']}") \
            if s.get("chance_band") is not None else "-"
        if not s["alerts"]:
            rows.append(f"<tr><td>{_html.escape(s['run'])}</td><td>none</td><td></td><td></td><td></td>"
                        f"<td>{chance}</td><td>{s['observations']} observations, no alert</td></tr>")
        for a in s["alerts"]:
            acc = "" if a.get("train_top1") is None else f"{a['train_top1']:.3f}"
            rows.append(f"<tr><td>{_html.escape(s['run'])}</td><td>{_html.escape(a['kind'])}</td>"
                        f"<td>{a['epoch']}</td><td>{acc}</td><td>{(a.get('margin') or float('nan')):+.3f}</td>"
                        f"<td>{chance}</td><td>{_html.escape(a['message'])}</td></tr>")
    return ('<section><h2>Live monitor: when each alert fired during training</h2>'
            '<p class="note">Each run was watched by <code>conceptevo.monitor.Monitor</code> at every epoch '
            '(its probe: the images the run evaluates on, or a sample of training images); an alert is what a '
            'training loop would have received at that epoch. '
            '"At chance from": the first epoch after the best one whose training top-1 is within three binomial '
            'standard deviations of guessing.</p>'
            '<table class="evo"><thead><tr><th>run</th><th>alert</th><th>epoch</th><th>train top-1</th>'
            '<th>margin</th><th>at chance from</th><th>message</th></tr></thead><tbody>'
            + "".join(rows) + "</tbody></table></section>")
