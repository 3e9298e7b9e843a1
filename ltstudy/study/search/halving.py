"""Successive halving over schedule-scaled runs (``--scheduler halving``).

Why not more rungs in ASHA: ASHA judges a trial part-way through *one* run, and a long-tailed recipe shows
what it does only after its last phase has begun (DRW at 160 of 200 epochs, MetaSAug's meta phase, the lr
decays, FSGL's re-balanced branch taking over), so a safe first rung sits near the end and stopping saves a
few per cent. Halving judges whole recipes instead: every configuration first runs the full recipe
compressed to ``epochs / η^K`` epochs, every phase and lr milestone at the same fraction of the run (they are
fractions of ``epochs``; the warm-up, the one schedule length given in epochs, is scaled here), the best
``1/η`` by the validation objective run again at ``η`` times the epochs, and so on up to the full recipe.
Only full-budget runs are eligible answers; the published configuration always goes on to the next budget,
so the study's answer is compared with a full-length run of it (the design rule ASHA keeps by never
stopping it).

Every run is a Tune trial of its own with one MLflow run (tag ``ltstudy.budget`` = ``epochs/full``) and one
Optuna trial (a promotion is enqueued with the configuration's values and the number it was promoted from).
Rounds are synchronous: a budget's trials start when the budget below has finished. TPE samples only the
first budget's configurations, all before any promotion, so it models values of one budget only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ray.tune.search import Searcher

from ltstudy.config import BUDGET_KEY, PUBLISHED_KEY
from ltstudy.study import _compat
from ltstudy.study.search.searcher import LtOptunaSearch

#: each budget is ETA times the one below it; the best 1/ETA go on
ETA = 3
#: the shortest compressed recipe: below this the phases of a recipe fall on the same epoch
MIN_EPOCHS = 3
#: the Optuna trial of a promotion: the number of the trial it was promoted from
PROMOTED_ATTR = "ltstudy_promoted_from"


@dataclass(frozen=True)
class Budget:
    epochs: int
    trials: int  # Tune trials at this budget, the published configuration's included


def ladder(epochs: int, num_trials: int, eta: int = ETA) -> tuple[Budget, ...]:
    """The budgets for ``num_trials`` configurations (the published one included) of ``epochs`` epochs:
    ``epochs / eta^K`` … ``epochs``, with ``K`` as large as the configurations (at least one besides the
    published one reaches the full budget) and :data:`MIN_EPOCHS` allow."""
    others = num_trials - 1
    k = 0
    while others // eta ** (k + 1) >= 1 and math.floor(epochs / eta ** (k + 1) + 0.5) >= MIN_EPOCHS:
        k += 1
    return tuple(Budget(math.floor(epochs / eta ** (k - i) + 0.5) if i < k else epochs, others // eta ** i + 1)
                 for i in range(k + 1))


def total_epochs(budgets: tuple[Budget, ...]) -> int:
    return sum(b.epochs * b.trials for b in budgets)


def scaled_settings(config: dict[str, Any], epochs: int, full: int, warmup: int) -> dict[str, Any]:
    """The settings that compress a recipe of ``full`` epochs to ``epochs``: the epochs, the warm-up at the
    same fraction (rounded to the nearest epoch) and the budget marker. Phase starts and lr milestones
    are fractions of ``epochs`` already and move with it."""
    w = int(config.get("warmup_epochs", warmup))
    return {"epochs": epochs, "warmup_epochs": math.floor(w * epochs / full + 0.5), BUDGET_KEY: f"{epochs}/{full}"}


class HalvingSearch(LtOptunaSearch):
    """:class:`LtOptunaSearch` that hands out the trials of successive halving (see the module doc). Its
    state lives in its ``__dict__``, which Tune's searcher save pickles: a resumed study goes on where it was.
    A promotion names its source's Optuna trial, so told trials are kept (a halving study has a few dozen)."""

    keeps_told_trials = True

    def __init__(self, *, budgets: tuple[Budget, ...], full_epochs: int, warmup_epochs: int, **kw: Any) -> None:
        super().__init__(**kw)
        self.budgets, self.full, self.warmup = budgets, full_epochs, warmup_epochs
        self.level = 0  # the budget being run
        self.expected = [budgets[0].trials]  # Tune trials each level runs (fewer when some failed)
        self.level_of: dict[str, int] = {}  # Tune trial id -> level
        self.values: dict[str, float | None] = {}  # finished Tune trial id -> objective (None: no value)
        self.origin: dict[str, dict[str, Any]] = {}  # Tune trial id -> its config before scaling
        self.params: dict[str, dict[str, Any]] = {}  # Tune trial id -> its Optuna trial's values
        self.queue: list[str] = []  # trial ids whose configuration runs next at this level

    def suggest(self, trial_id: str) -> dict | str | None:
        if self.level >= len(self.budgets):
            return Searcher.FINISHED
        if sum(v == self.level for v in self.level_of.values()) >= self.expected[self.level]:
            return None  # the level's trials are out: the next level starts when they have finished
        if self.level == 0:
            config = super().suggest(trial_id)
            if not isinstance(config, dict):
                return config
            origin = config
        else:
            source = self.queue.pop(0)
            origin = self.origin[source]
            number = _compat.optuna_trials(self)[source].number
            _compat.searcher_study(self).enqueue_trial(self.params[source],
                                                       user_attrs={PROMOTED_ATTR: number})
            config = super().suggest(trial_id)
            if not isinstance(config, dict):
                return config
            config = {**config, **({PUBLISHED_KEY: True} if origin.get(PUBLISHED_KEY) else {})}
        self.level_of[trial_id] = self.level
        self.origin[trial_id] = origin
        self.params[trial_id] = dict(_compat.optuna_trials(self)[trial_id].params)
        epochs = self.budgets[self.level].epochs
        return {**config, **scaled_settings(origin, epochs, self.full, self.warmup)}

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        super().on_trial_complete(trial_id, result=result, error=error)
        if trial_id not in self.level_of or trial_id in self.values:
            return
        value = (result or {}).get(self.metric)
        ok = not error and result and not result.get("failure") and isinstance(value, (int, float)) \
            and math.isfinite(value) and int(result.get("epoch", 0)) >= int(result.get("epochs_total", 1))
        self.values[trial_id] = float(value) if ok else None
        self._advance()

    def _advance(self) -> None:
        """Once every trial of the level has finished, the best of it (and the published one) go on."""
        while self.level < len(self.budgets):
            level = [t for t, v in self.level_of.items() if v == self.level]
            if len(level) < self.expected[self.level] or any(t not in self.values for t in level):
                return
            self.level += 1
            if self.level == len(self.budgets):
                return
            self.queue = self.promoted(level, self.budgets[self.level].trials - 1)
            self.expected.append(len(self.queue))

    def promoted(self, level: list[str], keep: int) -> list[str]:
        """The published trial (when it has a value) and the best ``keep`` others, by the objective."""
        sign = 1.0 if self.mode == "max" else -1.0
        scored = [t for t in level if self.values.get(t) is not None]
        published = [t for t in scored if self.origin[t].get(PUBLISHED_KEY)]
        others = sorted((t for t in scored if t not in published), key=lambda t: sign * self.values[t],
                        reverse=True)
        return published[:1] + others[:keep]
