"""ltstudy: long-tailed recognition methods on one trainer; hyperparameter studies on Ray Tune + Optuna,
tracked in MLflow.

Expected failures (bad flags, files or data) print one line and exit with code 2.
"""

from __future__ import annotations

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
