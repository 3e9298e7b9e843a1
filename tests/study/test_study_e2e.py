"""A real study against a real ``mlflow server``: records, pruning, failures, export, no leaked PGs."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from ltstudy.cli import main
from ltstudy.config import load_yaml, resolve_config
from ltstudy.study.run import StudyOptions, run_study
from ltstudy.study.search.optuna_storage import OPTUNA_JOURNAL, open_optuna_storage
from ltstudy.study.tracking.records import find_study, study_trials
from ltstudy.study.tracking.store import ROLE_TAG

from support.configs import TINY

pytestmark = pytest.mark.slow

# val_loss varies continuously, so ASHA (grace 1, factor 2) stops the worse half at epoch 1; lr 1e8
# makes the loss non-finite, which must end as a FAILED trial while the study goes on.
SPACE = """\
method: ce
metric: val_loss
mode: min
fixed: {epochs: 3}
tune:
  lr: {type: categorical, choices: [0.1, 1.0e+8]}
  weight_decay: {type: float, low: 1.0e-5, high: 1.0e-3, log: true}
"""


@pytest.fixture(scope="module")
def study(ray_local, mlflow_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("study")
    space = tmp / "space.yaml"
    space.write_text(SPACE)
    summary = run_study(StudyOptions(
        method="ce", space_path=str(space), num_trials=6, max_concurrent=2, sampler="random", seed=3,
        storage=str(tmp / "storage"), tracking_uri=mlflow_server, study_name="e2e", retries=0,
        verbose=0, fixed=dict(TINY)))
    return summary, tmp


def test_every_trial_has_one_child_run_with_records(study, mlflow_server):
    summary, _ = study
    mlc, exp, parent = find_study(mlflow_server, "e2e")
    assert parent.data.tags[ROLE_TAG] == "study"
    trials = study_trials(mlc, exp.experiment_id, parent.info.run_id)
    assert len(trials) == 6 and len({t["trial_id"] for t in trials}) == 6
    statuses = {t["status"] for t in trials}
    assert statuses & {"pruned", "failed"}, statuses
    for t in trials:
        run = mlc.get_run(t["run_id"])
        tags = run.data.tags
        for key in ("method", "dataset", "imbalance", "seed", "trial_id", "git_commit", "early_stopped"):
            assert key in tags, key
        assert tags["early_stopped"] == str(t["status"] == "pruned").lower()
        assert run.info.status == {"completed": "FINISHED", "pruned": "KILLED", "failed": "FAILED"}[t["status"]]
        flat = resolve_config(dict(TINY, method="ce", epochs=3)).to_dict()
        assert set(flat) <= set(run.data.params)
        artifacts = {a.path for a in mlc.list_artifacts(t["run_id"])}
        assert "config.yaml" in artifacts
        if t["status"] != "failed":
            assert "per_class_accuracy.json" in artifacts
            history = mlc.get_metric_history(t["run_id"], "val_loss")
            assert [m.step for m in history] == list(range(1, len(history) + 1))
            expected = 3 if t["status"] == "completed" else len(history)
            assert len(history) == expected and (t["status"] == "completed" or len(history) < 3)


def test_tune_state_holds_no_per_class_lists(study):
    """The per-class accuracy and calibration bins reach MLflow (above) but not Tune's trial state, which
    Tune writes whole, for every trial, at each experiment save: not in the last result, its running
    statistics, nor the copies of the result the kept checkpoints carry; neither are the start-up stamps."""
    from ray.tune.experiment.trial import Trial

    _, tmp = study
    [state] = (tmp / "storage" / "e2e").glob("experiment_state-*.json")
    bulky = {"val_per_class", "test_per_class", "val_reliability", "test_reliability", "startup"}
    for trial_json, run_state in json.loads(state.read_text())["trial_data"]:
        last = json.loads(run_state)["last_result"]
        assert last and not bulky & set(last)
        assert not {k.split("/")[0] for k in json.loads(run_state)["metric_analysis"]} & bulky
        trial = Trial.from_json_state(trial_json, stub=True)
        trial.restore_run_metadata(run_state)
        manager = trial.run_metadata.checkpoint_manager
        assert all(r.metrics == {} for r in manager.best_checkpoint_results)
        if manager.latest_checkpoint_result is not None:
            assert "train_loss" not in manager.latest_checkpoint_result.metrics  # (val_loss: the objective)
            assert manager.latest_checkpoint_result.metrics["epoch"] >= 1


def test_failed_trial_recorded_and_study_finished(study, mlflow_server):
    summary, _ = study
    failed = [t for t in summary.trials if t["status"] == "failed"]
    assert failed, "lr=1e8 was never sampled; change the seed"
    mlc = MlflowClient(mlflow_server)
    for t in failed:
        run = mlc.get_run(t["run_id"])
        assert run.data.params["lr"] == "100000000.0"
        assert "NonFiniteLossError" in run.data.tags["error"]
    assert summary.best is not None


def test_parent_holds_best_params_metrics_and_space(study, mlflow_server):
    summary, _ = study
    mlc, exp, parent = find_study(mlflow_server, "e2e")
    best = summary.best
    assert parent.data.params["lr"] == best["params"]["lr"]
    assert parent.data.metrics["val_loss"] == pytest.approx(best["metrics"]["val_loss"])
    arts = {a.path for a in mlc.list_artifacts(parent.info.run_id)}
    assert "search_space.yaml" in arts
    assert not mlc.list_artifacts(parent.info.run_id, "plots")  # figures are `ltstudy report`'s, drawn once
    completed = [t for t in summary.trials if t["status"] == "completed"]
    assert best["metrics"]["val_loss"] == min(t["metrics"]["val_loss"] for t in completed)


def test_first_trial_is_published_config_and_optuna_sees_pruned(study):
    summary, tmp = study
    ot = optuna.load_study(study_name="e2e", storage=open_optuna_storage(str(tmp / "storage" / OPTUNA_JOURNAL)))
    trials = sorted(ot.trials, key=lambda t: t.number)
    assert trials[0].params == {"lr": 0.1, "weight_decay": 2e-4}
    by_state = {t.state for t in trials}
    n_pruned = sum(t["status"] == "pruned" for t in summary.trials)
    n_failed = sum(t["status"] == "failed" for t in summary.trials)
    assert sum(t.state == optuna.trial.TrialState.PRUNED for t in trials) == n_pruned
    assert sum(t.state == optuna.trial.TrialState.FAIL for t in trials) == n_failed
    assert optuna.trial.TrialState.COMPLETE in by_state


def test_export_reproduces_best_config(study, mlflow_server, tmp_path):
    summary, _ = study
    out = tmp_path / "best.yaml"
    with pytest.raises(SystemExit) as code:
        main(["best-config", "export", "--study", "e2e", "-o", str(out), "--tracking-uri", mlflow_server])
    assert code.value.code == 0
    exported = load_yaml(out)
    assert exported["provenance"]["run_id"] == summary.best["run_id"]
    assert exported["provenance"]["metrics"]["val_loss"] == pytest.approx(summary.best["metrics"]["val_loss"])
    mlc = MlflowClient(mlflow_server)
    best_cfg = yaml.safe_load(Path(mlc.download_artifacts(summary.best["run_id"], "config.yaml",
                                                          str(tmp_path))).read_text())
    assert resolve_config(exported) == resolve_config(best_cfg)
    jout = tmp_path / "best.json"
    with pytest.raises(SystemExit):
        main(["best-config", "export", "--study", "e2e", "-o", str(jout), "--format", "json",
              "--tracking-uri", mlflow_server])
    assert resolve_config(load_yaml(jout)) == resolve_config(best_cfg)


def test_studies_list(study, mlflow_server, capsys):
    with pytest.raises(SystemExit):
        main(["studies", "list", "--tracking-uri", mlflow_server])
    assert "e2e" in capsys.readouterr().out


def test_no_leaked_placement_groups(study, ray_local):
    table = ray_local.util.placement_group_table()
    assert not [pg for pg in table.values() if pg["state"] == "CREATED"]


def test_feature_stage_study_extracts_once_from_a_trial_run(study, mlflow_server, tmp_path):
    """`tune --method ce_classifier --backbone RUN_ID`: features cached in the study storage, trials tagged."""
    summary, _ = study
    space = tmp_path / "space.yaml"
    space.write_text("method: ce_classifier\nmetric: val_top1\nmode: max\nfixed: {epochs: 2}\n"
                     "tune:\n  lr: {type: float, low: 0.01, high: 0.5, log: true}\n")
    features = run_study(StudyOptions(
        method="ce_classifier", space_path=str(space), num_trials=2, max_concurrent=2, sampler="random",
        storage=str(tmp_path / "storage"), tracking_uri=mlflow_server, study_name="e2e-features",
        retries=0, verbose=0, backbone=summary.best["run_id"]))
    assert features.counts == {"completed": 2}
    caches = [p for p in (tmp_path / "storage" / "features").iterdir() if not p.name.startswith(".")]
    assert len(caches) == 1 and (caches[0] / "manifest.json").is_file()
    mlc = MlflowClient(mlflow_server)
    for t in features.trials:
        run = mlc.get_run(t["run_id"])
        assert run.data.tags["feature_key"] == caches[0].name
        assert run.data.params["dataset"] == "synthetic"
        assert run.data.params["backbone"].endswith("checkpoint.pt")


def test_tune_keeps_no_per_trial_log_files_beside_mlflow(study):
    """MLflow holds every result: Tune's own result.json / progress.csv / TensorBoard files are not written
    (they cost every result a write, and the TensorBoard one warned at every trial end)."""
    _, tmp = study
    names = {p.name for p in (tmp / "storage" / "e2e").rglob("*") if p.is_file()}
    assert names, "the study wrote nothing under its storage folder"
    assert not {"result.json", "progress.csv"} & names
    assert not any(n.startswith("events.out.tfevents") for n in names)
