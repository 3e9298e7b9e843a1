"""Pretrained backbones from timm and open_clip, built tiny from configs with random weights (no download):
the interface, the library's preprocessing, weights from a local file (and from the weights cache a hub
fetch fills), the wrong-shape / missing-file / no-internet lines, and the adapters' identities."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from ltstudy.errors import ConfigError, DataError
from ltstudy.models import build_backbone, build_model, param_count
from ltstudy.models.adapters import (
    AdaptFormer,
    add_adaptformer,
    add_lora,
    add_vpt,
    block_biases,
    freeze_backbone,
    trained_share,
)
from ltstudy.models.weights import (
    MANIFEST,
    cache_folder,
    fetch_weights,
    local_weights,
    parse_model_name,
    weights_digest,
    weights_source,
)

from support.pretrained import (
    TINY_CLIP,
    TINY_CLIP_KWARGS,
    TINY_VIT,
    TINY_VIT_KWARGS,
    write_clip_weights,
    write_timm_weights,
)


def _vit(**kw):
    torch.manual_seed(0)
    return build_backbone(TINY_VIT, model_kwargs=TINY_VIT_KWARGS, **kw)


def _clip(**kw):
    torch.manual_seed(0)
    return build_backbone(TINY_CLIP, model_kwargs=TINY_CLIP_KWARGS, **kw)


def test_names_parse_into_library_architecture_and_tag():
    assert parse_model_name("timm:vit_base_patch16_224.augreg_in21k").tag == "augreg_in21k"
    assert parse_model_name("open_clip:ViT-B-16/openai").arch == "ViT-B-16"
    assert parse_model_name("open_clip:ViT-B-16").tag is None
    with pytest.raises(ConfigError, match="names no architecture"):
        parse_model_name("timm:")
    assert weights_source("open_clip:ViT-B-16/openai", None).kind == "hub"
    assert weights_source("timm:vit_tiny_patch16_224", None).kind == "random"
    assert weights_source("timm:vit_tiny_patch16_224.augreg_in21k", "none").kind == "random"


def test_tiny_timm_vit_interface_and_its_own_preprocessing():
    bb = _vit().eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        f = bb(x)
        pooled, fmap = bb.extract(x)
    assert f.shape == (2, 32) and bb.feature_dim == 32 and fmap is None
    torch.testing.assert_close(pooled, f)
    pre = bb.preprocess
    assert pre.size == 16 and pre.mean == (0.5, 0.5, 0.5) and pre.interpolation == "bicubic" and pre.crop_pct == 0.9
    assert len(bb.transformer_blocks()) == 2 and len(bb.stages) == 2
    with pytest.raises(ConfigError, match="feature maps"):
        bb.extract(x, fmaps=True)


def test_tiny_open_clip_has_both_towers_the_text_one_outside_the_state_dict():
    bb = _clip().eval()
    assert bb.separated and bb.feature_dim == 32  # the width before the projection (LIFT's feature)
    assert not any(k.startswith(("transformer.", "token_embedding")) for k in bb.state_dict())
    assert bb.preprocess.size == 16 and bb.preprocess.mean[0] == pytest.approx(0.48145466)
    with torch.no_grad():
        assert bb(torch.randn(2, 3, 16, 16)).shape == (2, 32)
    text = bb.encode_text(["a photo of a cat.", "a photo of a dog."])
    assert text.shape == (2, 16)
    torch.testing.assert_close(text.norm(dim=1), torch.ones(2))
    torch.testing.assert_close(bb.text_to_feature(text), text @ bb.projection.t())
    bb.drop_text()
    with pytest.raises(RuntimeError, match="dropped"):
        bb.encode_text(["x"])


def test_timm_weights_load_from_a_local_safetensors_file(tmp_path):
    """The hub file's layout (with its classifier) loads into the head-less backbone, tensor for tensor."""
    path = write_timm_weights(tmp_path / "model.safetensors", seed=3, head=7)
    from safetensors.torch import load_file

    expected = load_file(str(path))
    bb = _vit(pretrained=str(path))
    for key, value in bb.model.state_dict().items():
        assert torch.equal(value, expected[key]), key
    assert "head.weight" in expected  # left out: ltstudy puts its own classifier on top
    other = _vit()  # random init differs
    assert not torch.equal(other.model.state_dict()["blocks.0.attn.qkv.weight"], expected["blocks.0.attn.qkv.weight"])


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_open_clip_weights_load_from_a_local_file(tmp_path, suffix):
    path = write_clip_weights(tmp_path / f"open_clip_model{suffix}", seed=5)
    bb = _clip(pretrained=str(path))
    state = torch.load(path, weights_only=True)["state_dict"] if suffix == ".pt" else None
    if state is None:
        from safetensors.torch import load_file

        state = load_file(str(path))
    assert torch.equal(bb.visual.conv1.weight, state["visual.conv1.weight"])
    assert torch.equal(bb.projection, state["visual.proj"])
    # and the text tower came with it: the token embedding is the file's
    assert torch.equal(bb.__dict__["_clip"].token_embedding.weight, state["token_embedding.weight"])


def test_wrong_shape_missing_and_extra_tensors_are_one_line(tmp_path):
    wide = write_timm_weights(tmp_path / "wide.safetensors", kwargs={**TINY_VIT_KWARGS, "embed_dim": 48})
    with pytest.raises(DataError, match=r"does not fit .*has shape \[.*48.*\] in the file") as info:
        _vit(pretrained=str(wide))
    assert "\n" not in str(info.value)
    shallow = write_timm_weights(tmp_path / "shallow.safetensors", kwargs={**TINY_VIT_KWARGS, "depth": 1})
    with pytest.raises(DataError, match="lacks .* of the model's tensors"):
        _vit(pretrained=str(shallow))
    with pytest.raises(DataError, match="not found"):
        _vit(pretrained=str(tmp_path / "none.safetensors"))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(DataError, match="cannot read weights file"):
        _vit(pretrained=str(garbage))


def test_the_driver_check_reads_shapes_without_building_the_model(tmp_path):
    from ltstudy.models.pretrained import meta_fits

    good = write_clip_weights(tmp_path / "good.safetensors")
    meta_fits(TINY_CLIP, str(good), TINY_CLIP_KWARGS)
    bad_kwargs = {**TINY_CLIP_KWARGS, "embed_dim": 24}
    with pytest.raises(DataError, match=r"text_projection has shape \[32, 16\] in the file, \[32, 24\]"):
        meta_fits(TINY_CLIP, str(good), bad_kwargs)


def _fill_cache(cache, name: str, tag: str, source) -> str:
    """What fetch_weights leaves after a download: the file and its manifest in the tag's folder."""
    folder = cache_folder(cache, parse_model_name(name), tag)
    folder.mkdir(parents=True)
    target = folder / source.name
    target.write_bytes(source.read_bytes())
    (folder / MANIFEST).write_text(json.dumps({"file": source.name, "bytes": target.stat().st_size,
                                               "sha256": weights_digest(target)}))
    return str(target)


def test_a_hub_tag_loads_from_the_cache_a_fetch_filled_and_is_never_downloaded_by_a_trial(tmp_path):
    src = write_timm_weights(tmp_path / "model.safetensors", seed=4, head=3)
    cache = tmp_path / "weights"
    name = f"{TINY_VIT}.augreg_in21k"
    with pytest.raises(ConfigError, match="not in the cache"):  # a trial never fetches
        local_weights(name, None, cache)
    cached = _fill_cache(cache, name, "augreg_in21k", src)
    assert local_weights(name, None, cache) == cached
    assert fetch_weights(name, None, cache) == cached  # the driver finds it: nothing to download
    torch.manual_seed(0)
    bb = build_backbone(name, model_kwargs=TINY_VIT_KWARGS, weights_cache=str(cache))
    from safetensors.torch import load_file

    assert torch.equal(bb.model.pos_embed, load_file(cached)["pos_embed"])


def test_no_internet_is_one_line(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # as on a cluster without internet: no request made
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in ("timm:vit_tiny_patch16_224.augreg_in21k", "open_clip:ViT-B-16/openai"):
        with pytest.raises(ConfigError, match="cannot fetch the weights of") as info:
            fetch_weights(name, None, tmp_path / "weights")
        assert "\n" not in str(info.value) and "pretrained=FILE" in str(info.value)
    assert not any((tmp_path / "weights").rglob("*.safetensors"))  # nothing half-written stays


def test_unknown_tag_and_unknown_model_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="no pretrained tag 'nope'"):
        fetch_weights("open_clip:ViT-B-16/nope", None, tmp_path)
    with pytest.raises(ConfigError, match="timm has no pretrained tag 'nope' for vit_base_patch16_224; tags: "):
        fetch_weights("timm:vit_base_patch16_224.nope", None, tmp_path)
    assert not any(tmp_path.iterdir())  # no folder left behind
    from ltstudy.models.pretrained import check_model_name

    with pytest.raises(ConfigError, match="timm has no model"):
        check_model_name("timm:vit_no_such_model")
    with pytest.raises(ConfigError, match="open_clip has no model"):
        check_model_name("open_clip:ViT-Q-99")


@pytest.mark.parametrize("make", [_vit, _clip], ids=["timm", "open_clip"])
def test_adaptformer_at_initialisation_leaves_the_encoder_unchanged(make):
    """The up-projection starts at zero, so the branch adds nothing; once it is not zero it does."""
    bb = make().eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        before = bb(x)
        adapters = add_adaptformer(bb, bottleneck=4)
        after = bb(x)
    assert len(adapters) == 2 and all(isinstance(a, AdaptFormer) for a in adapters)
    assert all(torch.equal(a.up.weight, torch.zeros_like(a.up.weight)) for a in adapters)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    with torch.no_grad():
        adapters[0].up.weight.normal_()
        assert not torch.allclose(bb(x), before)


@pytest.mark.parametrize("make", [_vit, _clip], ids=["timm", "open_clip"])
def test_lora_starts_at_the_encoder_and_trains_only_its_factors(make):
    bb = make().eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        before = bb(x)
    freeze_backbone(bb)
    add_lora(bb, rank=2)
    with torch.no_grad():
        torch.testing.assert_close(bb(x), before)
    trainable = [n for n, p in bb.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


@pytest.mark.parametrize("deep", [False, True])
def test_visual_prompts_join_attention_and_leave_the_sequence_length(deep):
    bb = _vit().eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        before, tokens = bb(x), bb.forward_features(x).shape
    prompts = add_vpt(bb, length=3, deep=deep)
    with torch.no_grad():
        after = bb(x)
        assert bb.forward_features(x).shape == tokens  # removed after the last block
    assert prompts.prompts.shape == (2 if deep else 1, 3, 32)
    assert not torch.allclose(after, before)  # prompts take part in attention from the start (VPT, LIFT)


def test_bias_tuning_and_the_trained_share():
    net = build_model(TINY_VIT, 5, model_kwargs=TINY_VIT_KWARGS)
    freeze_backbone(net.backbone)
    for b in block_biases(net.backbone):
        b.requires_grad_(True)
    trained, total = trained_share(net)
    biases = sum(b.numel() for b in block_biases(net.backbone))
    assert trained == biases + 32 * 5 + 5 and total == param_count(net)


def test_models_that_have_no_vit_blocks_refuse_adapters():
    bb = build_backbone("timm:resnet18")
    with pytest.raises(ConfigError, match="no ViT blocks"):
        add_adaptformer(bb, 4)
    with torch.no_grad():
        f, m = bb.eval().extract(torch.randn(1, 3, 32, 32), fmaps=True)  # a CNN has maps: their mean is f
    torch.testing.assert_close(m.mean((2, 3)), f)


def test_text_features_map_through_the_projection_transpose():
    bb = _clip()
    text = F.normalize(torch.randn(4, 16), dim=1)
    torch.testing.assert_close(bb.text_to_feature(text), text @ bb.projection.t())
