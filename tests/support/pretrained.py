"""Tiny timm and open_clip models built from configs with random weights (nothing is downloaded), and the
weights files the tests write for them (the file a hub download would leave)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: a ViT of two blocks at 16 px, patch 8 (4 patches + the class token), width 32
TINY_VIT = "timm:vit_tiny_patch16_224"
TINY_VIT_KWARGS: dict[str, Any] = {"img_size": 16, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
#: a CLIP of the same shape: image tower 2 blocks at 16 px, text tower 2 blocks of width 32 (CLIP's vocabulary,
#: so the bundled tokenizer works offline), joint space 16
TINY_CLIP = "open_clip:ViT-B-16"
TINY_CLIP_KWARGS: dict[str, Any] = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def tiny_vit_settings(**extra: Any) -> dict[str, Any]:
    return {"model": TINY_VIT, "model_kwargs": TINY_VIT_KWARGS, **extra}


def tiny_clip_settings(**extra: Any) -> dict[str, Any]:
    return {"model": TINY_CLIP, "model_kwargs": TINY_CLIP_KWARGS, **extra}


def write_timm_weights(path: Path, seed: int = 1, kwargs: dict[str, Any] | None = None, head: int = 0) -> Path:
    """The state dict of a randomly initialised tiny timm ViT as ``.safetensors`` (with a ``head`` of that many
    classes when ``head`` > 0, as a hub file has one); returns the path."""
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = timm.create_model(TINY_VIT.split(":", 1)[1], pretrained=False, num_classes=head,
                              **(kwargs or TINY_VIT_KWARGS))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def write_clip_weights(path: Path, seed: int = 1, kwargs: dict[str, Any] | None = None) -> Path:
    """The state dict of a randomly initialised tiny open_clip model (both towers) as a file: ``.safetensors``
    or a torch checkpoint by the suffix."""
    import open_clip
    import torch

    torch.manual_seed(seed)
    model = open_clip.create_model(TINY_CLIP.split(":", 1)[1], pretrained=None, **(kwargs or TINY_CLIP_KWARGS))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save({"state_dict": state}, path)
    return path
