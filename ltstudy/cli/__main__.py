"""``python -m ltstudy.cli``."""

from ltstudy.cli import run

run()
