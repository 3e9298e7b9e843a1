"""``ltstudy best-config export``: the recommended trial's resolved config with where it came from."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import yaml

from ltstudy.study.results.selection import Objectives, confirmed_ranking, pick_best, pick_point
from ltstudy.study.tracking.records import find_study, study_trials
from ltstudy.study.tracking.store import CONFIG_ARTIFACT, TrackingError


def export_best(uri: str, study: str, pick: str | None = None) -> dict[str, Any]:
    """The recommended trial's resolved config plus a ``provenance`` block, read from the tracking store.

    The recommendation is, in this order: the confirmed winner (best mean validation objective over the
    confirmation seeds) when the study was confirmed; for a multi-objective study the Pareto point that
    ``pick`` names; else the best trial.
    """
    mlc, exp, parent = find_study(uri, study)
    obj = Objectives.from_tags(parent.data.tags)
    trials = study_trials(mlc, exp.experiment_id, parent.info.run_id)
    ranking = confirmed_ranking(study_trials(mlc, exp.experiment_id, parent.info.run_id, "confirmation"), obj)
    by_id = {t["trial_id"]: t for t in trials}
    confirmed = None
    if ranking and ranking[0]["trial_id"] in by_id and not obj.multi:
        chosen, confirmed = by_id[ranking[0]["trial_id"]], ranking
    elif obj.multi:
        chosen = pick_point(trials, obj, pick)
    else:
        chosen = pick_best(trials, obj)
        if chosen is None:
            raise TrackingError(f"study {study!r} has no finished trial with {obj.metric!r}")
    with tempfile.TemporaryDirectory() as tmp:
        path = mlc.download_artifacts(chosen["run_id"], CONFIG_ARTIFACT, tmp)
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
            "metric": obj.metric, "ranking": [{k: row[k] for k in ("trial_id", "mean", "std", "seeds")}
                                              for row in confirmed]}
    return config


# ------------------------------------------------------------------------------------------- plots
