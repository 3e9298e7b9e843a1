"""User-facing errors.

Anything a user can cause by a wrong flag, a bad file or missing data raises a subclass of
:class:`LtstudyError`. The CLI prints its message as one line and exits with code 2; every other
exception is a bug and keeps its traceback.
"""


class LtstudyError(Exception):
    """An expected failure caused by the user's input; its message is shown as one line."""


class ConfigError(LtstudyError):
    """An unknown key, a value of the wrong type, or an inconsistent setting."""


class DataError(LtstudyError):
    """A missing, partial or malformed dataset."""


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or infinite (the trainer's, or one a method optimises inside a trial, such as DLSA's
    flow): a property of the configuration, so the trial is a failure, not a result, and is not retried."""
