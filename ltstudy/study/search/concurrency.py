"""How many trials run at once: Tune's concurrency limiter, with the limit of this run."""

from __future__ import annotations

import signal
from typing import Any

from ray.tune.search import ConcurrencyLimiter, Searcher

from ltstudy.study import _compat


def tune_listens() -> bool:
    """Whether Tune's SIGUSR1 handler (end the loop, save the state) is installed in this process."""
    return signal.getsignal(signal.SIGUSR1) not in (signal.SIG_DFL, signal.SIG_IGN, None)


class StudyConcurrency(ConcurrencyLimiter):
    """Tune's concurrency limiter whose limit is this run's, also after ``--resume``.

    Tune restores a limiter's whole state, ``max_concurrent`` included, from the experiment's searcher
    state; this one keeps the limit it was given (see ``set_max``), so a resumed study runs as wide as
    the command that resumed it asked for or the cluster allows. Likewise this run's time budget
    (:class:`~ltstudy.study.search.budget.TimeBudget`, ``set_budget``): once it has passed, no trial is asked for
    (``None``, not Tune's ``FINISHED``, which the saved state would keep: ``--resume`` continues the study).
    """

    budget: Any = None

    def suggest(self, trial_id: str) -> dict | str | None:
        if self.budget is not None and self.budget.expired() and self._asked_any():
            # (the first trial, the published configuration, is asked for whatever the clock says)
            # BudgetEnd ends Tune's loop through Tune's SIGUSR1 handler; where Tune has none (not on the
            # main thread) the search has to be finished instead, or the loop would wait for ever
            return None if tune_listens() else Searcher.FINISHED
        return super().suggest(trial_id)

    def _asked_any(self) -> bool:
        """Whether the searcher has asked Optuna for a trial yet (running ones, or told and forgotten)."""
        return bool(_compat.optuna_trials(self.searcher) or _compat.completed_trials(self.searcher))

    def set_state(self, state: dict) -> None:
        keep, budget = self.max_concurrent, self.budget
        super().set_state(state)
        self.max_concurrent, self.budget = keep, budget

    def set_budget(self, budget: Any) -> None:
        self.budget = budget

    def set_max(self, value: int) -> None:
        self.max_concurrent = value
