"""The trainer: ``run_trial(cfg, report, ctx)`` and the one epoch loop it runs.

* :mod:`ltstudy.train.trial` — ``run_trial``, which builds the trial body for the method's stage;
* :mod:`ltstudy.train.loop` — the epoch loop both stages share, ``TrialContext``, ``NonFiniteLossError``;
* :mod:`ltstudy.train.image` / :mod:`ltstudy.train.feature` — the image and feature trial bodies;
* :mod:`ltstudy.train.optim` — the optimiser and lr schedule; :mod:`ltstudy.train.checkpoint` — checkpoints.
"""

from ltstudy.train.checkpoint import CHECKPOINT_FILE, load_checkpoint
from ltstudy.train.loop import NonFiniteLossError, Report, TrialContext
from ltstudy.train.optim import lr_factor, lr_phase_epochs
from ltstudy.train.trial import finished_metrics, phase_epochs, run_trial

__all__ = ["CHECKPOINT_FILE", "NonFiniteLossError", "Report", "TrialContext", "load_checkpoint", "lr_factor",
           "finished_metrics", "lr_phase_epochs", "phase_epochs", "run_trial"]
