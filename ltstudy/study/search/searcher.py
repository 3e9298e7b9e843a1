"""The searcher: Optuna inside Ray Tune, told the truth about every trial.

Ray's ``OptunaSearch`` stores a trial that ASHA stopped as COMPLETE with its truncated value (it tells
PRUNED only for a trial with no result), and on a STOP decision Tune does not even pass the result it
stopped on to the searcher, so a plain ``tell(PRUNED)`` would reach Optuna without the value. :class:`LtOptunaSearch`:

* reports intermediate values by epoch (Tune's iteration counter restarts after a restore);
* tells a stopped trial PRUNED after reporting the value it was stopped on, at its epoch, so TPE ranks
  pruned trials by how far and how well they got;
* tells FAIL for a failed trial and for a NaN objective, and for a trial the time budget cut (user attribute
  ``ltstudy_stopped_by=budget``: the clock says nothing about the configuration);
* marks the published configuration (the enqueued first trial) in its config (``PUBLISHED_KEY``), so the
  scheduler never stops it and the tracking tags it;
* supports multi-objective studies (a list of metrics; no intermediate values, no pruning signal);
* fails, on restore, the Optuna trials that no Tune trial owns (asked just before the driver was killed):
  left RUNNING they would steer TPE's constant liar away from their region forever.
"""

from __future__ import annotations

import hashlib
import logging
import math
import warnings
from typing import Any

import optuna
from ray.tune.search.optuna import OptunaSearch

from ltstudy.config import PUBLISHED_KEY
from ltstudy.errors import ConfigError
from ltstudy.study import _compat
from ltstudy.study.search.budget import BUDGET, STOPPED_BY
from ltstudy.study.search.optuna_storage import open_optuna_storage

SAMPLERS = ("tpe", "random", "cmaes", "gp", "qmc")
#: the user attribute on each Optuna trial naming the Tune trial it ran as (see ``tracking.links``)
TUNE_TRIAL_ATTR = "tune_trial_id"
#: below this many trials a model-based sampler has too little to model; the study says so
MODEL_MIN_TRIALS = 10

logger = logging.getLogger(__name__)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class LtOptunaSearch(OptunaSearch):
    def suggest(self, trial_id: str) -> dict | None:
        """Ray's suggest, plus the Tune trial id on the Optuna trial (how ``tracking.links`` finds it) and
        the published configuration marked in the config of the enqueued first trial."""
        config = super().suggest(trial_id)
        ot_trial = _compat.optuna_trials(self).get(trial_id)
        if config is not None and ot_trial is not None:
            ot_trial.set_user_attr(TUNE_TRIAL_ATTR, trial_id)
            if ot_trial.number == 0 and _compat.enqueued_points(self):
                config[PUBLISHED_KEY] = True
        return config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        trials, completed = _compat.optuna_trials(self), _compat.completed_trials(self)
        if isinstance(self.metric, list) or result.get("failure") or trial_id in completed:
            return
        if not _finite(result.get(self.metric)) or trial_id not in trials:
            return
        try:
            with warnings.catch_warnings():  # a resumed trial re-reports the epochs after its checkpoint
                warnings.filterwarnings("ignore", message=".*is already reported")
                trials[trial_id].report(result[self.metric], int(result.get("epoch", 0)))
        except optuna.exceptions.UpdateFinishedTrialError:
            # a trial Tune re-runs after a restore although Optuna already recorded its end
            completed.add(trial_id)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        state = optuna.trial.TrialState
        trials, completed = _compat.optuna_trials(self), _compat.completed_trials(self)
        if trial_id in completed or trial_id not in trials:
            return
        study, ot_trial = _compat.searcher_study(self), trials[trial_id]
        if _compat.trial_finished(study, ot_trial):
            completed.add(trial_id)
            self._forget(trial_id)
            return
        metrics = self.metric if isinstance(self.metric, list) else [self.metric]
        values = [(result or {}).get(m) for m in metrics]
        if error or not result or result.get("failure") or not all(_finite(v) for v in values):
            study.tell(ot_trial, state=state.FAIL)
        elif result.get(STOPPED_BY) == BUDGET:  # cut by the clock, not by its quality: nothing to learn
            ot_trial.set_user_attr("ltstudy_stopped_by", BUDGET)
            study.tell(ot_trial, state=state.FAIL)
        elif int(result.get("epoch", 0)) < int(result.get("epochs_total", 0)):
            if len(metrics) == 1:  # the value it was stopped on: Tune withholds the STOP result
                self.on_trial_result(trial_id, result)
            study.tell(ot_trial, state=state.PRUNED)
        else:
            study.tell(ot_trial, values if len(values) > 1 else values[0])
        completed.add(trial_id)
        self._forget(trial_id)

    #: whether a told trial stays in ``_ot_trials`` (a searcher that reads finished trials back keeps them)
    keeps_told_trials = False

    def _forget(self, trial_id: str) -> None:
        """Drop a told trial's ``optuna.Trial`` (its end is in the storage): Tune pickles the searcher at every
        experiment save, and the ``_ot_trials`` of every trial so far were a third of a save at 400 trials.
        The id stays in ``_completed_trials``, which is what every hook checks first."""
        if not self.keeps_told_trials:
            _compat.optuna_trials(self).pop(trial_id, None)

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        self.fail_orphans()

    def fail_orphans(self) -> list[int]:
        """Fail the RUNNING Optuna trials that no Tune trial of this searcher owns; returns their numbers."""
        study = _compat.searcher_study(self)
        owned = {t.number for t in _compat.optuna_trials(self).values()}
        running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        orphans = [t.number for t in running if t.number not in owned]
        for number in orphans:
            study.tell(number, state=optuna.trial.TrialState.FAIL)
            logger.warning("Optuna trial %d was asked before the study stopped and never ran: failed it", number)
        return orphans


def startup_trials(num_trials: int) -> int:
    """Random start-up trials of a model-based sampler: a quarter of the study, 2 to 10."""
    return max(2, min(10, num_trials // 4))


def study_seed(study: str) -> int:
    """The sampler seed of a study without ``--seed``: derived from its name, so studies differ."""
    return int.from_bytes(hashlib.sha256(study.encode()).digest()[:4], "big")


def make_sampler(name: str, seed: int | None, num_trials: int = 64):
    """An Optuna sampler by name; TPE (multivariate, constant liar in Optuna 5) is the default.

    Model-based samplers (TPE, GP) start with :func:`startup_trials` random trials (Optuna's fixed 10
    made every study of up to 10 trials a random search).
    """
    startup = startup_trials(num_trials)
    factories = {
        "tpe": lambda: optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup),
        "random": lambda: optuna.samplers.RandomSampler(seed=seed),
        "cmaes": lambda: optuna.samplers.CmaEsSampler(seed=seed),
        "gp": lambda: optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup),
        "qmc": lambda: optuna.samplers.QMCSampler(seed=seed),
    }
    if name not in factories:
        raise ConfigError(f"unknown sampler {name!r}; choose one of: {', '.join(SAMPLERS)}")
    return factories[name]()


def sampler_warning(name: str, num_trials: int) -> str | None:
    """One line when a model-based study is too short for its model to matter."""
    if name in ("tpe", "gp", "cmaes") and num_trials < MODEL_MIN_TRIALS:
        return (f"{num_trials} trials: {name} models the space from {startup_trials(num_trials)} start-up "
                f"trials, so this study is close to a random search; use --num-trials "
                f"{MODEL_MIN_TRIALS} or more (or --sampler random to say so)")
    return None


def make_searcher(space, sampler: str, seed: int, num_trials: int, study_name: str, optuna_storage: str,
                  fresh: bool, cls: type[LtOptunaSearch] = LtOptunaSearch, **extra: Any) -> LtOptunaSearch:
    """The searcher over ``space`` with its Optuna study named ``study_name`` in ``optuna_storage``.

    The published configuration is enqueued only on a fresh start: OptunaSearch re-enqueues
    ``points_to_evaluate`` into the persistent study every time it is built (``create_study(load_if_exists=True)``
    then ``enqueue_trial``), which would run it twice. ``cls`` and ``extra``: a subclass and its own
    arguments (``search.halving.HalvingSearch``).
    """
    return cls(**extra,
        space=space.define_by_run(), metric=space.searcher_metric, mode=space.searcher_mode,
        points_to_evaluate=[space.published_point()] if fresh else None,
        sampler=make_sampler(sampler, seed, num_trials), study_name=study_name,
        storage=open_optuna_storage(optuna_storage),
    )
