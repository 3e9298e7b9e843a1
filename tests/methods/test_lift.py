"""LIFT on tiny random models built from configs (no download): one epoch end to end on the CIFAR subset
from a weights file the test writes, the text-initialised head against open_clip computed by hand, the
class-mean head, what is trained and what stays frozen, LIFT's adapter width, and the refusals."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ltstudy.config import check_runnable, load_data, resolve_config
from ltstudy.errors import ConfigError
from ltstudy.methods.lift import lift_adapter_dim
from ltstudy.models.adapters import AdaptFormer
from ltstudy.train import TrialContext, run_trial
from ltstudy.train.image import ImageStage, build_method

from support.pretrained import (
    TINY_CLIP,
    TINY_CLIP_KWARGS,
    tiny_clip_settings,
    tiny_vit_settings,
    write_clip_weights,
)

TINY_DATA = {"dataset": "synthetic", "image_size": 8, "synthetic_classes": 4, "imbalance": 20, "val_per_class": 5,
             "batch_size": 32, "eval_batch_size": 64, "device": "cpu", "epochs": 1}


def _cfg(**extra):
    return resolve_config({"method": "lift", **TINY_DATA, **tiny_clip_settings(), **extra})


def test_lift_trains_one_epoch_end_to_end_on_the_cifar_subset(shared_data, tmp_path, one_thread):
    """The published recipe (AdaptFormer, text head, LA loss, random resized crop to the model's side, the
    five-crop ensemble) from a weights file, on CIFAR-10-LT; the frozen encoder keeps the file's weights."""
    weights = write_clip_weights(tmp_path / "open_clip_model.safetensors", seed=7)
    cfg = resolve_config({"method": "lift", "dataset": "cifar10-lt", "data_root": str(shared_data), "epochs": 1,
                          "batch_size": 128, "eval_batch_size": 256, "device": "cpu",
                          **tiny_clip_settings(pretrained=str(weights))})
    check_runnable(cfg)
    assert cfg.train.random_resized_crop and cfg.params.tte and cfg.train.lr == 0.01
    seen = []
    metrics = run_trial(cfg, lambda m, c: seen.append(m), TrialContext(checkpoint_dir=str(tmp_path / "run")))
    assert [m["epoch"] for m in seen] == [1]
    for key in ("val_top1", "test_top1", "val_ece", "test_ece", "test_nll", "test_ece_few"):
        assert 0.0 <= metrics[key] <= 1.0 or key == "test_nll", key
    assert sum(metrics["test_reliability"]["count"]) == len(load_data(cfg).test)  # every test image once
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["model"]
    from safetensors.torch import load_file

    file = load_file(str(weights))
    assert torch.equal(state["backbone.visual.conv1.weight"], file["visual.conv1.weight"])  # frozen
    ups = [k for k in state if k.endswith("adapter.up.weight")]
    assert len(ups) == 2 and all(state[k].abs().sum() > 0 for k in ups)  # trained away from zero


def test_the_head_starts_at_the_normalised_text_features_computed_by_open_clip(tmp_path):
    """By hand with open_clip: tokenize "a photo of a class k.", encode, normalise, map through the image
    projection's transpose, normalise: the head's rows."""
    import open_clip

    weights = write_clip_weights(tmp_path / "w.safetensors", seed=2)
    cfg = _cfg(pretrained=str(weights))
    data = load_data(cfg)
    net = build_method(cfg, data, torch.device("cpu")).build_model()
    ref = open_clip.create_model(TINY_CLIP.split(":")[1], pretrained=str(weights), **TINY_CLIP_KWARGS).eval()
    tokens = open_clip.get_tokenizer(TINY_CLIP.split(":")[1])([f"a photo of a {c}." for c in data.class_names])
    assert data.class_names[0] == "class_0"
    with torch.no_grad():
        text = F.normalize(ref.encode_text(tokens), dim=-1)
        expected = F.normalize(text @ ref.visual.proj.t(), dim=-1)
    torch.testing.assert_close(F.normalize(net.head.weight, dim=1), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(net.head.weight.norm(dim=1), torch.ones(4))
    assert float(net.head.scale) == 25.0


def test_the_prompt_ensemble_averages_normalised_template_features(tmp_path):
    import open_clip
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    weights = write_clip_weights(tmp_path / "w.safetensors", seed=2)
    cfg = _cfg(pretrained=str(weights), prompt="ensemble")
    data = load_data(cfg)
    net = build_method(cfg, data, torch.device("cpu")).build_model()
    ref = open_clip.create_model(TINY_CLIP.split(":")[1], pretrained=str(weights), **TINY_CLIP_KWARGS).eval()
    tok = open_clip.get_tokenizer(TINY_CLIP.split(":")[1])
    with torch.no_grad():
        every = tok([t(c) for t in OPENAI_IMAGENET_TEMPLATES for c in data.class_names])
        per = F.normalize(ref.encode_text(every), dim=-1).view(len(OPENAI_IMAGENET_TEMPLATES), 4, -1)
        expected = F.normalize(per.mean(0) @ ref.visual.proj.t(), dim=-1)
    torch.testing.assert_close(F.normalize(net.head.weight, dim=1), expected, rtol=1e-4, atol=1e-5)


def test_a_vit_without_text_starts_from_class_means():
    cfg = resolve_config({"method": "lift", **TINY_DATA, **tiny_vit_settings()})
    data = load_data(cfg)
    method = build_method(cfg, data, torch.device("cpu"))
    torch.manual_seed(0)
    net = method.build_model()
    # by hand: the frozen encoder (adapters are zero at initialisation) on the centre crops of the train set
    from ltstudy.data import make_loader

    sums = torch.zeros(4, 32)
    with torch.no_grad():
        for x, y in make_loader(data, "train", batch_size=64, device="cpu", train=False,
                                preprocess=net.backbone.preprocess):
            sums.index_add_(0, y, net.backbone.eval()(x))
    expected = F.normalize(sums / data.class_counts[:, None].float(), dim=1)
    torch.testing.assert_close(F.normalize(net.head.weight, dim=1), expected, rtol=1e-4, atol=1e-5)


def test_only_the_adapters_prompts_biases_and_head_train():
    cfg = _cfg(lora=True, vpt="shallow", bias_tuning=True)
    stage = ImageStage(cfg, TrialContext(), torch.device("cpu"))
    trained = {n for n, p in stage.module.named_parameters() if p.requires_grad}
    assert "head.weight" in trained and "backbone.prompts.prompts" in trained
    assert any("lora_A" in n for n in trained) and any(".adapter." in n for n in trained)
    assert any(n.endswith("bias") and "adapter" not in n and "lora" not in n for n in trained)
    frozen = {n: p.detach().clone() for n, p in stage.module.named_parameters() if not p.requires_grad}
    assert "backbone.visual.conv1.weight" in frozen and "backbone.visual.positional_embedding" in frozen
    stage.batches(0)
    for batch in stage.loader:
        stage.step(batch)
        break
    for n, p in stage.module.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_adaptformer_width_follows_lift_and_can_be_set():
    assert [lift_adapter_dim(c, 12) for c in (100, 1000, 365, 8142, 10)] == [4, 32, 8, 256, 1]
    stage = ImageStage(_cfg(adapter_dim=8), TrialContext(), torch.device("cpu"))
    adapters = [m for m in stage.module.modules() if isinstance(m, AdaptFormer)]
    assert len(adapters) == 2 and adapters[0].down.out_features == 8
    default = ImageStage(_cfg(), TrialContext(), torch.device("cpu"))
    assert [m for m in default.module.modules() if isinstance(m, AdaptFormer)][0].down.out_features == 1  # 4/(2*2)


def test_test_time_crops_and_the_eval_crop():
    stage = ImageStage(_cfg(), TrialContext(), torch.device("cpu"))
    pre = stage.eval_kw["preprocess"]
    assert pre.eval_crops == 5 and pre.expand == 24 and pre.size == 16 and pre.crop_pct == 0.875
    *views, y = next(iter(stage.val_loader))
    assert len(views) == 5 and views[0].shape[-1] == 16
    single = ImageStage(_cfg(tte=False), TrialContext(), torch.device("cpu"))
    assert single.eval_kw["preprocess"].eval_crops == 1


def test_refusals_before_any_trial(tmp_path):
    with pytest.raises(ConfigError, match="lift fine-tunes a pretrained vision transformer"):
        check_runnable(resolve_config({"method": "lift", **TINY_DATA, "model": "resnet32"}))
    with pytest.raises(ConfigError, match="needs a CLIP text tower"):
        check_runnable(resolve_config({"method": "lift", **TINY_DATA, **tiny_vit_settings(init_head="text_feat")}))
    with pytest.raises(ConfigError, match="class_names=FILE"):
        check_runnable(resolve_config({"method": "lift", "dataset": "filelist", **tiny_clip_settings()}))
    from ltstudy.errors import DataError

    with pytest.raises(DataError, match="class-names file .* not found"):
        check_runnable(resolve_config({"method": "lift", "dataset": "filelist", "class_names": str(tmp_path / "x"),
                                       **tiny_clip_settings()}))
