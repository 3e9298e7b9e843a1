"""Parameter-efficient fine-tuning of a vision transformer: AdaptFormer, LoRA, visual prompts, bias tuning.

All four act on the blocks a pretrained backbone lists (``transformer_blocks()``, ``ltstudy.models.pretrained``)
and leave the backbone's output unchanged at initialisation except VPT, whose prompts take part in
attention from the start (as in VPT and LIFT):

* **AdaptFormer** (Chen et al., NeurIPS 2022), as LIFT uses it: a bottleneck branch parallel to each block's
  MLP, ``x + MLP(LN(x)) + s * up(ReLU(down(LN'(x))))`` with its own LayerNorm, a learnable scale ``s``
  (1 at start, or a fixed value) and a zero-initialised up-projection, so the branch adds nothing until
  it is trained. peft has no parallel-adapter tuner, so this one is ltstudy's (a few lines).
* **LoRA** through ``peft`` (``inject_adapter_in_model``): on timm's fused ``qkv`` projection, and on
  open_clip's ``nn.MultiheadAttention`` (its input projection and its output projection), with peft's
  initialisation (A Kaiming-uniform, B zero) and LIFT's scaling 1 / r (``lora_alpha = 1``).
* **VPT** (Jia et al., ECCV 2022; LIFT's ``vpt_shallow`` / ``vpt_deep``): ``length`` learnable tokens appended
  to the sequence before the first block (shallow) or replacing the previous block's prompts before every
  block (deep), removed after the last block so the pooling sees the original tokens.
* **Bias tuning** (BitFit): the blocks' biases become trainable.

:func:`freeze_backbone` freezes everything else.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ltstudy.errors import ConfigError
from ltstudy.models.weights import require


class AdaptFormer(nn.Module):
    """``s * up(ReLU(down(LN(x))))`` with a zero-initialised ``up``: zero at initialisation."""

    def __init__(self, dim: int, bottleneck: int, scale: float | None = None) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(dim)
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        if scale is None:
            self.scale = nn.Parameter(torch.ones(1))
        else:
            self.register_buffer("scale", torch.tensor([float(scale)]))
        nn.init.kaiming_normal_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(torch.relu(self.down(self.ln(x)))) * self.scale


class ParallelAdapter(nn.Module):
    """A block's MLP branch with an AdaptFormer beside it: ``ls(mlp(norm(x))) + adapter(x)``.

    It takes the place of the block's ``mlp`` while its ``norm`` and layer scale become identities, so the
    block computes ``x + mlp_branch(x) + adapter(x)`` with every pretrained module where it was.
    """

    def __init__(self, norm: nn.Module, mlp: nn.Module, scale: nn.Module, adapter: AdaptFormer) -> None:
        super().__init__()
        self.norm, self.mlp, self.scale, self.adapter = norm, mlp, scale, adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale(self.mlp(self.norm(x))) + self.adapter(x)


def add_adaptformer(backbone: nn.Module, bottleneck: int, scale: float | None = None,
                    blocks: Sequence[int] | None = None) -> list[AdaptFormer]:
    """Put an AdaptFormer beside the MLP of each block (or of the ``blocks`` indices); returns them."""
    slots = backbone.transformer_blocks()
    chosen = range(len(slots)) if blocks is None else blocks
    adapters = []
    for i in chosen:
        s = slots[i]
        norm, mlp = getattr(s.block, s.norm), getattr(s.block, s.mlp)
        ls = getattr(s.block, s.scale) if hasattr(s.block, s.scale) else nn.Identity()
        dim = backbone.token_dim
        adapter = AdaptFormer(dim, bottleneck, scale).to(next(mlp.parameters()).device)
        setattr(s.block, s.mlp, ParallelAdapter(norm, mlp, ls, adapter))
        setattr(s.block, s.norm, nn.Identity())
        if hasattr(s.block, s.scale):
            setattr(s.block, s.scale, nn.Identity())
        adapters.append(adapter)
    return adapters


def add_lora(backbone: nn.Module, rank: int, alpha: float = 1.0) -> nn.Module:
    """LoRA on every block's attention projections, through peft; returns the backbone (changed in place)."""
    require("peft")
    from peft import LoraConfig, inject_adapter_in_model

    names = {id(s.block): None for s in backbone.transformer_blocks()}
    targets = []
    for name, module in backbone.named_modules():
        parent = name.rpartition(".")[0]
        owner = backbone.get_submodule(parent) if parent else backbone
        if id(owner) not in names:
            continue
        if isinstance(module, nn.MultiheadAttention) or (isinstance(module, nn.Linear) and name.endswith("attn.qkv")):
            targets.append(name)
        elif name.endswith(".attn") and hasattr(module, "qkv") and isinstance(module.qkv, nn.Linear):
            targets.append(f"{name}.qkv")
    targets = sorted(set(targets))
    if not targets:
        raise ConfigError(f"{getattr(backbone, 'name', 'the backbone')}: no attention projection for LoRA "
                          "(timm attn.qkv or nn.MultiheadAttention)")
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none", target_modules=targets)
    inject_adapter_in_model(config, backbone)
    return backbone


class VisualPrompts(nn.Module):
    """VPT prompts and the hooks that put them into the token sequence."""

    def __init__(self, backbone: nn.Module, length: int, deep: bool) -> None:
        super().__init__()
        slots = backbone.transformer_blocks()
        layers = len(slots) if deep else 1
        dim = backbone.token_dim
        bound = math.sqrt(6.0 / float(3 * backbone.patch_area + dim))  # VPT's (and LIFT's) initialisation
        self.prompts = nn.Parameter(torch.empty(layers, length, dim).uniform_(-bound, bound))
        self.deep = deep
        self.batch_first = backbone.batch_first
        self.length = length
        self._tokens: int | None = None
        blocks = [s.block for s in slots]
        self._handles = [blocks[i].register_forward_pre_hook(self._before(i)) for i in range(layers)]
        self._handles.append(blocks[-1].register_forward_hook(self._after))

    def _before(self, index: int):
        def hook(module: nn.Module, args: tuple) -> tuple:
            x, rest = args[0], args[1:]
            if not self.batch_first:
                x = x.transpose(0, 1)
            if index == 0:
                self._tokens = x.shape[1]
            x = x[:, : self._tokens]
            prompt = self.prompts[index].to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
            x = torch.cat([x, prompt], dim=1)
            return (x if self.batch_first else x.transpose(0, 1), *rest)

        return hook

    def _after(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        if self.batch_first:
            return out[:, : self._tokens]
        return out[: self._tokens]


def add_vpt(backbone: nn.Module, length: int, deep: bool) -> VisualPrompts:
    return VisualPrompts(backbone, length, deep)


def block_biases(backbone: nn.Module) -> list[nn.Parameter]:
    """The biases of the transformer blocks (BitFit)."""
    out = []
    for s in backbone.transformer_blocks():
        out += [p for name, p in s.block.named_parameters() if name.endswith("bias")]
    return out


def freeze_backbone(backbone: nn.Module) -> None:
    for p in backbone.parameters():
        p.requires_grad_(False)


def trained_share(model: nn.Module) -> tuple[int, int]:
    """(trainable parameters, all parameters)."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
