"""The tracking store's helpers: a store pulled home from a cluster (``ltstudy cluster pull``), a new SQLite store."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from ltstudy.study.tracking.store import (
    _SCHEMAS,
    TrackingError,
    artifact_location,
    check_reachable,
    client,
    download_artifact,
    make_schema,
)


def test_a_pulled_store_reads_its_served_artifacts_from_mlartifacts_beside_it(tmp_path):
    """Runs logged through a server with --artifacts-destination have ``mlflow-artifacts:/`` URIs, which MLflow
    resolves through a server only; pulled home, they are read from the mlartifacts/ folder beside the file."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlc = MlflowClient(uri)
    exp = mlc.create_experiment("pulled", artifact_location="mlflow-artifacts:/7")
    run = mlc.create_run(exp).info.run_id
    served = tmp_path / "mlartifacts" / "7" / run / "artifacts"
    served.mkdir(parents=True)
    (served / "config.yaml").write_text("method: ce\n")
    (tmp_path / "out").mkdir()
    got = download_artifact(mlc, run, "config.yaml", str(tmp_path / "out"))
    assert open(got).read() == "method: ce\n"
    with pytest.raises(TrackingError, match="reliability.json is not in .*mlartifacts/7/"):
        download_artifact(mlc, run, "reliability.json", str(tmp_path / "out"))


def test_reading_commands_never_create_a_sqlite_store(tmp_path):
    missing = f"sqlite:///{tmp_path / 'pulled.db'}"
    check_reachable(missing)  # a study may create it
    with pytest.raises(TrackingError, match="pulled.db does not exist"):
        check_reachable(missing, existing=True)
    assert not (tmp_path / "pulled.db").exists()


def test_a_new_sqlite_store_gets_its_schema_made_aside_then_copied_into_place(tmp_path, monkeypatch):
    """``make_schema`` (run while Ray starts) writes nothing at the store's path; the first client copies the
    migrated template there, and the store is the one MLflow would have made itself."""
    monkeypatch.chdir(tmp_path)
    db = tmp_path / "new" / "mlflow.db"
    db.parent.mkdir()
    make_schema(f"sqlite:///{db}")
    assert not db.exists()
    template = _SCHEMAS[db]
    mlc = client(f"sqlite:///{db}")
    assert db.exists() and not template.parent.exists()  # the temporary folder goes with its copy
    exp = mlc.create_experiment("study")
    mlc.create_run(exp)
    plain = MlflowClient(f"sqlite:///{tmp_path / 'plain.db'}")
    ours, theirs = mlc.get_experiment("0"), plain.get_experiment("0")  # MLflow's default experiment
    assert (ours.name, ours.artifact_location) == (theirs.name, theirs.artifact_location)
    assert [e.name for e in mlc.search_experiments()] == ["study", "Default"]


def test_a_named_sqlite_store_keeps_its_artifacts_beside_it_not_in_the_current_folder(tmp_path, monkeypatch):
    """MLflow's default artifact root is ``./mlruns`` of the folder a command runs in: a study recorded in
    ``--tracking-uri sqlite:///elsewhere/mlflow.db`` left its artifacts wherever it was started."""
    from ltstudy.study.tracking.study_run import StudyTracker

    work, store = tmp_path / "work", tmp_path / "store"
    work.mkdir(), store.mkdir()
    monkeypatch.chdir(work)
    uri = f"sqlite:///{store / 'mlflow.db'}"
    studies = []
    for k in range(2):  # the second: same name after the first went to MLflow's trash
        tracker = StudyTracker(uri, "a study/1")
        parent = tracker.open({}, resume=False)
        tracker.mlc.log_text(parent, "x", "note.txt")
        studies.append(tracker.mlc.get_experiment(tracker.experiment_id).artifact_location)
        tracker.mlc.rename_experiment(tracker.experiment_id, f"trashed-{k}")
        tracker.mlc.delete_experiment(tracker.experiment_id)
    assert not list(work.iterdir())
    first, second = (Path(p) for p in studies)
    assert first.parent == second.parent == store / "mlruns" and first != second
    assert first.name.startswith("a_study_1-")
    assert len(list(store.glob("mlruns/*/*/artifacts/note.txt"))) == 2
    assert artifact_location("http://127.0.0.1:5000", "s") is None
