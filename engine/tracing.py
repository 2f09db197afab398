"""Tracing the training process (Pfahler & Morik, arXiv 2109.05880): *what in training* changed a layer.

For a Conv2d or Linear layer ``l`` with weight ``W`` and bias ``b``, the change of its
pre-activation on an input ``x`` between epochs ``t`` and ``t'`` *with the input map held
fixed* is a sum over the updates made in between::

    Δz(x) = (W_t' − W_t) ⊛ a(x) + (b_t' − b_t) = Σ_s c_s(x),   c_s(x) = ΔW_s ⊛ a(x) + Δb_s

``⊛`` is the layer's own operation (``F.conv2d`` with its stride/padding/dilation/groups, or
the matrix product). Each source's bias change is *folded into* its term ``c_s`` (a source
is one thing that changed the layer: its weight and its bias part together). ``a(x)`` is
the layer's input computed by a fixed network: the final one (``input_from="final"``, the
original method), the ``t'`` one (``"t_prime"``, what ConceptEvo's evolutions ``t -> t'``
use), or the ``t`` one (``"t"``). Every source is scored by

    dot_s = ⟨c_s, Δz⟩,  norm_s = ‖c_s‖,  cos_s = dot_s / (‖c_s‖ ‖Δz‖),  share_s = dot_s / ‖Δz‖²

so ``Σ_s norm_s·cos_s = ‖Δz‖`` and ``Σ_s share_s = 1`` exactly (up to float rounding).
NOTE: ConceptEvo's Eq. 2 uses ``Z^{t'}(x) − Z^t(x)`` with each network's *own* input map;
the traced ``Δz`` holds the input fixed, so it is the part of that change made in this layer.

Sources, from free to fine:

* **checkpoints** -- telescoping over the saved checkpoints, ``ΔW_e = W_{e+1} − W_e``; needs
  no recording, works on any run (:func:`checkpoint_sources`).
* **classes** -- a :class:`Tracer` observes the optimiser and splits every step's update by
  the class of the batch rows that caused it:

  - the per-class weight gradient ``g^c`` of a layer is the weight-gradient of the class-c
    rows only. It is computed from the layer's input and output-gradient that hooks already
    hold, with the batch gathered in class order once per layer: small conv maps (<= 256
    positions) by one im2col and one matrix product per class, larger ones by oneDNN's
    weight-gradient per class (slices padded to powers of two), Linear layers by one batched
    product. The classes partition the batch, so together they cost a few weight-gradients
    of the layer (the many tiny per-class products run below the full-batch efficiency). Any common factor between ``Σ_c g^c`` and the gradient the
    optimiser used (gradient clipping, a loss scale) is measured (``κ``) and applied;
    whatever remains (extra loss terms on the weights) is the source ``other``.
  - SGD (any momentum, dampening, Nesterov, weight decay): **exact**. The update is linear
    in the gradients, so per-source momentum buffers ``v^s ← μ v^s + (1−d) g^s`` reproduce
    it; weight decay ``λ W`` is its own source ``weight_decay``; a momentum buffer that
    existed when the tracer attached is the source ``prior_momentum``. The same recurrence
    on the summed gradient in float64 is checked against the actual update every step
    (``max_mismatch``); the float rounding of the per-source state goes to ``other`` when a
    window closes, so the sources sum to ``W_t' − W_t`` exactly.
  - Adam, AdamW and other optimisers: **approximate**. Per-source first moments
    ``m^s`` (β1 of the optimiser, or its momentum, else 0) and the actual update split
    element-wise in proportion ``m^s·m/(m²+ε²)``; AdamW's decoupled decay is the exact source
    ``weight_decay``. Such sources carry ``exact=False`` in every table.

* **steps** (optional) -- the per-step update of each traced layer, stored as float16 or
  bfloat16 in chunks; the storage formula is printed before recording. Rounded, so labelled
  inexact.
* **examples** (optional, exact for SGD without Nesterov) -- per-example weight-gradients of
  chosen layers (from the same hooks: the per-example gradient of a Linear layer is
  ``δ_i ⊗ a_i``; of a conv, ``δ_i`` correlated with ``a_i``), or a Gaussian random
  projection of them (``sketch=k``). An example seen at step ``s`` contributes
  ``−Σ_{s'} lr_{s'} μ^{s'−s} f_s g_i`` to the window (``f_s = 1−dampening`` after the first
  step). The scores of a sketch deviate from the exact ones by at most
  ``ε·|coef|·‖g_i‖·‖G(x)‖`` with ``ε = sqrt(8 ln(4/δ)/k)`` and probability ``≥ 1−δ`` per
  score (inner-product Johnson–Lindenstrauss; ``G(x)`` is the weight-gradient of
  ``⟨z(x), Δz⟩``, see :func:`sketch_bound`).

Recorded files live in ``<run>/trace/`` (``trace.json`` + ``window_<t>_<t'>.pt`` per window,
plain tensors, weights-only loadable; ``steps/`` and ``examples/`` chunks when asked).

:func:`explain` gives the table of sources for one input at any recorded granularity
(``granularity="class" | "checkpoint" | "step" | "example"``), :func:`example_grid` draws the
top training examples of an example-level table as an image grid (PNG),
:func:`class_contributions` gives the per-class contribution distributions per layer (the
original's ridge plots; :func:`contributions_figure` draws them), :func:`attribute_evolutions`
joins the sources with ConceptEvo's important evolutions (which training classes drove them),
:func:`trace_run` (``conceptevo trace``) writes ``trace_sources.parquet`` and
``trace_classes.parquet`` (and optionally ``trace_explain.parquet``,
``trace_examples_<layer>.png``, ``trace_contributions.parquet``), and :func:`report_section`
renders the HTML fragment of the report. :meth:`Tracer.class_update_shares` feeds the live
monitor (``Monitor(..., tracer=tracer)``).
"""
from __future__ import annotations

import html
import itertools
import json
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from .errors import CheckpointError, ConceptEvoError, LayerError

__all__ = [
    "LayerSources",
    "TraceRun",
    "Tracer",
    "attribute_evolutions",
    "checkpoint_sources",
    "class_contributions",
    "contributions_figure",
    "decompose",
    "example_grid",
    "example_sources",
    "explain",
    "explain_examples",
    "layer_info",
    "layer_input",
    "original_storage_bytes",
    "report_section",
    "sketch_bound",
    "step_sources",
    "storage_bytes",
    "trace_run",
]

_EXTRA = ("weight_decay", "prior_momentum", "other")
_GEMM_MAX_L = 256      # conv output maps up to this many positions: class gradients by im2col + GEMM


# ----------------------------------------------------------------------------- layers
@dataclass
class LayerInfo:
    """How a traced layer computes: enough to apply a weight change to an input map."""

    name: str
    kind: str                         # "conv2d" | "linear"
    weight_shape: tuple[int, ...]
    has_bias: bool
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1

    def apply(self, a: torch.Tensor, dw: torch.Tensor, db: torch.Tensor | None) -> torch.Tensor:
        """``dw ⊛ a + db``; ``dw`` may stack several sources along the output dimension."""
        if self.kind == "conv2d":
            return F.conv2d(a, dw, db, self.stride, self.padding, self.dilation, self.groups)
        return F.linear(a, dw, db)

    def weight_grad(self, a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """Weight-gradient of ``⟨z, d⟩`` summed over the batch (``a``: input, ``d``: output grad)."""
        if self.kind == "conv2d":
            return torch.nn.grad.conv2d_weight(a, self.weight_shape, d, self.stride, self.padding,
                                               self.dilation, self.groups)
        return d.reshape(-1, d.shape[-1]).T @ a.reshape(-1, a.shape[-1])

    def example_grads(self, a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """Per-example weight-gradients, ``(B, *weight_shape)``."""
        if self.kind == "linear":
            if a.dim() != 2:
                return torch.einsum("b...o,b...i->boi", d, a)
            return d[:, :, None] * a[:, None, :]
        if self.groups != 1:
            return torch.stack([self.weight_grad(a[i:i + 1], d[i:i + 1]) for i in range(a.shape[0])])
        k = self.weight_shape[2:]
        # unfold is slow on channels-last maps: make both contiguous (NCHW) first
        cols = F.unfold(a.contiguous(), k, self.dilation, self.padding, self.stride)   # (B, Cin*kh*kw, L)
        g = torch.bmm(d.contiguous().flatten(2), cols.transpose(1, 2))               # (B, Cout, Cin*kh*kw)
        return g.reshape(a.shape[0], *self.weight_shape)

    def bias_grad(self, d: torch.Tensor) -> torch.Tensor:
        """Per-row bias gradient ``(B, Cout)``."""
        if self.kind == "conv2d":
            return d.sum((2, 3))
        return d.reshape(d.shape[0], -1, d.shape[-1]).sum(1)


def layer_info(model: nn.Module, name: str) -> LayerInfo:
    """The :class:`LayerInfo` of module ``name`` (a Conv2d or Linear), with clear errors."""
    mods = dict(model.named_modules())
    if name not in mods:
        preview = ", ".join(n for n in mods if n)[:400]
        raise LayerError(f"the model has no layer {name!r}; it has: {preview}")
    m = mods[name]
    if isinstance(m, nn.Conv2d):
        if m.padding_mode != "zeros":
            raise LayerError(f"layer {name!r}: padding_mode={m.padding_mode!r} is not traced (only 'zeros')")
        pad = m.padding
        if isinstance(pad, str):
            if pad != "valid":
                raise LayerError(f"layer {name!r}: padding={pad!r} is not traced; use explicit padding")
            pad = (0, 0)
        return LayerInfo(name, "conv2d", tuple(m.weight.shape), m.bias is not None, tuple(m.stride), tuple(pad),
                         tuple(m.dilation), int(m.groups))
    if isinstance(m, nn.Linear):
        return LayerInfo(name, "linear", tuple(m.weight.shape), m.bias is not None)
    raise LayerError(f"layer {name!r} is a {type(m).__name__}; tracing handles Conv2d and Linear layers")


def _select(model: nn.Module, layers) -> list[str]:
    from .adapter import select_layers

    if layers is None:
        layers = nn.Conv2d
    names = select_layers(model, layers)
    for n in names:
        layer_info(model, n)  # raises for untraceable layers
    return names


# ---------------------------------------------------------------------------- sources
@dataclass
class LayerSources:
    """The sources of one layer's change over a window: ``Σ_s dw[s] = W_t' − W_t`` (and ``db``).

    ``meta`` has one row per source: ``source`` (label), ``kind`` (checkpoint, class,
    weight_decay, prior_momentum, other, step, example), ``class`` (-1 unless a class or
    example), ``epoch_from``, ``epoch_to``, ``exact`` (bool), ``example`` (-1 unless an example).
    """

    layer: str
    dw: torch.Tensor                  # (S, *weight_shape)
    db: torch.Tensor | None           # (S, Cout) or None
    meta: pd.DataFrame

    def total(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return (self.dw.sum(0, dtype=torch.float64),
                None if self.db is None else self.db.sum(0, dtype=torch.float64))

    def grouped(self, by: str = "class") -> LayerSources:
        """Sum sources that share ``by`` (e.g. a class's sources over several epochs)."""
        keys = self.meta[by].astype(str) if by != "class" else self.meta.apply(
            lambda r: f"class {int(r['class'])}" if r["kind"] in ("class", "example") else r["kind"], axis=1)
        order = list(dict.fromkeys(keys))
        idx = torch.tensor([order.index(k) for k in keys])
        # sums in float64 (the sources may be stored in float32), a block of sources at a time
        dw = torch.zeros((len(order),) + tuple(self.dw.shape[1:]), dtype=torch.float64)
        for lo in range(0, len(idx), 64):
            dw.index_add_(0, idx[lo:lo + 64], self.dw[lo:lo + 64].double())
        db = None if self.db is None else torch.zeros((len(order), self.db.shape[1]), dtype=torch.float64
                                                      ).index_add_(0, idx, self.db.double())
        rows = []
        for k in order:
            part = self.meta[keys.values == k]
            first = part.iloc[0]
            rows.append({"source": k if by != "class" else (first["source"].split(" @")[0]),
                         "kind": first["kind"] if by == "class" else by,
                         "class": int(first["class"]) if part["class"].nunique() == 1 else -1,
                         "epoch_from": int(part["epoch_from"].min()), "epoch_to": int(part["epoch_to"].max()),
                         "exact": bool(part["exact"].all()), "example": -1})
        return LayerSources(self.layer, dw, db, pd.DataFrame(rows))


def _meta(rows: list[dict]) -> pd.DataFrame:
    cols = ["source", "kind", "class", "epoch_from", "epoch_to", "exact", "example"]
    df = pd.DataFrame(rows, columns=cols)
    for c in ("class", "epoch_from", "epoch_to", "example"):
        df[c] = df[c].astype("int64")
    df["exact"] = df["exact"].astype(bool)
    return df


def checkpoint_sources(states: Mapping[int, Mapping[str, torch.Tensor]], layer: str,
                       t: int | None = None, t2: int | None = None) -> LayerSources:
    """Telescoping sources of ``layer`` between checkpoints: ``ΔW_e = W_{e'} − W_e`` for
    consecutive saved epochs ``e < e'`` in ``[t, t']`` (default: all). Exact, free."""
    epochs = sorted(int(e) for e in states)
    t = epochs[0] if t is None else int(t)
    t2 = epochs[-1] if t2 is None else int(t2)
    for e in (t, t2):
        if e not in states:
            raise CheckpointError(f"no checkpoint for epoch {e}; saved epochs: {epochs}")
    if t2 <= t:
        raise ConceptEvoError(f"need t < t', got t={t}, t'={t2}")
    use = [e for e in epochs if t <= e <= t2]
    wkey, bkey = f"{layer}.weight", f"{layer}.bias"
    for e in use:
        if wkey not in states[e]:
            raise CheckpointError(f"checkpoint of epoch {e} has no {wkey!r} (layer {layer!r})")
    has_b = bkey in states[use[0]]
    dws, dbs, rows = [], [], []
    for e0, e1 in itertools.pairwise(use):
        dws.append(states[e1][wkey].double() - states[e0][wkey].double())
        if has_b:
            dbs.append(states[e1][bkey].double() - states[e0][bkey].double())
        rows.append({"source": f"epochs {e0}->{e1}", "kind": "checkpoint", "class": -1, "epoch_from": e0,
                     "epoch_to": e1, "exact": True, "example": -1})
    return LayerSources(layer, torch.stack(dws), torch.stack(dbs) if has_b else None, _meta(rows))


# ----------------------------------------------------------------------------- scoring
def _positions(info: LayerInfo, a: torch.Tensor) -> torch.Tensor:
    """The layer's input patches, one row per output position: ``(N, K)`` with ``z = X Wᵀ + b``
    (conv: the unfolded map, K ordered like ``weight.reshape(Cout, -1)``)."""
    if info.kind == "linear":
        return a.reshape(-1, a.shape[-1])
    u = F.unfold(a, info.weight_shape[2:], info.dilation, info.padding, info.stride)   # (B, K, L)
    return u.transpose(1, 2).reshape(-1, u.shape[1])


def _outputs(info: LayerInfo, z: torch.Tensor) -> torch.Tensor:
    """A layer output (or its change) as ``(N, C)``, rows in :func:`_positions`' order."""
    if info.kind == "linear":
        return z.reshape(-1, z.shape[-1])
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])


def decompose(info: LayerInfo, a: torch.Tensor, src: LayerSources, dz: torch.Tensor | None = None,
              channels: Sequence[int] | None = None, chunk: int = 64) -> tuple[pd.DataFrame, dict]:
    """Score every source of ``src`` on the input map ``a`` (a batch counts as one long vector).

    ``dz`` defaults to ``Σ_s c_s``'s reference ``(ΣΔW) ⊛ a + ΣΔb`` computed from the summed
    change; pass the checkpoint difference to check exactness. ``channels`` restricts
    ``z`` to those output channels (a neuron's map). Returns the table (meta + dot, norm,
    cos, share) and ``{"dz_norm", "residual"}`` with ``residual = ‖Σ_s c_s − Δz‖/‖Δz‖``.

    All in float64 on the unfolded input ``X`` (``c_s = X ΔW_sᵀ + Δb_s``), without forming
    the sources' outputs one by one: ``dot_s = ⟨ΔW_s, Δzᵀ X⟩ + ⟨Δb_s, Σ Δz⟩`` (one
    weight-gradient for all sources), ``‖c_s‖²`` from the Gram matrix ``XᵀX`` when the patch
    size is below the number of positions (else from ``X ΔW_sᵀ`` directly), and
    ``Σ_s c_s = X (Σ_s ΔW_s)ᵀ + Σ_s Δb_s`` (linear in the sources) for the residual.
    """
    a = a.double()
    s_count = src.dw.shape[0]
    cout = info.weight_shape[0]
    ch = list(range(cout)) if channels is None else [int(c) for c in channels]
    if dz is None:
        w, b = src.total()
        dz = info.apply(a, w[ch].double(), None if b is None else b[ch].double())
    dz = dz.double()
    if tuple(dz.shape[1:2]) != (len(ch),):
        dz = dz[:, ch] if dz.shape[1] == cout else dz
    if info.kind == "conv2d" and info.groups != 1:
        return _decompose_grouped(info, a, src, dz, ch, chunk)
    full = ch == list(range(cout))
    chi = None if full else torch.tensor(ch)
    X = _positions(info, a)                                    # (N, K)
    Z = _outputs(info, dz)                                     # (N, Cc)
    N, K = X.shape
    Cc = Z.shape[1]
    gram = K < N
    if gram:
        G = (Z.T @ X).reshape(-1)                              # weight-gradient of <z, dz>
        gb = Z.sum(0)
        M = X.T @ X
        v = X.sum(0)
    else:
        ZT = Z.T.contiguous()
        osum = torch.zeros(Cc, N, dtype=torch.float64)
    dots = torch.empty(s_count, dtype=torch.float64)
    norms2 = torch.empty(s_count, dtype=torch.float64)
    wsum = torch.zeros(Cc * K, dtype=torch.float64)
    bsum = torch.zeros(Cc, dtype=torch.float64)
    step = max(1, min(chunk * 8, (1 << 22) // max(1, Cc * (K if gram else N))))
    for lo in range(0, s_count, step):
        hi = min(s_count, lo + step)
        n = hi - lo
        dw = src.dw[lo:hi]
        dw = (dw if full else dw.index_select(1, chi)).double().reshape(n, Cc * K)
        db = None
        if src.db is not None:
            db = src.db[lo:hi]
            db = (db if full else db.index_select(1, chi)).double()
        W2 = dw.reshape(n * Cc, K)
        if gram:
            dots[lo:hi] = dw @ G + (db @ gb if db is not None else 0.0)
            wsum += dw.sum(0)
            q = ((W2 @ M) * W2).sum(1)
            if db is not None:
                bf = db.reshape(-1)
                q += 2.0 * bf * (W2 @ v) + bf * bf * N
                bsum += db.sum(0)
            norms2[lo:hi] = q.reshape(n, Cc).sum(1)
        else:
            # few positions: the sources' outputs themselves, one pass over the weight changes
            O = (W2 @ X.T).reshape(n, Cc, N)
            if db is not None:
                O += db.reshape(n, Cc, 1)
            osum += O.sum(0)
            dots[lo:hi] = (O * ZT).sum((1, 2))
            norms2[lo:hi] = O.pow(2).sum((1, 2))
    norms = norms2.clamp_min(0.0).sqrt()
    if gram:
        ssum = X @ wsum.reshape(Cc, K).T + (bsum if src.db is not None else 0.0)
    else:
        ssum = osum.T
    return _score_table(src, dots, norms, ssum, Z)


def _score_table(src: LayerSources, dots: torch.Tensor, norms: torch.Tensor, ssum: torch.Tensor,
                 dz: torch.Tensor) -> tuple[pd.DataFrame, dict]:
    s_count = dots.shape[0]
    dzn = float(dz.norm())
    res = float((ssum - dz).norm() / dzn) if dzn > 0 else float((ssum - dz).norm())
    table = src.meta.copy()
    table.insert(0, "layer", src.layer)
    table["dot"] = dots.numpy()
    table["norm"] = norms.numpy()
    denom = norms * dzn
    table["cos"] = torch.where(denom > 0, dots / denom.clamp_min(1e-300), torch.zeros_like(dots)).numpy()
    table["share"] = (dots / (dzn * dzn)).numpy() if dzn > 0 else np.zeros(s_count)
    table.attrs.update({"dz_norm": dzn, "residual": res})
    return table, {"dz_norm": dzn, "residual": res}


def _decompose_grouped(info: LayerInfo, a: torch.Tensor, src: LayerSources, dz: torch.Tensor, ch: list[int],
                       chunk: int) -> tuple[pd.DataFrame, dict]:
    """Grouped convolutions: every source's output by the layer's own operation."""
    s_count = src.dw.shape[0]
    dots = torch.empty(s_count, dtype=torch.float64)
    norms = torch.empty(s_count, dtype=torch.float64)
    ssum = torch.zeros_like(dz)
    for i in range(s_count):
        out = info.apply(a, src.dw[i][ch].double(), None if src.db is None else src.db[i][ch].double())
        ssum += out
        dots[i] = (out * dz).sum()
        norms[i] = out.norm()
    return _score_table(src, dots, norms, ssum, dz)


class _StopForward(Exception):
    pass


@torch.no_grad()
def layer_input(model: nn.Module, layer: str, x: torch.Tensor) -> torch.Tensor:
    """The input map of ``layer`` when ``model`` (eval mode) sees ``x``."""
    mods = dict(model.named_modules())
    if layer not in mods:
        raise LayerError(f"the model has no layer {layer!r}")
    got: list[torch.Tensor] = []

    def hook(m, inp):
        got.append(inp[0].detach())
        raise _StopForward                     # the rest of the network is not needed

    h = mods[layer].register_forward_pre_hook(hook)
    was = model.training
    model.eval()
    try:
        model(x)
    except _StopForward:
        pass
    finally:
        h.remove()
        model.train(was)
    if not got:
        raise LayerError(f"layer {layer!r} did not run in the forward pass")
    return got[0]


# ------------------------------------------------------------------------------ tracer
def _rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x[idx]`` along dim 0 in ``x``'s memory format, by whole-row copies (advanced indexing
    of a channels-last map copies element by element, several times slower)."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return x.permute(0, 2, 3, 1).index_select(0, idx).permute(0, 3, 1, 2)
    if x.is_contiguous():
        return x.index_select(0, idx)
    return x[idx]


class _ClassPlan:
    """The batch's rows grouped by class, for computing every class's weight-gradient at once.

    Rows are gathered in class order, each class padded with zero output-gradient rows to a
    bucket size (conv: the next power of two, so oneDNN meets few batch sizes and reuses its
    kernels; linear: the largest class, for one batched matrix product). The padding rows
    contribute exactly zero.
    """

    def __init__(self, y: torch.Tensor, num_classes: int):
        C = num_classes
        self.C = C
        self.order = torch.argsort(y, stable=True)
        self.counts = torch.bincount(y, minlength=C).tolist()
        self.n_max = max(self.counts) if self.counts else 0
        self._cache: dict[tuple[str, str], tuple] = {}

    def _layout(self, mode: str, dev: torch.device, cap: int) -> tuple:
        """``(idx, pad, segments)``: gather index into the batch, padded positions (zeroed in
        the output-gradient) and ``(class, lo, hi)`` slices of the gathered rows."""
        key = (mode, str(dev))
        if key in self._cache:
            return self._cache[key]
        order = self.order.tolist()
        idx, pad, segs, pos, start = [], [], [], 0, 0
        for c, n in enumerate(self.counts):
            if mode == "linear":
                m = self.n_max
            elif n == 0:
                start += n
                continue
            else:
                m = min(1 << (n - 1).bit_length(), cap)
            rows = order[start:start + n]
            start += n
            fill = rows[0] if rows else 0
            idx += rows + [fill] * (m - n)
            pad += list(range(pos + n, pos + m))
            segs.append((c, pos, pos + m))
            pos += m
        out = (torch.tensor(idx, dtype=torch.int64, device=dev), torch.tensor(pad, dtype=torch.int64, device=dev),
               segs)
        self._cache[key] = out
        return out

    def weight_grads(self, info: LayerInfo, a: torch.Tensor, d: torch.Tensor, out: torch.Tensor) -> None:
        """``out[c]`` = the weight-gradient of the class-c rows of the batch (``out``: ``(C, *shape)``)."""
        B = a.shape[0]
        if info.kind == "linear":
            idx, pad, _ = self._layout("linear", a.device, B)
            ag = _rows(a, idx).reshape(self.C, -1, a.shape[-1])          # (C, n_max*T, Cin)
            dg = _rows(d, idx)
            if len(pad):
                dg.index_fill_(0, pad, 0)
            dg = dg.reshape(self.C, -1, d.shape[-1])                     # (C, n_max*T, Cout)
            torch.bmm(dg.transpose(1, 2), ag, out=out.view(self.C, *info.weight_shape))
            return
        if (info.groups == 1 and d.dim() == 4 and d.shape[2] * d.shape[3] <= _GEMM_MAX_L
                and a.is_contiguous(memory_format=torch.channels_last)
                and d.is_contiguous(memory_format=torch.channels_last)):
            self._conv_gemm(info, a, d, out)
            return
        idx, pad, segs = self._layout("conv2d", a.device, B)
        ag, dg = _rows(a, idx), _rows(d, idx)
        if len(pad):
            dg.index_fill_(0, pad, 0)
        conv_bwd = torch.ops.aten.convolution_backward
        w = a.new_empty(1).expand(info.weight_shape)
        done = torch.zeros(self.C, dtype=torch.bool)
        for c, lo, hi in segs:
            out[c] = conv_bwd(dg[lo:hi], ag[lo:hi], w, None, info.stride, info.padding, info.dilation, False,
                              (0, 0), info.groups, (False, True, False))[1]
            done[c] = True
        if not bool(done.all()):
            out[~done.to(out.device)] = 0

    def _conv_gemm(self, info: LayerInfo, a: torch.Tensor, d: torch.Tensor, out: torch.Tensor) -> None:
        """Small maps (channels-last): one im2col of the class-sorted batch, then one matrix
        product per class over its contiguous rows (no padding, no per-call kernel set-up)."""
        order = self.order.to(a.device)
        a_s, d_s = _rows(a, order), _rows(d, order)
        B, Cin = a.shape[:2]
        Ho, Wo = d.shape[2:]
        kh, kw = info.weight_shape[2:]
        ph, pw = info.padding
        ap = F.pad(a_s, (pw, pw, ph, ph)) if ph or pw else a_s
        if not ap.is_contiguous(memory_format=torch.channels_last):
            ap = ap.contiguous(memory_format=torch.channels_last)
        sB, sC, sH, sW = ap.stride()
        (st_h, st_w), (dl_h, dl_w) = info.stride, info.dilation
        L, K, Cout = Ho * Wo, Cin * kh * kw, info.weight_shape[0]
        cols = ap.as_strided((B, Ho, Wo, kh, kw, Cin), (sB, sH * st_h, sW * st_w, sH * dl_h, sW * dl_w, sC)
                             ).reshape(B * L, K)                         # columns ordered (kh, kw, Cin)
        dm = d_s.permute(0, 2, 3, 1).reshape(B * L, Cout)
        buf = torch.empty((self.C, Cout, K), dtype=out.dtype, device=out.device)
        lo = 0
        for c, n in enumerate(self.counts):
            if n == 0:
                buf[c].zero_()
                continue
            torch.mm(dm[lo * L:(lo + n) * L].T, cols[lo * L:(lo + n) * L], out=buf[c])
            lo += n
        out.copy_(buf.view(self.C, Cout, kh, kw, Cin).permute(0, 1, 4, 2, 3))


class Tracer:
    """Records per-class update accumulators of chosen layers during training.

    Use with any loop (one forward + backward per optimiser step)::

        tracer = Tracer(layers=None, num_classes=10, out="run/trace")   # None: every Conv2d
        tracer.attach(model, optimizer)
        for epoch in range(1, E + 1):
            for x, y in loader:
                loss = F.cross_entropy(model(x), y)
                optimizer.zero_grad(); loss.backward(); optimizer.step()
                tracer.after_step(y)            # after optimizer.step(), before a scheduler step
            tracer.end_epoch(epoch)
        tracer.finish()

    The forward hooks keep the traced layers' inputs and output-gradients of the last
    forward that built a graph; ``after_step(y)`` turns them into per-class parts.

    Parameters
    ----------
    layers : layer choice (names, a type, a regex; default every Conv2d). Conv2d/Linear only.
    num_classes : number of classes (labels must lie in ``[0, num_classes)``).
    out : folder for ``trace.json`` and window files (None: keep in memory only).
    save_epochs : close a window only at these epochs (e.g. the saved checkpoints);
        default every epoch.
    steps : also store every step's update of every traced layer (``step_dtype``, chunks of
        ``chunk_steps`` steps, under ``out/steps``).
    example_layers : layers whose per-example sources are recorded (needs ``ids`` in
        ``after_step``); ``sketch`` > 0 stores a Gaussian projection of dimension ``sketch``.
    threads : torch threads for the tracer's own work in ``after_step`` (restored after; None:
        leave the setting alone). Its many small per-class products scale poorly; on a shared
        or loaded CPU, ``threads=1`` avoids OpenMP threads spinning on busy cores (measured in
        benchmarks/RESULTS.md).
    """

    def __init__(self, layers=None, num_classes: int | None = None, out: str | Path | None = None, *,
                 save_epochs: Sequence[int] | None = None, class_names: Sequence[str] | None = None,
                 steps: bool = False, step_dtype: torch.dtype = torch.bfloat16, chunk_steps: int = 256,
                 example_layers: Sequence[str] | None = None, sketch: int = 0, sketch_seed: int = 0,
                 verbose: bool = True, threads: int | None = None):
        self.layer_spec = layers
        self.num_classes = None if num_classes is None else int(num_classes)
        self.out = None if out is None else Path(out)
        self.save_epochs = None if save_epochs is None else sorted(int(e) for e in save_epochs)
        self.class_names = None if class_names is None else [str(c) for c in class_names]
        self.steps = bool(steps)
        self.step_dtype = step_dtype
        self.chunk_steps = int(chunk_steps)
        self.example_layers = list(example_layers or [])
        self.sketch = int(sketch)
        self.sketch_seed = int(sketch_seed)
        self.verbose = verbose
        self.threads = None if threads is None else int(threads)
        self.model: nn.Module | None = None
        self.windows: dict[tuple[int, int], dict[str, dict[str, torch.Tensor]]] = {}

    # ------------------------------------------------------------------ set-up
    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, epoch: int = 0,
               num_classes: int | None = None, class_names: Sequence[str] | None = None,
               out: str | Path | None = None, save_epochs: Sequence[int] | None = None) -> Tracer:
        """Start observing ``model``'s chosen layers as trained by ``optimizer`` from ``epoch``."""
        if num_classes is not None:
            self.num_classes = int(num_classes)
        if class_names is not None and self.class_names is None:
            self.class_names = [str(c) for c in class_names]
        if out is not None and self.out is None:
            self.out = Path(out)
        if save_epochs is not None and self.save_epochs is None:
            self.save_epochs = sorted(int(e) for e in save_epochs)
        if self.num_classes is None:
            raise ConceptEvoError("Tracer needs num_classes (at construction or in attach)")
        self.model, self.opt = model, optimizer
        self.layers = _select(model, self.layer_spec)
        self.info = {n: layer_info(model, n) for n in self.layers}
        bad = [n for n in self.example_layers if n not in self.layers]
        if bad:
            raise LayerError(f"example_layers {bad} are not among the traced layers {self.layers}")
        mods = dict(model.named_modules())
        self.params: dict[str, dict[str, nn.Parameter]] = {}
        for n in self.layers:
            m = mods[n]
            self.params[n] = {"weight": m.weight, **({"bias": m.bias} if m.bias is not None else {})}
        self.group_of: dict[int, dict] = {}
        for g in optimizer.param_groups:
            for p in g["params"]:
                self.group_of[id(p)] = g
        for n, ps in self.params.items():
            for k, p in ps.items():
                if id(p) not in self.group_of:
                    raise ConceptEvoError(f"{n}.{k} is not optimised by the optimizer given to the Tracer")
        self.opt_name = type(optimizer).__name__
        self.exact = isinstance(optimizer, torch.optim.SGD)
        k = self.num_classes + len(_EXTRA)
        self.k = k
        self.prev = {n: {key: p.detach().double().clone() for key, p in ps.items()} for n, ps in self.params.items()}
        self.buf: dict[str, dict[str, torch.Tensor | None]] = {}
        self.started: dict[str, dict[str, bool]] = {}
        for n, ps in self.params.items():
            self.buf[n], self.started[n] = {}, {}
            for key, p in ps.items():
                st = optimizer.state.get(p, {})
                prior = st.get("momentum_buffer") if self.exact else st.get("exp_avg")
                b = torch.zeros((k,) + tuple(p.shape), dtype=p.dtype, device=p.device)
                if prior is not None:
                    b[self.num_classes + 1] = prior.detach()
                self.buf[n][key] = b
                self.started[n][key] = prior is not None
        # float64 model of the optimiser's own state (SGD: the momentum buffer), for the per-step check
        self.tbuf = {n: {key: (self.buf[n][key].sum(0, dtype=torch.float64)) for key in ps}
                     for n, ps in self.params.items()}
        self.win_w = {n: {key: v.clone() for key, v in d.items()} for n, d in self.prev.items()}
        self.acc = self._zeros()
        self._g: dict[tuple[str, str], torch.Tensor] = {}
        self.window_start = int(epoch)
        self.step_count = 0
        self.epoch_steps: dict[int, int] = {int(epoch): 0}
        self._share_ref: dict[tuple[str, str], torch.Tensor] = {}
        self.max_mismatch = 0.0
        self.kappa_dev = 0.0
        self.lrs: list[float] = []
        self.momenta: list[tuple[float, float]] = []
        self._a: dict[str, torch.Tensor] = {}
        self._d: dict[str, torch.Tensor] = {}
        self._n_fwd: dict[str, int] = {}
        self._handles = []
        for n in self.layers:
            self._handles.append(mods[n].register_forward_hook(self._hook(n)))
        self._step_chunk: dict[str, list[torch.Tensor]] = {n: [] for n in self.layers}
        self._step_chunk_ids: list[int] = []
        self._chunks = 0
        self._ex: dict[str, list] = {n: [] for n in self.example_layers}
        self._ex_meta: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        if self.sketch:
            self._proj = {n: self._projection(n) for n in self.example_layers}
        if self.verbose:
            per = sum(p.numel() for ps in self.params.values() for p in ps.values())
            msg = (f"tracing {len(self.layers)} layers ({per:,} parameters) with {self.opt_name} "
                   f"({'exact' if self.exact else 'APPROXIMATE class split'}): class accumulators "
                   f"{k} sources x {per:,} x 4 B = {storage_bytes(per, k) / 2**20:.1f} MiB per window")
            if self.steps:
                bpe = torch.tensor([], dtype=self.step_dtype).element_size()
                msg += (f"; per-step deltas {per:,} x {bpe} B = {per * bpe / 2**20:.2f} MiB per step "
                        f"(steps x that in total)")
            print(msg, file=sys.stderr)
        return self

    def _projection(self, n: str) -> torch.Tensor:
        numel = int(np.prod(self.info[n].weight_shape)) + (self.info[n].weight_shape[0] if self.info[n].has_bias else 0)
        g = torch.Generator().manual_seed(self.sketch_seed + sum(map(ord, n)))
        return torch.randn(self.sketch, numel, generator=g, dtype=torch.float32) / math.sqrt(self.sketch)

    def _zeros(self) -> dict[str, dict[str, torch.Tensor]]:
        return {n: {key: torch.zeros((self.k,) + tuple(p.shape), dtype=torch.float64, device=p.device)
                    for key, p in ps.items()} for n, ps in self.params.items()}

    def _hook(self, name: str):
        def hook(module, inp, out):
            if not (torch.is_grad_enabled() and isinstance(out, torch.Tensor) and out.requires_grad):
                return
            self._a[name] = inp[0].detach()
            self._n_fwd[name] = self._n_fwd.get(name, 0) + 1

            def keep(g, _n=name):
                self._d[_n] = g.detach()
            out.register_hook(keep)
        return hook

    def detach(self) -> None:
        """Remove the hooks."""
        for h in getattr(self, "_handles", []):
            h.remove()
        self._handles = []

    # ------------------------------------------------------------------ per step
    @torch.no_grad()
    def after_step(self, y: torch.Tensor, ids: torch.Tensor | None = None) -> None:
        """Account for the optimiser step just taken on a batch with labels ``y`` (and dataset ``ids``)."""
        n = torch.get_num_threads()
        if self.threads is None or self.threads == n:
            return self._after_step(y, ids)
        torch.set_num_threads(self.threads)
        try:
            return self._after_step(y, ids)
        finally:
            torch.set_num_threads(n)

    def _after_step(self, y: torch.Tensor, ids: torch.Tensor | None = None) -> None:
        if self.model is None:
            raise ConceptEvoError("Tracer.after_step before attach(model, optimizer)")
        y = torch.as_tensor(y).reshape(-1).to(torch.int64)
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise ConceptEvoError(f"labels must lie in [0, {self.num_classes}); got {int(y.min())}..{int(y.max())}")
        if self.example_layers and ids is None:
            raise ConceptEvoError("example_layers are traced: pass the batch's dataset ids to after_step(y, ids)")
        C = self.num_classes
        plan = _ClassPlan(y, C)
        onehot = None
        for n in self.layers:
            info = self.info[n]
            if n not in self._a or n not in self._d:
                raise ConceptEvoError(f"layer {n!r}: no forward/backward was seen since the last step; "
                                      "call after_step once per optimizer step, after loss.backward()")
            if self._n_fwd.get(n, 0) > 1:
                raise ConceptEvoError(f"layer {n!r} ran {self._n_fwd[n]} times with gradients in one step; "
                                      "the tracer needs one forward and backward per optimizer step")
            a, d = self._a[n], self._d[n]
            if a.shape[0] != y.numel():
                raise ConceptEvoError(f"layer {n!r}: batch of {a.shape[0]} rows but {y.numel()} labels")
            ps = self.params[n]
            dev = a.device
            ge = info.example_grads(a, d).reshape(a.shape[0], -1) if n in self._ex else None
            # class parts of the weight gradient, written straight into the per-source gradient
            # buffer (rows 0..C-1) in the training dtype; float rounding against p.grad lands in
            # 'other', which keeps the sum exact
            gbuf = self._gbuf(n, "weight")
            gw = gbuf[:C]
            plan.weight_grads(info, a, d, gw)
            parts = {"weight": gw}
            if "bias" in ps:
                rb = info.bias_grad(d)
                if onehot is None or onehot.device != dev or onehot.dtype != rb.dtype:
                    onehot = F.one_hot(y.to(dev), C).to(rb.dtype).T.contiguous()     # (C, B)
                gb = self._gbuf(n, "bias")[:C]
                torch.mm(onehot, rb, out=gb)
                parts["bias"] = gb
                if n in self._ex:
                    ge = torch.cat([ge, rb], 1)
            # common factor kappa between the class parts and the optimiser's gradient (clipping,
            # loss scale); what remains goes to 'other'
            num = den = 0.0
            tots = {}
            for key, p in ps.items():
                if p.grad is None:
                    raise ConceptEvoError(f"{n}.{key} has no gradient at this step")
                tot = tots[key] = parts[key].sum(0)
                num += float(torch.dot(p.grad.reshape(-1), tot.reshape(-1)))
                den += float(torch.dot(tot.reshape(-1), tot.reshape(-1)))
            kappa = num / den if den > 0 else 1.0
            self.kappa_dev = max(self.kappa_dev, abs(kappa - 1.0))
            if n in self._ex:
                self._ex[n].append((ge * kappa).float())
            for key, p in ps.items():
                self._update(n, key, p, parts[key], kappa, tots[key])
            if self.steps:
                self._step_chunk[n].append(torch.cat([self._last_delta[n][k].reshape(-1)
                                                      for k in ps]).to(self.step_dtype))
        if self.example_layers:
            self._ex_meta.append((self.step_count, torch.as_tensor(ids).reshape(-1).clone(), y.clone()))
        g0 = self.group_of[id(self.params[self.layers[0]]["weight"])]
        self.lrs.append(float(g0["lr"]))
        self.momenta.append((float(g0.get("momentum", 0.0)), float(g0.get("dampening", 0.0))))
        if self.steps:
            self._step_chunk_ids.append(self.step_count)
            if len(self._step_chunk_ids) >= self.chunk_steps:
                self._flush_steps()
        self.step_count += 1
        self._a.clear()
        self._d.clear()
        self._n_fwd.clear()

    def _gbuf(self, n: str, key: str) -> torch.Tensor:
        """The per-source gradient buffer ``(k, *shape)`` of ``n.key`` (rows 0..C-1: the classes)."""
        g = self._g.get((n, key))
        if g is None:
            g = self._g[(n, key)] = torch.zeros_like(self.buf[n][key])
        return g

    def _update(self, n: str, key: str, p: torch.Tensor, gc: torch.Tensor, kappa: float, tot: torch.Tensor
                ) -> None:
        """Advance the per-source optimiser state of ``n.key`` and accumulate this step's update.

        ``gc``: the class parts ``(C, *shape)``, rows 0..C-1 of :meth:`_gbuf`. Sources: classes,
        weight_decay, prior_momentum, other. The per-source state is kept in the parameter's
        dtype, the accumulators in float64. For SGD the same recurrence runs once more on the
        summed gradient in float64 (one parameter's size) to check the model of the optimiser
        against the actual update every step (``max_mismatch``); the float rounding of the
        per-source state goes to ``other`` when the window closes (:meth:`end_epoch`), which
        keeps ``Σ_s acc_s = W_t' − W_t`` exact without a per-step sum over the sources.
        """
        group = self.group_of[id(p)]
        C = self.num_classes
        prev = self.prev[n][key]
        now = p.detach().double()
        actual = now - prev
        lr = float(group["lr"])
        wd = float(group.get("weight_decay", 0.0) or 0.0)
        buf = self.buf[n][key]
        acc = self.acc[n][key]
        g = self._gbuf(n, key)
        if gc.data_ptr() != g.data_ptr():
            g[:C].copy_(gc)
        if kappa != 1.0:
            g[:C].mul_(kappa)
        g[C + 1].zero_()
        torch.sub(p.grad, tot, alpha=kappa, out=g[C + 2])
        if self.exact:
            mu = float(group.get("momentum", 0.0))
            damp = float(group.get("dampening", 0.0))
            nesterov = bool(group.get("nesterov", False))
            gsum = p.grad.double()                      # Σ_s g_s, modelled in float64
            if wd:
                torch.mul(prev, wd, out=g[C])
                gsum.add_(prev, alpha=wd)
            else:
                g[C].zero_()
            if group.get("maximize", False):
                g.neg_()
                gsum.neg_()
            tb = self.tbuf[n][key]
            if mu:
                if not self.started[n][key]:
                    buf.copy_(g)
                    tb.copy_(gsum)
                    self.started[n][key] = True
                elif damp == 0.0:
                    torch.add(g, buf, alpha=mu, out=buf)
                    tb.mul_(mu).add_(gsum)
                else:
                    buf.mul_(mu).add_(g, alpha=1.0 - damp)
                    tb.mul_(mu).add_(gsum, alpha=1.0 - damp)
                if nesterov:
                    direction = g.add_(buf, alpha=mu)
                    dsum = gsum.add_(tb, alpha=mu)
                else:
                    direction, dsum = buf, tb
            else:
                direction, dsum = g, gsum
            acc.add_(direction, alpha=-lr)
            mismatch = actual - dsum * (-lr)
        else:
            beta1 = group["betas"][0] if "betas" in group else float(group.get("momentum", 0.0))
            decoupled = isinstance(self.opt, torch.optim.AdamW) or bool(group.get("decoupled_weight_decay", False))
            rest = actual.clone()
            g[C].zero_()
            if wd and decoupled:
                dec = prev * (-lr * wd)
                acc[C] += dec
                rest -= dec
            elif wd:
                torch.mul(prev, wd, out=g[C])
            alpha = (1.0 - beta1) if "betas" in group else 1.0
            if not self.started[n][key]:
                torch.mul(g, alpha, out=buf)
                self.started[n][key] = True
            else:
                buf.mul_(beta1).add_(g, alpha=alpha)
            m = buf.sum(0, dtype=torch.float64)
            eps = 1e-12 * float(m.abs().max()) + 1e-300
            share = rest * (m / (m * m + eps * eps))
            acc.add_(buf * share)
            pred = (buf.sum(0, dtype=torch.float64) * share) + (actual - rest)
            mismatch = actual - pred
            acc[C + 2] += mismatch
        scale = float(actual.abs().max())
        if scale > 0:
            self.max_mismatch = max(self.max_mismatch, float(mismatch.abs().max()) / scale)
        self.prev[n][key] = now
        if self.steps:
            self._last_delta = getattr(self, "_last_delta", {})
            self._last_delta.setdefault(n, {})[key] = actual

    def class_update_shares(self, top: int | None = 3) -> list[dict[str, Any]]:
        """Each class's share of the traced layers' update since the previous call (since attach
        on the first): ``‖U_c‖ / Σ_c' ‖U_c'‖`` with ``U_c`` the class's recorded update of all
        traced weights and biases together. The ``top`` classes (all when None), largest
        first, as ``{"class", "name", "share", "exact"}`` (``exact`` False for non-SGD
        optimisers, whose class split is approximate). A :class:`~conceptevo.monitor.Monitor`
        given this tracer logs them at every observation."""
        if self.model is None:
            raise ConceptEvoError("Tracer.class_update_shares before attach(model, optimizer)")
        C = self.num_classes
        n2 = torch.zeros(C, dtype=torch.float64)
        for n, d in self.acc.items():
            for k, acc in d.items():
                now = acc[:C]
                ref = self._share_ref.get((n, k))
                delta = now if ref is None else now - ref
                n2 += delta.reshape(C, -1).pow(2).sum(1).cpu()
                self._share_ref[(n, k)] = now.clone()
        norms = n2.sqrt()
        tot = float(norms.sum())
        shares = (norms / tot) if tot > 0 else torch.zeros(C, dtype=torch.float64)
        order = torch.argsort(shares, descending=True, stable=True).tolist()
        names = self.class_names or [str(c) for c in range(C)]
        return [{"class": int(c), "name": names[c], "share": float(shares[c]), "exact": bool(self.exact)}
                for c in order[:top if top is not None else C]]

    def _flush_steps(self) -> None:
        if not self._step_chunk_ids:
            return
        blob = {"steps": torch.tensor(self._step_chunk_ids, dtype=torch.int64)}
        for n in self.layers:
            blob[n] = torch.stack(self._step_chunk[n])
            self._step_chunk[n] = []
        if self.out is not None:
            _save_pt(self.out / "steps" / f"chunk_{self._chunks:05d}.pt", blob)
        else:
            self.windows.setdefault(("steps", self._chunks), blob)  # type: ignore[arg-type]
        self._chunks += 1
        self._step_chunk_ids = []

    # ------------------------------------------------------------------ windows
    def end_epoch(self, epoch: int) -> None:
        """Close the epoch; writes the window ``[start, epoch]`` when ``epoch`` is a save epoch."""
        epoch = int(epoch)
        self.epoch_steps[epoch] = self.step_count
        if self.save_epochs is not None and epoch not in self.save_epochs:
            return
        key = (self.window_start, epoch)
        C = self.num_classes
        for n, ps in self.params.items():
            for k, p in ps.items():
                # float rounding of the per-source state (and anything that moved the weights outside
                # the modelled steps) goes to 'other': the sources sum to the window's change exactly
                now = p.detach().double()
                acc = self.acc[n][k]
                acc[C + 2] += (now - self.win_w[n][k]) - acc.sum(0)
                self.win_w[n][k] = now
                if (n, k) in self._share_ref:             # the accumulators restart at zero
                    self._share_ref[(n, k)] -= acc[:C]
        blob = {f"{n}.{k}": v for n, d in self.acc.items() for k, v in d.items()}
        self.windows[key] = blob
        if self.out is not None:
            _save_pt(self.out / f"window_{key[0]:03d}_{key[1]:03d}.pt",
                     {k: v.to(torch.float32) for k, v in blob.items()})
            self._write_meta()
        self.acc = self._zeros()
        self.window_start = epoch

    def finish(self) -> None:
        """Flush the step chunks, per-example records and ``trace.json``; remove the hooks."""
        if self.steps:
            self._flush_steps()
        if self.example_layers and self.out is not None:
            _save_pt(self.out / "examples.pt", self.example_blob())
        if self.out is not None:
            self._write_meta()
        self.detach()

    def example_blob(self) -> dict[str, torch.Tensor]:
        """Per-example records: ``steps``/``ids`` per row, ``<layer>`` gradient (or sketch) rows,
        ``labels`` (the class of each row), ``<layer>.norm`` their exact norms, and the per-step
        ``lr``, ``momentum``, ``dampening``."""
        if not self._ex_meta:
            return {}
        blob = {"steps": torch.cat([torch.full((len(i),), s, dtype=torch.int64) for s, i, _ in self._ex_meta]),
                "ids": torch.cat([i for _, i, _ in self._ex_meta]).to(torch.int64),
                "labels": torch.cat([y for _, _, y in self._ex_meta]).to(torch.int64),
                "lr": torch.tensor(self.lrs, dtype=torch.float64),
                "momentum": torch.tensor([m for m, _ in self.momenta], dtype=torch.float64),
                "dampening": torch.tensor([d for _, d in self.momenta], dtype=torch.float64)}
        for n in self.example_layers:
            g = torch.cat(self._ex[n])
            blob[f"{n}.norm"] = g.norm(dim=1)
            blob[n] = g @ self._proj[n].T if self.sketch else g
        return blob

    def meta(self) -> dict[str, Any]:
        names = self.class_names or [str(c) for c in range(self.num_classes)]
        return {
            "layers": self.layers,
            "layer_info": {n: {"kind": i.kind, "weight_shape": list(i.weight_shape), "has_bias": i.has_bias}
                           for n, i in self.info.items()},
            "num_classes": self.num_classes, "class_names": names, "extra_sources": list(_EXTRA),
            "optimizer": self.opt_name, "exact": self.exact,
            "windows": [list(k) for k in self.windows if isinstance(k[0], int)],
            "steps_recorded": self.step_count, "max_mismatch": self.max_mismatch,
            "epoch_steps": {str(e): int(v) for e, v in self.epoch_steps.items()},
            "max_kappa_deviation": self.kappa_dev, "per_step": self.steps,
            "step_dtype": str(self.step_dtype).replace("torch.", ""),
            "example_layers": self.example_layers, "sketch": self.sketch, "sketch_seed": self.sketch_seed,
        }

    def _write_meta(self) -> None:
        path = self.out / "trace.json"
        text = json.dumps(self.meta(), indent=2)
        from .store import atomic_write

        atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))

    def sources(self, layer: str, t: int, t2: int) -> LayerSources:
        """Class sources of ``layer`` over the recorded windows covering ``[t, t']`` (in memory)."""
        return _window_sources(self.meta(), lambda k: self.windows[k], layer, t, t2)


def _save_pt(path: Path, blob: dict[str, torch.Tensor]) -> None:
    from .store import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: torch.save(blob, tmp))


def _window_sources(meta: dict, load: Callable[[tuple[int, int]], dict], layer: str, t: int, t2: int
                    ) -> LayerSources:
    if layer not in meta["layers"]:
        raise LayerError(f"layer {layer!r} was not traced; traced layers: {meta['layers']}")
    wins = sorted(tuple(w) for w in meta["windows"])
    chain, e = [], int(t)
    while e < int(t2):
        nxt = [w for w in wins if w[0] == e and w[1] <= int(t2)]
        if not nxt:
            raise ConceptEvoError(f"recorded windows {wins} do not tile epochs {t} -> {t2} (stuck at {e})")
        w = max(nxt, key=lambda w: w[1])
        chain.append(w)
        e = w[1]
    names = list(meta["class_names"]) + list(meta["extra_sources"])
    C = int(meta["num_classes"])
    dws, dbs, rows = [], [], []
    has_b = bool(meta["layer_info"][layer]["has_bias"])
    for w in chain:
        blob = load(w)
        dws.append(blob[f"{layer}.weight"])
        if has_b:
            dbs.append(blob[f"{layer}.bias"])
        for i, nm in enumerate(names):
            kind = "class" if i < C else _EXTRA[i - C]
            exact = bool(meta["exact"]) or kind == "weight_decay"
            rows.append({"source": f"{'class ' + nm if i < C else nm} @{w[0]}->{w[1]}", "kind": kind,
                         "class": i if i < C else -1, "epoch_from": w[0], "epoch_to": w[1],
                         "exact": exact, "example": -1})
    # kept in the stored dtype (float32 on disk): converted to float64 block by block where scored
    return LayerSources(layer, torch.cat(dws), torch.cat(dbs) if has_b else None, _meta(rows))


def example_sources(meta: dict, blob: dict[str, torch.Tensor], layer: str, shape: tuple[int, ...], t_step: int,
                    t2_step: int, labels: np.ndarray | None = None) -> tuple[torch.Tensor, pd.DataFrame]:
    """Per-example updates of ``layer`` over optimiser steps ``[t_step, t2_step)``.

    Returns ``(rows, meta)``: ``rows`` = ``coef_i · g_i`` flattened (weight then bias), one
    row per (example, visit) merged per example id, so ``Σ rows`` is the class sources' sum
    without ``weight_decay``/``prior_momentum``/``other`` (exact for SGD, no Nesterov)."""
    if layer not in blob:
        raise LayerError(f"layer {layer!r} has no per-example record; recorded: {meta.get('example_layers')}")
    coef = _example_coefficients(blob, t_step, t2_step)               # per row
    g = blob[layer].double() * coef[:, None]
    ids = blob["ids"]
    uniq, inv = torch.unique(ids, return_inverse=True)
    rows = torch.zeros((len(uniq), g.shape[1]), dtype=torch.float64).index_add_(0, inv, g)
    cls = labels[uniq.numpy()] if labels is not None else np.full(len(uniq), -1)
    m = _meta([{"source": f"example {int(i)}", "kind": "example", "class": int(c), "epoch_from": -1,
                "epoch_to": -1, "exact": not meta.get("sketch"), "example": int(i)} for i, c in zip(uniq, cls)])
    return rows, m


def step_sources(meta: dict, chunks, layer: str, s0: int, s1: int, epochs: tuple[int, int] = (-1, -1)
                 ) -> LayerSources:
    """Per-step sources of ``layer`` for optimiser steps ``[s0, s1)`` from the recorded step
    chunks (each ``{"steps": ids, layer: (n, weight+bias) deltas}``). Exact when the deltas
    were stored in float32 or float64, rounded (``exact=False``) in float16/bfloat16."""
    if layer not in meta["layers"]:
        raise LayerError(f"layer {layer!r} was not traced; traced layers: {meta['layers']}")
    info = meta["layer_info"][layer]
    shape = tuple(info["weight_shape"])
    rows, ids = [], []
    for blob in chunks:
        st = blob["steps"]
        keep = (st >= s0) & (st < s1)
        if bool(keep.any()):
            rows.append(blob[layer][keep].double())
            ids.append(st[keep])
    if not rows:
        raise ConceptEvoError(f"no recorded steps in [{s0}, {s1}) for layer {layer!r}")
    rows_t, ids_t = torch.cat(rows), torch.cat(ids)
    exact = str(meta.get("step_dtype", "")) in ("float32", "float64")
    m = _meta([{"source": f"step {int(i)}", "kind": "step", "class": -1, "epoch_from": epochs[0],
                "epoch_to": epochs[1], "exact": exact, "example": -1} for i in ids_t])
    return _rows_as_sources(layer, rows_t, m, shape, bool(info["has_bias"]))


def _rows_as_sources(layer: str, rows: torch.Tensor, meta: pd.DataFrame, shape: tuple[int, ...], has_bias: bool,
                     epochs: tuple[int, int] | None = None) -> LayerSources:
    """Flattened (weight then bias) rows as a :class:`LayerSources`."""
    W = int(np.prod(shape))
    if epochs is not None:
        meta = meta.copy()
        meta["epoch_from"], meta["epoch_to"] = int(epochs[0]), int(epochs[1])
    return LayerSources(layer, rows[:, :W].reshape(-1, *shape), rows[:, W:] if has_bias else None, meta)


def _with_extra(src: LayerSources, classes: LayerSources) -> LayerSources:
    """``src`` plus the weight_decay, prior_momentum and other sources of ``classes`` (summed
    over its windows): what per-example updates leave out of the layer's change."""
    extra = classes.grouped("class")
    keep = extra.meta["kind"].isin(_EXTRA).to_numpy()
    idx = torch.from_numpy(np.flatnonzero(keep))
    dw = torch.cat([src.dw, extra.dw[idx]])
    db = None if src.db is None else torch.cat([src.db, extra.db[idx]])
    meta = pd.concat([src.meta, extra.meta[keep]], ignore_index=True)
    return LayerSources(src.layer, dw, db, _meta(meta.to_dict("records")))


def _example_coefficients(blob: dict, t_step: int, t2_step: int) -> torch.Tensor:
    """``−Σ_{s'∈[max(s,t),t')} lr_{s'} μ^{s'−s} f_s`` for every recorded row (seen at step ``s``)."""
    lr, mu, damp = blob["lr"], blob["momentum"], blob["dampening"]
    n = len(lr)
    # c[s] = Σ_{s' >= s, in window} lr_s' mu^{s'-s} (one backward recursion; mu constant or not)
    c = torch.zeros(n + 1, dtype=torch.float64)
    for s in range(min(n, t2_step) - 1, -1, -1):
        inside = lr[s] if s >= t_step else 0.0
        nxt = mu[s + 1] * c[s + 1] if s + 1 < n else 0.0
        c[s] = inside + nxt
    steps = blob["steps"]
    first = steps == 0
    f = torch.where(first | (mu[steps] == 0), torch.ones_like(damp[steps]), 1.0 - damp[steps])
    return -(c[steps] * f)


def sketch_bound(k: int, delta: float) -> float:
    """ε such that ``|⟨Su,Sv⟩ − ⟨u,v⟩| ≤ ε‖u‖‖v‖`` with probability ≥ 1−δ for a Gaussian
    ``S`` (k × P, entries N(0, 1/k)), valid for ε ≤ 1/2: ``P(fail) ≤ 4 exp(−k ε²/8)``."""
    return math.sqrt(8.0 * math.log(4.0 / delta) / k)


# ------------------------------------------------------------------------- runs on disk
class TraceRun:
    """A training run directory (``run.json``, ``checkpoints/``, optionally ``trace/``)."""

    def __init__(self, run_dir: str | Path, model_factory: Callable[[], nn.Module] | None = None):
        from .train import run_checkpoints, run_model_factory

        self.root = Path(run_dir)
        self.checkpoints = run_checkpoints(self.root)
        if not self.checkpoints:
            raise CheckpointError(f"{self.root} has no checkpoints/epoch_*.pt")
        self.factory = model_factory or run_model_factory(self.root)
        self._states: dict[int, dict[str, torch.Tensor]] = {}
        self._examples: dict[str, torch.Tensor] | None = None
        tj = self.root / "trace" / "trace.json"
        self.trace_meta = json.loads(tj.read_text(encoding="utf-8")) if tj.exists() else None

    @property
    def epochs(self) -> list[int]:
        return list(self.checkpoints)

    def state(self, epoch: int) -> dict[str, torch.Tensor]:
        from .adapter import load_state_dict_file

        epoch = int(epoch)
        if epoch not in self.checkpoints:
            raise CheckpointError(f"{self.root}: no checkpoint for epoch {epoch}; saved: {self.epochs}")
        if epoch not in self._states:
            self._states[epoch] = load_state_dict_file(self.checkpoints[epoch])
        return self._states[epoch]

    def model(self, epoch: int) -> nn.Module:
        m = self.factory()
        m.load_state_dict(self.state(epoch))
        return m.eval()

    def has_classes(self) -> bool:
        return self.trace_meta is not None and bool(self.trace_meta.get("windows"))

    def sources(self, layer: str, t: int, t2: int, kind: str = "auto") -> LayerSources:
        """Sources of ``layer`` over ``[t, t']`` at one granularity: ``"checkpoint"`` (telescoping
        over the saved checkpoints, always available), ``"class"`` (recorded class windows),
        ``"step"`` (recorded per-step deltas, ``Tracer(steps=True)``), ``"example"`` (recorded
        per-example updates, ``Tracer(example_layers=...)``, plus the window's weight_decay,
        prior_momentum and other sources so that they still sum to the change), or ``"auto"``
        (class when recorded, else checkpoint)."""
        if kind == "auto":
            kind = "class" if self.has_classes() else "checkpoint"
        if kind == "checkpoint":
            return checkpoint_sources({e: self.state(e) for e in self.epochs if t <= e <= t2}, layer, t, t2)
        if kind not in ("class", "step", "example"):
            raise ConceptEvoError(f"kind must be 'auto', 'class', 'checkpoint', 'step' or 'example', got {kind!r}")
        if not self.has_classes():
            raise ConceptEvoError(f"{self.root} has no recorded sources (trace/trace.json); "
                                  "train with a Tracer or use kind='checkpoint'")
        tdir = self.root / "trace"
        # memory-mapped: only this layer's accumulators are read from each window file
        classes = _window_sources(self.trace_meta, lambda w: torch.load(
            tdir / f"window_{w[0]:03d}_{w[1]:03d}.pt", map_location="cpu", weights_only=True, mmap=True),
            layer, t, t2)
        if kind == "class":
            return classes
        s0, s1 = self.step_range(t, t2)
        if kind == "step":
            if not self.trace_meta.get("per_step"):
                raise ConceptEvoError(f"{self.root}: no per-step deltas were recorded; train with Tracer(steps=True)")
            chunks = sorted((tdir / "steps").glob("chunk_*.pt"))
            return step_sources(self.trace_meta, (torch.load(c, map_location="cpu", weights_only=True)
                                                  for c in chunks), layer, s0, s1, (t, t2))
        if layer not in (self.trace_meta.get("example_layers") or []):
            raise LayerError(f"layer {layer!r} has no per-example record; recorded: "
                             f"{self.trace_meta.get('example_layers')}")
        if self.trace_meta.get("sketch"):
            raise ConceptEvoError("the per-example records are sketches (Tracer(sketch=k)): score them with "
                                  "explain_examples(..., proj=...) instead")
        if self._examples is None:
            self._examples = torch.load(tdir / "examples.pt", map_location="cpu", weights_only=True)
        blob = self._examples
        info = self.trace_meta["layer_info"][layer]
        shape = tuple(info["weight_shape"])
        labels = None
        if "labels" in blob:                                    # per recorded row -> per dataset id
            labels = np.full(int(blob["ids"].max()) + 1, -1, dtype=np.int64)
            labels[blob["ids"].numpy()] = blob["labels"].numpy()
        rows, meta = example_sources(self.trace_meta, blob, layer, shape, s0, s1, labels=labels)
        return _with_extra(_rows_as_sources(layer, rows, meta, shape, bool(info["has_bias"]), (t, t2)), classes)

    def step_range(self, t: int, t2: int) -> tuple[int, int]:
        """The optimiser steps ``[s, s')`` taken between the ends of epochs ``t`` and ``t'``."""
        es = {int(k): int(v) for k, v in (self.trace_meta or {}).get("epoch_steps", {}).items()}
        missing = [e for e in (t, t2) if int(e) not in es]
        if missing:
            raise ConceptEvoError(f"{self.root}: no step count recorded at the end of epoch(s) {missing} "
                                  f"(recorded: {sorted(es)})")
        return es[int(t)], es[int(t2)]

    def input_model(self, input_from: str, t: int, t2: int) -> nn.Module:
        if input_from == "final":
            return self.model(self.epochs[-1])
        if input_from == "t_prime":
            return self.model(t2)
        if input_from == "t":
            return self.model(t)
        raise ConceptEvoError(f"input_from must be 'final', 't_prime' or 't', got {input_from!r}")


def explain(run: TraceRun | str | Path, x: torch.Tensor, layer: str, t: int, t2: int, *, kind: str = "auto",
            input_from: str = "final", by: str | None = None, channels: Sequence[int] | None = None,
            granularity: str | None = None) -> pd.DataFrame:
    """The sources of ``layer``'s change ``t -> t'`` on input(s) ``x``: one row per source with
    ``dot``, ``norm``, ``cos``, ``share`` (sorted by ``dot``, largest first).

    ``granularity`` (alias of ``kind``): ``"class"``, ``"checkpoint"``, ``"step"`` (needs
    ``Tracer(steps=True)``), ``"example"`` (needs ``Tracer(example_layers=[layer])``; the
    table then has one row per training example, column ``example``, plus the window's
    weight_decay/prior_momentum/other rows) or ``"auto"``.

    ``Δz`` is computed from the checkpoints (``(W_t' − W_t) ⊛ a(x) + b_t' − b_t``), so the
    table's ``attrs["residual"]`` = ``‖Σ_s c_s − Δz‖/‖Δz‖`` checks the sources. ``by="class"``
    sums each class's sources over the recorded windows. A batch ``x`` is one long vector.
    """
    run = run if isinstance(run, TraceRun) else TraceRun(run)
    x = x if x.dim() == 4 or x.dim() == 2 else x.unsqueeze(0)
    src = run.sources(layer, t, t2, granularity or kind)
    if by:
        src = src.grouped(by)
    model = run.input_model(input_from, t, t2)
    info = layer_info(model, layer)
    a = layer_input(model, layer, x)
    ref = checkpoint_sources({t: run.state(t), t2: run.state(t2)}, layer, t, t2)
    w, b = ref.total()
    ch = list(range(info.weight_shape[0])) if channels is None else list(channels)
    dz = info.apply(a.double(), w[ch], None if b is None else b[ch])
    table, _ = decompose(info, a, src, dz, channels=ch)
    table.attrs["input_from"] = input_from
    return table.sort_values("dot", ascending=False, kind="stable").reset_index(drop=True)


def explain_examples(info: LayerInfo, a: torch.Tensor, dz: torch.Tensor, rows: torch.Tensor, meta: pd.DataFrame,
                     proj: torch.Tensor | None = None) -> pd.DataFrame:
    """Per-example scores: ``dot_i = ⟨ΔW_i, G(x)⟩`` with ``G(x)`` the weight(+bias)-gradient of
    ``⟨z(x), Δz⟩`` (one weight-gradient for all examples). With ``proj`` (a sketch), ``rows``
    are projected and so is ``G``; ``norm``/``cos`` are then left out (NaN)."""
    a, dz = a.double(), dz.double()
    G = info.weight_grad(a, dz).reshape(-1)
    if info.has_bias:
        G = torch.cat([G, info.bias_grad(dz).sum(0)])
    if proj is not None:
        G = proj.double() @ G
    dots = rows.double() @ G
    out = meta.copy()
    out["dot"] = dots.numpy()
    dzn = float(dz.norm())
    if proj is None:
        norms = []
        W = int(np.prod(info.weight_shape))
        for lo in range(0, rows.shape[0], 256):
            r = rows[lo:lo + 256].double()
            dw = r[:, :W].reshape(-1, *info.weight_shape)
            db = r[:, W:] if info.has_bias else None
            n = dw.shape[0]
            o = info.apply(a, dw.reshape(n * info.weight_shape[0], *info.weight_shape[1:]),
                           None if db is None else db.reshape(-1))
            o = o.reshape(o.shape[0], n, -1).transpose(0, 1).reshape(n, -1)
            norms.append(o.norm(dim=1))
        out["norm"] = torch.cat(norms).numpy()
        out["cos"] = np.where(out["norm"] > 0, out["dot"] / np.maximum(out["norm"] * dzn, 1e-300), 0.0)
    else:
        out["norm"] = np.nan
        out["cos"] = np.nan
    out["share"] = out["dot"] / (dzn * dzn) if dzn > 0 else 0.0
    return out.sort_values("dot", ascending=False, kind="stable").reset_index(drop=True)


# ------------------------------------------------------------------------- figures
def _display_uint8(data, i: int) -> np.ndarray:
    """Training image ``i`` as uint8 ``(H, W, 3)``: ``data.raw(i)`` when the dataset has it
    (the built-in :class:`~conceptevo.data.ImageSet`), else its tensor scaled by its min/max."""
    if hasattr(data, "raw"):
        return np.asarray(data.raw(int(i)), dtype=np.uint8)
    x = torch.as_tensor(data[int(i)][0]).float()
    x = (x - x.min()) / (x.max() - x.min()).clamp_min(1e-12)
    img = (x * 255).round().to(torch.uint8)
    if img.dim() == 2:
        img = img[None]
    img = img.permute(1, 2, 0).numpy()
    return np.repeat(img, 3, axis=2) if img.shape[2] == 1 else img


def example_grid(table: pd.DataFrame, data, path: str | Path | None = None, *, top: int = 16, cols: int = 8,
                 scale: int = 2, pad: int = 2) -> tuple[np.ndarray, list[int]]:
    """The ``top`` training examples of an explain table (``explain(..., granularity="example")``
    or :func:`explain_examples`; rows ranked by ``dot``, largest first) as one image grid.

    Tile ``k`` (row-major, ``cols`` per row, ``pad`` white pixels around each, every pixel
    repeated ``scale`` times) is example ``ids[k]``. Returns ``(grid uint8 (H, W, 3), ids)`` and
    writes a PNG to ``path`` when given."""
    ex = table[table["kind"] == "example"] if "kind" in table.columns else table
    ex = ex.sort_values("dot", ascending=False, kind="stable")
    ids = [int(i) for i in ex["example"].head(int(top))]
    if not ids:
        raise ConceptEvoError("the table has no example rows (explain with granularity='example')")
    tiles = [_display_uint8(data, i) for i in ids]
    h, w = tiles[0].shape[:2]
    th, tw = h * scale + 2 * pad, w * scale + 2 * pad
    cols = max(1, min(int(cols), len(ids)))
    rows = -(-len(ids) // cols)
    grid = np.full((rows * th, cols * tw, 3), 255, dtype=np.uint8)
    for k, img in enumerate(tiles):
        r, c = divmod(k, cols)
        big = np.repeat(np.repeat(img, scale, axis=0), scale, axis=1)
        grid[r * th + pad:r * th + pad + h * scale, c * tw + pad:c * tw + pad + w * scale] = big
    if path is not None:
        from PIL import Image

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(grid).save(path)
    return grid, ids


def class_contributions(run: TraceRun | str | Path, data, t: int, t2: int, *, layers: Sequence[str] | None = None,
                        images: int = 64, input_from: str = "final", seed: int = 0, batch_size: int = 64
                        ) -> pd.DataFrame:
    """Per-class contribution distributions per layer (the original's ridge plots): for each of
    ``images`` inputs of ``data`` (a random sample) and each traced layer, the share
    ``⟨c_class(x), Δz(x)⟩ / ‖Δz(x)‖²`` of every class source (summed over the windows of
    ``[t, t']``) and of weight_decay, prior_momentum, other. Shares of one input and layer sum
    to 1. Columns: layer, image, label, source, kind, source_class, share, cos."""
    from .importance import as_dataset, dataset_labels

    run = run if isinstance(run, TraceRun) else TraceRun(run)
    if not run.has_classes():
        raise ConceptEvoError(f"{run.root} has no recorded class sources (trace/trace.json)")
    ds = as_dataset(data)
    labels = dataset_labels(data)
    rng = np.random.default_rng(seed)
    idx = np.arange(len(ds)) if len(ds) <= images else np.sort(rng.choice(len(ds), images, replace=False))
    x = torch.stack([torch.as_tensor(ds[int(i)][0]) for i in idx])
    model = run.input_model(input_from, t, t2)
    out = []
    for layer in (layers or run.trace_meta["layers"]):
        src = run.sources(layer, t, t2, "class").grouped("class")
        info = layer_info(model, layer)
        ref = checkpoint_sources({t: run.state(t), t2: run.state(t2)}, layer, t, t2)
        w, b = ref.total()
        S = src.dw.shape[0]
        for lo in range(0, len(x), batch_size):
            a = layer_input(model, layer, x[lo:lo + batch_size]).double()
            n = a.shape[0]
            dz = info.apply(a, w.double(), None if b is None else b.double()).reshape(n, -1)
            dz2 = (dz * dz).sum(1)
            dots = torch.empty(n, S, dtype=torch.float64)
            norms = torch.empty(n, S, dtype=torch.float64)
            for s in range(S):
                c = info.apply(a, src.dw[s].double(), None if src.db is None else src.db[s].double()).reshape(n, -1)
                dots[:, s] = (c * dz).sum(1)
                norms[:, s] = c.norm(dim=1)
            share = dots / dz2.clamp_min(1e-300)[:, None]
            cos = dots / (norms * dz2.sqrt()[:, None]).clamp_min(1e-300)
            for j in range(n):
                i = int(idx[lo + j])
                for s in range(S):
                    out.append({"layer": layer, "image": i, "label": int(labels[i]),
                                "source": src.meta["source"].iloc[s], "kind": src.meta["kind"].iloc[s],
                                "source_class": int(src.meta["class"].iloc[s]), "share": float(share[j, s]),
                                "cos": float(cos[j, s])})
    return pd.DataFrame(out)


def contributions_figure(contrib: pd.DataFrame, class_names: Sequence[str] | None = None, value: str = "share"):
    """A Plotly figure of :func:`class_contributions`: one panel per layer, one half-violin per
    source (a ridge line: the distribution over inputs of that source's ``value``)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    layers = list(dict.fromkeys(contrib["layer"]))
    fig = make_subplots(rows=1, cols=len(layers), shared_yaxes=True, subplot_titles=layers,
                        horizontal_spacing=0.02)

    def label(r):
        c = int(r["source_class"])
        if c >= 0:
            return class_names[c] if class_names is not None and c < len(class_names) else f"class {c}"
        return str(r["kind"])

    names = contrib.apply(label, axis=1)
    order = list(dict.fromkeys(names))
    for k, layer in enumerate(layers):
        part = contrib[contrib["layer"] == layer]
        pn = names[part.index]
        for nm in order:
            vals = part.loc[pn == nm, value]
            fig.add_trace(go.Violin(x=vals, y=[nm] * len(vals), name=nm, orientation="h", side="positive",
                                    width=1.8, points=False, line_width=1, showlegend=False,
                                    meanline_visible=True), row=1, col=k + 1)
    fig.update_layout(height=max(300, 22 * len(order) + 120), margin={"l": 10, "r": 10, "t": 40, "b": 30},
                      violingap=0, violinmode="overlay")
    fig.update_yaxes(categoryorder="array", categoryarray=order[::-1])
    fig.update_xaxes(title_text=value)
    return fig


# ------------------------------------------------------------------ joined with ConceptEvo
def attribute_evolutions(run: TraceRun | str | Path, importance: pd.DataFrame, data, t: int, t2: int, *,
                         top: int = 5, images_per_class: int = 32, kind: str = "auto", input_from: str = "t_prime",
                         seed: int = 0, batch_size: int = 128) -> pd.DataFrame:
    """For each class ``c`` of ``importance`` (``evolution_importance`` output: class, layer,
    channel, score), its ``top`` most important evolutions, and for each the share of the
    neuron's traced change ``Δz_n`` on class-c images explained by every training source:
    ``share_s = Σ_x ⟨c_{s,n}(x), Δz_n(x)⟩ / Σ_x ‖Δz_n(x)‖²`` (sums to 1 over sources).

    Columns: class, layer, channel, score, rank, source, kind, source_class, exact, share, dot, norm, cos.
    """
    from .importance import as_dataset, dataset_labels

    run = run if isinstance(run, TraceRun) else TraceRun(run)
    need = {"class", "layer", "channel", "score"}
    if not need <= set(importance.columns):
        raise ConceptEvoError(f"importance table needs columns {sorted(need)}, has {list(importance.columns)}")
    ds = as_dataset(data)
    labels = dataset_labels(data)
    model = run.input_model(input_from, t, t2)
    rng = np.random.default_rng(seed)
    out = []
    imp = importance.sort_values(["class", "score"], ascending=[True, False], kind="stable")
    src_cache: dict[str, LayerSources] = {}
    for c, part in imp.groupby("class", sort=True):
        part = part.head(top).reset_index(drop=True)
        idx = np.flatnonzero(labels == int(c))
        if len(idx) == 0:
            continue
        if len(idx) > images_per_class:
            idx = np.sort(rng.choice(idx, images_per_class, replace=False))
        x = torch.stack([torch.as_tensor(ds[int(i)][0]) for i in idx])
        for layer, rows in part.groupby("layer", sort=False):
            if layer not in src_cache:
                s = run.sources(layer, t, t2, kind)
                src_cache[layer] = s.grouped("class") if s.meta["kind"].eq("class").any() else s
            src = src_cache[layer]
            info = layer_info(model, layer)
            ref = checkpoint_sources({t: run.state(t), t2: run.state(t2)}, layer, t, t2)
            w, b = ref.total()
            for _, r in rows.iterrows():
                ch = [int(r["channel"])]
                tabs = []
                for lo in range(0, len(x), batch_size):
                    a = layer_input(model, layer, x[lo:lo + batch_size])
                    dz = info.apply(a.double(), w[ch], None if b is None else b[ch])
                    tab, _ = decompose(info, a, src, dz, channels=ch)
                    tab["dz2"] = float(dz.norm()) ** 2
                    tabs.append(tab)
                dz2 = sum(tb["dz2"].iloc[0] for tb in tabs)
                dot = sum(tb["dot"].to_numpy() for tb in tabs)
                norm = np.sqrt(sum(tb["norm"].to_numpy() ** 2 for tb in tabs))
                base = tabs[0]
                for j in range(len(base)):
                    out.append({"class": int(c), "layer": layer, "channel": int(r["channel"]),
                                "score": float(r["score"]), "rank": int(r["rank"]) if "rank" in r else -1,
                                "source": base["source"].iloc[j], "kind": base["kind"].iloc[j],
                                "source_class": int(base["class"].iloc[j]), "exact": bool(base["exact"].iloc[j]),
                                "share": float(dot[j] / dz2) if dz2 > 0 else 0.0, "dot": float(dot[j]),
                                "norm": float(norm[j]),
                                "cos": float(dot[j] / (norm[j] * math.sqrt(dz2))) if norm[j] * dz2 > 0 else 0.0})
    return pd.DataFrame(out)


def _builtin_split(run: TraceRun, split: str):
    """The run's own built-in data split (same seed and size), refused for other data."""
    from .data import builtin_dataset

    card = json.loads((run.root / "run.json").read_text(encoding="utf-8"))
    d = card.get(f"{split}_data", {})
    src = str(d.get("source", ""))
    if not src.startswith("builtin:"):
        raise ConceptEvoError(f"{run.root} was not trained on the built-in data ({src or 'unknown'}); "
                              f"pass the {split} data explicitly")
    return builtin_dataset(split, seed=int(card.get("seed", 0)), num_images=d.get("size"))


def trace_run(run_dir: str | Path, out: str | Path | None = None, *, t: int | None = None, t2: int | None = None,
              layers: Sequence[str] | None = None, importance: pd.DataFrame | None = None, data=None,
              classes: Sequence[int] | None = None, top: int = 5, images_per_class: int = 32, seed: int = 0,
              granularity: str = "auto", input_index: int | None = None, contributions: int = 0,
              train_data=None, grid_top: int = 16) -> dict[str, pd.DataFrame]:
    """Write ``trace_sources.parquet`` (every layer's sources over ``[t, t']`` at ``granularity``
    -- class, checkpoint, step, example or auto -- with the size of their weight change) and
    ``trace_classes.parquet`` (:func:`attribute_evolutions`) to ``out`` (default: the run).
    Importance is computed (Eq. 2-4) on ``data`` when not given; ``data`` defaults to the run's
    built-in test split (same seed and size), refused for other data.

    ``input_index``: also explain test image ``input_index`` against every layer's sources at
    ``granularity`` (``trace_explain.parquet``); at the example granularity, also write the
    grid of its top ``grid_top`` training examples per layer (``trace_examples_<layer>.png``,
    from ``train_data``, default the run's built-in training split). ``contributions`` > 0:
    the per-class contribution distributions on that many test images
    (``trace_contributions.parquet``, :func:`class_contributions`)."""
    from .store import RunStore

    run = TraceRun(run_dir)
    t = run.epochs[0] if t is None else int(t)
    t2 = run.epochs[-1] if t2 is None else int(t2)
    model = run.model(t2)
    if layers is None:
        if granularity == "example" and run.trace_meta:
            layers = list(run.trace_meta.get("example_layers") or [])
        else:
            layers = run.trace_meta["layers"] if run.has_classes() else _select(model, None)
    rows = []
    for layer in layers:
        src = run.sources(layer, t, t2, granularity)
        w, b = src.total()
        tot = float(torch.sqrt((w ** 2).sum() + ((b ** 2).sum() if b is not None else 0)))
        n2 = (src.dw.double() ** 2).flatten(1).sum(1)
        d = (src.dw.double() * w.double()).flatten(1).sum(1)
        if src.db is not None:
            n2 += (src.db.double() ** 2).sum(1)
            d += (src.db.double() * b.double()).sum(1)
        part = src.meta.copy()
        part.insert(0, "layer", layer)
        part["weight_norm"] = n2.sqrt().numpy()
        part["weight_share"] = (d / (tot * tot)).numpy() if tot > 0 else 0.0
        rows.append(part)
    sources = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()
    if data is None:
        # the run's held-out split: images of each class the evolutions are evaluated on
        data = _builtin_split(run, "test")
    store = RunStore(out or run.root)
    res: dict[str, pd.DataFrame] = {"sources": sources}
    if input_index is not None:
        from .importance import as_dataset

        x = torch.as_tensor(as_dataset(data)[int(input_index)][0])
        tabs = []
        for layer in layers:
            tab = explain(run, x, layer, t, t2, granularity=granularity)
            tab["residual"] = tab.attrs["residual"]
            tabs.append(tab)
            if granularity == "example":
                if train_data is None:
                    train_data = _builtin_split(run, "train")
                safe = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in layer)
                example_grid(tab, train_data, Path(out or run.root) / f"trace_examples_{safe}.png", top=grid_top)
        res["explain"] = pd.concat(tabs, ignore_index=True)
        res["explain"].insert(0, "input", int(input_index))
        store.save_table("trace_explain", res["explain"])
    if contributions:
        res["contributions"] = class_contributions(run, data, t, t2, layers=[
            n for n in layers if n in run.trace_meta["layers"]], images=int(contributions), seed=seed)
        store.save_table("trace_contributions", res["contributions"])
    if importance is None:
        from .importance import evolution_importance

        importance = evolution_importance(run.model(t), run.model(t2), data, classes=classes,
                                          layers=list(layers), max_images_per_class=images_per_class, seed=seed)
    elif classes is not None:
        importance = importance[importance["class"].isin(list(classes))]
    importance = importance[importance["layer"].isin(list(layers))]
    cls = attribute_evolutions(run, importance, data, t, t2, top=top, images_per_class=images_per_class,
                               seed=seed)
    store.save_table("trace_sources", sources)
    store.save_table("trace_classes", cls)
    res["classes"] = cls
    return res


# -------------------------------------------------------------------------------- report
def report_section(classes: pd.DataFrame | None, class_names: Sequence[str] | None = None, top_sources: int = 3,
                   *, contributions: pd.DataFrame | None = None, images: Sequence[str | Path] = ()) -> str:
    """HTML fragment: for each class's important evolutions, the training classes that drove them;
    with ``contributions`` (:func:`class_contributions`) the per-class distributions per layer
    as a Plotly figure (drawn once the page's plotly.js has loaded); with ``images`` (PNG files,
    e.g. :func:`example_grid`'s) the top training examples, embedded."""
    has_cls = classes is not None and len(classes) > 0
    if not has_cls and (contributions is None or len(contributions) == 0) and not images:
        return ""
    if has_cls and class_names is None and "class_name" in classes.columns:
        pairs = classes[classes["kind"] == "class"][["source_class", "class_name"]]
        lookup = dict(zip(classes["class"], classes["class_name"])) | dict(pairs.itertuples(index=False, name=None))
        class_names = [str(lookup.get(i, i)) for i in range(int(max(lookup)) + 1)] if lookup else None
    name = (lambda c: class_names[c] if class_names is not None and 0 <= c < len(class_names) else str(c))
    parts = ['<section class="tracing"><h2>What in training drove the important evolutions</h2>']
    if has_cls:
        approx = not bool(classes["exact"].all())
        parts += [('<p class="note">Share of each neuron\'s traced change (t &rarr; t\', input map fixed) on the '
                   "class's images contributed by each training source (Pfahler &amp; Morik); shares sum to 1."
                   + (" <b>Approximate</b> (non-SGD optimiser): class split in proportion to gradient contribution."
                      if approx else "") + "</p>"),
                  ("<table><thead><tr><th>class</th><th>neuron</th><th>importance</th><th>top sources (share)</th>"
                   "</tr></thead><tbody>")]
        for (c, layer, ch), g in classes.groupby(["class", "layer", "channel"], sort=False):
            g = g.sort_values("share", ascending=False).head(top_sources)
            cells = ", ".join(
                f"{html.escape(name(int(r['source_class'])) if r['source_class'] >= 0 else str(r['source']))} "
                f"{r['share']:.2f}" for _, r in g.iterrows())
            parts.append(f"<tr><td>{html.escape(name(int(c)))}</td><td>{html.escape(str(layer))}:{int(ch)}</td>"
                         f"<td>{g['score'].iloc[0]:.3f}</td><td>{cells}</td></tr>")
        parts.append("</tbody></table>")
    if contributions is not None and len(contributions):
        fig = contributions_figure(contributions, class_names)
        payload = fig.to_json()
        parts.append('<h3>Per-class contributions per layer</h3><p class="note">For each layer, the '
                     "distribution over inputs of each training source's share of the layer's change "
                     "(t &rarr; t', input map fixed); the original's ridge plots.</p>"
                     '<div id="fig-tracing-contrib"></div>'
                     '<script type="application/json" id="tracing-contrib-data">'
                     + payload.replace("</", "<\\/") + "</script>"
                     "<script>window.addEventListener('DOMContentLoaded', function () {"
                     "var f = JSON.parse(document.getElementById('tracing-contrib-data').textContent);"
                     "if (window.Plotly) Plotly.newPlot('fig-tracing-contrib', f.data, f.layout, "
                     "{displaylogo: false});});</script>")
    for p in images:
        import base64

        p = Path(p)
        b64 = base64.b64encode(p.read_bytes()).decode("ascii")
        parts.append(f'<figure class="tracing-examples"><img alt="top training examples" '
                     f'src="data:image/png;base64,{b64}"><figcaption>{html.escape(p.stem)}: top training '
                     "examples (largest dot with the input's change first)</figcaption></figure>")
    parts.append("</section>")
    return "\n".join(parts)


# ------------------------------------------------------------------------------ storage
def storage_bytes(params: int, sources: int, windows: int = 1, bytes_per: int = 4) -> int:
    """Bytes of class accumulators: ``windows × sources × params × bytes_per``."""
    return int(windows) * int(sources) * int(params) * int(bytes_per)


def original_storage_bytes(params: int, steps: int, bytes_per: int = 4) -> int:
    """Bytes of the original's per-step weight deltas (float32 HDF5): ``steps × params × 4``."""
    return int(steps) * int(params) * int(bytes_per)
