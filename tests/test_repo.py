"""The repository's promises to a new user: the README's commands are what CI runs; the package ships
what it needs; nothing generated is tracked."""

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return [line.strip() for block in blocks[:2] for line in block.strip().splitlines()]


def test_ci_lints_then_runs_the_readme_test_command():
    test_command = [c for c in _readme_commands() if "pytest" in c]
    assert test_command, "the README's second block must give the test command"
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    pytest_line = test_command[-1].split("&& ")[-1]
    assert pytest_line in ci
    assert "ruff check ." in ci and ci.index("ruff check .") < ci.index(pytest_line)


def test_readme_opens_with_install_and_main_job():
    first = " ".join(_readme_commands()[:3])
    assert "pip install" in first and "ltstudy " in first


def test_no_tracked_file_is_generated_or_large():
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    paths = [p for p in files.decode().split("\0") if p]
    assert not [p for p in paths if p.startswith(("ltstudy-results/", "ltstudy_results/", "mlruns/"))]
    big = [p for p in paths if (ROOT / p).is_file() and (ROOT / p).stat().st_size > 1_000_000]
    assert not big, big


@pytest.mark.slow
def test_a_built_wheel_ships_the_search_spaces(tmp_path):
    """A non-editable install finds search_spaces/ too: the wheel carries them as package data."""
    src = tmp_path / "src"  # a copy of the tracked tree: building writes build/ beside the sources
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for rel in filter(None, files.decode().split("\0")):
        target = src / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if (ROOT / rel).is_symlink():
            target.symlink_to((ROOT / rel).readlink())
        elif (ROOT / rel).is_file():
            target.write_bytes((ROOT / rel).read_bytes())
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "dist"), str(src)], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("ltstudy-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {Path(n).name for n in names if n.startswith("ltstudy/search_spaces/")}
    assert shipped == {p.name for p in (ROOT / "search_spaces").glob("*.yaml")}
