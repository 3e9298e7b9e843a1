"""Searchers and schedulers: OptunaSearch that tells Optuna the truth about stopped trials, and ASHA.

Ray's OptunaSearch stores a trial that ASHA stopped as COMPLETE with its truncated value, so TPE would
learn from short runs as if they were finished (platform notes 2.4). ``LtOptunaSearch`` marks a trial
PRUNED when its last epoch is below its budget and FAIL when the trial reported a failure (a non-finite
loss), and reports intermediate values by epoch (Tune's iteration counter restarts after a restore).
"""

from __future__ import annotations

from ray.tune.search.optuna import OptunaSearch

SAMPLERS = ("tpe", "random", "cmaes", "gp", "qmc")
SCHEDULERS = ("asha", "none")


class LtOptunaSearch(OptunaSearch):
    def suggest(self, trial_id: str) -> dict | None:
        """Ray's suggest, plus the Tune trial id on the Optuna trial (how ``study.links`` finds it)."""
        from ltstudy.study.links import TUNE_TRIAL_ATTR

        config = super().suggest(trial_id)
        ot_trial = self._ot_trials.get(trial_id)
        if config is not None and ot_trial is not None:
            ot_trial.set_user_attr(TUNE_TRIAL_ATTR, trial_id)
        return config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        import optuna

        if result.get("failure") or self.metric not in result or trial_id in self._completed_trials:
            return
        try:
            self._ot_trials[trial_id].report(result[self.metric], int(result.get("epoch", 0)))
        except optuna.exceptions.UpdateFinishedTrialError:
            # a trial Tune re-runs after a restore although Optuna already recorded its end
            self._completed_trials.add(trial_id)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        import optuna

        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        ot_trial = self._ot_trials[trial_id]
        if ot_trial.study._storage.get_trial(ot_trial._trial_id).state.is_finished():
            self._completed_trials.add(trial_id)
            return
        if error or not result or result.get("failure") or result.get(self.metric) is None:
            self._ot_study.tell(ot_trial, state=optuna.trial.TrialState.FAIL)
        elif int(result.get("epoch", 0)) < int(result.get("epochs_total", 0)):
            self._ot_study.tell(ot_trial, state=optuna.trial.TrialState.PRUNED)
        else:
            self._ot_study.tell(ot_trial, result[self.metric])
        self._completed_trials.add(trial_id)


def make_sampler(name: str, seed: int | None):
    """An Optuna sampler by name; TPE (multivariate, constant liar in Optuna 5) is the default."""
    import optuna

    from ltstudy.errors import ConfigError

    factories = {
        "tpe": lambda: optuna.samplers.TPESampler(seed=seed),
        "random": lambda: optuna.samplers.RandomSampler(seed=seed),
        "cmaes": lambda: optuna.samplers.CmaEsSampler(seed=seed),
        "gp": lambda: optuna.samplers.GPSampler(seed=seed),
        "qmc": lambda: optuna.samplers.QMCSampler(seed=seed),
    }
    if name not in factories:
        raise ConfigError(f"unknown sampler {name!r}; choose one of: {', '.join(SAMPLERS)}")
    return factories[name]()


#: the Optuna journal of every study under a local storage root (``optuna-dashboard <root>/optuna.journal``)
OPTUNA_JOURNAL = "optuna.journal"


def open_optuna_storage(location: str):
    """The Optuna storage that holds every study: a journal file path, or an RDB URL (``sqlite:///…``,
    ``postgresql://…``)."""
    import optuna

    if "://" in location:
        return optuna.storages.RDBStorage(location)
    from optuna.storages.journal import JournalFileBackend

    return optuna.storages.JournalStorage(JournalFileBackend(location))


def make_searcher(space, sampler: str, seed: int | None, study_name: str, optuna_storage: str,
                  fresh: bool) -> LtOptunaSearch:
    """The searcher over ``space`` with its Optuna study named ``study_name`` in ``optuna_storage``.

    The published configuration is enqueued only on a fresh start: OptunaSearch re-enqueues
    ``points_to_evaluate`` into the persistent study every time it is built (platform notes 1.7).
    """
    storage = open_optuna_storage(optuna_storage)
    return LtOptunaSearch(
        space=space.define_by_run(), metric=space.metric, mode=space.mode,
        points_to_evaluate=[space.published_point()] if fresh else None,
        sampler=make_sampler(sampler, seed), study_name=study_name, storage=storage,
    )


def make_scheduler(name: str, metric: str, mode: str, epochs: int, grace: int = 1,
                   reduction_factor: int = 2):
    """ASHA on ``epoch`` (not training_iteration, which restarts after a restore), or none."""
    from ltstudy.errors import ConfigError

    if name == "none":
        return None
    if name != "asha":
        raise ConfigError(f"unknown scheduler {name!r}; choose one of: {', '.join(SCHEDULERS)}")
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr="epoch", metric=metric, mode=mode, max_t=max(epochs, 1),
                         grace_period=max(1, min(grace, epochs)), reduction_factor=reduction_factor)
