"""Batch loaders used by the trainer.

Both loaders derive an epoch's sample order and augmentation only from ``(seed, epoch)``, so an
epoch is reproducible and resuming at an epoch boundary needs no loader state. Under data
parallelism every rank computes the same global order, each global batch of ``batch_size`` is cut
into ``world_size`` contiguous shards, and rank r yields shard r.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from ltstudy.data.augment import AugmentSpec, apply, eval_batch, normalize
from ltstudy.data.filelist import FileListDataset
from ltstudy.data.preprocess import Preprocess
from ltstudy.data.samplers import epoch_order
from ltstudy.errors import ConfigError

Batch = tuple[torch.Tensor, ...]  # (x, y), or (x_1, ..., x_V, y) with several views


def derive_seed(seed: int, epoch: int, stream: int) -> int:
    """A 63-bit seed for one random stream (0 = order, 1 = augmentation, ...) of one epoch."""
    state = np.random.SeedSequence([seed % 2**64, epoch % 2**64, stream]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def per_rank_batch(batch_size: int, rank: int, world_size: int) -> int:
    """Validate the distributed setting and return the per-rank batch size."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"invalid rank {rank} for world_size {world_size}")
    if batch_size < 1 or batch_size % world_size:
        raise ConfigError(f"batch_size {batch_size} must be a positive multiple of world_size {world_size}")
    return batch_size // world_size


def global_batches(
    order: torch.Tensor, batch_size: int, world_size: int, drop_last: bool, train: bool = True
) -> list[torch.Tensor]:
    """Cut an epoch order into global batches.

    A last partial batch is dropped with ``drop_last``, and in training also when it is too small
    to give every rank a sample; evaluation keeps it (some ranks may then get an empty shard).
    """
    batches = list(order.split(batch_size))
    if batches and len(batches[-1]) < batch_size:
        if drop_last or (train and len(batches[-1]) < world_size):
            batches.pop()
    return batches


def shard(batch: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank ``rank``'s contiguous shard of a global batch."""
    return torch.tensor_split(batch, world_size)[rank]


class _EpochOrder:
    """Shared (seed, epoch) -> order logic of both loaders."""

    def __init__(
        self,
        n: int,
        batch_size: int,
        train: bool,
        weights: torch.Tensor | None,
        seed: int,
        rank: int,
        world_size: int,
        drop_last: bool,
    ):
        self.per_rank = per_rank_batch(batch_size, rank, world_size)
        self.n, self.batch_size, self.train = n, batch_size, train
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        if self.weights is not None and len(self.weights) != n:
            raise ConfigError(f"sampler weights have {len(self.weights)} entries for {n} samples")
        self.seed, self.rank, self.world_size, self.drop_last = seed, rank, world_size, drop_last
        self.epoch: int | None = None

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and augmentation the next iteration produces."""
        self.epoch = int(epoch)

    def batches(self) -> list[torch.Tensor]:
        """Global batches of the current epoch (indices on the CPU)."""
        if not self.train:
            return global_batches(
                torch.arange(self.n), self.batch_size, self.world_size, self.drop_last, False
            )
        if self.epoch is None:
            raise RuntimeError("call set_epoch(epoch) before iterating a training loader")
        gen = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, 0))
        order = epoch_order(self.n, self.weights, gen)
        return global_batches(order, self.batch_size, self.world_size, self.drop_last)

    def __len__(self) -> int:
        full, rest = divmod(self.n, self.batch_size)
        keep = rest > 0 and not self.drop_last and (rest >= self.world_size or not self.train)
        return full + int(keep)

    @property
    def num_samples(self) -> int:
        """Samples in the underlying split (one epoch draws this many across all ranks)."""
        return self.n


class TensorLoader(_EpochOrder):
    """Batches from uint8 images held once on the device, augmented and normalised there.

    With augmentation and ``world_size > 1`` each rank augments the whole global batch with the
    shared generator and keeps its shard, so the result equals single-process training with the same
    global batch; the extra work is cheap next to the forward pass on CIFAR-sized images. With
    ``views = V > 1`` every image is augmented V times independently and a batch is ``(x_1, ..., x_V, y)``.
    With a model's ``preprocess`` the images are brought to its side on the device (training: by the random
    resized crop or a resize; evaluation: its centre crop, or its five crops as five views).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        batch_size: int,
        device: str | torch.device,
        mean: Sequence[float],
        std: Sequence[float],
        train: bool,
        augment: AugmentSpec | None = None,
        sampler_weights: torch.Tensor | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        channels_last: bool = False,
        views: int = 1,
        preprocess: Preprocess | None = None,
    ):
        super().__init__(len(labels), batch_size, train, sampler_weights, seed, rank, world_size, drop_last)
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.labels = torch.as_tensor(labels, dtype=torch.int64).to(self.device)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device)
        self.augment = augment if train else None
        self.channels_last = channels_last
        self.views = views
        self.preprocess = preprocess
        self.train_mode = train

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _view(self, batch: torch.Tensor, local: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        if self.augment is None:
            x = self.images[local.to(self.device)]
            if self.preprocess is not None:  # training without augmentation: resized to the model's side
                x = apply(AugmentSpec(crop_padding=0, flip=False), x, self.mean, self.std, None, self.preprocess)
            else:
                x = normalize(x, self.mean, self.std)
        elif self.world_size == 1:
            x = apply(self.augment, self.images[local.to(self.device)], self.mean, self.std, gen, self.preprocess)
        else:
            x = apply(self.augment, self.images[batch.to(self.device)], self.mean, self.std, gen, self.preprocess)
            x = shard(x, self.rank, self.world_size)
        return self._layout(x)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        batches = self.batches()
        gen = None
        if self.augment is not None:
            gen = torch.Generator(device=self.device).manual_seed(derive_seed(self.seed, self.epoch, 1))
        for batch in batches:
            local = shard(batch, self.rank, self.world_size)
            if not self.train_mode:  # evaluation: one view, or the model's crops (test-time ensemble)
                views = [self._layout(v) for v in
                         eval_batch(self.images[local.to(self.device)], self.mean, self.std, self.preprocess)]
            else:
                views = [self._view(batch, local, gen) for _ in range(self.views)]
            yield *views, self.labels[local.to(self.device)]


class _BatchSampler(torch.utils.data.Sampler):
    """Yields this rank's ``[(index, sample_seed), ...]`` batches of the current epoch."""

    def __init__(self, order: _EpochOrder):
        self.order = order

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        o = self.order
        base = derive_seed(o.seed, o.epoch or 0, 2)
        for b, batch in enumerate(o.batches()):
            start = b * o.batch_size + sum(len(s) for s in torch.tensor_split(batch, o.world_size)[: o.rank])
            local = shard(batch, o.rank, o.world_size).tolist()
            yield [(i, (base + start + k) % 2**63) for k, i in enumerate(local)]

    def __len__(self) -> int:
        return len(self.order)


class FileListLoader(_EpochOrder):
    """Batches from a :class:`FileListDataset` through a DataLoader, normalised on the device.

    Per-sample augmentation (RandomResizedCrop + flip, + the MoCo-v2 colour ops with ``AugmentSpec.color``)
    runs in the workers, seeded per sample from ``(seed, epoch, position in the epoch)``, so it does not
    depend on ``num_workers``. Of an ``AugmentSpec`` only cutout and AutoAugment are applied (on the
    device); crop, flip and colour are the dataset's. A dataset with ``views > 1`` yields
    ``(x_1, ..., x_V, y)`` batches.
    """

    def __init__(
        self,
        dataset: FileListDataset,
        *,
        batch_size: int,
        device: str | torch.device,
        mean: Sequence[float],
        std: Sequence[float],
        train: bool,
        augment: AugmentSpec | None = None,
        sampler_weights: torch.Tensor | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        channels_last: bool = False,
        num_workers: int | None = None,
    ):
        super().__init__(len(dataset), batch_size, train, sampler_weights, seed, rank, world_size, drop_last)
        self.dataset, self.device = dataset, torch.device(device)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device)
        self.channels_last = channels_last
        self.augment = None
        if train and augment is not None:
            self.augment = dataclasses.replace(augment, crop_padding=0, flip=False, color=False)
        self.num_workers = min(4, os.cpu_count() or 1) if num_workers is None else num_workers

    def __iter__(self) -> Iterator[Batch]:
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=_BatchSampler(self),
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
        )
        gen = None
        if self.augment is not None:
            gen = torch.Generator(device=self.device).manual_seed(derive_seed(self.seed, self.epoch, 1))
        for images, labels in loader:
            images = images.to(self.device, non_blocking=True)
            views = images.unbind(1) if images.dim() == 5 else (images,)
            out = []
            for v in views:
                x = normalize(v, self.mean, self.std) if self.augment is None else \
                    apply(self.augment, v, self.mean, self.std, gen)
                out.append(x.contiguous(memory_format=torch.channels_last) if self.channels_last else x)
            yield *out, labels.to(self.device, non_blocking=True)


class LockstepLoader:
    """Two training loaders over the same split iterated in lockstep (GLMC's "org" and "invs" samplers).

    A batch is the first loader's batch followed by the second's, ``(*a, *b)``; both are set to the same
    epoch, and the epoch has as many batches as the first loader (both hold the same samples and batch size).
    """

    def __init__(self, first: _EpochOrder, second: _EpochOrder) -> None:
        if len(first) != len(second):
            raise ConfigError(f"lockstep loaders differ in length: {len(first)} and {len(second)} batches")
        self.first, self.second = first, second

    def set_epoch(self, epoch: int) -> None:
        self.first.set_epoch(epoch)
        self.second.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.first)

    @property
    def num_samples(self) -> int:
        return self.first.num_samples

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        for a, b in zip(self.first, self.second, strict=True):
            yield (*a, *b)
