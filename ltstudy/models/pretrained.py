"""Backbones from timm and open_clip behind ltstudy's backbone interface.

``model=timm:NAME`` is any timm model (``timm.create_model(NAME, num_classes=0, **model_kwargs)``);
``model=open_clip:ARCH/TAG`` an open_clip CLIP model, of which ltstudy keeps the image tower as the backbone
and the text tower beside it (not a submodule: it is in no state dict and no optimiser) until the method
that needs it — LIFT's text-initialised classifier — has used it. ``model_kwargs`` go to the library's
constructor (a tiny ViT for tests: ``{img_size: 32, patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2}``;
for open_clip the config keys, e.g. ``vision_cfg`` and ``text_cfg``).

Every backbone has ``forward(x) -> (B, D)``, ``feature_dim``, ``stages``, and:

* ``preprocess``: the library's own preprocessing (:class:`ltstudy.data.Preprocess`: resolution, mean / std,
  interpolation, evaluation crop), which the data pipeline applies;
* ``extract(x, fmaps)``: the pooled feature and, for convolutional models pooled by averaging, the
  last-stage map (the feature cache's ``fmap``); a ViT's pooled feature is its class token (or a
  normed token average), which is no spatial mean of a map, so it has none;
* ``transformer_blocks()``: the encoder's blocks, where ``ltstudy.models.adapters`` inserts AdaptFormer,
  LoRA and visual prompts;
* ``encode_text(prompts)`` (open_clip): L2-normalised text features in the backbone's feature space.

Features: timm's pre-logits (``forward_head(pre_logits=True)``). open_clip ViTs, as in LIFT, give the
image tower's pooled, normed token *before* its projection into the joint space (width D = 768 for
ViT-B/16); text features are mapped into that space through the projection's transpose, as LIFT
initialises its classifier (``text @ proj.T``). open_clip towers whose projection cannot be separated
(a timm trunk, ModifiedResNet) give the joint-space embedding, where text features already live.

Weights: ``ltstudy.models.weights``. The library is imported when such a model is built or named.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ltstudy.data.preprocess import Preprocess
from ltstudy.errors import ConfigError, DataError
from ltstudy.models.weights import ModelName, parse_model_name, require


@dataclass
class BlockSlots:
    """A transformer block and the attribute names of its MLP branch: ``x + ls(mlp(norm(x)))``."""

    block: nn.Module
    norm: str
    mlp: str
    scale: str


def check_model_name(name: str) -> ModelName:
    """A ``timm:`` / ``open_clip:`` name the library knows (it is imported here); else one line."""
    spec = parse_model_name(name)
    lib = require(spec.library)
    if spec.library == "timm":
        if not lib.is_model(spec.arch):
            close = lib.list_models(f"*{spec.arch.split('_')[0]}*")[:5]
            raise ConfigError(f"timm has no model {spec.arch!r}" + (f"; similar: {', '.join(close)}" if close else ""))
    elif spec.arch not in lib.list_models():
        raise ConfigError(f"open_clip has no model {spec.arch!r}; see open_clip.list_models()")
    return spec


def _fit_error(name: str, path: str, exc: BaseException) -> DataError:
    """A state-dict mismatch as one line: the first mismatch torch reports."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    detail = next((ln for ln in lines[1:] if ln), lines[0] if lines else type(exc).__name__)
    return DataError(f"weights file {path} does not fit {name}: {detail[:300]}")


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A weights file as a flat state dict: ``.safetensors``, or a torch checkpoint (``state_dict`` / ``model``
    entries unwrapped, a ``module.`` prefix dropped); tensors only, loaded safely."""
    try:
        if path.endswith(".safetensors"):
            safetensors = require("safetensors")
            del safetensors
            from safetensors.torch import load_file

            state: Any = load_file(path, device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file
        first = next((ln for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        raise DataError(f"cannot read weights file {path}: {first.strip()[:200]}") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise DataError(f"weights file {path} holds no state dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def check_fits(name: str, path: str, model: nn.Module, state: dict[str, torch.Tensor],
               ignore: tuple[str, ...] = ()) -> None:
    """Every tensor of ``model`` is in ``state`` with its shape, and ``state`` holds nothing else (keys starting
    with one of ``ignore`` aside: a pretrained classifier ltstudy does not use); else one line."""
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in state.items() if not k.startswith(ignore)}
    wrong = [k for k in own if k in theirs and theirs[k] != own[k]]
    if wrong:
        k = wrong[0]
        raise DataError(f"weights file {path} does not fit {name}: {k} has shape {list(theirs[k])} in the file, "
                        f"{list(own[k])} in the model ({len(wrong)} tensor(s) of the wrong shape)")
    missing = [k for k in own if k not in theirs]
    if missing:
        raise DataError(f"weights file {path} does not fit {name}: it lacks {len(missing)} of the model's tensors "
                        f"(e.g. {missing[0]})")
    extra = [k for k in theirs if k not in own]
    if extra:
        raise DataError(f"weights file {path} does not fit {name}: it holds {len(extra)} tensor(s) the model does "
                        f"not have (e.g. {extra[0]})")


@contextlib.contextmanager
def _quiet_open_clip():
    """open_clip logs a root-logger warning for every model built without weights (ltstudy loads them itself)."""
    root = logging.getLogger()
    before = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(before)


class TimmBackbone(nn.Module):
    """A timm model without its classifier (``num_classes=0``)."""

    def __init__(self, model: nn.Module, name: str) -> None:
        super().__init__()
        self.model = model
        self.name = name
        self.feature_dim: int = int(model.num_features)
        timm = require("timm")
        cfg = timm.data.resolve_model_data_config(model)
        size = cfg["input_size"][-1]
        embed = getattr(model, "patch_embed", None)
        if embed is not None and getattr(embed, "img_size", None):  # a ViT built at another size
            size = int(embed.img_size[-1])
        self.preprocess = Preprocess(int(size), tuple(cfg["mean"]), tuple(cfg["std"]), cfg["interpolation"]
                                     if cfg["interpolation"] in ("bilinear", "bicubic", "nearest") else "bicubic",
                                     float(cfg["crop_pct"]))

    @property
    def stages(self) -> list[nn.Module]:
        blocks = getattr(self.model, "blocks", None)
        if blocks is not None:
            return list(blocks)
        return [getattr(self.model, f"layer{i}") for i in range(1, 5) if hasattr(self.model, f"layer{i}")]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The library's unpooled output: tokens (B, N, D) of a ViT, the last map (B, D, H, W) of a CNN."""
        return self.model.forward_features(x)

    def pool(self, raw: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(raw, pre_logits=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.forward_features(x))

    def extract(self, x: torch.Tensor, fmaps: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        raw = self.forward_features(x)
        pooled = self.pool(raw)
        if not fmaps:
            return pooled, None
        if raw.dim() != 4 or getattr(self.model, "global_pool", None) is None or \
                not torch.allclose(raw.mean((2, 3)), pooled, atol=1e-4, rtol=1e-4):
            raise ConfigError(f"feature maps (--fmaps, fsa) need a convolutional backbone whose feature is the "
                              f"spatial mean of its last map; {self.name} is not one")
        return pooled, raw

    def transformer_blocks(self) -> list[BlockSlots]:
        blocks = getattr(self.model, "blocks", None)
        if blocks is None or not all(hasattr(b, "norm2") and hasattr(b, "mlp") for b in blocks):
            raise ConfigError(f"{self.name} has no ViT blocks (norm2 -> mlp): adapters and prompts need a "
                              "vision transformer")
        return [BlockSlots(b, "norm2", "mlp", "ls2") for b in blocks]

    @property
    def token_dim(self) -> int:
        return int(self.model.embed_dim)

    @property
    def patch_area(self) -> int:
        k = self.model.patch_embed.proj.kernel_size
        return int(k[0] * k[1])

    @property
    def batch_first(self) -> bool:
        return True

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        raise ConfigError(f"{self.name} has no text tower (classifier initialisation from class names needs an "
                          "open_clip model; use init_head=class_mean)")

    def text_to_feature(self, text: torch.Tensor) -> torch.Tensor:
        raise ConfigError(f"{self.name} has no text tower")

    def drop_text(self) -> None:
        """No text tower to free."""


class OpenClipBackbone(nn.Module):
    """The image tower of an open_clip model; its text tower and tokenizer are kept beside it, not in it."""

    def __init__(self, clip: nn.Module, name: str, arch: str) -> None:
        super().__init__()
        self.name = name
        visual = clip.visual
        self.visual = visual
        open_clip = require("open_clip")
        proj = getattr(visual, "proj", None)
        self.separated = isinstance(visual, open_clip.transformer.VisionTransformer) and proj is not None
        if self.separated:  # LIFT's feature: the pooled token before the projection into the joint space
            self.register_buffer("projection", proj.detach().clone())
            visual.proj = None
            self.feature_dim = int(self.projection.shape[0])
        else:
            self.projection = None
            self.feature_dim = int(getattr(visual, "output_dim", None) or clip.text_projection.shape[-1])
        cfg = getattr(visual, "preprocess_cfg", {}) or {}
        size = cfg.get("size", visual.image_size)
        size = size[-1] if isinstance(size, (tuple, list)) else size
        interp = cfg.get("interpolation", "bicubic")
        self.preprocess = Preprocess(int(size), tuple(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)),
                                     tuple(cfg.get("std", open_clip.OPENAI_DATASET_STD)),
                                     interp if interp in ("bilinear", "bicubic", "nearest") else "bicubic", 1.0)
        self.__dict__["_clip"] = clip  # the text tower: not a submodule (no state dict, no optimiser)
        self.__dict__["_arch"] = arch

    @property
    def stages(self) -> list[nn.Module]:
        transformer = getattr(self.visual, "transformer", None)
        return list(transformer.resblocks) if transformer is not None else []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual(x)

    def extract(self, x: torch.Tensor, fmaps: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        if fmaps:
            raise ConfigError(f"feature maps (--fmaps, fsa) need a convolutional backbone whose feature is the "
                              f"spatial mean of its last map; {self.name} is not one")
        return self.visual(x), None

    def transformer_blocks(self) -> list[BlockSlots]:
        transformer = getattr(self.visual, "transformer", None)
        trunk = getattr(self.visual, "trunk", None)
        if transformer is not None:
            return [BlockSlots(b, "ln_2", "mlp", "ls_2") for b in transformer.resblocks]
        if trunk is not None and hasattr(trunk, "blocks"):
            return [BlockSlots(b, "norm2", "mlp", "ls2") for b in trunk.blocks]
        raise ConfigError(f"{self.name} has no transformer blocks: adapters and prompts need a vision transformer")

    @property
    def token_dim(self) -> int:
        transformer = getattr(self.visual, "transformer", None)
        if transformer is not None:
            return int(transformer.width)
        return int(self.visual.trunk.embed_dim)

    @property
    def patch_area(self) -> int:
        conv = getattr(self.visual, "conv1", None)
        k = conv.kernel_size if conv is not None else self.visual.trunk.patch_embed.proj.kernel_size
        return int(k[0] * k[1])

    @property
    def batch_first(self) -> bool:
        transformer = getattr(self.visual, "transformer", None)
        return bool(getattr(transformer, "batch_first", True))

    @torch.no_grad()
    def encode_text(self, prompts: list[str], chunk: int = 256) -> torch.Tensor:
        """L2-normalised text features of ``prompts`` in CLIP's joint space (:meth:`text_to_feature` maps them
        into the backbone's feature space)."""
        clip = self.__dict__.get("_clip")
        if clip is None:
            raise RuntimeError("the text tower was dropped")
        tokenizer = require("open_clip").get_tokenizer(self.__dict__["_arch"])
        device = next(self.visual.parameters()).device
        clip.to(device)
        was = clip.training
        clip.eval()
        try:
            parts = [clip.encode_text(tokenizer(prompts[i:i + chunk]).to(device)).float()
                     for i in range(0, len(prompts), chunk)]
        finally:
            clip.train(was)
        return F.normalize(torch.cat(parts), dim=-1)

    @torch.no_grad()
    def text_to_feature(self, text: torch.Tensor) -> torch.Tensor:
        """Joint-space text features in the backbone's feature space: through the projection's transpose for a
        ViT whose feature precedes its projection (LIFT's ``text @ proj.T``), as they are otherwise."""
        if self.projection is None:
            return text
        return text @ self.projection.to(text).t()

    def drop_text(self) -> None:
        """Free the text tower (it is only needed to initialise a classifier)."""
        clip = self.__dict__.pop("_clip", None)
        if clip is not None:
            for attr in ("transformer", "token_embedding", "ln_final", "text"):
                if hasattr(clip, attr):
                    setattr(clip, attr, None)


def build_pretrained(name: str, weights: str | None = None, model_kwargs: dict[str, Any] | None = None
                     ) -> TimmBackbone | OpenClipBackbone:
    """A timm or open_clip backbone with ``weights`` (a local file, checked tensor for tensor) or randomly
    initialised (``weights=None``)."""
    spec = check_model_name(name)
    kwargs = dict(model_kwargs or {})
    lib = require(spec.library)
    try:
        if spec.library == "timm":
            model = lib.create_model(spec.arch, pretrained=False, num_classes=0, **kwargs)
        else:
            quick = bool((lib.get_pretrained_cfg(spec.arch, spec.tag) or {}).get("quick_gelu")) if spec.tag else False
            with _quiet_open_clip():
                model = lib.create_model(spec.arch, pretrained=None, force_quick_gelu=quick, **kwargs)
    except (TypeError, ValueError, RuntimeError, KeyError, AssertionError) as exc:
        first = next((ln for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        raise ConfigError(f"cannot build {name} with model_kwargs {kwargs}: {first.strip()[:200]}") from None
    if weights is not None:
        state = read_state_dict(weights)
        if spec.library == "timm":
            head = model.pretrained_cfg.get("classifier") or "head"
            heads = tuple(f"{h}." for h in ([head] if isinstance(head, str) else head))
            check_fits(name, weights, model, state, ignore=heads)
            model.load_state_dict({k: v for k, v in state.items() if not k.startswith(heads)})
        else:
            state = lib.factory.convert_state_dict(model, state) if hasattr(lib.factory, "convert_state_dict") \
                else state
            if "logit_bias" not in state and getattr(model, "logit_bias", None) is not None:
                state["logit_bias"] = torch.zeros_like(model.logit_bias)
            check_fits(name, weights, model, state)
            try:
                model.load_state_dict(state)
            except RuntimeError as exc:
                raise _fit_error(name, weights, exc) from None
    if spec.library == "timm":
        return TimmBackbone(model, name)
    return OpenClipBackbone(model, name, spec.arch)


def meta_fits(name: str, weights: str, model_kwargs: dict[str, Any] | None = None) -> None:
    """Check a weights file against the model without building it in memory (on the ``meta`` device) and
    without loading the file's tensors (a safetensors header holds the shapes): the driver's check."""
    spec = check_model_name(name)
    if weights.endswith(".safetensors"):
        require("safetensors")
        from safetensors import safe_open

        try:
            with safe_open(weights, framework="pt", device="cpu") as f:
                shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}  # noqa: SIM118 - safe_open API
        except Exception as exc:  # noqa: BLE001 - not a safetensors file
            raise DataError(f"cannot read weights file {weights}: {str(exc).splitlines()[0][:200]}") from None
        fake = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    else:
        fake = read_state_dict(weights)
    with torch.device("meta"):
        lib = require(spec.library)
        if spec.library == "timm":
            model = lib.create_model(spec.arch, pretrained=False, num_classes=0, **(model_kwargs or {}))
            head = model.pretrained_cfg.get("classifier") or "head"
            check_fits(name, weights, model, fake, ignore=tuple(f"{h}." for h in ([head] if isinstance(head, str)
                                                                                  else head)))
        else:
            with _quiet_open_clip():
                model = lib.create_model(spec.arch, pretrained=None, device="meta", **(model_kwargs or {}))
            if "logit_bias" not in fake and getattr(model, "logit_bias", None) is not None:
                fake["logit_bias"] = torch.empty(model.logit_bias.shape, device="meta")
            check_fits(name, weights, model, fake)
