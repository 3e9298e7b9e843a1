"""``--time-budget``: an honest end to a study that runs out of time.

Tune's own ``time_budget_s`` ends the experiment by dropping the running trials without telling the searcher
or the callbacks (their MLflow runs and Optuna trials stay RUNNING) and marks the search finished in the
saved state (a later ``--resume`` would start nothing). Here the budget is this run's, and:

* once it has passed, no trial is asked for (but the first, the published configuration) (:class:`~ltstudy.study.search.concurrency.StudyConcurrency` asks the
  searcher for nothing more);
* a running trial is stopped at its next epoch's result, through Tune's own stop path (searcher, scheduler
  and callbacks all see its end), with ``stopped_by: budget`` in its last result: its MLflow run is KILLED
  and tagged ``budget``, its Optuna trial FAIL (TPE learns nothing from a run cut by the clock) with the
  user attribute ``ltstudy_stopped_by=budget``;
* the published trial (trial 0) is never cut: it always finishes, so the study has its reference;
* when no trial runs or waits to start any more, Tune's loop is ended the way Ctrl-C ends it (SIGUSR1: the state saved, the
  search not marked finished), so ``--resume`` continues with the trials the budget left.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import ray.tune

from ltstudy.config import PUBLISHED_KEY
from ltstudy.study.search.concurrency import tune_listens

#: the key a trial's last result carries when the budget stopped it, and its value
STOPPED_BY, BUDGET = "stopped_by", "budget"


class TimeBudget:
    """This run's deadline (``seconds`` from now); :meth:`cut` stops a running trial's result after it."""

    def __init__(self, seconds: float) -> None:
        self.seconds = float(seconds)
        self.deadline = time.time() + self.seconds
        self.stopped: set[str] = set()  # the trials it cut

    def expired(self) -> bool:
        return time.time() >= self.deadline

    def cut(self, trial_id: str, result: dict[str, Any]) -> bool:
        if not self.expired() or "epoch" not in result or result.get("failure") or result.get("done"):
            return False
        if (result.get("config") or {}).get(PUBLISHED_KEY):
            return False  # the published trial always finishes
        if int(result.get("epoch", 0)) >= int(result.get("epochs_total", 0)):
            return False  # its last epoch: it finished
        result[STOPPED_BY] = BUDGET  # in place: the trial's last result, which every end hook reads
        self.stopped.add(trial_id)
        return True



#: the budget of the run in progress in this process (``activate``), which every BudgetStopper applies
_ACTIVE: list[TimeBudget | None] = [None]


def activate(budget: TimeBudget | None) -> None:
    _ACTIVE[0] = budget


class BudgetStopper(ray.tune.Stopper):
    """The stopper a study runs with (from its first start): it holds nothing and applies the budget of the
    run in progress. Tune saves the stopper in the experiment state and puts the saved one back on
    ``--resume`` over the one it was given, so a stopper holding a deadline would bring the first run's
    budget back into every later run."""

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        budget = _ACTIVE[0]
        return budget is not None and budget.cut(trial_id, result)

    def stop_all(self) -> bool:
        return False  # Tune's stop_all drops the running trials unrecorded; BudgetEnd ends the loop instead


class BudgetEnd(ray.tune.Callback):
    """Ends Tune's loop once the budget has passed and no trial runs (as Ctrl-C does: Tune's SIGUSR1)."""

    def __init__(self, budget: TimeBudget) -> None:
        self.budget = budget
        self.ended = False

    def __getstate__(self) -> dict[str, Any]:
        return {"budget": None, "ended": False}  # a resumed study brings this run's budget

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        if self.ended or self.budget is None or not self.budget.expired():
            return
        if any(t.status in ("RUNNING", "PENDING") for t in trials) or not tune_listens():
            return  # without Tune's handler, StudyConcurrency finishes the search instead
        self.ended = True
        os.kill(os.getpid(), signal.SIGUSR1)
