"""What makes a study use the machine: checkpoints at a sane rate, data decoded once per process, the
start-up stages of a trial, and trials that stay identical when they share a process."""

from __future__ import annotations

import math

import pytest

from ltstudy.config import load_data
from ltstudy.study.search.schedulers import make_scheduler, rung_epochs
from ltstudy.study.startup import startup_note, startup_stages
from ltstudy.train import TrialContext, run_trial

from support.configs import tiny_config


def test_checkpoints_every_n_epochs_at_rungs_and_always_at_the_end(tmp_path):
    ctx = TrialContext(checkpoint_dir=str(tmp_path), checkpoint_every=5, checkpoint_epochs=frozenset({3}))
    assert [e for e in range(1, 13) if ctx.checkpoint_due(e, 12)] == [3, 5, 10, 12]
    assert not TrialContext(checkpoint_dir=str(tmp_path), rank=1).checkpoint_due(12, 12)  # rank 0 writes
    assert not TrialContext().checkpoint_due(12, 12)  # nowhere to write


def test_a_trial_writes_only_the_checkpoints_that_are_due(tmp_path):
    seen = []
    ctx = TrialContext(checkpoint_dir=str(tmp_path), checkpoint_every=2)
    run_trial(tiny_config("ce", epochs=3), lambda m, ckpt: seen.append((m["epoch"], ckpt is not None)), ctx)
    assert seen == [(1, False), (2, True), (3, True)]


def test_rung_epochs_are_where_asha_decides(tmp_path):
    asha = make_scheduler("asha", "val_loss", "min", 20, 2, 2, state_dir=str(tmp_path))
    rungs = rung_epochs(asha)
    assert rungs == tuple(sorted({math.ceil(m) for m, _ in asha.rungs})) and 2 in rungs and 16 in rungs
    assert rung_epochs(None) == ()


def test_a_plan_knows_its_rung_epochs_and_its_notes(tmp_path):
    from ltstudy.study.run import StudyOptions, plan_study

    from support.configs import TINY

    plan = plan_study(StudyOptions(method="ce", num_trials=4, storage=str(tmp_path / "storage"),
                                   tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                                   fixed={**TINY, "epochs": 8}))
    assert plan.rungs == rung_epochs(make_scheduler("asha", plan.space.metric, plan.space.mode, plan.max_t,
                                                    plan.grace, 2, state_dir=str(tmp_path)))
    assert plan.grace in plan.rungs and all(isinstance(e, int) for e in plan.rungs)
    assert plan.notes and all(isinstance(n, str) for n in plan.notes)  # 4 TPE trials: close to random
    assert not list(tmp_path.iterdir())  # planning writes nothing


def test_the_dataset_is_decoded_once_per_process_per_definition():
    a = tiny_config("ce", seed=1)
    assert load_data(a) is load_data(tiny_config("ldam_drw", seed=1, lr=0.5))  # nor method nor lr define it
    assert load_data(tiny_config("ce", seed=2)) is not load_data(a)  # synthetic data follows the seed
    other = load_data(tiny_config("ce", imbalance=10))
    assert other is not load_data(a) and len(other.train) != len(load_data(a).train)
    carved = load_data(tiny_config("metasaug"))  # MetaSAug carves a meta set: another split
    assert carved is not load_data(a)


def test_a_trial_is_the_same_after_other_trials_ran_in_its_process():
    """Tune reuses a trial's process: nothing a trial leaves behind (the cached dataset, RNG state,
    torch settings) may change the next one."""
    def metrics(cfg):
        out = []
        run_trial(cfg, lambda m, _: out.append({k: v for k, v in m.items() if isinstance(v, float)}))
        return out

    first = metrics(tiny_config("ce", epochs=2))
    metrics(tiny_config("ldam_drw", epochs=2))  # the same data, from the cache
    metrics(tiny_config("metasaug", epochs=2))
    again = metrics(tiny_config("ce", epochs=2))
    def same(m):
        return {k: v for k, v in m.items() if not k.endswith(("_s", "seconds"))}

    assert [same(m) for m in first] == [same(m) for m in again]


def test_startup_stages_of_a_new_and_of_a_reused_process():
    new = startup_stages(100.0, {"import_started": 101.0, "imported": 104.0, "entered": 104.5, "ready": 106.0,
                                 "process_trials": 1})
    assert new == pytest.approx({"startup_import_s": 3.0, "startup_ray_s": 1.5, "startup_data_model_s": 1.5,
                                 "startup_s": 6.0, "reused_process": 0.0})
    reused = startup_stages(200.0, {"import_started": 101.0, "imported": 104.0, "entered": 200.2,
                                    "ready": 200.3, "process_trials": 2})
    assert reused == pytest.approx({"startup_import_s": 0.0, "startup_ray_s": 0.2, "startup_data_model_s": 0.1,
                                    "startup_s": 0.3, "reused_process": 1.0})
    # Tune made the process before telling the callbacks: the imports count from the process's start
    early = startup_stages(100.0, {"import_started": 98.0, "imported": 100.5, "entered": 101.0, "ready": 101.5,
                                   "process_trials": 1})
    assert early["startup_s"] == pytest.approx(3.5) and early["startup_import_s"] == pytest.approx(2.5)


def test_startup_stages_of_a_multi_worker_trial_and_the_warning():
    stamps = {"driver_import_started": 99.0, "driver_entered": 102.0, "driver_trials": 1,
              "import_started": 105.0, "imported": 108.0, "entered": 110.0, "ready": 111.0, "process_trials": 1}
    out = startup_stages(100.0, stamps)
    assert out == pytest.approx({"startup_driver_s": 3.0, "startup_workers_s": 3.0, "startup_worker_import_s": 3.0,
                                 "startup_worker_setup_s": 2.0, "startup_data_model_s": 1.0, "startup_s": 12.0,
                                 "reused_process": 0.0})
    line, warning = startup_note("trial 0", 2, {**out, "epoch_wall_s": 4.0})
    assert line.startswith("trial 0: 2 workers ready 12.0 s after launch (Train driver 3.0 s")
    assert warning is not None and "--workers 1" in warning
    assert startup_note("trial 0", 2, {**out, "epoch_wall_s": 40.0})[1] is None
