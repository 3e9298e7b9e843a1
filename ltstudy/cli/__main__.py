"""``python -m ltstudy.cli``."""

from ltstudy.cli import main

main()
