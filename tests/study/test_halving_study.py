"""A real successive-halving study (Tune + Optuna + MLflow): one run and one Optuna trial per Tune trial,
each tagged with its budget, and the answer a full-budget run everywhere."""

from __future__ import annotations

import optuna
import pytest
import yaml

from ltstudy.cli import main
from ltstudy.study.run import StudyOptions, run_study
from ltstudy.study.search.optuna_storage import OPTUNA_JOURNAL, open_optuna_storage
from ltstudy.study.tracking.records import find_study, study_trials

from support.configs import TINY

pytestmark = pytest.mark.slow

SPACE = """\
method: ce
metric: val_loss
mode: min
fixed: {epochs: 9}
tune:
  lr: {type: float, low: 1.0e-4, high: 0.1, log: true}
"""


def test_halving_study_records_and_answer(ray_local, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    summary = run_study(StudyOptions(
        method="ce", space_path=str(space), num_trials=4, max_concurrent=2, sampler="random", seed=5,
        scheduler="halving", storage=str(tmp_path / "storage"), tracking_uri=uri, study_name="sh", retries=0,
        verbose=0, fixed=dict(TINY)))
    mlc, exp, parent = find_study(uri, "sh")
    trials = study_trials(mlc, exp.experiment_id, parent.info.run_id)
    # 4 configurations at 3 epochs, then the published one and the best other at the full 9
    assert sorted(t["budget"] for t in trials) == ["3/9"] * 4 + ["9/9"] * 2
    assert all(t["status"] == "completed" and t["mlflow_status"] == "FINISHED" for t in trials)
    assert {t["params"]["epochs"] for t in trials} == {"3", "9"}
    full = [t for t in trials if t["budget"] == "9/9"]
    assert sum(t["published"] for t in full) == 1
    short = {t["tuned"]["lr"]: t["metrics"]["val_loss"] for t in trials if t["budget"] == "3/9" and not t["published"]}
    promoted = next(t for t in full if not t["published"])["tuned"]["lr"]
    assert short[promoted] == min(short.values())  # the best of the short runs went on
    ot = optuna.load_study(study_name="sh", storage=open_optuna_storage(str(tmp_path / "storage" / OPTUNA_JOURNAL)))
    assert len(ot.trials) == len(trials) == 6
    # the answer is a full-budget run: in the summary, on the study run and in the export
    assert summary.best["budget"] == "9/9" and summary.best["trial_id"] in {t["trial_id"] for t in full}
    out = tmp_path / "best.yaml"
    with pytest.raises(SystemExit) as done:
        main(["best-config", "export", "--study", "sh", "--tracking-uri", uri, "-o", str(out)])
    assert done.value.code in (0, None)
    exported = yaml.safe_load(out.read_text())
    assert exported["provenance"]["run_id"] == summary.best["run_id"] and exported["epochs"] == 9
