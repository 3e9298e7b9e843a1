"""User-facing errors.

Anything a user can cause by a wrong flag, a bad file or missing data raises a subclass of
:class:`LtstudyError`. The CLI prints its message as one line and exits with its ``exit_code`` (2 for bad
input, 1 for a study that did not do its job, 130 for an interrupted one); every other exception is a bug
and keeps its traceback.
"""


class LtstudyError(Exception):
    """An expected failure caused by the user's input; its message is shown as one line."""

    #: how the CLI labels the line, and the process's exit code
    label = "error"
    exit_code = 2


class ConfigError(LtstudyError):
    """An unknown key, a value of the wrong type, or an inconsistent setting."""


class DataError(LtstudyError):
    """A missing, partial or malformed dataset."""


class StudyFailed(LtstudyError):
    """A study ran but did not do its job (every trial failed)."""

    exit_code = 1


class TrackingWriteError(LtstudyError):
    """Records the tracking store never took (it stayed out of reach, or rejected them): the command ran,
    but its MLflow record is incomplete."""

    exit_code = 1


class StudyInterrupted(LtstudyError):
    """A study stopped by Ctrl-C or SIGTERM; its state is saved and ``--resume`` continues it."""

    label = "interrupted"
    exit_code = 130


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or infinite (the trainer's, or one a method optimises inside a trial, such as DLSA's
    flow): a property of the configuration, so the trial is a failure, not a result, and is not retried."""
