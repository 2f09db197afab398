"""A non-editable install must carry the report's JavaScript and CSS (package data, not Python)."""
import fnmatch
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_report_assets_are_declared_package_data():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    globs = cfg["package-data"]["conceptevo"]
    assets = sorted(p.relative_to(ROOT / "engine").as_posix() for p in (ROOT / "engine" / "report_assets").iterdir())
    assert {"report_assets/report.js", "report_assets/report.css"} <= set(assets)
    for a in assets:
        assert any(fnmatch.fnmatch(a, g) for g in globs), f"{a} would be left out of a wheel"


def test_assets_load_through_importlib_resources():
    from conceptevo.report import _asset

    js, css = _asset("report.js"), _asset("report.css")
    assert "window.conceptevoReport" in js and "#side-panel" in css
    assert "</script" not in js.lower() and "</style" not in css.lower()


def test_report_js_parses():
    """A syntax error in report.js would only show in a browser: check it with node when present."""
    import shutil
    import subprocess

    import pytest

    node = shutil.which("node") or shutil.which("nodejs")
    if node is None:
        pytest.skip("node is not installed (the browser test covers the script)")
    js = ROOT / "engine" / "report_assets" / "report.js"
    proc = subprocess.run([node, "--check", str(js)], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
