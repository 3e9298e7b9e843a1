"""Registered methods. Importing this package registers every method module listed below."""

from ltstudy.methods import balanced_softmax, ce, ce_classifier, dlsa, fsa, ldam_drw, tailcalibx  # noqa: F401  (registration)
from ltstudy.methods.base import (
    Amp,
    Method,
    MethodContext,
    Params,
    get_method,
    iter_hyperparameters,
    list_methods,
    register,
)

__all__ = [
    "Amp",
    "Method",
    "MethodContext",
    "Params",
    "get_method",
    "iter_hyperparameters",
    "list_methods",
    "register",
]
