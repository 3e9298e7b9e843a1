"""The contract every registered method meets; a new method is tested here with no new test code.

Each method: builds from its published defaults; takes one training step with a finite loss and finite
gradients; reads exactly the hyperparameters it declares; and trains one epoch on the shared CIFAR-10
subset at IF = 100 producing every metric.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from ltstudy.config import TrialConfig, resolve_config
from ltstudy.methods import Amp, get_method, list_methods
from ltstudy.train import TrialContext, _optimizer, _prepare_model, build_method, load_data, run_trial

METRICS = [f"{split}_{m}" for split in ("val", "test") for m in ("top1", "many", "medium", "few", "loss")]
END_TO_END = [m for m in list_methods() if get_method(m).stage == "end_to_end"]


class RecordingParams:
    """Wraps a method's Params and records which declared fields the method reads."""

    def __init__(self, inner: Any) -> None:
        self._inner, self.read = inner, set()

    def __getattr__(self, name: str) -> Any:
        if name in type(self._inner).model_fields:
            self.read.add(name)
        return getattr(self._inner, name)


@pytest.fixture(scope="session")
def cifar_backbone(shared_data, tmp_path_factory) -> str:
    """A ResNet-32 checkpoint trained one epoch with CE, for the feature-stage methods."""
    out = tmp_path_factory.mktemp("backbone")
    run_trial(_config("ce", shared_data, None), ctx=TrialContext(checkpoint_dir=str(out)))
    return str(out / "checkpoint.pt")


def _config(name: str, root: Any, backbone: str | None, **extra: Any) -> TrialConfig:
    values = {"method": name, "dataset": "cifar10-lt", "data_root": str(root), "imbalance": 100,
              "epochs": 1, "batch_size": 64, "model": "resnet32", "device": "cpu", **extra}
    if get_method(name).stage == "feature":
        values["backbone"] = backbone
    return resolve_config(values)


@pytest.mark.parametrize("name", list_methods())
def test_builds_from_published_defaults(name):
    spec = get_method(name)
    params = spec.Params()
    cfg = resolve_config({"method": name})
    assert cfg.params == params
    for key, value in spec.train_defaults.items():
        assert getattr(cfg.train, key) == (tuple(value) if isinstance(value, list) else value)


@pytest.mark.parametrize("name", END_TO_END)
def test_one_step_gives_finite_loss_and_gradients(name):
    cfg = resolve_config({"method": name, "dataset": "synthetic", "model": "resnet32",
                          "batch_size": 32, "epochs": 2, "device": "cpu"})
    data, device = load_data(cfg), torch.device("cpu")
    torch.manual_seed(0)
    method = build_method(cfg, data, device)
    model = _prepare_model(method, cfg.train, device, 1)
    optimizer = _optimizer(model, cfg.train)
    method.on_epoch_start(1)
    loader = method.train_loader(batch_size=32, train=True, augment=None)
    loader.set_epoch(0)
    loss = method.train_step(model, next(iter(loader)), optimizer, Amp())
    assert torch.isfinite(loss).all()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name", list_methods())
def test_one_epoch_on_cifar10_lt_reads_declared_params_and_reports_every_metric(
        name, shared_data, request):
    backbone = request.getfixturevalue("cifar_backbone") if get_method(name).stage == "feature" else None
    cfg = _config(name, shared_data, backbone)
    recorder = RecordingParams(cfg.params)
    reports: list[dict] = []
    metrics = run_trial(TrialConfig(cfg.train, recorder), lambda m, ckpt: reports.append(m))
    assert recorder.read == set(type(cfg.params).model_fields), "declared vs read hyperparameters"
    assert [r["epoch"] for r in reports] == [1]
    for key in METRICS:
        assert key in metrics and math.isfinite(metrics[key]), key
    assert 0.0 <= metrics["test_top1"] <= 1.0
    assert len(metrics["test_per_class"]) == 10
