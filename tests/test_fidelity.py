"""conceptevo.fidelity: each claim judged on constructed artifacts where the answer is known,
and the fidelity harness end to end in its one-seed quick mode."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conceptevo.fidelity import CLAIMS, evaluate_claims

ROOT = Path(__file__).resolve().parents[1]


def _write_run(d: Path, *, lift=3.0, wt_div=(1.0, 1.3), hl_collapses=True, of_ratio=0.7, of_slow=True,
               bins=(-0.10, -0.05, -0.03, -0.01), rnd=-0.04, class_top=-0.2, class_bottom=-0.01,
               wt_alarm=False, hl_alert_epoch=3, wt_alert=False) -> None:
    d.mkdir(parents=True, exist_ok=True)
    # the built-in trainer's run folders, each watched by a live monitor (claim g)
    for run, acc, alerts in (
            ("high_lr", [0.03, 0.2, 0.3, 0.15, 0.06, 0.03, 0.03],
             [] if hl_alert_epoch is None else [{"kind": "lr_too_high", "epoch": hl_alert_epoch, "margin": 0.2,
                                                 "message": "m", "evidence": {}}]),
            ("well_trained", [0.03, 0.3, 0.6, 0.8, 0.9, 0.9, 0.9],
             [{"kind": "overfitting", "epoch": 5, "margin": 0.1, "message": "m", "evidence": {}}] if wt_alert else [])):
        r = d / "training" / run
        (r / "monitor").mkdir(parents=True)
        (r / "run.json").write_text(json.dumps({"num_classes": 32, "hyper": {"eval_train_max": 1000,
                                                                             "train_subset": None},
                                                "train_data": {"size": 9600}}))
        log = pd.DataFrame({"epoch": range(len(acc)), "train_top1": acc})
        log.to_parquet(r / "log.parquet")
        log.assign(alerts="").to_parquet(r / "monitor" / "metrics.parquet")
        (r / "monitor" / "alerts.jsonl").write_text("".join(json.dumps(a) + "\n" for a in alerts))
    rows = [{"scope": s, "family": f, "k": 10, "share": 0.5, "chance": 0.5 / lift, "lift": lift}
            for s in ("within", "across_epochs", "across_models") for f in ("colour", "shape", "texture", "size")]
    rows[-2]["lift"] = lift  # one family not in the claim, to make sure it is ignored
    pd.DataFrame(rows).to_parquet(d / "alignment_base.parquet")
    diag = pd.DataFrame({"model": "well_trained", "epoch": [0, 1, 5], "diversity": [2.0, 1.0, 1.1],
                         "diversity_knn": [5.0, wt_div[0], wt_div[1]], "diversity_knn_se": [0.02] * 3})
    diag.to_parquet(d / "diagnostics.parquet")
    verdicts = {
        "well_trained": {"measure": "knn", "diversity_collapses": wt_alarm, "slow_evolution": False,
                         "diverged": False, "collapse_margin": -0.5},
        "high_lr": {"measure": "knn", "diversity_collapses": hl_collapses, "diversity_peak": 1.2,
                    "diversity_peak_epoch": 2, "diversity_last": 0.4 if hl_collapses else 1.2,
                    "collapse_margin": 0.5, "collapse_margin_se": 0.05, "train_top1_best": 0.3,
                    "train_top1_last": 0.03},
        "overfit": {"speed_ratio": of_ratio, "speed_ratio_se": 0.03, "slow_evolution": of_slow,
                    "movement_per_gain": 1.0, "movement_per_gain_reference": 1.0 / of_ratio},
    }
    (d / "verdicts.json").write_text(json.dumps(verdicts))
    labels = ["0-25%", "25-50%", "50-75%", "75-100%", "random"]
    pd.DataFrame({"split": "train", "metric": "top1", "bin": labels, "mean_delta": [*bins, rnd]}).to_parquet(
        d / "reversion.parquet")
    long = []
    for c in range(4):  # class 3 reacts the other way; class 2 does not react at all
        for b, lab in enumerate(labels):
            if c == 2:
                v = 0.0
            elif c == 3:
                v = class_bottom if b == 0 else class_top if b == 3 else -0.05
            else:
                v = class_top if b == 0 else class_bottom if b == 3 else -0.05
            long.append({"class": c, "layer": "l", "sample": 0, "split": "train", "bin": lab, "delta_top1": v})
    pd.DataFrame(long).to_parquet(d / "reversion_long.parquet")


def test_every_claim_holds_on_a_healthy_run(tmp_path):
    _write_run(tmp_path)
    t = evaluate_claims(tmp_path).set_index("claim")
    assert list(t.index) == list(CLAIMS)
    assert t["holds"].tolist() == [True] * 8, t[["holds", "value"]]
    assert t.loc["g", "numbers"]["alert_epoch"] == 3 and t.loc["g", "numbers"]["chance_epoch"] == 5
    assert t.loc["e", "numbers"]["class_wins"] == 2 and t.loc["e", "numbers"]["classes_reacting"] == 3
    assert t.loc["b", "numbers"]["change"] == pytest.approx(0.3)


@pytest.mark.parametrize("change, claim", [
    (dict(lift=1.9), "a"),
    (dict(wt_div=(1.3, 1.2)), "b"),
    (dict(hl_collapses=False), "c"),
    (dict(of_ratio=1.1, of_slow=False), "d"),
    (dict(of_ratio=0.7, of_slow=False), "d"),
    (dict(bins=(-0.05, -0.10, -0.03, -0.01)), "e"),            # top bin not the worst
    (dict(rnd=-0.2), "e"),                                    # random outside the bins
    (dict(class_top=-0.001, class_bottom=-0.2), "e"),         # most classes the other way round
    (dict(wt_alarm=True), "f"),
    (dict(hl_alert_epoch=None), "g"),                          # the monitor stays silent
    (dict(hl_alert_epoch=5), "g"),                             # it speaks only once accuracy is at chance
    (dict(wt_alert=True), "h"),                                # a false alarm on the healthy run
])
def test_each_claim_fails_when_its_condition_fails(tmp_path, change, claim):
    _write_run(tmp_path, **change)
    t = evaluate_claims(tmp_path).set_index("claim")
    assert not t.loc[claim, "holds"] and t.loc[claim, "holds"] is not None
    others = t.drop(index=claim)
    assert others["holds"].all(), others[["holds", "value"]]


def test_missing_artifacts_give_no_judgement(tmp_path):
    t = evaluate_claims(tmp_path)
    assert t["holds"].isna().all() and len(t) == 8


@pytest.mark.slow
def test_fidelity_harness_quick_mode(tmp_path):
    """One seed at the demo's quick sizes: the harness runs end to end, prints its table and
    writes fidelity.json with every claim judged (the quick sizes are a smoke test, not evidence)."""
    out = tmp_path / "fid.json"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_fidelity.py"), "--seeds", "1",
                          "--quick", "--out", str(tmp_path / "runs"), "--json", str(out)],
                         capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["quick"] is True and doc["seeds"] == [0] and set(doc["held"]) == set(CLAIMS)
    claims = pd.DataFrame(doc["per_seed"]["0"])
    assert list(claims["claim"]) == list(CLAIMS)
    assert claims["holds"].isin([True, False]).all()  # every artifact was there to judge
    for c in CLAIMS:
        assert f"\n{c}     " in res.stdout
    assert (tmp_path / "runs" / "seed_0" / "claims.json").exists()
    assert not (tmp_path / "runs" / "seed_0" / "report.html").exists()  # the harness skips the report
    np.testing.assert_equal(sorted(doc["seconds_per_seed"]), ["0"])
