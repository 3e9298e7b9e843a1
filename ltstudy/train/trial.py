"""``run_trial(cfg, report, ctx) -> metrics``: train and evaluate one configuration.

Pure torch: no Ray, no MLflow. Callers (the CLI, the Ray Tune/Train adapters, tests, notebooks) pass a
``report`` callback that receives each epoch's metrics and, when one was written, the directory of that
epoch's checkpoint. Studies select on the ``val_*`` metrics; the test split is evaluated once, after the
last epoch, and only reported.
"""

from __future__ import annotations

import math
import time
from typing import Any

from ltstudy.config import TrialConfig, check_runnable, lr_milestones
from ltstudy.methods import get_method
from ltstudy.runtime import resolve_device
from ltstudy.train.checkpoint import read_progress
from ltstudy.train.feature import FeatureStage
from ltstudy.train.image import ImageStage
from ltstudy.train.loop import Report, TrialContext, run_epochs
from ltstudy.train.optim import lr_phase_epochs


def phase_epochs(cfg: TrialConfig) -> list[int]:
    """0-based epochs where the trial's schedule changes phase: the lr schedule's and the method's own."""
    spec = get_method(cfg.method)
    own = [e for e in spec.phase_epochs(cfg.params, cfg.train.epochs) if 0 < e < cfg.train.epochs]
    return sorted(set(lr_phase_epochs(cfg.train, lr_milestones(cfg))) | set(own))


def finished_metrics(checkpoint_dir: str, cfg: TrialConfig) -> dict[str, Any] | None:
    """The final epoch's metrics when ``checkpoint_dir`` holds the trial's last epoch, else None."""
    progress = read_progress(checkpoint_dir)
    if progress is None or int(progress.get("epoch", 0)) < cfg.train.epochs:
        return None
    return {k: (math.nan if v is None else v) for k, v in progress["metrics"].items()}


def run_trial(cfg: TrialConfig, report: Report | None = None,
              ctx: TrialContext | None = None) -> dict[str, Any]:
    """Train and evaluate one configuration; returns the last epoch's metrics (with test metrics)."""
    ctx = ctx or TrialContext()
    check_runnable(cfg)
    device = resolve_device(ctx.device if ctx.device is not None else cfg.train.device)
    body = FeatureStage if get_method(cfg.method).stage == "feature" else ImageStage
    stage = body(cfg, ctx, device)
    ctx.ready_at = time.time()
    return run_epochs(stage, cfg, ctx, report)
