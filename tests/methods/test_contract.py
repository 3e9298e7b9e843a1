"""The contract every registered method meets; a new method is tested here with no new test code.

Every method, on tiny synthetic data (no dataset folder needed): builds from its published defaults;
takes one finite step with finite gradients; reads exactly the hyperparameters it declares; reports every
metric; gives the same metrics for the same seed; reaches after 1 epoch + resume what 2 straight epochs
reach; and round-trips its state through a checkpoint.
"""

from __future__ import annotations

import io
import math

import pytest
import torch

from ltstudy.config import TrainConfig, TrialConfig, load_data, resolve_config
from ltstudy.data import dataset_family
from ltstudy.methods import ImageMethod, get_method, list_methods
from ltstudy.runtime import NO_AMP
from ltstudy.train import TrialContext, run_trial
from ltstudy.train.feature import FeatureStage
from ltstudy.train.image import ImageStage, build_method, model_preprocess, prepare_model
from ltstudy.train.loop import run_epochs
from ltstudy.train.optim import make_optimizer

from support.configs import RecordingParams, tiny_config
from support.pretrained import tiny_clip_settings

METRICS = [f"{split}_{m}" for split in ("val", "test")
           for m in ("top1", "many", "medium", "few", "loss", "ece", "ece_many", "ece_few", "nll")]
IMAGE = [m for m in list_methods() if issubclass(get_method(m), ImageMethod)]
FEATURE = [m for m in list_methods() if get_method(m).stage == "feature" and not get_method(m).post_hoc]
#: post-hoc rules on the backbone's classifier: nothing to train
POST_HOC = [m for m in list_methods() if get_method(m).stage == "feature" and get_method(m).post_hoc]
#: small enough for every method, big enough that each method's own phase runs in epoch 1 of 2
SMALL = {"fsgl": {"batch_size": 32}, "metasaug": {"meta_batch": 16, "switch": 0.5, "num_meta": 2},
         "dlsa": {"num_cluster": 8, "flow_epochs": 2, "flow_batch_size": 64},
         # a tiny random CLIP (image and text towers), every option of LIFT at once, AMP off on the CPU anyway
         "lift": tiny_clip_settings(lora=True, vpt="deep", bias_tuning=True, batch_size=32, crop_padding=0,
                                    random_resized_crop=True)}


def _cfg(name: str, backbone: str, **extra) -> TrialConfig:
    return tiny_config(name, backbone, **{**SMALL.get(name, {}), **extra})


def _scalars(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not k.endswith(("per_class", "seconds", "per_s"))}


@pytest.mark.parametrize("dataset", ["cifar10-lt", "cifar100-lt", "filelist"])
@pytest.mark.parametrize("name", list_methods())
def test_each_dataset_family_resolves_to_its_published_recipe(name, dataset):
    """The family's recipe (cited) is what a config of that dataset resolves to, key for key; keys the recipe
    leaves out keep their defaults; a user value still wins over the recipe."""
    spec = get_method(name)
    recipe = spec.recipe(dataset_family(dataset))
    assert recipe.source.strip() and recipe.settings
    cfg = resolve_config({"method": name, "dataset": dataset})
    flat, defaults = cfg.to_dict(), {**TrainConfig().model_dump(mode="json"), **spec.Params().model_dump()}
    for imbalance in (None, *recipe.by_imbalance):
        values = recipe.resolved(imbalance)
        assert set(values) <= set(TrainConfig.model_fields) | set(spec.Params.model_fields)
        resolved = resolve_config({"method": name, "dataset": dataset,
                                   **({"imbalance": imbalance} if imbalance else {})}).to_dict()
        for key, value in values.items():
            assert resolved[key] == (list(value) if isinstance(value, tuple) else value), key
    for key, value in defaults.items():
        if key not in recipe.settings and key not in ("method", "dataset"):
            assert flat[key] == value, key
    key, value = next((k, v) for k, v in recipe.settings.items() if isinstance(v, float) and v > 0)
    assert resolve_config({"method": name, "dataset": dataset, key: value * 2}).to_dict()[key] == value * 2


def _grads_finite(parameters) -> None:
    grads = [p.grad for p in parameters if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name", IMAGE)
def test_image_method_one_step_gives_finite_loss_and_gradients(name):
    cfg = _cfg(name, None, epochs=2)
    device = torch.device("cpu")
    torch.manual_seed(0)
    method = build_method(cfg, load_data(cfg), device)
    model = prepare_model(method.build_model(), cfg.train, device, 1)
    optimizer = make_optimizer(model.parameters(), cfg.train)
    method.on_epoch_start(1)  # the last phase of the schedule (DRW, meta step)
    pre = model_preprocess(model, cfg.train, method)
    loader = method.train_loader(batch_size=32, train=True, augment=None, **({"preprocess": pre} if pre else {}))
    loader.set_epoch(0)
    loss = method.train_step(model, next(iter(loader)), optimizer, NO_AMP)
    assert loss.dim() == 0 and torch.isfinite(loss)
    _grads_finite(model.parameters())


@pytest.mark.parametrize("name", FEATURE)
def test_feature_method_batch_loss_is_finite_with_finite_gradients(name, tiny_backbone, tmp_path):
    cfg = _cfg(name, tiny_backbone, feature_storage=str(tmp_path))
    stage = FeatureStage(cfg, TrialContext(), torch.device("cpu"))
    stage.method.on_epoch_start(0)
    batch = next(iter(stage.batches(0)))
    loss = stage.method.batch_loss(batch)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    _grads_finite(stage.module.parameters())


@pytest.mark.parametrize("name", POST_HOC)
def test_post_hoc_rule_trains_nothing_and_gives_finite_logits(name, tiny_backbone, tmp_path):
    cfg = _cfg(name, tiny_backbone, feature_storage=str(tmp_path))
    stage = FeatureStage(cfg, TrialContext(), torch.device("cpu"))
    assert stage.optimizer is None and list(stage.batches(0)) == []
    assert not any(p.requires_grad for p in stage.module.parameters())
    for split in ("val", "test"):
        logits = stage.method.logits(split)
        assert logits.shape[1] == 4 and torch.isfinite(logits).all()


@pytest.mark.parametrize("name", list_methods())
def test_one_epoch_reads_declared_params_and_reports_every_metric(name, tiny_backbone, tmp_path):
    cfg = _cfg(name, tiny_backbone, feature_storage=str(tmp_path))
    recorder = RecordingParams(cfg.params)
    reports: list[dict] = []
    metrics = run_trial(TrialConfig(cfg.train, recorder), lambda m, ckpt: reports.append(m))
    assert recorder.read == set(type(cfg.params).model_fields), "declared vs read hyperparameters"
    assert [r["epoch"] for r in reports] == [1]
    for key in METRICS:
        assert key in metrics and math.isfinite(metrics[key]), key
    assert 0.0 <= metrics["test_top1"] <= 1.0
    assert len(metrics["test_per_class"]) == len(metrics["val_per_class"]) == 4


@pytest.mark.parametrize("name", list_methods())
def test_same_seed_same_metrics_and_resume_equals_a_straight_run(name, tiny_backbone, tmp_path):
    cfg = _cfg(name, tiny_backbone, epochs=2, feature_storage=str(tmp_path / "store"))
    straight = run_trial(cfg)
    assert _scalars(run_trial(cfg)) == _scalars(straight), "same seed, same metrics"
    ckpt = tmp_path / "ckpt"

    class Stop(Exception):
        pass

    def stop_after_first(metrics: dict, checkpoint: str | None) -> None:
        if metrics["epoch"] == 1:
            raise Stop

    with pytest.raises(Stop):
        run_trial(cfg, stop_after_first, TrialContext(checkpoint_dir=str(ckpt)))
    seen: list[int] = []
    resumed = run_trial(cfg, lambda m, c: seen.append(m["epoch"]),
                        TrialContext(checkpoint_dir=str(ckpt), resume_from=str(ckpt)))
    assert seen == [2]
    assert _scalars(resumed) == _scalars(straight)
    assert resumed["test_per_class"] == straight["test_per_class"]


def _stage(cfg: TrialConfig):
    body = FeatureStage if get_method(cfg.method).stage == "feature" else ImageStage
    return body(cfg, TrialContext(), torch.device("cpu"))


@pytest.mark.parametrize("name", list_methods())
def test_trained_state_round_trips_into_a_fresh_trial(name, tiny_backbone, tmp_path):
    """A fresh trial that loads a trained trial's checkpoint state evaluates exactly like it."""
    cfg = _cfg(name, tiny_backbone, feature_storage=str(tmp_path))
    trained = _stage(cfg)
    run_epochs(trained, cfg, TrialContext())
    buffer = io.BytesIO()
    torch.save(trained.state(), buffer)
    buffer.seek(0)
    fresh = _stage(cfg)
    fresh.load_state(torch.load(buffer, weights_only=True))
    assert _flat(fresh.method.state_dict()).keys() == _flat(trained.method.state_dict()).keys()
    for key, value in _flat(trained.method.state_dict()).items():
        assert torch.equal(torch.as_tensor(_flat(fresh.method.state_dict())[key]), torch.as_tensor(value)), key
    for split in ("val", "test"):
        assert fresh.evaluate(split) == trained.evaluate(split)


def _flat(state, prefix=""):
    if isinstance(state, dict):
        return {k2: v2 for k, v in state.items() for k2, v2 in _flat(v, f"{prefix}{k}.").items()}
    return {prefix: state}
