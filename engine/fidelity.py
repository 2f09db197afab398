"""The claims the demo makes on the built-in data, checked on a finished run directory.

``conceptevo demo`` prints which of them held in this run; ``benchmarks/bench_fidelity.py``
checks them over several seeds (each seed changes the data, the initialisation and the
order) and states each as "holds in n/N". Every claim reads only the run's artifacts
(``alignment.parquet``, ``diagnostics.parquet``, ``verdicts.json``, ``reversion*.parquet``),
so a user can check them on any run with the three built-in regimes.

====  =====================================================================================
a     neighbours share ground-truth concepts: lift >= 2 for colour, shape and texture, within
      the base model, across epochs and across runs (the smallest of the nine lifts; the base
      model's neurons are the queries: ``alignment_base.parquet``)
b     well_trained's concept diversity rises from its first trained epoch to its last
c     high_lr's diversity falls as its accuracy collapses, and the collapse verdict fires
d     overfit moves less per unit of training-accuracy gain than well_trained (ratio < 1),
      and the slow-evolution verdict fires
e     Fig. 7: reverting the most important quarter of a layer's evolutions costs the most
      train top-1, the least important quarter the least, a random quarter in between; and
      per class, the most important quarter costs more than the least important one in most
      (more than half) of the classes that react to reversion at all
f     no verdict fires on well_trained (no false alarm)
g     the live monitor (:mod:`conceptevo.monitor`, every epoch during training) raises its
      ``lr_too_high`` alert on high_lr before high_lr's training accuracy reaches chance
      (:func:`conceptevo.monitor.chance_band`)
h     the live monitor raises no alert on well_trained (no false alarm during training)
====  =====================================================================================

Diversity is the measure the verdicts read (``verdicts.json``: ``measure``; by default the
k-NN entropy of the unified space, see :mod:`conceptevo.diagnostics`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["CLAIMS", "evaluate_claims"]

#: claim id -> one line, as printed in tables
CLAIMS: dict[str, str] = {
    "a": "neighbours share colour/shape/texture: lift >= 2 (within, across epochs, across runs)",
    "b": "well_trained diversity rises (first trained epoch -> last)",
    "c": "high_lr diversity falls as accuracy collapses; verdict fires",
    "d": "overfit moves less per accuracy gain than well_trained; verdict fires",
    "e": "Fig. 7 order: top quarter costs most, bottom least, random between; most classes",
    "f": "no verdict fires on well_trained",
    "g": "live monitor: high_lr's lr_too_high alert fires before its accuracy reaches chance",
    "h": "live monitor: no alert on well_trained",
}
_FAMILIES = ("colour", "shape", "texture")


def _row(claim: str, holds: bool | None, value: str, **numbers: Any) -> dict[str, Any]:
    return {"claim": claim, "text": CLAIMS[claim], "holds": holds, "value": value,
            "numbers": {k: (None if v is None or (isinstance(v, float) and not np.isfinite(v)) else v)
                        for k, v in numbers.items()}}


def evaluate_claims(run_dir: str | Path, reference: str = "well_trained", high_lr: str = "high_lr",
                    overfit: str = "overfit") -> pd.DataFrame:
    """One row per claim: ``claim, text, holds`` (True / False / None when it cannot be
    judged: a missing artifact or run), ``value`` (the numbers, in words) and ``numbers``."""
    run_dir = Path(run_dir)
    rows = [_claim_a(run_dir), *_claims_bcdf(run_dir, reference, high_lr, overfit), _claim_e(run_dir),
            *_claims_gh(run_dir, reference, high_lr)]
    return pd.DataFrame(sorted(rows, key=lambda r: r["claim"]))


def _base_alignment(run_dir: Path) -> pd.DataFrame | None:
    """``alignment_base.parquet`` (the base model's neurons as queries), computed from the saved
    space and the run's built-in data when an older run lacks it."""
    path = run_dir / "alignment_base.parquet"
    if path.exists():
        return pd.read_parquet(path)
    manifest = run_dir / "manifest.json"
    if not (run_dir / "space").exists() or not manifest.exists():
        return None
    config = json.loads(manifest.read_text(encoding="utf-8")).get("config") or {}
    if config.get("dataset", "builtin") != "builtin":
        return None
    from .alignment import alignment_report
    from .builtin import builtin_dataset
    from .space import UnifiedSpace
    from .store import RunStore

    space = UnifiedSpace.load(run_dir / "space")
    data = builtin_dataset("train", seed=int(config.get("seed", 0)), root=run_dir / "data")
    table = alignment_report(space, data.tags, seed=int(config.get("seed", 0)),
                             queries=space.rows(*space.base_key)).table
    RunStore(run_dir).save_table("alignment_base", table)
    return table


def _claim_a(run_dir: Path) -> dict[str, Any]:
    t = _base_alignment(run_dir)
    if t is None:
        return _row("a", None, "no alignment table (no concept tags)")
    t = t[t["family"].isin(_FAMILIES)]
    if t.empty:
        return _row("a", None, "no colour/shape/texture rows")
    lifts = {f"{r.family}/{r.scope}": float(r.lift) for r in t.itertuples()}
    worst = min(lifts, key=lifts.get)
    low = min(lifts.values())
    return _row("a", bool(low >= 2.0 and len(lifts) == 9), f"min lift {low:.2f} ({worst})", min_lift=low, **lifts)


def _claims_bcdf(run_dir: Path, reference: str, high_lr: str, overfit: str) -> list[dict[str, Any]]:
    vpath, dpath = run_dir / "verdicts.json", run_dir / "diagnostics.parquet"
    if not vpath.exists() or not dpath.exists():
        return [_row(c, None, "no diagnostics") for c in "bcdf"]
    verdicts = json.loads(vpath.read_text(encoding="utf-8"))
    table = pd.read_parquet(dpath)
    out = []
    ref = verdicts.get(reference)
    measure = (ref or {}).get("measure", "map")
    col = "diversity_knn" if measure == "knn" and "diversity_knn" in table else "diversity"

    # (b) the reference's diversity from its first trained epoch to its last
    g = table[(table["model"] == reference) & (table["epoch"] >= 1)].sort_values("epoch")
    if len(g) >= 2:
        h0, h1 = float(g[col].iloc[0]), float(g[col].iloc[-1])
        se_col = col + "_se"
        se = float(np.hypot(g[se_col].iloc[0], g[se_col].iloc[-1])) if se_col in g else float("nan")
        e0, e1 = int(g["epoch"].iloc[0]), int(g["epoch"].iloc[-1])
        out.append(_row("b", bool(h1 > h0), f"{h0:.2f} (epoch {e0}) -> {h1:.2f} (epoch {e1}), "
                        f"change {h1 - h0:+.2f} ± {se:.2f}", first=h0, last=h1, change=h1 - h0, se=se,
                        measure=measure))
    else:
        out.append(_row("b", None, f"{reference}: fewer than two trained epochs"))

    # (c) high_lr: falls as accuracy collapses, verdict fires
    v = verdicts.get(high_lr)
    if v is None or v.get("diversity_collapses") is None:
        out.append(_row("c", None, f"no verdict for {high_lr}"))
    else:
        fell = v["diversity_last"] < v["diversity_peak"]
        out.append(_row(
            "c", bool(fell and v["diversity_collapses"]),
            f"{v['diversity_peak']:.2f} (epoch {v['diversity_peak_epoch']}) -> {v['diversity_last']:.2f}; "
            f"margin {v['collapse_margin']:+.2f} ± {v.get('collapse_margin_se', float('nan')):.2f}; "
            f"top-1 {v.get('train_top1_best', float('nan')):.2f} -> {v.get('train_top1_last', float('nan')):.2f}; "
            f"verdict {'fires' if v['diversity_collapses'] else 'silent'}",
            peak=v["diversity_peak"], last=v["diversity_last"], margin=v["collapse_margin"],
            margin_se=v.get("collapse_margin_se"), fires=bool(v["diversity_collapses"])))

    # (d) overfit: slower per accuracy gain, verdict fires
    v = verdicts.get(overfit)
    if v is None or v.get("speed_ratio") is None:
        out.append(_row("d", None, f"no speed verdict for {overfit}"))
    else:
        r = float(v["speed_ratio"])
        out.append(_row("d", bool(r < 1.0 and v["slow_evolution"]),
                        f"ratio {r:.2f} ± {v.get('speed_ratio_se', float('nan')):.2f} "
                        f"({v['movement_per_gain']:.2f} vs {v['movement_per_gain_reference']:.2f}); "
                        f"verdict {'fires' if v['slow_evolution'] else 'silent'}",
                        ratio=r, ratio_se=v.get("speed_ratio_se"), fires=bool(v["slow_evolution"])))

    # (f) no false alarm on the reference
    if ref is None:
        out.append(_row("f", None, f"no verdicts for {reference}"))
    else:
        alarms = [k for k in ("diversity_collapses", "slow_evolution", "diverged") if ref.get(k)]
        out.append(_row("f", not alarms, "silent" if not alarms else "fires: " + ", ".join(alarms),
                        collapse_margin=ref.get("collapse_margin")))
    return out


def _claim_e(run_dir: Path) -> dict[str, Any]:
    spath, lpath = run_dir / "reversion.parquet", run_dir / "reversion_long.parquet"
    if not spath.exists() or not lpath.exists():
        return _row("e", None, "no reversion check")
    from .reversion import RANDOM_BIN, class_ordering

    s = pd.read_parquet(spath)
    s = s[(s["split"] == "train") & (s["metric"] == "top1")]
    bins = s[s["bin"] != RANDOM_BIN]["mean_delta"].to_numpy()
    rnd = s.loc[s["bin"] == RANDOM_BIN, "mean_delta"]
    if bins.size < 2 or rnd.empty:
        return _row("e", None, "reversion table lacks bins")
    top, bottom, r = float(bins[0]), float(bins[-1]), float(rnd.iloc[0])
    ordered = bool(top <= bins.min() and bottom >= bins.max() and top <= r <= bottom)
    per_class = class_ordering(pd.read_parquet(lpath))
    reacting = per_class[~per_class["no_effect"]]
    cols = [c for c in per_class.columns if c not in ("class", "top_bin_drops_most", "monotone", "no_effect",
                                                       RANDOM_BIN)]
    wins = int((reacting[cols[0]] < reacting[cols[-1]]).sum()) if len(reacting) else 0
    share = wins / len(reacting) if len(reacting) else float("nan")
    holds = bool(ordered and len(reacting) and share > 0.5)
    value = (f"bins {', '.join(f'{b * 100:+.1f}' for b in bins)} pts, random {r * 100:+.1f}; top > bottom in "
             f"{wins}/{len(reacting)} reacting classes")
    return _row("e", holds, value, bins=[float(b) for b in bins], random=r, class_wins=wins,
                classes_reacting=int(len(reacting)), classes=int(len(per_class)))


def _claims_gh(run_dir: Path, reference: str, high_lr: str) -> list[dict[str, Any]]:
    from .monitor import alert_summary

    hi = alert_summary(run_dir / "training" / high_lr)
    ref = alert_summary(run_dir / "training" / reference)
    out = []
    if hi is None:
        out.append(_row("g", None, f"{high_lr} was trained without the live monitor"))
    else:
        first = hi["first"].get("lr_too_high")
        chance = hi["chance_epoch"]
        acc = next((a["train_top1"] for a in hi["alerts"] if a["kind"] == "lr_too_high"), None)
        said = ("silent" if first is None else f"lr_too_high at epoch {first}"
                + ("" if acc is None else f" (train top-1 {acc:.3f})"))
        band = "" if hi["chance_band"] is None else f"; at chance (<= {hi['chance_band']:.3f}) " + (
            "never" if chance is None else f"from epoch {chance}")
        out.append(_row("g", bool(first is not None and (chance is None or first < chance)), said + band,
                        alert_epoch=first, chance_epoch=chance, alert_top1=acc, peak_epoch=hi["peak_epoch"]))
    if ref is None:
        out.append(_row("h", None, f"{reference} was trained without the live monitor"))
    else:
        fired = [f"{a['kind']} at epoch {a['epoch']}" for a in ref["alerts"]]
        out.append(_row("h", not fired, f"no alert in {ref['observations']} observations" if not fired
                        else ", ".join(fired), alerts=[a["kind"] for a in ref["alerts"]]))
    return out
