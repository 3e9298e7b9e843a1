"""The trial loop: reproducibility, resume, schedules, failure on a non-finite loss."""

import pytest

from ltstudy.config import resolve_config
from ltstudy.train import NonFiniteLossError, TrialContext, lr_factor, run_trial


def _cfg(shared_data, **extra):
    return resolve_config({"method": "ldam_drw", "dataset": "cifar10-lt", "data_root": str(shared_data),
                           "imbalance": 100, "epochs": 3, "batch_size": 128, "warmup_epochs": 1,
                           "device": "cpu", "seed": 3, **extra})


def _scalars(m):
    return {k: v for k, v in m.items() if not k.endswith("per_class") and "seconds" not in k
            and "per_s" not in k}


def test_same_seed_same_metrics_and_resume_is_identical(shared_data, tmp_path):
    cfg = _cfg(shared_data)
    full = run_trial(cfg)
    assert _scalars(run_trial(cfg)) == _scalars(full)

    class Interrupt(Exception):
        pass

    def stop_after_two(metrics, checkpoint):
        assert checkpoint == str(tmp_path)
        if metrics["epoch"] == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        run_trial(cfg, stop_after_two, TrialContext(checkpoint_dir=str(tmp_path)))
    seen = []
    resumed = run_trial(cfg, lambda m, c: seen.append(m["epoch"]),
                        TrialContext(checkpoint_dir=str(tmp_path), resume_from=str(tmp_path)))
    assert seen == [3]
    assert _scalars(resumed) == _scalars(full)
    assert resumed["test_per_class"] == full["test_per_class"]


def test_other_seed_other_metrics(shared_data):
    a = run_trial(_cfg(shared_data, epochs=1))
    b = run_trial(_cfg(shared_data, epochs=1, seed=4))
    assert _scalars(a) != _scalars(b)


def test_non_finite_loss_fails_the_trial():
    cfg = resolve_config({"dataset": "synthetic", "epochs": 1, "lr": 1e12, "warmup_epochs": 0,
                          "device": "cpu", "batch_size": 64})
    with pytest.raises(NonFiniteLossError, match="epoch 1"):
        run_trial(cfg)


def test_lr_schedules():
    step = resolve_config({"epochs": 200}).train
    assert [lr_factor(e, step) for e in (0, 4, 5, 159, 160, 179, 180)] == [
        0.2, 1.0, 1.0, 1.0, 0.01, 0.01, pytest.approx(1e-4)]
    cos = resolve_config({"epochs": 10, "warmup_epochs": 0, "schedule": "cosine"}).train
    assert lr_factor(0, cos) == 1.0 and lr_factor(5, cos) == pytest.approx(0.5)
