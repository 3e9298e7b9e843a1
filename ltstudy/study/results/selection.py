"""Which trial a study recommends: the best one, a point of the Pareto front, or the confirmed winner.

Pure functions over the trial records that :mod:`ltstudy.study.tracking.records` reads back from MLflow (dicts with
``trial_id``, ``status``, ``metrics``, ``params``, ``published``). Only trials that ran their whole budget
are candidates while any did: a pruned trial's metric is from a shorter run.
"""

from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass
from typing import Any

from ltstudy.errors import ConfigError


@dataclass(frozen=True)
class Objectives:
    """The study's objective(s): one metric and mode, or 2-3 of each (multi-objective)."""

    metrics: tuple[str, ...]
    modes: tuple[str, ...]

    @classmethod
    def from_tags(cls, tags: dict[str, str]) -> Objectives:
        metrics = tuple(tags.get("ltstudy.metric", "val_top1").split(","))
        modes = tuple(tags.get("ltstudy.mode", "max").split(","))
        return cls(metrics, modes if len(modes) == len(metrics) else (modes[0],) * len(metrics))

    def tags(self) -> dict[str, str]:
        return {"ltstudy.metric": ",".join(self.metrics), "ltstudy.mode": ",".join(self.modes)}

    @property
    def multi(self) -> bool:
        return len(self.metrics) > 1

    @property
    def metric(self) -> str:
        return self.metrics[0]

    @property
    def mode(self) -> str:
        return self.modes[0]

    def signed(self, trial: dict[str, Any]) -> tuple[float, ...]:
        """The objectives of a trial, each turned so that larger is better."""
        return tuple((1.0 if mode == "max" else -1.0) * trial["metrics"][m]
                     for m, mode in zip(self.metrics, self.modes, strict=True))

    def ranked(self, trial: dict[str, Any]) -> tuple[float, ...]:
        """Sort key, larger is better: :meth:`signed`, then on a tie the earlier trial (the lower Optuna
        number; trial 0 is the published configuration), as Optuna's own ``best_trial`` and the progress
        board break ties."""
        return (*self.signed(trial), earlier(trial))

    def describe(self) -> str:
        return ", ".join(f"{mode} {m}" for m, mode in zip(self.metrics, self.modes, strict=True))


def earlier(trial: dict[str, Any]) -> float:
    """A tie-break, larger for earlier trials: minus the Optuna number (a trial without one comes last)."""
    number = trial.get("number")
    return -float(number) if number is not None else -math.inf


def published_trial(trials: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The published configuration: Optuna trial 0 (enqueued first, see ``search.searcher``), or under
    successive halving its full-budget run (``search.halving``)."""
    full = next((t for t in trials if t.get("published") and t.get("budget") and not t.get("partial")), None)
    return full or next((t for t in trials if t.get("number") == 0), None)


def full_budget(trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The trials that ran the whole recipe: all but successive halving's shorter runs, which rank
    configurations for promotion only and are never an answer."""
    return [t for t in trials if not t.get("partial")]


def candidates(trials: list[dict[str, Any]], obj: Objectives) -> list[dict[str, Any]]:
    """Full-budget trials with every objective finite: those that completed, else (none did) the pruned ones."""
    scored = [t for t in full_budget(trials) if t["status"] in ("completed", "pruned")
              and all(math.isfinite(t["metrics"].get(m, math.nan)) for m in obj.metrics)]
    return [t for t in scored if t["status"] == "completed"] or scored


def pick_best(trials: list[dict[str, Any]], obj: Objectives) -> dict[str, Any] | None:
    """The best trial on a single objective (None for a multi-objective study: see :func:`pareto_front`)."""
    pool = candidates(trials, obj)
    if obj.multi or not pool:
        return None
    return max(pool, key=obj.ranked)


def pareto_front(trials: list[dict[str, Any]], obj: Objectives) -> list[dict[str, Any]]:
    """The non-dominated candidates, best first on the first objective."""
    pool = candidates(trials, obj)
    scores = [obj.signed(t) for t in pool]

    def dominated(i: int) -> bool:
        return any(all(b >= a for a, b in zip(scores[i], scores[j], strict=True)) and scores[j] != scores[i]
                   for j in range(len(pool)) if j != i)

    front = [t for i, t in enumerate(pool) if not dominated(i)]
    return sorted(front, key=obj.ranked, reverse=True)


_RULE = re.compile(r"^\s*(max|min)\s+(\w+)(?:\s+where\s+(.+))?\s*$")
_COND = re.compile(r"^\s*(\w+)\s*(>=|<=|>|<)\s*([-+0-9.eE]+)\s*$")


def pick_point(trials: list[dict[str, Any]], obj: Objectives, pick: str | None) -> dict[str, Any]:
    """The trial ``best-config export`` writes for a multi-objective study.

    ``pick`` is ``N`` (the N-th point of the Pareto front as the summary lists it, from 0) or a rule
    ``"max METRIC [where METRIC >= X [and METRIC <= Y ...]]"`` applied to the Pareto front.
    """
    front = pareto_front(trials, obj)
    if not front:
        raise ConfigError("the study has no finished trial with every objective")
    if pick is None:
        raise ConfigError(f"a multi-objective study ({obj.describe()}) has {len(front)} Pareto points; "
                          "choose one with --pick N or --pick 'max METRIC where METRIC >= X'")
    if pick.strip().isdigit():
        n = int(pick)
        if n >= len(front):
            raise ConfigError(f"--pick {n}: the Pareto front has points 0..{len(front) - 1}")
        return front[n]
    match = _RULE.match(pick)
    if not match:
        raise ConfigError(f"--pick {pick!r}: give N or 'max METRIC where METRIC >= X'")
    mode, metric, where = match.groups()
    pool = front
    conds = [(cond, _COND.match(cond)) for cond in filter(None, re.split(r"\s+and\s+", where or ""))]
    for cond, c in conds:
        if not c:
            raise ConfigError(f"--pick: cannot read the condition {cond!r} (METRIC >= NUMBER)")
    for name in [metric, *(c.group(1) for _, c in conds)]:
        if not all(name in t["metrics"] for t in front):
            known = sorted(set.intersection(*(set(t["metrics"]) for t in front)))
            raise ConfigError(f"--pick: the trials have no metric {name!r} (they have: "
                              f"{', '.join(k for k in known if k.startswith('val_'))}, ...)")
    for _, c in conds:
        name, op, value = c.group(1), c.group(2), float(c.group(3))
        test = {">=": float.__ge__, "<=": float.__le__, ">": float.__gt__, "<": float.__lt__}[op]
        pool = [t for t in pool if name in t["metrics"] and test(float(t["metrics"][name]), value)]
    if not all(metric in t["metrics"] for t in front):
        raise ConfigError(f"--pick: the trials have no metric {metric!r}")
    if not pool:
        raise ConfigError(f"--pick {pick!r}: no Pareto point satisfies the condition")
    sign = 1.0 if mode == "max" else -1.0
    return max(pool, key=lambda t: (sign * t["metrics"][metric], earlier(t)))


def t_half_width(values: list[float], level: float = 0.95) -> float:
    """Half the width of the two-sided Student-t confidence interval of the mean (NaN below two values)."""
    from scipy import stats

    if len(values) < 2:
        return math.nan
    return float(stats.t.ppf(0.5 + level / 2, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values)))


def confirmed_ranking(runs: list[dict[str, Any]], obj: Objectives,
                      published_id: str | None = None) -> list[dict[str, Any]]:
    """Confirmation runs grouped by the trial they confirm, ranked by the mean objective over seeds.

    Each row: ``trial_id``, ``mean``, ``std`` (sample, 0 for one seed), ``ci95`` (half-width of the 95 %
    t-interval of the mean), ``seeds``, ``values``; with the published trial's id, also ``diff`` and
    ``diff_ci95``: the mean paired difference against the published configuration over the seeds both ran
    (every candidate runs the same seeds) and its t-interval. A failed or unfinished confirmation run counts
    as missing; a trial with no finished run is left out.
    """
    groups: dict[str, list[tuple[int, float]]] = {}
    for r in runs:
        value = r["metrics"].get(obj.metric, math.nan)
        if r["status"] == "completed" and math.isfinite(value):
            groups.setdefault(r["confirms"], []).append((int(r.get("seed", 0)), value))
    rows = []
    reference = dict(groups.get(published_id, [])) if published_id else {}
    for trial_id, pairs in groups.items():
        values = [v for _, v in sorted(pairs)]
        row = {"trial_id": trial_id, "mean": statistics.fmean(values),
               "std": statistics.stdev(values) if len(values) > 1 else 0.0, "ci95": t_half_width(values),
               "seeds": [s for s, _ in sorted(pairs)], "values": values}
        diffs = [v - reference[s] for s, v in sorted(pairs) if s in reference]
        if reference and diffs:
            row.update(diff=statistics.fmean(diffs), diff_ci95=t_half_width(diffs))
        rows.append(row)
    sign = 1.0 if obj.mode == "max" else -1.0
    return sorted(rows, key=lambda row: sign * row["mean"], reverse=True)


def recommended(trials: list[dict[str, Any]], confirmations: list[dict[str, Any]],
                obj: Objectives) -> dict[str, Any] | None:
    """The study's answer, the same everywhere (summary, ``studies list`` / ``show``, report, export): the
    confirmed winner (best mean over the confirmation seeds, its ranking row as ``confirmed``) when the study
    was confirmed, else the best single-seed trial (None for a multi-objective study)."""
    if obj.multi:
        return None
    published = published_trial(trials)
    ranking = confirmed_ranking(confirmations, obj, published["trial_id"] if published else None)
    by_id = {t["trial_id"]: t for t in trials}
    if ranking and ranking[0]["trial_id"] in by_id:
        return {**by_id[ranking[0]["trial_id"]], "confirmed": ranking[0], "ranking": ranking}
    return pick_best(trials, obj)


def gain_over_published(trials: list[dict[str, Any]], best: dict[str, Any] | None,
                        obj: Objectives) -> dict[str, float] | None:
    """How much better the recommended trial is than the published configuration (validation objective,
    and the test metric of the same name, reported only); None without a finished published trial."""
    published = next((t for t in full_budget(trials) if t.get("published") and t["status"] == "completed"), None)
    if best is None or published is None or obj.multi:
        return None
    gain = {obj.metric: best["metrics"][obj.metric] - published["metrics"][obj.metric]}
    test = "test_" + obj.metric.removeprefix("val_")
    if test in best["metrics"] and test in published["metrics"]:
        gain[test] = best["metrics"][test] - published["metrics"][test]
    return gain
