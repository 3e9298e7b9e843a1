"""``ltstudy bench overhead``: what the platform spends around a trial, side by side with plain Ray Tune.

For each trial count N, in one run on one machine, ``concurrent`` trials at a time:

* **ltstudy**: a real ``ltstudy tune`` process (``--scheduler none``, ``--sampler tpe``), timed from its start to
  its exit; from its MLflow record, the seconds each trial spent inside ``run_trial`` (its work);
* **plain Tune**: a process running ``Tuner`` + ``OptunaSearch`` (TPE) + ``MLflowLoggerCallback`` (SQLite), as a
  user would wire them by hand, whose trials busy-wait for the median work of the ltstudy trials.

Per run: the share of the slots used (Σ work ÷ (slots × wall)) and the overhead per trial ((slots × wall − Σ
work) ÷ N, slot-seconds). A least-squares line through (N, slots × wall − Σ work) over the trial counts splits
the overhead into a fixed cost and a cost per trial; the ratio to plain Tune is the claim, not an absolute time.

``features=True`` is the feature-stage case: ``ce_classifier`` on a synthetic backbone's cached features, trials
of about a second, default 1,000 of them; it also times what a person does next over that study: ``studies
show``, ``report``, ``best-config export``, the MLflow UI's runs page, and Optuna's ``ask`` at the last trial.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from ltstudy.errors import StudyFailed
from ltstudy.experiments.bench_study import trial_records, tune_process
from ltstudy.experiments.local_cluster import mlflow_server

#: the image-stage trial: one epoch of CE on a small synthetic set (about 3 s on a 2-core machine)
IMAGE_TRIAL = ["--method", "ce", "--dataset", "synthetic", "epochs=1", "image_size=16", "synthetic_classes=10",
               "val_per_class=10", "batch_size=64", "warmup_epochs=0", "device=cpu"]
#: the feature-stage trial: ce_classifier on cached features, a handful of epochs (about a second)
FEATURE_TRIAL = ["--method", "ce_classifier", "epochs=6", "batch_size=256", "device=cpu"]

#: plain Tune, as a user wires it by hand; argv: trials, concurrent, work seconds, root folder
PLAIN_TUNE = r"""
import sys, time
import ray
from ray import tune
from ray.air.integrations.mlflow import MLflowLoggerCallback
from ray.tune.search.optuna import OptunaSearch

trials, concurrent, work, root = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]

def trainable(config):
    end, x = time.perf_counter() + work, 0
    while time.perf_counter() < end:  # busy, like a trial's training
        x += 1
    tune.report({"val_top1": config["lr"] * config["weight_decay"]})

ray.init(address="local", num_cpus=concurrent, log_to_driver=False, logging_level="ERROR")
space = {"lr": tune.loguniform(1e-3, 1.0), "weight_decay": tune.loguniform(1e-5, 1e-2)}
tune.Tuner(
    trainable, param_space=space,
    tune_config=tune.TuneConfig(search_alg=OptunaSearch(metric="val_top1", mode="max", seed=0),
                                num_samples=trials, max_concurrent_trials=concurrent),
    run_config=tune.RunConfig(name="plain", storage_path=root + "/storage", verbose=0, callbacks=[
        MLflowLoggerCallback(tracking_uri=f"sqlite:///{root}/mlflow.db", experiment_name="plain")]),
).fit()
ray.shutdown()
"""


def _plain_tune(root: Path, trials: int, concurrent: int, work: float) -> float:
    """One plain-Tune process; returns its wall seconds."""
    tic = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PLAIN_TUNE, str(trials), str(concurrent), f"{work:.4f}", str(root)],
                          cwd=root, capture_output=True, text=True)
    wall = time.perf_counter() - tic
    if done.returncode != 0:
        tail = (done.stderr.strip() or done.stdout.strip()).splitlines()[-1:] or ["no output"]
        raise StudyFailed(f"bench overhead: the plain-Tune run exited {done.returncode}: {tail[0]}")
    return wall


def _figures(trials: int, slots: int, wall: float, work: float) -> dict[str, float]:
    lost = slots * wall - work
    return {"trials": trials, "wall_s": wall, "work_s": work, "share": work / (slots * wall),
            "overhead_per_trial": lost / trials, "lost_slot_s": lost}


def _fit(rows: list[dict[str, float]]) -> dict[str, float]:
    """Least squares of lost slot-seconds against trials: fixed cost (slot-s) + per-trial cost (slot-s)."""
    if len(rows) < 2:
        return {}
    slope, intercept = statistics.linear_regression([r["trials"] for r in rows], [r["lost_slot_s"] for r in rows])
    return {"fixed_slot_s": intercept, "per_trial_slot_s": slope}


def _pair(root: Path, trials: int, concurrent: int, settings: list[str]) -> dict[str, Any]:
    """ltstudy and plain Tune on the same trial length, one run each."""
    name = f"overhead-{trials}"
    wall = tune_process(root, name, ["--num-trials", str(trials), "--max-concurrent", str(concurrent),
                                     "--scheduler", "none", "--sampler", "tpe", "--seed", "0", "--retries", "0",
                                     *settings])
    records = trial_records(root, name)
    works = [t["in_trial_s"] for t in records]
    ltstudy = _figures(trials, concurrent, wall, sum(works))
    median = statistics.median(works)
    plain_root = root / "plain"
    plain_root.mkdir()
    plain = _figures(trials, concurrent, _plain_tune(plain_root, trials, concurrent, median), median * trials)
    return {"trials": trials, "trial_s": median, "ltstudy": ltstudy, "plain": plain}


def bench_overhead(trials: tuple[int, ...] = (8, 32, 96), concurrent: int = 2) -> dict[str, Any]:
    """Image-stage trials at each trial count: ltstudy and plain Tune side by side, and the fitted costs."""
    rows = []
    for n in trials:
        with tempfile.TemporaryDirectory(prefix="ltstudy-bench-overhead-") as tmp:
            rows.append(_pair(Path(tmp), n, concurrent, IMAGE_TRIAL))
    return {"rows": rows, "ltstudy_fit": _fit([r["ltstudy"] for r in rows]),
            "plain_fit": _fit([r["plain"] for r in rows])}


def bench_overhead_features(trials: int = 1000, concurrent: int = 2) -> dict[str, Any]:
    """The feature-stage case at ``trials`` trials, and the time of what a person does next over it."""
    with tempfile.TemporaryDirectory(prefix="ltstudy-bench-overhead-") as tmp:
        root = Path(tmp)
        backbone = _synthetic_backbone(root)
        row = _pair(root, trials, concurrent, [*FEATURE_TRIAL, "--backbone", backbone])
        row["after"] = _afterwards(root, f"overhead-{trials}")
    return row


def _synthetic_backbone(root: Path) -> str:
    from ltstudy.config import resolve_config
    from ltstudy.train import TrialContext, run_trial

    folder = root / "backbone"
    cfg = resolve_config({"method": "ce", "dataset": "synthetic", "image_size": 16, "synthetic_classes": 10,
                          "val_per_class": 10, "epochs": 1, "batch_size": 64, "device": "cpu"})
    run_trial(cfg, ctx=TrialContext(checkpoint_dir=str(folder)))
    return str(folder / "checkpoint.pt")


def _timed(root: Path, *argv: str) -> float:
    tic = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "ltstudy.cli", *argv], cwd=root, capture_output=True, text=True)
    if done.returncode != 0:
        raise StudyFailed(f"bench overhead: `ltstudy {argv[0]}` exited {done.returncode}: "
                          f"{(done.stderr.strip() or done.stdout.strip()).splitlines()[-1:]}")
    return time.perf_counter() - tic


def _afterwards(root: Path, study: str) -> dict[str, float]:
    """Seconds of ``studies show``, ``report``, ``best-config export``, the MLflow UI's runs page (its first
    page of runs, as the page asks the server for it) and Optuna's ``ask`` at the study's last trial."""
    uri = ["--tracking-uri", f"sqlite:///{root / 'mlflow.db'}"]
    out = {"studies show": _timed(root, "studies", "show", study, *uri),
           "report": _timed(root, "report", study, "-o", str(root / "report.html"), "--no-log", *uri),
           "best-config export": _timed(root, "best-config", "export", "--study", study, "-o",
                                        str(root / "best.yaml"), *uri)}
    with mlflow_server(root, backend=f"sqlite:///{root / 'mlflow.db'}") as server:
        out["MLflow UI runs page"] = _runs_page(server, study)
    out["Optuna ask at the last trial"] = _optuna_ask(root / "storage" / "optuna.journal", study)
    return out


def _runs_page(server: str, study: str) -> float:
    """What the MLflow UI's experiment page asks for first: the experiment, then 100 runs by start time."""
    def post(path: str, body: dict[str, Any]) -> dict[str, Any]:
        request = urllib.request.Request(f"{server}{path}", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as resp:
            return json.loads(resp.read())

    tic = time.perf_counter()
    with urllib.request.urlopen(f"{server}/ajax-api/2.0/mlflow/experiments/get-by-name?experiment_name={study}",
                                timeout=120) as resp:
        experiment = json.loads(resp.read())["experiment"]["experiment_id"]
    post("/ajax-api/2.0/mlflow/runs/search", {"experiment_ids": [experiment], "max_results": 100,
                                               "order_by": ["attributes.start_time DESC"],
                                               "run_view_type": "ACTIVE_ONLY"})
    return time.perf_counter() - tic


def _optuna_ask(journal: Path, study: str) -> float:
    """Seconds of one TPE ``ask`` on a copy of the study as it ended (the sampler a study uses)."""
    import optuna

    from ltstudy.study.search.optuna_storage import open_optuna_storage
    from ltstudy.study.search.searcher import make_sampler

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    copy = optuna.storages.InMemoryStorage()
    optuna.copy_study(from_study_name=study, from_storage=open_optuna_storage(str(journal)),
                      to_storage=copy, to_study_name=study)
    loaded = optuna.load_study(study_name=study, storage=copy, sampler=make_sampler("tpe", 0, 1000))
    space = loaded.best_trial.distributions  # what the searcher suggests for every trial
    tic = time.perf_counter()
    loaded.ask(fixed_distributions=space)
    return time.perf_counter() - tic
