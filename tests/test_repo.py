"""The repository's promises to a new user: the README's commands are what CI runs."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return [line.strip() for block in blocks[:2] for line in block.strip().splitlines()]


def test_ci_runs_the_readme_test_command():
    test_command = [c for c in _readme_commands() if "pytest" in c]
    assert test_command, "the README's second block must give the test command"
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command[-1].split("&& ")[-1] in [line.strip() for line in ci]


def test_readme_opens_with_install_and_main_job():
    first = " ".join(_readme_commands()[:3])
    assert "pip install" in first and "ltstudy " in first
