"""Registered methods. Importing this package registers every method module listed below."""

from ltstudy.methods import (  # noqa: F401  (registration, in a fixed order)
    balanced_softmax,
    ce,
    ce_classifier,
    dlsa,
    fsa,
    fsgl,
    ldam_drw,
    metasaug,
    tailcalibx,
)
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
