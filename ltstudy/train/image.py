"""The image trial body: data, network and method of an end-to-end trial, as a :class:`Stage`."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import nn

from ltstudy.config import DATA_KEYS, PATH_KEYS, TrialConfig, load_data
from ltstudy.data import LIST_DATASETS, AugmentSpec, LTData, Preprocess, make_loader
from ltstudy.errors import ConfigError
from ltstudy.methods import ImageMethod, MethodContext, get_method
from ltstudy.metrics import evaluation_from, summarise
from ltstudy.runtime import make_amp
from ltstudy.train.checkpoint import load_checkpoint
from ltstudy.train.loop import Stage, TrialContext


def check_stage1(cfg: TrialConfig) -> None:
    """An image trial that starts from a stage-1 network (``backbone``, MetaSAug's classifier-only recipe)
    must run on that network's data, so its validation and test images are ones the network never trained
    on. In memory every data key draws the split; file lists fix theirs (the imbalance, profile and seed
    settings do not apply; the seed only draws the carved sets from the val list)."""
    t = cfg.train
    if not t.backbone:
        return
    state = load_checkpoint(t.backbone, torch.device("cpu"))
    if state is None or "config" not in state:
        raise ConfigError(f"stage-1 checkpoint not found (or not an ltstudy checkpoint): {t.backbone}")
    own = state["config"]
    keys = ("dataset", "image_size") if t.dataset in LIST_DATASETS else DATA_KEYS
    for key in keys:
        if key in PATH_KEYS:
            continue
        if key in own and own[key] != getattr(t, key):
            raise ConfigError(f"{key}={getattr(t, key)!r} differs from the stage-1 network's {key}={own[key]!r} "
                              f"({t.backbone}); a trial that starts from it must use its data split")


def build_method(cfg: TrialConfig, data: LTData, device: torch.device, rank: int = 0,
                 world_size: int = 1) -> ImageMethod:
    t = cfg.train

    def loader(split: str, **kw: Any) -> Any:
        kw.setdefault("device", device)
        kw.setdefault("seed", t.seed)
        return make_loader(data, split, **kw)

    ctx = MethodContext(
        num_classes=data.num_classes, class_counts=data.class_counts.to(device), epochs=t.epochs,
        device=device, model_name=t.model, train=t, data=data, make_loader=loader, rank=rank,
        world_size=world_size, model_options=t.backbone_options(),
    )
    return get_method(t.method)(cfg.params, ctx)


def prepare_model(model: nn.Module, cfg: Any, device: torch.device, world_size: int) -> nn.Module:
    """On the device, channels-last on CUDA, and wrapped in DDP (SyncBatchNorm on CUDA) for several ranks."""
    model = model.to(device)
    if device.type == "cuda" and cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if world_size > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model) if device.type == "cuda" else model
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    return model


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def model_preprocess(model: nn.Module, t: Any, method: ImageMethod | None = None) -> Preprocess | None:
    """The preprocessing the trial's batches get: the network's backbone's own (a timm / open_clip model's;
    None for ltstudy's ResNets) with the trial's ``crop_pct``, as the method wants it."""
    net = unwrap(model)
    pre = getattr(net, "preprocess", None) or getattr(getattr(net, "backbone", None), "preprocess", None)
    if pre is not None and getattr(t, "crop_pct", None):
        pre = replace(pre, crop_pct=t.crop_pct)
    return method.preprocess(pre) if method is not None else pre


class ImageStage(Stage):
    """An end-to-end trial: the method's loader and ``train_step`` on the (possibly DDP) network."""

    def __init__(self, cfg: TrialConfig, ctx: TrialContext, device: torch.device) -> None:
        t = cfg.train
        check_stage1(cfg)
        self.data = data = load_data(cfg)
        torch.manual_seed(t.seed)
        method = build_method(cfg, data, device, ctx.rank, ctx.world_size)
        self.model = prepare_model(method.build_model(), t, device, ctx.world_size)
        self.amp = make_amp(t.amp, device)
        self.cfg = t
        channels_last = device.type == "cuda" and t.channels_last
        augment = AugmentSpec.of(t)
        pre = model_preprocess(self.model, t, method)
        extra = {"preprocess": pre} if pre is not None else {}
        self.loader = method.train_loader(
            batch_size=t.batch_size, train=True, augment=augment, sampler=t.sampler, sampler_q=t.sampler_q,
            rank=ctx.rank, world_size=ctx.world_size, channels_last=channels_last, num_workers=t.num_workers,
            **extra,
        )
        self.eval_kw = dict(batch_size=t.eval_batch_size, device=device, train=False,
                            channels_last=channels_last, num_workers=t.num_workers, **extra)
        self.val_loader = make_loader(data, "val", **self.eval_kw)
        super().__init__(method, unwrap(self.model), cfg, device, self.loader.num_samples,
                         parameters=self.model.parameters())

    def batches(self, epoch: int) -> Any:
        self.model.train()
        self.loader.set_epoch(epoch)
        return self.loader

    def step(self, batch: Any) -> torch.Tensor:
        return self.method.train_step(self.model, batch, self.optimizer, self.amp)

    @torch.no_grad()
    def evaluate(self, split: str) -> tuple[dict[str, Any], list[float]]:
        """The split's metrics from the network's logits; with several views of each image (test-time crops)
        the mean of the views' logits."""
        self.model.eval()
        loader = self.val_loader if split == "val" else make_loader(self.data, split, **self.eval_kw)
        parts, labels = [], []
        for *views, y in loader:
            with self.amp.autocast():
                logits = torch.stack([self.model(v).float() for v in views]).mean(0)
            parts.append(summarise(logits, y))
            labels.append(y.cpu())
        if not parts:
            raise ConfigError(f"the {split} split holds no image")
        pred, conf, nll = (torch.cat(col) for col in zip(*parts, strict=True))
        return evaluation_from(pred, conf, nll, torch.cat(labels), self.data.class_counts,
                               self.cfg.many_threshold, self.cfg.few_threshold)

    def state(self) -> dict[str, Any]:
        state = super().state()
        if self.amp.scaler is not None:
            state["scaler"] = self.amp.scaler.state_dict()
        return state

    def load_state(self, state: dict[str, Any]) -> None:
        super().load_state(state)
        if self.amp.scaler is not None and "scaler" in state:
            self.amp.scaler.load_state_dict(state["scaler"])
