"""``ltstudy bench study``: what a study costs beyond training, on this machine.

Per-trial overhead = the trial's wall time seen by the Tune driver (start to completion callback) minus
the time spent inside ``run_trial`` (as reported by the trial itself). It is Ray's scheduling, process
start, data loading outside the loop, checkpoint persistence and MLflow logging.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path
from typing import Any

TINY = {"dataset": "synthetic", "image_size": 8, "synthetic_classes": 4, "imbalance": 10,
        "val_per_class": 5, "batch_size": 64, "eval_batch_size": 256, "warmup_epochs": 0}


def bench_study(trials: int = 3, epochs: int = 2, workers: tuple[int, ...] = (1, 2)) -> list[dict[str, Any]]:
    from ltstudy.study.tune import StudyOptions, run_study

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for w in workers:
            summary = run_study(StudyOptions(
                method="ce", num_trials=trials, max_concurrent=1, scheduler="none", sampler="random",
                # the Train driver holds 0.01 CPU: 2 x 0.99 + 0.01 fits a 2-core box
                workers=w, cpus_per_worker=1.0 if w == 1 else 0.99, storage=str(Path(tmp) / "storage"), study_name=f"bench-{w}w",
                tracking_uri=f"sqlite:///{Path(tmp) / 'mlflow.db'}", retries=0, verbose=0,
                overrides={**TINY, "epochs": epochs}))
            walls, inside = [], []
            for t in summary.trials:
                wall = summary.trial_wall_s.get(t["trial_id"])
                if wall is not None and "time_in_run_trial_s" in t["metrics"]:
                    walls.append(wall)
                    inside.append(t["metrics"]["time_in_run_trial_s"])
            wall, run = statistics.median(walls), statistics.median(inside)
            rows.append({"workers": w, "trials": len(walls), "wall_s": wall, "run_trial_s": run,
                         "overhead_s": wall - run, "trials_per_hour": 3600.0 / wall})
    return rows
