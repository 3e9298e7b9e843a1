"""A study planned: every check that can fail on user input, with nothing written anywhere.

:func:`plan_study` reads the options (and, with ``--resume``, the saved ones), the search space, the
fixed settings, the dataset (built once on the driver), the backbone, the tracking store and the Ray
address, and returns a :class:`StudyPlan`. Only :func:`ltstudy.study.run.run_study` writes anything, after
this has passed, so a bad command leaves no trace.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from ltstudy.config import PATH_KEYS, check_runnable, resolve_config
from ltstudy.errors import ConfigError
from ltstudy.methods import get_method
from ltstudy.models import is_pretrained_name
from ltstudy.study.checks import check_data
from ltstudy.study.cluster.shape import TrialShape, check_trial_shape
from ltstudy.study.data import backbone_settings
from ltstudy.study.options import StudyOptions, read_saved
from ltstudy.study.ray_session import check_address
from ltstudy.study.search.halving import ETA, MIN_EPOCHS, Budget, ladder, total_epochs
from ltstudy.study.search.optuna_storage import optuna_location, public_url, redact_url
from ltstudy.study.search.schedulers import asha_epochs, first_rung, make_scheduler, rung_epochs
from ltstudy.study.search.searcher import make_sampler, sampler_warning, study_seed
from ltstudy.study.search.space import SearchSpace, default_space_path, space_from_text
from ltstudy.study.storage import check_study_name, check_writable, is_remote, locate, storage_root
from ltstudy.study.tracking.store import OPTUNA_STORAGE_TAG, check_reachable, git_commit, resolve_tracking_uri
from ltstudy.train import phase_epochs


@dataclass(kw_only=True)
class StudyPlan:
    opts: StudyOptions
    space: SearchSpace
    space_yaml: str  # the space file's text as the study started
    study: str
    storage: str
    experiment_path: str
    optuna_storage: str  # a journal file or an RDB URL holding every study's Optuna study
    tracking_uri: str
    fresh: bool
    seed: int  # the sampler's seed (derived from the study name unless --seed)
    max_t: int  # the trials' epochs: the budget early stopping works within
    grace: int  # ASHA's first rung
    phases: list[int] = field(default_factory=list)  # the latest schedule phase start per corner config
    rungs: tuple[int, ...] = ()  # ASHA's rung epochs: trials write a checkpoint there
    budgets: tuple[Budget, ...] = ()  # --scheduler halving: the budgets, shortest first
    notes: list[str] = field(default_factory=list)  # one-line warnings for the user

    @property
    def tune_trials(self) -> int:
        """Tune trials the study runs: --num-trials, or under halving every budget's runs."""
        return sum(b.trials for b in self.budgets) if self.budgets else self.opts.num_trials

    @property
    def space_text(self) -> str:
        return self.space_yaml + "\n# effective fixed settings (file + KEY=VALUE)\n" + \
            yaml.safe_dump({"fixed": self.space.fixed}, sort_keys=False)

    def with_fixed(self, values: dict[str, Any]) -> StudyPlan:
        """The plan with more settings fixed for every trial (data staged, features extracted)."""
        return replace(self, space=self.space.with_fixed(values)) if values else self

    def resume_command(self) -> str:
        parts = ["ltstudy tune --resume", f"--method {self.space.method}", f"--study-name {self.study}",
                 f"--storage {self.storage}", f"--tracking-uri {redact_url(self.tracking_uri)}"]
        if self.opts.address:
            parts.append(f"--address {self.opts.address}")
        return " ".join(parts)

    def saved(self) -> dict[str, Any]:
        """What ``--resume`` reads back (``options.write_saved``)."""
        return {**self.opts.saved(), "optuna_storage": public_url(self.optuna_storage), "seed": self.seed, "space_yaml": self.space_yaml, "study": self.study}

    def tags(self) -> dict[str, Any]:
        """The study run's tags: what the study is, for ``studies list`` and the report."""
        o, s = self.opts, self.space
        return {"ltstudy.method": s.method, "ltstudy.metric": ",".join(s.metrics),
                "ltstudy.mode": ",".join(s.modes), "ltstudy.sampler": o.sampler, "ltstudy.seed": self.seed,
                "ltstudy.scheduler": o.scheduler, "ltstudy.grace_period": self.grace,
                "ltstudy.reduction_factor": o.reduction_factor, "ltstudy.num_trials": o.num_trials,
                "ltstudy.workers": o.workers, "ltstudy.storage": self.experiment_path,
                "ltstudy.tuned": ",".join(s.tuned_names), OPTUNA_STORAGE_TAG: public_url(self.optuna_storage),
                "dataset": s.dataset, "git_commit": git_commit(),
                **({"ltstudy.feature_key": s.fixed["feature_key"]} if s.fixed.get("feature_key") else {})}


def plan_study(o: StudyOptions) -> StudyPlan:
    """Every user-input check, with nothing written anywhere."""
    o, saved = _options(o)
    space, space_yaml = _space(o, saved)
    check_runnable(space.published_config())
    epochs, phases = schedule_budget(space, o)
    grace = first_rung(phases, o.grace_period)
    scheduler = make_scheduler(o.scheduler, space.metric, space.mode, epochs, grace, o.reduction_factor,
                               state_dir=".")
    study = _study_name(o, space)
    storage = storage_root(o.storage)
    experiment_path, exists = locate(storage, study)
    if exists and not o.resume:
        raise ConfigError(f"study {study!r} already exists under {storage}; pass --resume to continue it "
                          "or choose another --study-name")
    optuna_storage = optuna_location(o.optuna_storage, storage, is_remote(storage))
    uri = resolve_tracking_uri(o.tracking_uri)
    check_reachable(uri)
    _check_writes(storage, experiment_path, optuna_storage, uri)
    check_address(o.address)
    if not space.published_config().train.download:  # with download, run_study fetches it once
        check_data(space.published_config())
    seed = saved["seed"] if saved is not None else (o.seed if o.seed is not None else study_seed(study))
    budgets = ladder(epochs, o.num_trials) if o.scheduler == "halving" else ()
    return StudyPlan(opts=o, space=space, space_yaml=space_yaml, study=study, storage=storage,
                     experiment_path=experiment_path, optuna_storage=optuna_storage, tracking_uri=uri,
                     fresh=not o.resume, seed=seed, max_t=epochs, grace=grace, phases=phases,
                     rungs=rung_epochs(scheduler), budgets=budgets,
                     notes=_notes(o, space) + _stopping_note(o, epochs, grace, rung_epochs(scheduler), budgets))


def _check_writes(storage: str, experiment_path: str, optuna_storage: str, tracking_uri: str) -> None:
    """Every local place the study writes can be written (a read-only mount, ``/proc``): one line each,
    before Ray starts. Remote stores (``s3://``, a server, PostgreSQL) are checked by their own connections."""
    if not is_remote(storage):
        check_writable(storage, "--storage")
        if Path(experiment_path).is_dir():  # a resumed study's own folder
            check_writable(experiment_path, "--storage")
    if "://" not in optuna_storage:
        check_writable(optuna_storage, "--optuna-storage", is_file=True)
    elif optuna_storage.startswith("sqlite:///"):
        check_writable(optuna_storage[len("sqlite:///"):], "--optuna-storage", is_file=True)
    if tracking_uri.startswith("sqlite:///"):
        check_writable(tracking_uri[len("sqlite:///"):], "--tracking-uri", is_file=True)


def _options(o: StudyOptions) -> tuple[StudyOptions, dict[str, Any] | None]:
    """The options checked; on ``--resume`` the saved study's, with this run's per-run options."""
    if o.resume and not o.study_name:
        raise ConfigError("--resume needs --study-name (the study to continue)")
    saved = None
    if o.resume:
        storage = storage_root(o.storage)
        experiment_path, exists = locate(storage, o.study_name)
        if not exists:
            raise ConfigError(f"--resume: no study {o.study_name!r} to continue under {storage}")
        saved = read_saved(experiment_path)
        o = o.for_resume(saved)
    get_method(o.method)
    o.check()
    check_trial_shape(TrialShape(o.workers, o.cpus_per_worker, o.gpus_per_worker))
    make_sampler(o.sampler, 0, o.num_trials)  # an unknown sampler is one line here
    return o, saved


def _space(o: StudyOptions, saved: dict[str, Any] | None) -> tuple[SearchSpace, str]:
    """The search space (the saved one on ``--resume``) with the study's fixed settings, and its text."""
    fixed = dict(o.fixed)
    if get_method(o.method).stage == "feature":
        fixed = backbone_settings(o.method, o.backbone, fixed, o.tracking_uri)
    if saved is not None:
        space_yaml, where = saved["space_yaml"], f"the space of study {o.study_name}"
    else:
        path = Path(o.space_path) if o.space_path else default_space_path(o.method, fixed.get("dataset"))
        if not path.is_file():
            raise ConfigError(f"search-space file not found: {path}")
        space_yaml, where = path.read_text(), str(path)
    space = space_from_text(space_yaml, where, o.method)
    for key in PATH_KEYS:
        if key in space.fixed and key not in fixed:
            fixed[key] = space.fixed[key]
    return space.with_fixed(_absolute_paths(fixed)), space_yaml


def _absolute_paths(values: dict[str, Any]) -> dict[str, Any]:
    """Relative local paths become absolute: Tune runs each trial in its own working folder."""
    out = dict(values)
    for key in PATH_KEYS:
        value = out.get(key)
        if isinstance(value, str) and "://" not in value and not os.path.isabs(value) and \
                not is_pretrained_name(value):  # backbone=timm:NAME names a model, not a file
            out[key] = str(Path(value).resolve())
    return out


def schedule_budget(space: SearchSpace, o: StudyOptions) -> tuple[int, list[int]]:
    """(the trials' epochs, the latest phase start of each corner configuration of the space)."""
    if o.scheduler != "none" and "epochs" in space.tuned_names:
        raise ConfigError(f"{space.path}: 'epochs' is tuned, and early stopping would favour the short "
                          "runs; fix epochs (KEY=VALUE or fixed:) or pass --scheduler none")
    phases = [max(phase_epochs(resolve_config(c)), default=0) for c in space.corner_configs()]
    return space.published_config().train.epochs, phases


def _study_name(o: StudyOptions, space: SearchSpace) -> str:
    study = o.study_name or f"{o.method}-{space.dataset}-{datetime.now():%Y%m%d-%H%M%S}"
    check_study_name(study)
    if o.confirm and space.multi_objective:
        raise ConfigError("--confirm ranks configurations by one objective; this study has "
                          f"{len(space.metrics)} ({', '.join(space.metrics)})")
    return study


def _stopping_note(o: StudyOptions, epochs: int, grace: int, rungs: tuple[int, ...],
                   budgets: tuple[Budget, ...]) -> list[str]:
    """One line when early stopping can save little (a stopped trial still runs up to ASHA's first rung;
    halving with too few configurations or epochs for a second budget); halving's budgets always."""
    full = o.num_trials * epochs
    if o.scheduler == "halving":
        if len(budgets) < 2:
            return [f"halving: {o.num_trials} configuration(s) of {epochs} epochs leave one budget (it needs "
                    f"{ETA + 1}+ configurations and {ETA * MIN_EPOCHS}+ epochs), so nothing is saved"]
        steps = ", ".join(f"{b.trials} at {b.epochs}" for b in budgets)
        spent = total_epochs(budgets)
        return [f"halving: {steps} epochs; {spent:,} of {full:,} epochs ({1 - spent / full:.0%} saved); only "
                f"full-budget runs can be the answer"]
    if o.scheduler != "asha" or epochs < 1:
        return []
    first = min(grace, epochs)
    saved = (epochs - first) / epochs
    if saved >= 0.25:
        return []
    spent = asha_epochs(o.num_trials, epochs, rungs, o.reduction_factor)
    return [f"early stopping can save at most {saved:.0%} of a stopped trial's epochs (about {spent:,.0f} of "
            f"{full:,} in all): ASHA's first rung is at epoch {first} of {epochs} (after the last schedule "
            "phase of the space); --scheduler halving judges whole compressed recipes, --scheduler none says "
            "so, --grace-period N judges earlier"]


def _notes(o: StudyOptions, space: SearchSpace) -> list[str]:
    """One-line warnings for the user about the plan."""
    notes = []
    if (warning := sampler_warning(o.sampler, o.num_trials)) and not o.resume:
        notes.append(warning)
    if o.scheduler == "halving" and space.multi_objective:
        raise ConfigError(f"--scheduler halving promotes by one objective; this study has {len(space.metrics)} "
                          f"({', '.join(space.metrics)}): use --scheduler asha or none")
    if o.scheduler != "none" and space.multi_objective:
        notes.append(f"multi-objective study: early stopping decides on the first objective, {space.metric}")
    return notes
