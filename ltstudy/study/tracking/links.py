"""Links between a study's three records: the Tune trial, the Optuna trial and the MLflow run.

The searcher writes the Tune trial id on each Optuna trial it asks for (user attribute
:data:`~ltstudy.study.search.searcher.TUNE_TRIAL_ATTR`). :class:`OptunaLinks`, used by the Tune callbacks
in the driver, finds the Optuna trial of a Tune trial, gives its number (what the progress lines and the
MLflow run show) and writes the MLflow run id and URL onto it, so optuna-dashboard leads to MLflow and
MLflow back to the Optuna trial. :func:`annotate_study` names the objective (optuna-dashboard shows
``val_top1`` instead of "Objective 0") and puts the MLflow experiment on the Optuna study.
"""

from __future__ import annotations

from typing import Any

import optuna

from ltstudy.study import _compat
from ltstudy.study.search.searcher import TUNE_TRIAL_ATTR

RUN_ID_ATTR = "mlflow_run_id"
RUN_URL_ATTR = "mlflow_run"


def annotate_study(storage: Any, study_name: str, metrics: list[str], attrs: dict[str, str]) -> None:
    """Objective names (one per objective) and MLflow pointers on the Optuna study (idempotent: resume
    sets them again)."""
    study = optuna.load_study(study_name=study_name, storage=storage)
    if study.metric_names != list(metrics):
        study.set_metric_names(list(metrics))
    for key, value in attrs.items():
        study.set_user_attr(key, value)


class OptunaLinks:
    """Tune trial id -> Optuna trial (number, storage id), found through the searcher's user attribute."""

    def __init__(self, storage: Any, study_name: str) -> None:
        self.storage, self.study_name = storage, study_name
        self._found: dict[str, tuple[int, int]] = {}
        self._study_id: int | None = None

    def _lookup(self, tune_trial_id: str) -> tuple[int, int] | None:
        if tune_trial_id in self._found:
            return self._found[tune_trial_id]
        if self._study_id is None:
            try:
                self._study_id = self.storage.get_study_id_from_name(self.study_name)
            except KeyError:
                return None
        for t in self.storage.get_all_trials(self._study_id, deepcopy=False):
            tid = t.user_attrs.get(TUNE_TRIAL_ATTR)
            if tid and tid not in self._found:
                self._found[tid] = (t.number, _compat.storage_trial_id(t))
        return self._found.get(tune_trial_id)

    def number(self, tune_trial_id: str) -> int | None:
        """The Optuna trial number, or None when the searcher has not asked for this trial."""
        found = self._lookup(tune_trial_id)
        return found[0] if found else None

    def set_run(self, tune_trial_id: str, run_id: str, url: str) -> bool:
        """Write the MLflow run on the (running) Optuna trial; False when it is unknown or finished."""
        found = self._lookup(tune_trial_id)
        if found is None:
            return False
        try:
            self.storage.set_trial_user_attr(found[1], RUN_ID_ATTR, run_id)
            self.storage.set_trial_user_attr(found[1], RUN_URL_ATTR, url)
        except optuna.exceptions.UpdateFinishedTrialError:
            return False
        return True
