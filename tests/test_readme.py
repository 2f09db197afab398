"""The README opens with the two commands, and .ci/run runs exactly the second one."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```[^\n]*\n(.*?)```", text, re.S).group(1)
    return [s.strip() for s in block.splitlines() if s.strip() and not s.strip().startswith("#")]


def test_readme_opens_with_two_commands():
    cmds = readme_commands()
    assert len(cmds) == 2
    assert "torch==2.13.0" in cmds[0] and "conceptevo demo" in cmds[0]
    assert "torch==2.13.0" in cmds[1] and "pytest" in cmds[1]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    ci_cmds = [line.replace(" -q ", " ").replace("pip install -q", "pip install") for line in ci.splitlines()]
    wanted = readme_commands()[1]
    assert any(c.strip() == wanted for c in ci_cmds), f".ci/run does not run the README's test command {wanted!r}"
