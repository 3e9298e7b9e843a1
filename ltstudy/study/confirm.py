"""Confirm before export: re-run the study's best configurations over more seeds, rank them by the mean.

The winner of many trials selected on a small validation set is partly luck. ``ltstudy tune --confirm K``
(or ``ltstudy confirm STUDY --top K``) re-runs the top K completed configurations, at their full budget,
with S new seeds each (the trial's own seed + 1 … + S; the seed also draws the validation split, so each
confirmation sees other validation images) and ranks them by their mean validation objective. The
selecting run's own value is left out of the mean: it is the one the search was lucky on. The runs are
children of the study run tagged ``ltstudy.role=confirmation`` and ``ltstudy.confirms=<trial id>``;
``best-config export`` then takes the confirmed winner and records the ranking in its provenance. A
(trial, seed) pair that was already confirmed is not run again.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import ray.tune
import yaml
from mlflow.entities import Metric
from ray.tune.search.basic_variant import BasicVariantGenerator

from ltstudy.config import CONFIRMS_KEY
from ltstudy.errors import ConfigError
from ltstudy.study.cluster.placement import PlacementGroupReaper, place_study
from ltstudy.study.cluster.shape import TrialShape
from ltstudy.study.options import StudyOptions, read_saved
from ltstudy.study.process import quiet, quiet_tuner_output
from ltstudy.study.ray_session import check_address, ray_init, stop_ray
from ltstudy.study.results.selection import Objectives, confirmed_ranking, full_budget, published_trial
from ltstudy.study.search.space import space_from_text
from ltstudy.study.tracking.callback import MLflowTrialCallback
from ltstudy.study.tracking.records import find_study, study_trials
from ltstudy.study.tracking.store import CONFIG_ARTIFACT, download_artifact, git_commit, log_batch
from ltstudy.study.tracking.study_run import StudyTracker
from ltstudy.study.trainable import Resources, make_trainable, reuse_actors


def confirmation_points(tracker: StudyTracker, obj: Objectives, k: int, seeds: int) -> list[dict[str, Any]]:
    """The trial configs to run: the top ``k`` completed trials and the published one, each on the same new
    seeds (the published trial's seed + 1 … + ``seeds``: paired), those not yet confirmed."""
    mlc = tracker.mlc
    trials = study_trials(mlc, tracker.experiment_id, tracker.parent_run_id)
    done = [t for t in full_budget(trials) if t["status"] == "completed" and obj.metric in t["metrics"]]
    top = sorted(done, key=obj.ranked, reverse=True)[:k]
    published = published_trial(done)
    if published is not None and published not in top:
        top.append(published)  # the reference every candidate is compared with, seed by seed
    base = int(published["seed"]) if published is not None and str(published.get("seed")).isdigit() else None
    already = {(r["confirms"], str(r["seed"])) for r in
               study_trials(mlc, tracker.experiment_id, tracker.parent_run_id, "confirmation")
               if r["status"] in ("completed", "pruned", "failed")}
    points = []
    with tempfile.TemporaryDirectory() as tmp:
        for t in top:
            config = yaml.safe_load(Path(download_artifact(mlc, t["run_id"], CONFIG_ARTIFACT, tmp)).read_text())
            first = base if base is not None else int(config.get("seed", 0))
            for i in range(1, seeds + 1):
                if (t["trial_id"], str(first + i)) not in already:
                    points.append({**config, "seed": first + i, CONFIRMS_KEY: t["trial_id"]})
    return points


def confirm_top(plan: Any, tracker: StudyTracker, trainable: Any, k: int, seeds: int, concurrency: int,
                echo: Callable[..., None] | None = None) -> list[dict[str, Any]]:
    """Run the confirmation trials (Ray must be up) and record the ranking on the study run."""
    o: StudyOptions = plan.opts
    obj = Objectives(tuple(plan.space.metrics), tuple(plan.space.modes))
    points = confirmation_points(tracker, obj, k, seeds)
    if points:
        callback = MLflowTrialCallback(tracker.uri, tracker.experiment_id, tracker.parent_run_id, plan.study,
                                       commit=git_commit(), echo=echo, objectives=obj.metrics, role="confirmation")
        quiet(o.verbose)
        try:
            with quiet_tuner_output(o.verbose):  # the study's own lines, not Ray's tables
                _confirmation_tuner(plan, o, trainable, points, concurrency, callback).fit()
        except BaseException:
            if lost := callback.close(raise_errors=False):
                print(f"error: {lost}", file=sys.stderr)  # the error that stopped the runs follows
            raise
        callback.close()  # every confirmation record written before the ranking reads them
    runs = study_trials(tracker.mlc, tracker.experiment_id, tracker.parent_run_id, "confirmation")
    published = published_trial(study_trials(tracker.mlc, tracker.experiment_id, tracker.parent_run_id))
    ranking = confirmed_ranking(runs, obj, published["trial_id"] if published else None)
    if ranking:
        best, now = ranking[0], int(time.time() * 1000)
        log_batch(tracker.mlc, tracker.parent_run_id,
                  metrics=[Metric(f"confirmed.{obj.metric}.mean", best["mean"], now, 0),
                           Metric(f"confirmed.{obj.metric}.std", best["std"], now, 0)],
                  tags={"ltstudy.confirmed_best": best["trial_id"],
                        "ltstudy.confirmed_seeds": ",".join(map(str, best["seeds"]))})
    return ranking


def _confirmation_tuner(plan: Any, o: StudyOptions, trainable: Any, points: list[dict[str, Any]],
                        concurrency: int, callback: MLflowTrialCallback) -> ray.tune.Tuner:
    # the generator overlays each point on the param space's keys, so the space holds them all
    search = BasicVariantGenerator(points_to_evaluate=points, max_concurrent=concurrency)
    return ray.tune.Tuner(
        trainable, param_space=dict(points[0]),
        tune_config=ray.tune.TuneConfig(search_alg=search, num_samples=len(points),
                                        reuse_actors=reuse_actors(plan.opts.workers)),
        run_config=ray.tune.RunConfig(
            name=f"{plan.study}-confirm-{time.strftime('%Y%m%d-%H%M%S')}", storage_path=plan.storage,
            callbacks=[callback, PlacementGroupReaper()], verbose=o.verbose,
            failure_config=ray.tune.FailureConfig(max_failures=o.retries)))


def confirm_study(study: str, k: int, seeds: int, tracking_uri: str, address: str | None = None,
                  max_concurrent: int | None = None, echo: Callable[..., None] | None = None) -> dict[str, Any]:
    """``ltstudy confirm``: confirm a finished study's top ``k`` with the resources it was run with."""
    if k < 1 or seeds < 1:
        raise ConfigError("--top and --seeds must be at least 1")
    mlc, exp, parent = find_study(tracking_uri, study)
    obj = Objectives.from_tags(parent.data.tags)
    if obj.multi:
        raise ConfigError(f"study {study!r} has {len(obj.metrics)} objectives; confirmation ranks by one")
    experiment_path = parent.data.tags.get("ltstudy.storage")
    if not experiment_path:
        raise ConfigError(f"study {study!r} records no storage (ltstudy.storage tag); it cannot be confirmed")
    saved = read_saved(experiment_path)
    names = set(StudyOptions.__dataclass_fields__)
    o = StudyOptions(**{k2: v for k2, v in saved.items() if k2 in names}, address=address,
                     max_concurrent=max_concurrent, verbose=0)
    check_address(address)
    space = space_from_text(saved["space_yaml"], f"the space of study {study}", o.method)
    storage = experiment_path.rsplit("/", 1)[0]
    tracker = StudyTracker(tracking_uri, study)
    tracker.experiment_id, tracker.parent_run_id = exp.experiment_id, parent.info.run_id
    plan = SimpleNamespace(opts=o, space=space, study=study, storage=storage)
    started = ray_init(address)
    try:
        place = place_study(max_concurrent, TrialShape(o.workers, o.cpus_per_worker, o.gpus_per_worker), storage,
                            tracking_uri, space.fixed)
        trainable = make_trainable(Resources.of(o, storage=storage, placement=place))
        ranking = confirm_top(plan, tracker, trainable, k, seeds, place.max_concurrent, echo)
    finally:
        if started:
            stop_ray()
    return {"study": study, "metric": obj.metric, "mode": obj.mode, "ranking": ranking}
