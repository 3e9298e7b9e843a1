"""``ltstudy best-config export``: the recommended trial's resolved config with where it came from."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import yaml

from ltstudy.errors import ConfigError
from ltstudy.study.results.selection import Objectives, pick_point, recommended
from ltstudy.study.tracking.records import find_study, study_trials
from ltstudy.study.tracking.store import CONFIG_ARTIFACT, TrackingError, download_artifact


def export_best(uri: str, study: str, pick: str | None = None,
                trials: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The recommended trial's resolved config plus a ``provenance`` block, read from the tracking store.

    The recommendation is, in this order: the confirmed winner (best mean validation objective over the
    confirmation seeds) when the study was confirmed; for a multi-objective study the Pareto point that
    ``pick`` names; else the best trial. ``trials``: the study's trial records when the caller has read them
    (the report does: reading 1,000 trials' records takes seconds).
    """
    mlc, exp, parent = find_study(uri, study)
    obj = Objectives.from_tags(parent.data.tags)
    trials = trials if trials is not None else study_trials(mlc, exp.experiment_id, parent.info.run_id)
    confirmed = None
    if pick is not None and not obj.multi:
        raise ConfigError(f"--pick chooses a Pareto point of a multi-objective study; study {study!r} has one "
                          f"objective ({obj.describe()}): drop --pick")
    if obj.multi:
        chosen = pick_point(trials, obj, pick)
    else:
        chosen = recommended(trials, study_trials(mlc, exp.experiment_id, parent.info.run_id, "confirmation"), obj)
        if chosen is None:
            raise TrackingError(f"study {study!r} has no finished trial with {obj.metric!r}")
        confirmed = chosen.get("ranking")
    with tempfile.TemporaryDirectory() as tmp:
        path = download_artifact(mlc, chosen["run_id"], CONFIG_ARTIFACT, tmp)
        config = yaml.safe_load(Path(path).read_text())
    config["provenance"] = {
        "study": study, "trial_id": chosen["trial_id"], "run_id": chosen["run_id"],
        "tracking_uri": uri, "objective": {"metric": ",".join(obj.metrics), "mode": ",".join(obj.modes)},
        "status": chosen["status"], "published": chosen["published"],
        "metrics": {k: chosen["metrics"][k] for k in sorted(chosen["metrics"]) if k.startswith(("val_", "test_"))},
        "selected_by": "confirmation" if confirmed else ("pick " + str(pick) if obj.multi else "best trial"),
    }
    if confirmed:
        config["provenance"]["confirmation"] = {
            "metric": obj.metric, "interval": "95 % Student-t; diff: paired, against the published trial",
            "ranking": [{k: row[k] for k in ("trial_id", "mean", "std", "ci95", "diff", "diff_ci95", "seeds", "values")
                         if k in row} for row in confirmed]}
    return config


# ------------------------------------------------------------------------------------------- plots
