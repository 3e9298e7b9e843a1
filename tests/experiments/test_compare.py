"""``compare``: the mean ± std table over seeds behind the README's results."""

import math

import pytest

from ltstudy.experiments import compare as compare_module
from ltstudy.experiments.compare import COLUMNS, compare, markdown


def test_mean_and_sample_std_over_seeds_with_nan_left_out(monkeypatch):
    runs = {0: 0.2, 1: 0.4, 2: math.nan}

    def fake_run_trial(cfg, report=None, ctx=None):
        value = runs[cfg.train.seed]
        return {c: value for c in COLUMNS}

    monkeypatch.setattr(compare_module, "run_trial", fake_run_trial)
    seen = []
    rows = compare(["ce"], [0, 1, 2], {"dataset": "synthetic"}, on_run=lambda m, s, r: seen.append((m, s)))
    assert seen == [("ce", 0), ("ce", 1), ("ce", 2)]
    mean, std = rows["ce"]["val_top1"]
    assert mean == pytest.approx(0.3) and std == pytest.approx(0.1414213, rel=1e-5)  # n - 1 in the std
    table = markdown(rows)
    assert table.splitlines()[2].startswith("| ce | 30.0 ± 14.1 |")


def test_one_seed_has_zero_spread_and_an_all_nan_column_is_a_dash(monkeypatch):
    monkeypatch.setattr(compare_module, "run_trial", lambda cfg, report=None, ctx=None: {
        c: (math.nan if c.endswith("few") else 0.5) for c in COLUMNS})
    rows = compare(["ce"], [0], {"dataset": "synthetic"})
    assert rows["ce"]["test_top1"] == (0.5, 0.0)
    cells = markdown(rows).splitlines()[2].split("|")
    assert cells[COLUMNS.index("val_few") + 2].strip() == "–"


def test_a_real_run(tmp_path):
    rows = compare(["ce"], [0], {"dataset": "synthetic", "image_size": 8, "synthetic_classes": 4,
                                 "epochs": 1, "device": "cpu", "batch_size": 64, "imbalance": 20})
    assert all(math.isfinite(rows["ce"][c][0]) for c in ("val_top1", "test_top1"))


def test_cli_shows_progress_writes_table_and_figure_and_records_mlflow(tmp_path, capsys, one_thread):
    """`ltstudy compare` of 2 methods x 2 seeds: a line per run start and end, the table, the figure, and
    an MLflow experiment of its own with a run per (method, seed)."""
    import json

    from mlflow.tracking import MlflowClient

    from ltstudy.cli import main

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(SystemExit) as code:
        main(["compare", "--methods", "ce,balanced_softmax", "--seeds", "0,1", "-o", str(tmp_path / "t.md"),
              "--experiment", "cmp", "--tracking-uri", uri, "dataset=synthetic", "image_size=8",
              "synthetic_classes=4", "imbalance=20", "val_per_class=5", "epochs=2", "device=cpu",
              "batch_size=64", "warmup_epochs=0"])
    out = capsys.readouterr().out
    assert code.value.code == 0
    for i, run in enumerate(("ce seed 0", "ce seed 1", "balanced_softmax seed 0", "balanced_softmax seed 1")):
        assert f"[{i + 1}/4] {run}: started (2 epochs)" in out and f"[{i + 1}/4] {run}: val top-1" in out
    assert "| balanced_softmax |" in (tmp_path / "t.md").read_text()
    assert (tmp_path / "t.png").read_bytes().startswith(b"\x89PNG")
    mlc = MlflowClient(uri)
    exp = mlc.get_experiment_by_name("cmp")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = mlc.search_runs([exp.experiment_id])
    [parent] = [r for r in runs if r.data.tags.get("ltstudy.role") == "compare"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_name for r in children) == ["balanced_softmax-seed0", "balanced_softmax-seed1",
                                                         "ce-seed0", "ce-seed1"]
    for r in children:
        assert [m.step for m in mlc.get_metric_history(r.info.run_id, "val_top1")] == [1, 2]
        assert {"per_class_accuracy.json", "per_class_accuracy.png"} <= {a.path for a in
                                                                          mlc.list_artifacts(r.info.run_id)}
        assert json.loads(r.inputs.dataset_inputs[0].dataset.profile)["num_classes"] == 4
    assert {"compare.md", "buckets.png"} <= {a.path for a in mlc.list_artifacts(parent.info.run_id)}
    assert "ce.test_top1.mean" in parent.data.metrics and parent.info.status == "FINISHED"
