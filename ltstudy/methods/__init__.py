"""Registered methods. Importing this package registers every method module listed below."""

from ltstudy.methods import balanced_softmax, ce, fsgl, ldam_drw, metasaug  # noqa: F401  (registration)
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
