"""``run_trial(cfg, report, ctx) -> metrics``: train and evaluate one configuration.

Pure torch: no Ray, no MLflow. Callers (the CLI, the Ray Tune/Train adapters, tests, notebooks) pass a
``report`` callback that receives each epoch's metrics and, when one was written, the directory of that
epoch's checkpoint. Studies select on the ``val_*`` metrics; the test split is evaluated once, after the
last epoch, and only reported.
"""

from __future__ import annotations

from typing import Any

from ltstudy.config import TrialConfig, check_runnable
from ltstudy.methods import get_method
from ltstudy.runtime import resolve_device
from ltstudy.train.feature import FeatureStage
from ltstudy.train.image import ImageStage
from ltstudy.train.loop import Report, TrialContext, run_epochs


def run_trial(cfg: TrialConfig, report: Report | None = None,
              ctx: TrialContext | None = None) -> dict[str, Any]:
    """Train and evaluate one configuration; returns the last epoch's metrics (with test metrics)."""
    ctx = ctx or TrialContext()
    check_runnable(cfg)
    device = resolve_device(ctx.device if ctx.device is not None else cfg.train.device)
    body = FeatureStage if get_method(cfg.method).stage == "feature" else ImageStage
    return run_epochs(body(cfg, ctx, device), cfg, ctx, report)
