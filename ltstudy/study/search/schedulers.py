"""Early stopping that respects long-tailed recipes, protects the published trial and survives a resume.

* **Phases.** A method's schedule changes phase late (DRW at 160/200 epochs, MetaSAug's meta phase, the lr
  milestones): a trial stopped before that has not shown what it does. By default ASHA's first rung is the
  epoch after the last phase start of any configuration the space can produce (``grace="auto"``), so no
  trial is stopped before every phase has begun. ``--grace-period N`` opts out.
* **The published trial** (the first trial of every study, the paper's setting) is never stopped early:
  its results still count towards the rungs' cut-offs, but a STOP decision on it becomes CONTINUE, so a
  study's answer can always be compared with a full-length run of the published configuration.
* **Resume.** Ray's controller saves the searcher's and the callbacks' state but not the scheduler's, so
  after ``Tuner.restore`` ASHA's rungs would start empty and every trial would survive the next rungs.
  :class:`StudyASHA` writes its rungs next to the experiment after every decision (under a name Tune's
  restore does not stage, see :data:`STATE_FILE`) and reads them back when Tune unpickles it on restore.

Ray's ``MedianStoppingRule`` and ``HyperBandScheduler`` are not offered: they keep per-trial state keyed
by ``Trial`` objects (not ids) and pause trials, so making them resume exactly would mean rewriting them.
"""

from __future__ import annotations

import io
import logging
import math
import pickle
from typing import Any

from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, TrialScheduler

from ltstudy.config import PUBLISHED_KEY
from ltstudy.errors import ConfigError
from ltstudy.study import _compat
from ltstudy.study.storage import filesystem

logger = logging.getLogger(__name__)

SCHEDULERS = ("asha", "halving", "none")
#: ASHA's rungs beside the experiment. Not ``*.pkl`` / ``*.json``: on restore Tune copies the experiment
#: folder's files of those kinds into its staging folder and uploads that folder at every save, which put the
#: copy from resume time back over the live rungs (ray.tune.execution.experiment_state,
#: ``sync_down_experiment_state``); a name Tune does not stage is written by this scheduler only.
STATE_FILE = "ltstudy_scheduler_state.rungs"
OLD_STATE_FILE = "ltstudy_scheduler_state.pkl"  # studies started before the rename
#: a result that came with a trial checkpoint carries this key (``trainable._reporter``)
CHECKPOINTED_KEY = "ltstudy_checkpointed"


class SavesState:
    """Tune saves its experiment state on a period (at most every few seconds, more rarely as saves get
    slower), so a driver killed right after a trial was added, or after a trial checkpointed, restarted
    from a state that did not know the trial or its checkpoint: the trial ran again as a new one (a second
    MLflow run, an orphaned Optuna trial, more trials than ``--num-trials``) or repeated its epochs. This
    scheduler mixin makes Tune save the state at the end of the step in which a trial was added and in
    which a trial's result brought a checkpoint. A new trial is saved before it starts, and the save waited
    for (the searcher has asked Optuna for it already: a state without it would orphan that Optuna trial);
    a checkpoint's save is Tune's own, at the end of the step (a state a moment behind names the trial's
    previous checkpoint, which Tune keeps: ``num_to_keep=2``)."""

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        super().on_trial_add(tune_controller, trial)
        if tune_controller is None:  # a scheduler driven by hand
            return
        if not getattr(trial, "has_reported_at_least_once", True):  # new, not one a resumed study re-queues
            _compat.save_experiment_now(tune_controller, trial)
        elif trial.status != "TERMINATED":  # restored from a state that may be behind its checkpoints
            for path in _compat.drop_missing_checkpoints(trial):
                logger.debug("trial %s: checkpoint %s is gone (the state was saved before Tune removed it)",
                            trial.trial_id, path)

    def _saved_checkpoint(self, tune_controller: Any, result: dict) -> None:
        if result.get(CHECKPOINTED_KEY) and tune_controller is not None:
            _compat.force_experiment_save(tune_controller)


class StudyFIFO(SavesState, FIFOScheduler):
    """No early stopping (``--scheduler none``), with the experiment state saved as :class:`SavesState` says."""

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        self._saved_checkpoint(tune_controller, result)
        return super().on_trial_result(tune_controller, trial, result)


class StudyASHA(SavesState, AsyncHyperBandScheduler):
    """ASHA on ``epoch`` that never stops the published trial and keeps its rungs across a resume (and saves
    the experiment state as :class:`SavesState` says)."""

    def __init__(self, *, state_dir: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._state_path = f"{state_dir.rstrip('/')}/{STATE_FILE}"

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        self._saved_checkpoint(tune_controller, result)
        decision = super().on_trial_result(tune_controller, trial, result)
        time_attr, max_t = _compat.asha_budget(self)
        if decision == TrialScheduler.STOP and trial.config.get(PUBLISHED_KEY) and result.get(time_attr, 0) < max_t:
            _compat.set_asha_stopped(self, _compat.asha_stopped(self) - 1)
            decision = TrialScheduler.CONTINUE
        self._save()
        return decision

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        super().on_trial_complete(tune_controller, trial, result)
        self._save()

    @property
    def rungs(self) -> list[tuple[float, dict[str, float]]]:
        """(milestone epoch, {trial id: signed objective}) of the one bracket, latest milestone first."""
        return _compat.asha_rungs(self)[0]

    def _save(self) -> None:
        state = {"rungs": _compat.asha_rungs(self), "num_stopped": _compat.asha_stopped(self)}
        fs, path = filesystem(self._state_path)
        with fs.open_output_stream(path + ".tmp") as out:
            out.write(pickle.dumps(state))
        fs.move(path + ".tmp", path)

    def _load(self) -> None:
        state = None
        for name in (STATE_FILE, OLD_STATE_FILE):
            fs, path = filesystem(self._state_path.rsplit("/", 1)[0] + "/" + name)
            try:
                with fs.open_input_stream(path) as src:
                    state = pickle.load(io.BytesIO(src.read()))
                break
            except (FileNotFoundError, OSError):
                continue
        if state is None:
            return
        _compat.set_asha_rungs(self, state["rungs"])
        _compat.set_asha_stopped(self, state["num_stopped"])

    def __setstate__(self, state: dict) -> None:
        # Tune unpickles the scheduler of a restored study from tuner.pkl, written before any result
        self.__dict__.update(state)
        self._load()


def rung_epochs(scheduler: StudyASHA | StudyFIFO) -> tuple[int, ...]:
    """The epochs at which ``scheduler`` decides (ASHA decides at the first result at or past a rung)."""
    if not isinstance(scheduler, StudyASHA):
        return ()
    return tuple(sorted({math.ceil(m) for m, _ in scheduler.rungs}))


def first_rung(phases: list[int], grace: int | str) -> int:
    """ASHA's grace period: ``grace`` when a number, else the epoch after the last phase start (>= 1)."""
    if grace != "auto":
        return int(grace)
    return max(phases, default=0) + 1


def asha_epochs(num_trials: int, epochs: int, rungs: tuple[int, ...], reduction_factor: float) -> float:
    """The epochs an ASHA study spends when each rung keeps exactly its best ``1/reduction_factor``
    (ASHA's nominal cut; asynchronous, it keeps more while a rung is filling) and the published trial
    always runs on: every trial runs to the first rung, each further segment by the trials left."""
    marks = [r for r in sorted(rungs) if r < epochs] + [epochs]
    spent, alive, last = 0.0, float(num_trials), 0
    for i, mark in enumerate(marks):
        spent += alive * (mark - last)
        last = mark
        alive = max(num_trials / reduction_factor ** (i + 1), 1.0) if num_trials > 1 else 1.0
    return spent


def make_scheduler(name: str, metric: str, mode: str, epochs: int, grace: int, reduction_factor: float,
                   state_dir: str) -> StudyASHA | StudyFIFO:
    """ASHA on ``epoch`` (Tune's iteration counter restarts after a restore), or none (FIFO; also under
    ``halving``, whose searcher decides which configurations run longer: ``search.halving``)."""
    if name in ("none", "halving"):
        return StudyFIFO()
    if name != "asha":
        raise ConfigError(f"unknown scheduler {name!r}; choose one of: {', '.join(SCHEDULERS)}")
    return StudyASHA(time_attr="epoch", metric=metric, mode=mode, max_t=max(epochs, 1),
                     grace_period=max(1, min(grace, epochs)), reduction_factor=reduction_factor,
                     state_dir=state_dir)
