"""A study's options: what the user asked for, checked, saved with the study and reused by ``--resume``.

The options that define what a study is (its method, space, trial shape, sampler, scheduler, seed, fixed
settings) are written to ``<storage>/<study>/ltstudy_study.json`` when it starts; ``--resume`` reads them
back, so a resumed study is the study that was started. A flag given again on ``--resume`` must agree with
the saved value (one line otherwise); the deliberate ones (:data:`PER_RUN`: where it runs, how many trials
run at once, how long this run may take, how much it prints) apply to the resumed run only.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

from ltstudy.errors import ConfigError
from ltstudy.study.storage import filesystem
from ltstudy.study.storage import public_url as _public_url

OPTIONS_FILE = "ltstudy_study.json"
#: options that belong to one run of a study, not to the study: they may change on --resume
PER_RUN = ("max_concurrent", "storage", "tracking_uri", "study_name", "address", "resume", "time_budget",
           "verbose", "confirm", "confirm_seeds", "checkpoint_every", "given")
#: how the CLI spells an option, for messages
FLAG = {"num_trials": "--num-trials", "space_path": "--space", "fixed": "KEY=VALUE settings"}


@dataclass(kw_only=True)
class StudyOptions:
    method: str
    space_path: str | None = None
    num_trials: int = 16
    max_concurrent: int | None = None
    sampler: str = "tpe"
    scheduler: str = "asha"
    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    storage: str | None = None
    tracking_uri: str | None = None
    study_name: str | None = None
    address: str | None = None
    resume: bool = False
    seed: int | None = None  # None: derived from the study name
    backbone: str | None = None  # feature-stage methods: a checkpoint, or the MLflow run of a trial
    optuna_storage: str | None = None  # journal file or RDB URL; default <storage>/optuna.journal
    fixed: dict[str, Any] = field(default_factory=dict)  # KEY=VALUE: settings the study does not tune
    retries: int = 1
    grace_period: int | str = "auto"  # "auto": ASHA's first rung after the last schedule phase
    reduction_factor: float = 2.0
    time_budget: float | None = None  # seconds
    confirm: int = 0  # re-run the top K configurations over `confirm_seeds` more seeds
    confirm_seeds: int = 3
    checkpoint_every: int = 5  # epochs between trial checkpoints; also at the end and at ASHA's rungs
    verbose: int = 0  # 0: ltstudy's progress lines only; 1, 2: also Ray's tables and the workers' logs
    #: the options the user gave explicitly (the CLI fills it); None: those set away from their defaults
    given: frozenset[str] | None = None

    def check(self) -> None:
        """The numbers make sense (one line per problem, before anything starts)."""
        if self.num_trials < 1:
            raise ConfigError("--num-trials must be at least 1")
        if self.max_concurrent is not None and self.max_concurrent < 1:
            raise ConfigError("--max-concurrent must be at least 1")
        if self.workers < 1:
            raise ConfigError("--workers must be at least 1")
        if self.cpus_per_worker <= 0:
            raise ConfigError("--cpus-per-worker must be > 0")
        if self.gpus_per_worker < 0 or (self.gpus_per_worker > 1 and not float(self.gpus_per_worker).is_integer()):
            raise ConfigError("--gpus-per-worker must be a fraction of one GPU (0.25, 0.5, ...) or a whole number")
        if self.retries < 0:
            raise ConfigError("--retries must be >= 0")
        if self.grace_period != "auto" and (not str(self.grace_period).isdigit() or int(self.grace_period) < 1):
            raise ConfigError(f"--grace-period must be 'auto' or a whole number of epochs >= 1, "
                              f"got {self.grace_period!r}")
        if self.reduction_factor <= 1:
            raise ConfigError(f"--reduction-factor must be > 1, got {self.reduction_factor:g}")
        asha_only = [f"--{key.replace('_', '-')}" for key in ("grace_period", "reduction_factor")
                     if self.given is not None and key in self.given]
        if self.scheduler != "asha" and asha_only:
            verb = "sets" if len(asha_only) == 1 else "set"
            why = " (halving promotes a third of each budget's runs, η = 3)" if self.scheduler == "halving" else ""
            raise ConfigError(f"{' and '.join(asha_only)} {verb} ASHA's rungs; --scheduler {self.scheduler} has "
                              f"none{why}")
        if self.time_budget is not None and self.time_budget <= 0:
            raise ConfigError("--time-budget must be positive")
        if self.checkpoint_every < 1:
            raise ConfigError("--checkpoint-every must be at least 1 (epochs)")
        if self.confirm < 0 or self.confirm_seeds < 1:
            raise ConfigError("--confirm must be >= 0 and --confirm-seeds >= 1")

    def saved(self) -> dict[str, Any]:
        """What defines the study (written with it)."""
        return {k: v for k, v in asdict(self).items() if k not in PER_RUN}

    def for_resume(self, saved: dict[str, Any]) -> StudyOptions:
        """The saved study with this run's per-run options; a given flag that disagrees is one line."""
        defaults = {f.name: f.default if f.default_factory is MISSING else f.default_factory()
                    for f in fields(self)}
        names = set(defaults)
        for key, value in saved.items():
            if key not in names or key in PER_RUN:
                continue
            mine = getattr(self, key)
            given = key in self.given if self.given is not None else mine != defaults[key]
            if key == "optuna_storage" and mine:  # saved without its password (``public_url``)
                mine = _public_url(mine)
            if given and _normal(mine) != _normal(value):
                flag = FLAG.get(key, "--" + key.replace("_", "-"))
                raise ConfigError(f"{flag} {_show(getattr(self, key))} differs from the study's saved "
                                  f"{_show(value)}; drop it to resume the study as it was started")
        kept = {k: v for k, v in saved.items() if k in names and k not in PER_RUN}
        run = {k: getattr(self, k) for k in PER_RUN}
        if self.optuna_storage:  # the URL given again, with the password the saved one lacks
            kept["optuna_storage"] = self.optuna_storage
        return StudyOptions(**{**kept, **run, "given": None})


#: the options' defaults, for the CLI's help (each is stated once, on the dataclass)
DEFAULTS = StudyOptions(method="")


def read_saved(experiment_path: str) -> dict[str, Any]:
    """The options a study was started with (``ConfigError`` when they are missing or unreadable)."""
    fs, path = filesystem(f"{experiment_path}/{OPTIONS_FILE}")
    try:
        with fs.open_input_stream(path) as src:
            return json.loads(src.read())
    except (FileNotFoundError, OSError, ValueError):
        raise ConfigError(f"{experiment_path} holds no readable {OPTIONS_FILE}; the study was started by an "
                          "older ltstudy or its folder is damaged") from None


def write_saved(experiment_path: str, data: dict[str, Any]) -> None:
    fs, path = filesystem(f"{experiment_path}/{OPTIONS_FILE}")
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as out:
        out.write(json.dumps(data, indent=1, default=str).encode())


def _normal(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _show(value: Any) -> str:
    return json.dumps(value, default=str) if isinstance(value, (dict, list)) else str(value)


def parse_duration(text: str | None) -> float | None:
    """``90``, ``90s``, ``45m``, ``2h``, ``1d`` -> seconds; None stays None."""
    if text is None:
        return None
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    raw = str(text).strip().lower()
    scale = units.get(raw[-1:], None)
    number = raw[:-1] if scale else raw
    try:
        value = float(number) * (scale or 1)
    except ValueError:
        raise ConfigError(f"--time-budget {text!r}: give seconds or a number with s, m, h or d (e.g. 2h)") from None
    if value <= 0:
        raise ConfigError(f"--time-budget {text!r} must be positive")
    return value
