"""The trial loop: seeds, schedules, failure on a non-finite loss (same seed and resume: the contract suite)."""

import pytest

from ltstudy.config import resolve_config
from ltstudy.train import NonFiniteLossError, lr_factor, run_trial


def _cfg(**extra):
    """LDAM-DRW (a method with state that changes mid-run) on small synthetic data, DRW in epoch 3."""
    return resolve_config({"method": "ldam_drw", "dataset": "synthetic", "image_size": 16,
                           "imbalance": 10, "epochs": 3, "batch_size": 64, "warmup_epochs": 1,
                           "drw_start": 0.67, "device": "cpu", "seed": 3, **extra})


def _scalars(m):
    return {k: v for k, v in m.items() if not k.endswith("per_class") and "seconds" not in k
            and "per_s" not in k}


def test_other_seed_other_metrics():
    a = run_trial(_cfg(epochs=1))
    b = run_trial(_cfg(epochs=1, seed=4))
    assert _scalars(a) != _scalars(b)


def test_non_finite_loss_fails_the_trial():
    cfg = resolve_config({"dataset": "synthetic", "image_size": 16, "epochs": 1, "lr": 1e12,
                          "warmup_epochs": 0, "device": "cpu", "batch_size": 64})
    with pytest.raises(NonFiniteLossError, match="epoch 1"):
        run_trial(cfg)


def test_lr_schedules():
    step = resolve_config({"epochs": 200}).train
    assert [lr_factor(e, step) for e in (0, 4, 5, 159, 160, 179, 180)] == [
        0.2, 1.0, 1.0, 1.0, 0.01, 0.01, pytest.approx(1e-4)]
    cos = resolve_config({"epochs": 10, "warmup_epochs": 0, "schedule": "cosine"}).train
    assert lr_factor(0, cos) == 1.0 and lr_factor(5, cos) == pytest.approx(0.5)


def test_lr_milestones_follow_the_phase_switch_where_the_reference_ties_them():
    """LDAM-DRW and MetaSAug decay the lr at their switch (160 of 200) and at 180: moving the switch in a study
    moves the decays; explicit milestones win; methods without a switch keep 0.8 and 0.9."""
    from ltstudy.config import lr_milestones

    drw = resolve_config({"method": "ldam_drw", "drw_start": 0.6, "epochs": 100})
    assert lr_milestones(drw) == (0.6, 0.8)
    factors = [lr_factor(e, drw.train, lr_milestones(drw)) for e in (59, 60, 79, 80)]
    assert factors == [1.0, 0.01, 0.01, pytest.approx(1e-4)]
    meta = resolve_config({"method": "metasaug", "switch": 0.7})
    assert lr_milestones(meta) == (0.7, 0.85) and lr_milestones(meta.replace(switch=0.8)) == (0.8, 0.9)
    assert lr_milestones(meta.replace(milestones=[0.5, 0.75])) == (0.5, 0.75)
    assert lr_milestones(resolve_config({"method": "ce"})) == (0.8, 0.9)
