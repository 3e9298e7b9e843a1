"""Studies whose answer holds up, end to end on tiny synthetic trials: early stopping waits for the last
schedule phase and spares the published trial, pruned trials reach Optuna with their value, a
multi-objective study exports a chosen Pareto point, --confirm re-runs the top configurations, a study
whose trials all fail exits 1 (its study run FAILED), and a time budget ends a study honestly."""

from __future__ import annotations

import json

import optuna
import pytest
from mlflow.tracking import MlflowClient

from ltstudy.cli import main
from ltstudy.config import load_yaml
from ltstudy.study.run import StudyOptions, run_study
from ltstudy.study.search.optuna_storage import OPTUNA_JOURNAL, open_optuna_storage
from ltstudy.study.tracking.records import find_study, study_trials

from support.configs import TINY

pytestmark = pytest.mark.slow

# LDAM-DRW switches on its class-balanced weights at drw_start·epochs = epoch 3 of 6, so ASHA's first rung
# is epoch 4 (cosine lr: no other phase). lr 1e-4 against 0.1 makes clear losers by validation top-1:
# planted, on data where they really lose (16-pixel images, 20 validation images a class: at epoch 4 the
# learners reach 0.72-1.0, the losers 0.5-0.55; on TINY's 8 pixels some learners sat near chance at
# epoch 4 too, and with losers tied at the median nothing was stopped: 3 runs of 3
# on 2026-12-04). Not by validation loss: a trial that learns nothing sits at ln 4, below the learners' loss.
LATE_PHASE = """\
method: ldam_drw
metric: val_top1
mode: max
fixed: {epochs: 6, schedule: cosine, drw_start: 0.5}
tune:
  lr: {type: categorical, choices: [0.1, 1.0e-4]}
  weight_decay: {type: float, low: 1.0e-5, high: 1.0e-3, log: true}
"""


def _study(tmp, uri, name, space_text, **kw):
    space = tmp / f"{name}.yaml"
    space.write_text(space_text)
    opts = dict(method=space_text.split()[1], space_path=str(space), num_trials=6, max_concurrent=2,
                sampler="random", seed=3, storage=str(tmp / "storage"), tracking_uri=uri, study_name=name,
                retries=0, verbose=0, fixed=dict(TINY))
    return run_study(StudyOptions(**{**opts, **kw}), say=lambda line: None)


def test_early_stopping_waits_for_the_last_phase_and_spares_the_published_trial(ray_local, mlflow_server,
                                                                                tmp_path):
    summary = _study(tmp_path, mlflow_server, "late-phase", LATE_PHASE, num_trials=8, reduction_factor=2,
                     fixed={**TINY, "val_per_class": 20, "imbalance": 10, "batch_size": 16, "image_size": 16})
    mlc = MlflowClient(mlflow_server)
    _, exp, parent = find_study(mlflow_server, "late-phase")
    assert parent.data.tags["ltstudy.grace_period"] == "4"
    trials = study_trials(mlc, exp.experiment_id, parent.info.run_id)
    pruned = [t for t in trials if t["status"] == "pruned"]
    assert pruned, [(t["status"], t["params"]["lr"], t["metrics"].get("val_top1")) for t in trials]
    for t in trials:
        epochs = [m.step for m in mlc.get_metric_history(t["run_id"], "val_loss")]
        assert t["status"] == "failed" or max(epochs) >= 4, (t["status"], epochs)  # never before the rung
    published = [t for t in trials if t["published"]]
    assert len(published) == 1 and published[0]["status"] == "completed"
    print({(t["status"], t["params"]["lr"], t["metrics"].get("val_top1")) for t in trials})
    # the planted losers, and only they, are stopped; the answer is a planted winner
    assert {float(t["params"]["lr"]) for t in pruned} == {1e-4}, [(t["status"], t["params"]["lr"]) for t in trials]
    assert float(summary.best["params"]["lr"]) == 0.1
    ot = optuna.load_study(study_name="late-phase", storage=open_optuna_storage(str(tmp_path / "storage" / OPTUNA_JOURNAL)))
    for t in ot.trials:
        if t.state == optuna.trial.TrialState.PRUNED:
            assert t.value is not None and t.value == t.intermediate_values[max(t.intermediate_values)]
    assert summary.gain is not None and "val_top1" in summary.gain


def test_multi_objective_study_exports_a_chosen_pareto_point(ray_local, mlflow_server, tmp_path, capsys):
    space = ("method: ce\nmetric: [val_top1, val_few]\nmode: [max, max]\nfixed: {epochs: 2}\n"
             "tune:\n  lr: {type: float, low: 0.001, high: 0.5, log: true}\n"
             "  sampler: {type: categorical, choices: [instance, sqrt]}\n")
    summary = _study(tmp_path, mlflow_server, "two-objectives", space, num_trials=4, scheduler="none")
    assert summary.front and summary.best is None
    out = tmp_path / "best.yaml"
    with pytest.raises(SystemExit) as code:
        main(["best-config", "export", "--study", "two-objectives", "--tracking-uri", mlflow_server])
    assert code.value.code == 2 and "--pick" in capsys.readouterr().err
    with pytest.raises(SystemExit) as code:
        main(["best-config", "export", "--study", "two-objectives", "--pick", "0", "-o", str(out),
              "--tracking-uri", mlflow_server])
    assert code.value.code == 0
    exported = load_yaml(out)
    assert exported["provenance"]["trial_id"] == summary.front[0]["trial_id"]
    assert exported["provenance"]["objective"] == {"metric": "val_top1,val_few", "mode": "max,max"}


def test_confirm_reruns_the_top_configurations_and_export_uses_the_ranking(ray_local, mlflow_server, tmp_path,
                                                                           capsys):
    """The top 2 and the published trial each run the same 2 new seeds (paired); the summary, ``studies
    show`` and ``best-config export`` all name the confirmed winner, with its interval and paired difference."""
    space = "method: ce\nfixed: {epochs: 2}\ntune:\n  lr: {type: float, low: 0.001, high: 0.5, log: true}\n"
    summary = _study(tmp_path, mlflow_server, "confirmed", space, num_trials=4, scheduler="none", confirm=2,
                     confirm_seeds=2)
    mlc = MlflowClient(mlflow_server)
    _, exp, parent = find_study(mlflow_server, "confirmed")
    trials = study_trials(mlc, exp.experiment_id, parent.info.run_id)
    published = next(t for t in trials if t["number"] == 0)
    runs = study_trials(mlc, exp.experiment_id, parent.info.run_id, "confirmation")
    confirmed_ids = {row["trial_id"] for row in summary.confirmed}
    assert published["trial_id"] in confirmed_ids and len(confirmed_ids) in (2, 3)
    assert len(runs) == 2 * len(confirmed_ids) and {r["confirms"] for r in runs} == confirmed_ids
    assert {tuple(row["seeds"]) for row in summary.confirmed} == {(int(published["seed"]) + 1,
                                                                  int(published["seed"]) + 2)}  # paired
    assert all("ci95" in row and "diff" in row for row in summary.confirmed)
    assert summary.best["trial_id"] == summary.confirmed[0]["trial_id"]  # the summary's answer is confirmed
    assert len(trials) == 4  # trials stay trials
    out = tmp_path / "best.yaml"
    with pytest.raises(SystemExit):
        main(["best-config", "export", "--study", "confirmed", "-o", str(out), "--tracking-uri", mlflow_server])
    prov = load_yaml(out)["provenance"]
    assert prov["selected_by"] == "confirmation" and prov["trial_id"] == summary.confirmed[0]["trial_id"]
    assert [r["trial_id"] for r in prov["confirmation"]["ranking"]] == [r["trial_id"] for r in summary.confirmed]
    assert {"mean", "ci95", "diff", "diff_ci95", "seeds"} <= set(prov["confirmation"]["ranking"][0])
    capsys.readouterr()
    with pytest.raises(SystemExit) as code:
        main(["studies", "show", "confirmed", "--format", "json", "--tracking-uri", mlflow_server])
    header = json.loads(capsys.readouterr().out)
    header = header.get("study", header)
    assert code.value.code == 0 and header["best_trial_id"] == summary.confirmed[0]["trial_id"]
    assert header["selected_by"] == "confirmation"
    with pytest.raises(SystemExit) as code:  # --pick belongs to multi-objective studies
        main(["best-config", "export", "--study", "confirmed", "--pick", "3", "--tracking-uri", mlflow_server])
    assert code.value.code == 2 and "drop --pick" in capsys.readouterr().err
    # confirming again runs nothing new: every (trial, seed) pair is done
    with pytest.raises(SystemExit) as code:
        main(["confirm", "confirmed", "--top", "2", "--seeds", "2", "--tracking-uri", mlflow_server])
    assert code.value.code == 0
    assert len(study_trials(mlc, exp.experiment_id, parent.info.run_id, "confirmation")) == len(runs)


def test_a_study_whose_trials_all_fail_exits_1_with_the_common_error(ray_local, mlflow_server, tmp_path, capsys):
    space = "method: ce\nfixed: {epochs: 2, lr: 1.0e+12}\ntune:\n  weight_decay: {type: float, low: 1.0e-5, high: 1.0e-3, log: true}\n"
    (tmp_path / "space.yaml").write_text(space)
    with pytest.raises(SystemExit) as code:
        main(["tune", "--method", "ce", "--space", str(tmp_path / "space.yaml"), "--num-trials", "2",
              "--storage", str(tmp_path / "storage"), "--tracking-uri", mlflow_server, "--study-name",
              "all-fail", "--retries", "0", "--scheduler", "none", *[f"{k}={v}" for k, v in TINY.items()]])
    err = capsys.readouterr().err.strip().splitlines()
    assert code.value.code == 1
    assert err[-1].startswith("error: all 2 trials failed; most common error (2 of 2): NonFiniteLossError")
    _, _, parent = find_study(mlflow_server, "all-fail")
    assert parent.info.status == "FAILED"  # the study did not do its job: its run says so


def test_a_time_budget_cuts_running_trials_finishes_the_published_one_and_resumes(ray_local, mlflow_server,
                                                                                  tmp_path, capsys):
    """A 1 s budget has passed at the first result of every trial: trial 1 is cut there (status budget,
    KILLED, Optuna FAIL), the published trial 0 runs to its end, trial 2 never starts; the command exits 0
    (a trial completed) without Ray's restore hint; ``--resume`` (no budget) runs trial 2 only."""
    where = ["--study-name", "budget", "--storage", str(tmp_path / "storage"), "--tracking-uri", mlflow_server]
    argv = ["tune", "--method", "ce", *where, "--num-trials", "3", "--max-concurrent", "2", "--time-budget", "1",
            "--scheduler", "none", "--sampler", "random", "--retries", "0",
            *[f"{k}={v}" for k, v in TINY.items()], "epochs=12"]
    with pytest.raises(SystemExit) as code:
        main(argv)
    out = capsys.readouterr()
    assert code.value.code == 0, out.err[-3000:]
    assert "Tuner.restore" not in out.out + out.err and "Stop signal received" not in out.out + out.err
    assert "1 running trial(s) cut (status budget), 1 of 3 not started" in out.out
    mlc = MlflowClient(mlflow_server)
    _, exp, parent = find_study(mlflow_server, "budget")
    trials = {t["number"]: t for t in study_trials(mlc, exp.experiment_id, parent.info.run_id)}
    assert sorted(trials) == [0, 1]
    assert trials[0]["published"] and trials[0]["status"] == "completed" and trials[0]["mlflow_status"] == "FINISHED"
    assert trials[1]["status"] == "budget" and trials[1]["mlflow_status"] == "KILLED"
    assert int(trials[1]["tags"]["ltstudy.epochs"]) < 12
    assert mlc.get_run(parent.info.run_id).info.status == "FINISHED"
    storage = open_optuna_storage(str(tmp_path / "storage" / OPTUNA_JOURNAL))
    ot = {t.number: t for t in optuna.load_study(study_name="budget", storage=storage).trials}
    assert ot[0].state == optuna.trial.TrialState.COMPLETE
    assert ot[1].state == optuna.trial.TrialState.FAIL and ot[1].user_attrs["ltstudy_stopped_by"] == "budget"
    assert not any(t.state == optuna.trial.TrialState.RUNNING for t in ot.values())

    with pytest.raises(SystemExit) as code:  # this run has no budget: the saved one is not brought back
        main(["tune", "--resume", *where])
    assert code.value.code == 0, capsys.readouterr().err[-3000:]
    trials = {t["number"]: t for t in study_trials(mlc, exp.experiment_id, parent.info.run_id)}
    assert sorted(trials) == [0, 1, 2] and trials[2]["status"] == "completed"
    assert trials[1]["status"] == "budget"  # an ended trial stays as it ended
    ot = optuna.load_study(study_name="budget", storage=storage).trials
    assert len(ot) == 3 and not any(t.state == optuna.trial.TrialState.RUNNING for t in ot)
