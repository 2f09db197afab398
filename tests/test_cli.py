"""The command line answers --help for every subcommand and reports bad input clearly."""
import pytest
from typer.testing import CliRunner

from conceptevo.cli import app

runner = CliRunner()


@pytest.mark.parametrize("cmd", [[], ["demo"], ["run"], ["data"], ["train"], ["stimuli"], ["info"], ["importance"], ["reversion"], ["diagnostics"], ["report"]])
def test_help(cmd):
    res = runner.invoke(app, [*cmd, "--help"])
    assert res.exit_code == 0, res.output
    assert "Usage" in res.output


def test_info_lists_backends():
    res = runner.invoke(app, ["info"])
    assert res.exit_code == 0, res.output


def test_run_with_missing_config_names_it(tmp_path):
    res = runner.invoke(app, ["run", str(tmp_path / "nope.toml")])
    assert res.exit_code == 2
    assert "nope.toml" in res.output


def test_run_with_unknown_key_names_it(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('dataset = "builtin"\nlearning_rate = 3\n')
    res = runner.invoke(app, ["run", str(cfg)])
    assert res.exit_code == 2 and "learning_rate" in res.output


def test_stimuli_with_missing_checkpoint_names_it(tmp_path):
    res = runner.invoke(app, ["stimuli", str(tmp_path / "epoch_003.pt"), "--out", str(tmp_path / "o"),
                              "--dataset", str(tmp_path / "nodata")])
    assert res.exit_code == 2
    assert "nodata" in res.output or "epoch_003.pt" in res.output
