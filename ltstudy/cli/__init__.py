"""ltstudy: long-tailed recognition methods on one trainer; hyperparameter studies on Ray Tune + Optuna,
tracked in MLflow.

Expected failures (bad flags, files or data) print one line and exit with code 2.
"""

from __future__ import annotations

import atexit
import os
import sys

import typer
from typer.exceptions import Abort, TyperException

# the command modules register themselves on ``app``, in the order of ``ltstudy --help``
from ltstudy.cli import train, study, features, bench, cluster  # noqa: F401, I001  # isort: skip
from ltstudy.cli.common import app
from ltstudy.errors import LtstudyError

app.info.help = __doc__


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app, turning expected failures into one line and exit code 2."""
    from ltstudy.cli.common import console

    if not console.is_terminal:  # logs and pipes: long lines stay whole, tables are not squeezed to 80
        console.width = 200
    command = typer.main.get_command(app)
    try:
        code = command.main(args=argv, prog_name="ltstudy", standalone_mode=False)
    except LtstudyError as exc:
        print(f"{exc.label}: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except TyperException as exc:  # usage errors (typer vendors click since 0.29)
        if type(exc).__name__ == "NoArgsIsHelpError" and getattr(exc, "ctx", None) is not None:
            print(exc.ctx.get_help())
            sys.exit(0)
        print(f"error: {exc.format_message()}", file=sys.stderr)
        sys.exit(2)
    except Abort:
        print("aborted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


def run() -> None:
    """The ``ltstudy`` command: :func:`main`, then an exit without Python's module teardown.

    Once a command has done its work, the exit handlers have run (Ray's and MLflow's included) and the
    output is flushed, freeing every torch, Ray and MLflow object one by one buys nothing and cost 1.5 s of
    every command's wall on the 2-core machine (docs/benchmarks.md).
    """
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if not isinstance(exc.code, int | None):
            print(exc.code, file=sys.stderr)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)
