"""Backbone shapes, parameter counts and compatibility (functional_call, SyncBN, channels_last)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.func import functional_call

import ltstudy.models as models
from ltstudy.models import build_backbone, build_model, list_heads, list_models, param_count

CIFAR = ["resnet32", "resnet32_w4", "resnet34_cifar"]
IMAGENET = ["resnet50", "resnext50_32x4d"]
FEATURE_DIM = {
    "resnet32": 64,
    "resnet32_w4": 256,
    "resnet34_cifar": 512,
    "resnet50": 2048,
    "resnext50_32x4d": 2048,
}
# (input side, final map side)
SIDES = {
    "resnet32": (32, 8),
    "resnet32_w4": (32, 8),
    "resnet34_cifar": (32, 4),
    "resnet50": (64, 2),
    "resnext50_32x4d": (64, 2),
}
NUM_STAGES = {"resnet32": 3, "resnet32_w4": 3, "resnet34_cifar": 4, "resnet50": 4, "resnext50_32x4d": 4}


def test_registry_lists_every_model():
    assert set(list_models()) == set(CIFAR + IMAGENET)
    assert list_heads() == ["linear", "normed", "cosine", "scaled_cosine"]


@pytest.mark.parametrize("name", CIFAR + IMAGENET)
def test_backbone_interface(name):
    torch.manual_seed(0)
    bb = build_backbone(name).eval()
    side, out_side = SIDES[name]
    x = torch.randn(2, 3, side, side)
    with torch.no_grad():
        fmap = bb.forward_features(x)
        pooled = bb(x)
    d = FEATURE_DIM[name]
    assert bb.feature_dim == d
    assert fmap.shape == (2, d, out_side, out_side)
    assert pooled.shape == (2, d)
    torch.testing.assert_close(pooled, fmap.mean(dim=(2, 3)))
    assert isinstance(bb.stages, nn.ModuleList) and len(bb.stages) == NUM_STAGES[name]
    assert not any(isinstance(m, nn.Linear) for m in bb.modules()), "the backbone must not carry an fc"


@pytest.mark.parametrize("name", IMAGENET)
def test_imagenet_classifier_forward(name):
    model = build_model(name, num_classes=7).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 7) and torch.isfinite(out).all()


def test_param_counts():
    assert 450_000 <= param_count(build_model("resnet32", 10)) <= 470_000
    assert 20_000_000 <= param_count(build_model("resnet34_cifar", 10)) <= 22_000_000


def test_param_count_trainable_only():
    m = build_model("resnet32", 10)
    for p in m.backbone.parameters():
        p.requires_grad_(False)
    assert param_count(m, trainable_only=True) == 64 * 10 + 10


def test_stage_hook_sees_last_two_stages():
    bb = build_backbone("resnet32").eval()
    seen = {}
    hooks = [
        bb.stages[i].register_forward_hook(lambda m, i_, o, k=i: seen.__setitem__(k, o.shape))
        for i in (-1, -2)
    ]
    with torch.no_grad():
        bb(torch.randn(1, 3, 32, 32))
    for h in hooks:
        h.remove()
    assert seen == {-1: (1, 64, 8, 8), -2: (1, 32, 16, 16)}


def test_functional_call_with_perturbed_params_changes_output():
    torch.manual_seed(0)
    model = build_model("resnet32", 10).eval()
    x = torch.randn(2, 3, 32, 32)
    params = dict(model.named_parameters())
    with torch.no_grad():
        base = model(x)
        same = functional_call(model, params, (x,))
        perturbed = {
            k: v + 0.05 * torch.randn_like(v) if k.startswith("backbone.stages.0") else v
            for k, v in params.items()
        }
        changed = functional_call(model, perturbed, (x,))
    torch.testing.assert_close(same, base)
    assert not torch.allclose(changed, base)


def test_virtual_sgd_step_backpropagates_to_original_params():
    """MetaSAug's pattern: a differentiable SGD step, then a loss on the stepped weights."""
    torch.manual_seed(0)
    model = build_model("resnet32", 4, head="normed")
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    loss = nn.functional.cross_entropy(functional_call(model, (params, buffers), (x,)) * 30, y)
    grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
    stepped = {k: v - 0.1 * g for (k, v), g in zip(params.items(), grads, strict=True)}
    meta_loss = nn.functional.cross_entropy(functional_call(model, (stepped, buffers), (x,)) * 30, y)
    meta_loss.backward()
    first_conv = model.backbone.conv1.weight
    assert first_conv.grad is not None and torch.isfinite(first_conv.grad).all()
    assert first_conv.grad.abs().sum() > 0


def test_sync_batchnorm_conversion():
    model = nn.SyncBatchNorm.convert_sync_batchnorm(build_model("resnet32", 10))
    assert not any(type(m) is nn.BatchNorm2d for m in model.modules())
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in model.modules()) > 0
    assert isinstance(model.backbone.stages, nn.ModuleList)
    model.eval()  # SyncBatchNorm needs a process group only in training mode
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("name", ["resnet32", "resnet50"])
def test_channels_last_matches_contiguous(name):
    torch.manual_seed(0)
    model = build_model(name, 5).eval()
    side = SIDES[name][0]
    x = torch.randn(2, 3, side, side)
    with torch.no_grad():
        ref = model(x)
        model = model.to(memory_format=torch.channels_last)
        out = model(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


#: optional libraries of the pretrained backbones: imported inside functions only, so a ResNet run and
#: ``ltstudy --help`` never load them
LAZY = {"timm", "open_clip", "peft", "safetensors", "huggingface_hub"}


def test_models_layer_imports_torch_at_module_level_and_the_hub_libraries_lazily():
    pkg = Path(models.__file__).parent
    allowed_roots = {"__future__", "collections", "copy", "math", "typing", "torch", "torchvision", "contextlib",
                     "dataclasses", "logging", "hashlib", "json", "os", "shutil", "uuid", "pathlib", "importlib",
                     "re"}
    for path in pkg.glob("*.py"):
        tree = ast.parse(path.read_text())
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            for n in names:
                root = n.split(".")[0]
                if root in LAZY:
                    assert id(node) not in top, f"{path.name} imports {n} at module level"
                    continue
                ok = root in allowed_roots or n == "ltstudy.errors" or n.startswith(("ltstudy.models",
                                                                                       "ltstudy.data"))
                assert ok, f"{path.name} imports {n}"
