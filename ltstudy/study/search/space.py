"""Search-space files (``search_spaces/<method>.yaml``) → validated :class:`SearchSpace` → Optuna.

A file names the method, the objective (``metric``, ``mode``; a list of two or three metrics, each with
a mode, makes a multi-objective study), the ``fixed`` settings and the ``tune``d parameters. Every name is checked against the method's declared hyperparameters and the shared
``TrainConfig`` fields, and every range end is resolved through :func:`resolve_config`, so a space that
validates can only produce configs the trainer accepts. The published configuration (method defaults
plus the fixed settings) must lie inside the space: it is enqueued as the first trial, which is what
guarantees that a study never ends worse than the paper's setting on the validation metric.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from ltstudy.config import TrainConfig, TrialConfig, load_yaml, parse_yaml, resolve_config
from ltstudy.data import dataset_family
from ltstudy.errors import ConfigError
from ltstudy.methods import get_method

#: metrics reported every epoch that a study may select on (test metrics are report-only)
OBJECTIVES = ("val_top1", "val_many", "val_medium", "val_few", "val_loss", "val_ece", "val_ece_many",
              "val_ece_medium", "val_ece_few", "val_nll")
#: calibration objectives: lower is better, so a study minimises them (accuracy against ECE: two objectives)
MINIMISED = ("val_ece", "val_ece_many", "val_ece_medium", "val_ece_few", "val_nll")
_TOP_KEYS = {"method", "metric", "mode", "fixed", "tune", "description"}
_PARAM_KEYS = {"type", "low", "high", "log", "step", "choices", "when"}
#: keys that describe where a trial runs, not what it is; they never belong in a search space
_RUNTIME_KEYS = {"method", "device"}


class SpaceError(ConfigError):
    """A search-space file that does not fit its method."""


@dataclass(frozen=True, kw_only=True)
class Param:
    """One tuned parameter: a distribution and an optional condition on another parameter."""

    name: str
    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()
    when: dict[str, tuple[Any, ...]] = field(default_factory=dict)

    def contains(self, value: Any) -> bool:
        if self.type == "categorical":
            return value in self.choices
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return False
        if not (self.low - 1e-12 <= value <= self.high + 1e-12):
            return False
        if self.step:
            k = (value - self.low) / self.step
            return abs(k - round(k)) < 1e-6
        return self.type == "float" or float(value).is_integer()

    def active(self, values: dict[str, Any]) -> bool:
        """True when every condition holds for the values chosen so far."""
        return all(values.get(k) in allowed for k, allowed in self.when.items())

    def suggest(self, trial: Any) -> Any:
        if self.type == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.type == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high),
                                     step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)


def active_values(params: tuple[Param, ...], config: dict[str, Any]) -> dict[str, Any]:
    """The tuned values a trial actually used: each parameter whose condition held, in space order
    (a ``sampler_q`` tuned only ``when: {sampler: power}`` is left out of an ``instance`` trial)."""
    chosen: dict[str, Any] = {}
    for p in params:
        if p.name in config and p.active(chosen):
            chosen[p.name] = config[p.name]
    return chosen


@dataclass(frozen=True)
class DefineByRun:
    """Suggests the tuned values and returns the constants.

    OptunaSearch merges the returned constants into the trial config, so each Tune config is the full
    flat mapping that :func:`resolve_config` turns into the trial.
    """

    params: tuple[Param, ...]
    constants: dict[str, Any]

    def __call__(self, trial: Any) -> dict[str, Any]:
        chosen: dict[str, Any] = {}
        for p in self.params:
            if p.active(chosen):
                chosen[p.name] = p.suggest(trial)
        return dict(self.constants)


@dataclass(frozen=True, kw_only=True)
class SearchSpace:
    method: str
    metrics: tuple[str, ...]
    modes: tuple[Literal["max", "min"], ...]
    fixed: dict[str, Any]
    params: tuple[Param, ...]
    path: str | None = None

    @property
    def tuned_names(self) -> list[str]:
        return [p.name for p in self.params]

    @property
    def metric(self) -> str:
        """The first objective: the one early stopping decides on."""
        return self.metrics[0]

    @property
    def mode(self) -> Literal["max", "min"]:
        return self.modes[0]

    @property
    def multi_objective(self) -> bool:
        return len(self.metrics) > 1

    @property
    def searcher_metric(self) -> str | list[str]:
        """What OptunaSearch takes: one metric name, or the list of a multi-objective study."""
        return list(self.metrics) if self.multi_objective else self.metric

    @property
    def searcher_mode(self) -> str | list[str]:
        return list(self.modes) if self.multi_objective else self.mode

    def with_fixed(self, values: dict[str, Any]) -> SearchSpace:
        """The space with more settings fixed (``KEY=VALUE`` on the command line, a backbone's data).
        Fixing a tuned name removes it from the search."""
        if not values:
            return self
        if "method" in values and values["method"] != self.method:
            raise SpaceError(f"fixed method={values['method']!r} contradicts the space's method {self.method!r}")
        kept = tuple(p for p in self.params if p.name not in values)
        for p in kept:
            for dep in p.when:
                if dep in values:
                    raise SpaceError(f"cannot fix {dep!r}: tuned parameter {p.name!r} depends on it")
        space = replace(self, fixed={**self.fixed, **{k: v for k, v in values.items() if k != "method"}},
                        params=kept)
        space.check()
        return space

    def published_point(self) -> dict[str, Any]:
        """Tuned values of the published configuration (method defaults under the fixed settings)."""
        resolved = resolve_config({**self.fixed, "method": self.method}).to_dict()
        point: dict[str, Any] = {}
        for p in self.params:
            if p.active(point):
                point[p.name] = resolved[p.name]
        return point

    def published_values(self) -> dict[str, Any]:
        """The published configuration as flat settings: the fixed ones, the published point, the method."""
        return {**self.fixed, **self.published_point(), "method": self.method}

    def published_config(self) -> TrialConfig:
        """The published configuration, resolved: the study's first trial."""
        return resolve_config(self.published_values())

    @property
    def dataset(self) -> str:
        """The study's dataset (the trainer's default when the space does not fix one)."""
        return self.published_config().train.dataset

    def define_by_run(self) -> DefineByRun:
        """The Optuna define-by-run function (a picklable object: Tune saves the searcher)."""
        return DefineByRun(self.params, {**self.fixed, "method": self.method})

    def check(self) -> None:
        """Every combination of range ends must resolve; the published point must be inside."""
        base = {**self.fixed, "method": self.method}
        resolve_config(base)
        for p in self.params:
            ends = p.choices if p.type == "categorical" else (p.low, p.high)
            for value in ends:
                try:
                    resolve_config({**base, p.name: value})
                except ConfigError as exc:
                    raise SpaceError(f"{self._where()}: {p.name} = {value!r} is not accepted: {exc}") from None
        published = resolve_config(base).to_dict()
        chosen: dict[str, Any] = {}
        for p in self.params:
            if p.active(chosen):
                value = published[p.name]
                if not p.contains(value):
                    raise SpaceError(
                        f"{self._where()}: the published value {p.name} = {value!r} lies outside the "
                        f"search space; widen it so the published configuration can be the first trial"
                    )
                chosen[p.name] = value

    def corner_configs(self) -> list[dict[str, Any]]:
        """The published point and, for each tuned parameter, the point with it at each range end (or
        choice): the configurations where anything monotonic in one parameter takes its extremes."""
        base = {**self.fixed, "method": self.method}
        published = self.published_point()
        out = [{**base, **published}]
        for p in self.params:
            ends = p.choices if p.type == "categorical" else (p.low, p.high)
            out += [{**base, **published, p.name: value} for value in ends]
        return out

    def _where(self) -> str:
        return self.path or f"search space of {self.method}"


def _number(where: str, name: str, key: str, raw: Any) -> float:
    if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not math.isfinite(raw):
        raise SpaceError(f"{where}: {name}.{key} must be a finite number, got {raw!r}")
    return float(raw)


def _param(where: str, name: str, spec: Any, allowed: set[str], earlier: dict[str, Param],
           method: str) -> Param:
    if name not in allowed:
        raise SpaceError(f"{where}: tuned name {name!r} is not a hyperparameter of method {method!r} "
                         f"nor a training setting")
    if not isinstance(spec, dict):
        raise SpaceError(f"{where}: tune.{name} must be a mapping with a 'type'")
    unknown = set(spec) - _PARAM_KEYS
    if unknown:
        raise SpaceError(f"{where}: tune.{name} has unknown key(s) {sorted(unknown)}")
    kind = spec.get("type")
    when = _condition(where, name, spec.get("when") or {}, earlier)
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise SpaceError(f"{where}: {name}: a categorical parameter needs a non-empty 'choices' list")
        return Param(name=name, type="categorical", choices=tuple(choices), when=when)
    if kind not in ("float", "int"):
        raise SpaceError(f"{where}: {name}: type must be float, int or categorical, got {kind!r}")
    if "low" not in spec or "high" not in spec:
        raise SpaceError(f"{where}: {name}: a {kind} parameter needs 'low' and 'high'")
    low, high = _number(where, name, "low", spec["low"]), _number(where, name, "high", spec["high"])
    log, step = bool(spec.get("log", False)), spec.get("step")
    if low > high:
        raise SpaceError(f"{where}: {name}: low ({low:g}) > high ({high:g})")
    if log and low <= 0:
        raise SpaceError(f"{where}: {name}: log scale needs low > 0, got low = {low:g}")
    if step is not None:
        step = _number(where, name, "step", step)
        if step <= 0:
            raise SpaceError(f"{where}: {name}: step must be > 0")
        if log:
            raise SpaceError(f"{where}: {name}: 'step' and 'log' cannot be combined (Optuna)")
    if kind == "int" and not (low.is_integer() and high.is_integer()):
        raise SpaceError(f"{where}: {name}: an int parameter needs integer low/high")
    return Param(name=name, type=kind, low=low if kind == "float" else int(low),
                 high=high if kind == "float" else int(high), log=log, step=step, when=when)


def _condition(where: str, name: str, raw: Any, earlier: dict[str, Param]) -> dict[str, tuple[Any, ...]]:
    if not isinstance(raw, dict):
        raise SpaceError(f"{where}: {name}.when must map a tuned parameter to a value or a list of values")
    out = {}
    for dep, value in raw.items():
        if dep not in earlier:
            raise SpaceError(f"{where}: {name}.when refers to {dep!r}, which is not a tuned parameter "
                             f"listed before {name!r}")
        out[dep] = tuple(value) if isinstance(value, list) else (value,)
    return out


def _objectives(where: str, metric: Any, mode: Any) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``metric: val_top1, mode: max`` or ``metric: [val_top1, val_few], mode: [max, max]`` (one mode for all
    is allowed too); two or three distinct validation metrics make a multi-objective study."""
    metrics = tuple(metric) if isinstance(metric, list) else (metric,)
    modes = tuple(mode) if isinstance(mode, list) else (mode,) * len(metrics)
    for m in metrics:
        if m not in OBJECTIVES:
            raise SpaceError(f"{where}: metric must be one of {', '.join(OBJECTIVES)} (or a list of 2-3 of them); "
                             f"got {m!r}")
    if not 1 <= len(metrics) <= 3 or len(set(metrics)) != len(metrics):
        raise SpaceError(f"{where}: metric must be one metric or a list of 2 or 3 different ones, got {metric!r}")
    if len(modes) != len(metrics) or any(m not in ("max", "min") for m in modes):
        raise SpaceError(f"{where}: mode must be 'max' or 'min', or one of them per metric; got {mode!r}")
    wrong = next((m for m, d in zip(metrics, modes, strict=True) if m in MINIMISED and d != "min"), None)
    if wrong:
        raise SpaceError(f"{where}: {wrong} is a calibration error, lower is better: its mode is min")
    return metrics, modes


def parse_space(data: dict[str, Any], where: str = "search space",
                method: str | None = None) -> SearchSpace:
    """Validate a parsed mapping; ``method`` (from ``--method``) must match the file's, when given."""
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise SpaceError(f"{where}: unknown top-level key(s) {sorted(unknown)}; expected "
                         f"{sorted(_TOP_KEYS)}")
    file_method = data.get("method", method)
    if file_method is None:
        raise SpaceError(f"{where}: no 'method'")
    if method is not None and file_method != method:
        raise SpaceError(f"{where} is for method {file_method!r}, not {method!r}")
    spec = get_method(file_method)
    metrics, modes = _objectives(where, data.get("metric", "val_top1"), data.get("mode", "max"))
    fixed, tune = data.get("fixed") or {}, data.get("tune") or {}
    if not isinstance(fixed, dict) or not isinstance(tune, dict):
        raise SpaceError(f"{where}: 'fixed' and 'tune' must be mappings")
    allowed = (set(TrainConfig.model_fields) | set(spec.Params.model_fields)) - _RUNTIME_KEYS
    bad_fixed = sorted(set(fixed) - allowed - {"device"})
    if bad_fixed:
        raise SpaceError(f"{where}: fixed key {bad_fixed[0]!r} is not a hyperparameter of "
                         f"{file_method!r} or a training setting")
    if not tune:
        raise SpaceError(f"{where}: tunes nothing; list the tuned parameters under 'tune:'")
    both = sorted(set(fixed) & set(tune))
    if both:
        raise SpaceError(f"{where}: {both[0]!r} is both fixed and tuned")
    params: dict[str, Param] = {}
    for name, pspec in tune.items():
        params[name] = _param(where, str(name), pspec, allowed, params, file_method)
    space = SearchSpace(method=file_method, metrics=metrics, modes=modes, fixed=dict(fixed),
                        params=tuple(params.values()), path=where)
    space.check()
    return space


def load_space(path: str | Path, method: str | None = None) -> SearchSpace:
    """Read and validate a search-space file; every problem is one :class:`SpaceError` line."""
    return parse_space(load_yaml(path), str(path), method)


def space_from_text(text: str, where: str, method: str | None = None) -> SearchSpace:
    """A space from the text of its file (a study keeps the text it started with, for --resume)."""
    return parse_space(parse_yaml(text, where), where, method)


def default_space_path(method: str, dataset: str | None = None) -> Path:
    """The method's search space for the dataset's family: ``search_spaces/<method>.<family>.yaml`` where a
    family needs its own ranges (MetaSAug and FSA on file lists), else ``search_spaces/<method>.yaml``;
    a user's copy in the current directory first, then the one shipped with the package
    (``ltstudy/search_spaces``, the repository's top-level folder)."""
    names = [f"{method}.yaml"]
    if dataset:
        names.insert(0, f"{method}.{dataset_family(dataset)}.yaml")
    shipped = Path(__file__).resolve().parents[2] / "search_spaces"
    for folder in (Path("search_spaces"), shipped):
        for name in names:
            if (folder / name).is_file():
                return folder / name
    return Path("search_spaces") / names[-1]
