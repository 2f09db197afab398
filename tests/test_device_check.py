"""benchmarks/device_check.py without a GPU: every GPU check is skipped with its reason, exit 0; a wrong
result anywhere makes the exit status 1 and is named in the JSON and the Markdown table."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "device_check.py"


@pytest.fixture
def device_check(monkeypatch):
    spec = importlib.util.spec_from_file_location("device_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "device_check", mod)  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a CPU-only machine
    return mod


def test_cpu_only_machine_skips_every_gpu_check(device_check, tmp_path, capsys):
    assert device_check.main(["--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "device_check.json").read_text())
    status = {c["name"]: (c["status"], c["summary"]) for c in report["checks"]}
    assert [c["name"] for c in report["checks"]] == [name for name, _ in device_check.CHECKS]
    assert status.pop("environment")[0] == "ok"
    assert all(s == "skipped" and why for s, why in status.values()), status
    assert status["triton vs reference"][1] == "no CUDA device"
    assert report["wrong"] == [] and len(report["skipped"]) == len(device_check.CHECKS) - 1
    table = (tmp_path / "device_check.md").read_text()
    assert table.count("| skipped |") == len(device_check.CHECKS) - 1
    assert "skipped: triton vs reference (no CUDA device)" in capsys.readouterr().out


def test_a_wrong_result_or_an_error_exits_1(device_check, tmp_path, monkeypatch):
    def wrong(ctx):
        return False, "GPU and CPU disagree", {"max_abs_diff": 1.0}

    def broken(ctx):
        raise RuntimeError("kernel launch failed")

    monkeypatch.setattr(device_check, "CHECKS", [("environment", device_check.check_environment),
                                                 ("wrong", wrong), ("broken", broken)])
    assert device_check.main(["--out", str(tmp_path)]) == 1
    report = json.loads((tmp_path / "device_check.json").read_text())
    assert report["wrong"] == ["wrong", "broken"]
    assert [c["status"] for c in report["checks"]] == ["ok", "FAIL", "error"]
    assert "RuntimeError: kernel launch failed" in report["checks"][2]["summary"]
    assert "| wrong | FAIL |" in (tmp_path / "device_check.md").read_text()
