"""The Tune callbacks of a study's main line: the progress a person follows, and each trial's start-up
stages. (MLflow's callback is :mod:`ltstudy.study.tracking.callback`; freeing Train placement groups is
:mod:`ltstudy.study.cluster.placement`.)"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import ray.tune

from ltstudy.study.search.space import Param, active_values
from ltstudy.study.startup import startup_note, startup_stages
from ltstudy.study.tracking.store import trial_outcome
from ltstudy.study.trainable import STARTUP_KEY


class ProgressCallback(ray.tune.Callback):
    """Feeds a :class:`~ltstudy.study.progress.ProgressBoard` from Tune's hooks (driver side); labels
    trials by their Optuna number."""

    def __init__(self, board: Any, params: tuple[Param, ...], links: Any = None,
                 objectives: tuple[str, ...] = ()) -> None:
        self.board, self.params, self.links, self.objectives = board, params, links, tuple(objectives)

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles callbacks with the experiment; a resumed study brings its own board.
        return {"board": None, "params": self.params, "links": None, "objectives": self.objectives}

    def number(self, trial: Any) -> int | None:
        return self.links.number(trial.trial_id) if self.links is not None else None

    def label(self, trial: Any) -> str:
        number = self.number(trial)
        return f"trial {number}" if number is not None else f"trial {trial.trial_id}"

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if self.board is not None:
            self.board.start(trial.trial_id, self.label(trial), active_values(self.params, dict(trial.config)))

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if self.board is not None:
            self.board.result(trial.trial_id, result.get("epoch"), result.get("epochs_total"),
                              result.get(self.board.metric))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trial, errored=False)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trial, errored=True)

    def _end(self, trial: Any, errored: bool) -> None:
        if self.board is None:
            return
        last = trial.last_result or {}
        outcome, why = trial_outcome(last, errored, self.objectives)
        error = why or ("the trial raised an error" if errored else None)
        self.board.end(trial.trial_id, self.label(trial), outcome, int(last.get("epoch", 0)),
                       int(last.get("epochs_total", 0)), last.get(self.board.metric), error, self.number(trial))


class StartupCallback(ray.tune.Callback):
    """Adds each trial's start-up stages (``startup_*`` seconds) to its first result, in place; with
    ``say``, tells once per study what a multi-worker trial's start-up costs (and warns when it does not
    pay).

    Listed before the callbacks that read results (MLflow, progress), which then see the stages.
    """

    def __init__(self, workers: int = 1, say: Callable[[str], None] | None = None,
                 label: Callable[[Any], str] | None = None) -> None:
        self.workers, self.say, self.label = workers, say, label
        self._launched: dict[str, float] = {}
        self._told = False

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles callbacks with the experiment; a resumed study brings its own
        return {"workers": self.workers, "say": None, "label": None, "_launched": {}, "_told": False}

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._launched[trial.trial_id] = time.time()

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        # the stamps become the startup_* stages; the dict itself stays off the trial's state (Tune keeps
        # running statistics of every number in a result, written for every trial at every save)
        stamps = result.pop(STARTUP_KEY, None)
        launch = self._launched.pop(trial.trial_id, None)
        if not (isinstance(stamps, dict) and launch is not None and stamps.get("entered") is not None):
            return
        result.update(startup_stages(launch, stamps))
        if self.workers > 1 and self.say is not None and not self._told and "startup_driver_s" in result:
            self._told = True
            line, warning = startup_note(self.label(trial) if self.label else f"trial {trial.trial_id}",
                                         self.workers, result)
            self.say(line)
            if warning:
                self.say(f"warning: {warning}")
