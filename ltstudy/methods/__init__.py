"""Registered methods. Importing this package registers every method module listed below.

Two contracts: :class:`ImageMethod` (``ltstudy/methods/image.py``) for methods that train the network,
:class:`FeatureMethod` (``ltstudy/methods/feature.py``) for classifiers trained on cached features.
"""

from ltstudy.methods import (  # noqa: F401  (registration, in a fixed order)
    balanced_softmax,
    ce,
    ce_classifier,
    decoupled,
    dlsa,
    fsa,
    fsgl,
    ldam_drw,
    lift,
    logit_adjust,
    metasaug,
    tailcalibx,
)
from ltstudy.methods.feature import FeatureMethod, FeatureSet
from ltstudy.methods.image import ImageMethod
from ltstudy.methods.registry import (
    Method,
    MethodContext,
    Params,
    get_method,
    iter_hyperparameters,
    list_methods,
    register,
)

__all__ = [
    "FeatureMethod",
    "FeatureSet",
    "ImageMethod",
    "Method",
    "MethodContext",
    "Params",
    "get_method",
    "iter_hyperparameters",
    "list_methods",
    "register",
]
