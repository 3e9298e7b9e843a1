"""File-list datasets in the ImageNet-LT / Places-LT / iNaturalist format.

Each line of a list file is ``relative/path.jpg label``; images live under an image root.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ltstudy.data.preprocess import Preprocess
from ltstudy.errors import DataError

if TYPE_CHECKING:  # torchvision is imported when a file list is read: it costs every process about 2 s
    from torchvision.transforms import v2


def read_filelist(path: str | Path) -> tuple[list[str], np.ndarray]:
    """Parse a list file.

    Args:
        path: List file; blank lines are skipped.

    Returns:
        ``(paths, labels)``: relative image paths and int64 labels.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"file list {path} not found")
    paths, labels = [], []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            line = line.strip()
            if not line:
                continue
            parts = line.rsplit(None, 1)
            if len(parts) != 2 or not parts[1].isdigit():
                raise DataError(f"{path}, line {lineno}: expected 'relative/path.jpg label', got {line!r}")
            if Path(parts[0]).is_absolute() or ".." in Path(parts[0]).parts:
                raise DataError(f"{path}, line {lineno}: image path {parts[0]!r} leaves the image root "
                                "(absolute or with '..'); list paths relative to it")
            paths.append(parts[0])
            labels.append(int(parts[1]))
    if not paths:
        raise DataError(f"file list {path} holds no images")
    return paths, np.asarray(labels, dtype=np.int64)


def read_class_names(path: str | Path, num_classes: int) -> list[str]:
    """Class names in label order from a class-names file.

    ``.txt``: one class per line. A line ``ID NAME`` whose ID is a WordNet id (``n01440764 tench``) or equal
    to its name (``airfield airfield``), the two forms of LIFT's ImageNet-LT and Places-LT
    ``classnames.txt``, gives NAME; any other line is the name. ``.json``: a list of names, or of objects with
    a ``name`` (and an ``id`` that orders them: iNaturalist's ``categories.json``). Underscores become spaces.
    """
    import json
    import re

    path = Path(path)
    if not path.is_file():
        raise DataError(f"class-names file {path} not found")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read class-names file {path}: {exc}") from None
    if path.suffix == ".json":
        try:
            items = json.loads(text)
        except ValueError as exc:
            raise DataError(f"class-names file {path} is not valid JSON: {exc}") from None
        if not isinstance(items, list) or not all(isinstance(i, (str, dict)) for i in items):
            raise DataError(f"class-names file {path} must hold a list of names or of {{'name': ...}} objects")
        if items and isinstance(items[0], dict):
            if not all(isinstance(i, dict) and isinstance(i.get("name"), str) for i in items):
                raise DataError(f"class-names file {path}: every entry needs a 'name'")
            items = [i["name"] for i in sorted(items, key=lambda i: i.get("id", 0))] \
                if all("id" in i for i in items) else [i["name"] for i in items]
        names = [str(i) for i in items]
    else:
        names = []
        for line in text.splitlines():
            line = line.strip()
            if not line:
                continue
            head, _, rest = line.partition(" ")
            rest = rest.strip()
            names.append(rest if rest and (re.fullmatch(r"n\d{8}", head) or rest == head) else line)
    if len(names) != num_classes:
        raise DataError(f"class-names file {path} names {len(names)} classes; the dataset has {num_classes}")
    return [n.replace("_", " ") for n in names]


def make_transform(size: int, train: bool, color: bool = False, pre: Preprocess | None = None) -> v2.Transform:
    """Standard ImageNet-style uint8 transforms.

    Args:
        size: Output side length (a model's ``pre.size`` when given).
        train: RandomResizedCrop + flip when True, else Resize(size*256/224) + CenterCrop.
        color: Training only: the MoCo-v2 pipeline GLMC/FSGL train ImageNet-LT with (colour jitter 0.4 on
            every image, grayscale with p 0.2, Gaussian blur σ in [0.1, 2] with p 0.5, kernel ~size/10).
        pre: A pretrained model's preprocessing: its side and interpolation, and at evaluation its
            ``crop_pct`` (the shorter side resized to size / crop_pct, then the centre crop) or its five
            crops of the image resized to size + expand (a (5, 3, size, size) tensor: five views).
    """
    from torchvision.transforms import InterpolationMode, v2

    mode = InterpolationMode(pre.interpolation) if pre is not None else InterpolationMode.BILINEAR
    if pre is not None:
        size = pre.size
    if not train:
        if pre is None:
            return v2.Compose([v2.Resize(int(size * 256 / 224), antialias=True), v2.CenterCrop(size)])
        resize = v2.Resize(pre.resize_side, interpolation=mode, antialias=True)
        if pre.eval_crops == 5:
            return v2.Compose([resize, v2.FiveCrop(size)])  # a tuple: FileListDataset stacks it
        return v2.Compose([resize, v2.CenterCrop(size)])
    if not color:
        return v2.Compose([v2.RandomResizedCrop(size, interpolation=mode, antialias=True), v2.RandomHorizontalFlip()])
    kernel = max(3, (size // 10) | 1)  # 23 at 224 px, MoCo's kernel
    return v2.Compose([
        v2.RandomResizedCrop(size, interpolation=mode, antialias=True),
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.0)], p=1.0),
        v2.RandomGrayscale(p=0.2),
        v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=0.5),
        v2.RandomHorizontalFlip(),
    ])


class FileListDataset(torch.utils.data.Dataset):
    """Images listed in a file list, decoded to uint8 (3,size,size) tensors, or (views,3,size,size).

    An item key is either an index or ``(index, seed)``; with a seed the random transform draws from
    a CPU RNG seeded with it, so augmentation does not depend on the worker that decodes the image. With
    ``views > 1`` an image is decoded once and transformed ``views`` times independently (GLMC's two-crop
    transform).
    """

    def __init__(self, root: str | Path, paths: list[str], labels: np.ndarray, *, size: int, train: bool,
                 color: bool = False, views: int = 1, pre: Preprocess | None = None):
        self.root = Path(root)
        self.paths = list(paths)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.transform = make_transform(size, train, color, pre)
        self.views = views

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> torch.Tensor:
        """Read and decode one image as uint8 RGB (3,H,W)."""
        path = self.root / self.paths[index]
        if not path.is_file():
            raise DataError(f"image {path} listed in the file list does not exist")
        from torchvision.io import ImageReadMode, decode_image, read_file

        try:
            return decode_image(read_file(str(path)), mode=ImageReadMode.RGB)
        except RuntimeError as exc:
            raise DataError(f"cannot decode image {path}: {exc}") from exc

    def _views(self, image: torch.Tensor) -> torch.Tensor:
        if self.views == 1:
            out = self.transform(image)
            return torch.stack(list(out)) if isinstance(out, (tuple, list)) else out  # five crops: (5, C, H, W)
        return torch.stack([self.transform(image) for _ in range(self.views)])

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        image = self.load(index)
        if seed is None:
            out = self._views(image)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(seed)
                out = self._views(image)
        return out, int(self.labels[index])
