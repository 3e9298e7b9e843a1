"""A pretrained model's preprocessing in the data pipeline: the device-side random resized crop and resize of
in-memory batches, the evaluation crop and the five test-time crops (on the device and in the file-list
transform); class-names files; the named file-list benchmarks."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from ltstudy.data import NAMED_LISTS, Preprocess, build_data, make_loader, read_class_names
from ltstudy.data.preprocess import eval_views, random_resized_crop
from ltstudy.errors import DataError

from support.data import write_filelist_tree

PRE = Preprocess(16, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), "bicubic", 0.875)


def test_random_resized_crop_is_per_image_seeded_and_in_range():
    x = torch.rand(6, 3, 32, 32)
    a = random_resized_crop(x, 24, torch.Generator().manual_seed(1), "bicubic")
    b = random_resized_crop(x, 24, torch.Generator().manual_seed(1), "bicubic")
    c = random_resized_crop(x, 24, torch.Generator().manual_seed(2), "bicubic")
    assert a.shape == (6, 3, 24, 24) and torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1
    flat = torch.full((2, 3, 32, 32), 0.25)
    torch.testing.assert_close(random_resized_crop(flat, 16, torch.Generator().manual_seed(0)), torch.full(
        (2, 3, 16, 16), 0.25))


def test_a_full_box_is_the_resized_image():
    """scale and ratio pinned to the whole square image: the crop is the image resized (bilinear, no
    antialiasing needed when enlarging)."""
    x = torch.rand(2, 3, 8, 8)
    out = random_resized_crop(x, 16, torch.Generator().manual_seed(0), "bilinear", scale=(1, 1), ratio=(1, 1))
    torch.testing.assert_close(out, F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False))


def test_eval_crop_and_the_five_crops_follow_torchvision():
    x = torch.rand(1, 3, 20, 20)
    centre = eval_views(x, PRE)
    side = int(16 / 0.875)  # 18: the shorter side before the centre crop
    ref = v2.CenterCrop(16)(F.interpolate(x, size=(side, side), mode="bicubic", align_corners=False,
                                          antialias=True).clamp(0, 1))
    assert len(centre) == 1
    torch.testing.assert_close(centre[0], ref)
    five = Preprocess(16, PRE.mean, PRE.std, "bilinear", 1.0, eval_crops=5, expand=8)
    crops = eval_views(x, five)
    resized = F.interpolate(x, size=(24, 24), mode="bilinear", align_corners=False, antialias=True)
    for got, want in zip(crops, v2.FiveCrop(16)(resized), strict=True):
        torch.testing.assert_close(got, want)


def test_in_memory_loaders_resize_on_the_device_and_normalise_with_the_models_statistics():
    data = build_data("synthetic", synthetic_classes=3, image_size=8, imbalance=2, val_per_class=2)
    from ltstudy.data import AugmentSpec

    train = make_loader(data, "train", batch_size=4, device="cpu", train=True, preprocess=PRE,
                        augment=AugmentSpec(crop_padding=0, resized_crop=True))
    train.set_epoch(0)
    x, y = next(iter(train))
    assert x.shape == (4, 3, 16, 16)
    five = Preprocess(16, PRE.mean, PRE.std, "bicubic", 1.0, eval_crops=5, expand=8)
    *views, y = next(iter(make_loader(data, "val", batch_size=6, device="cpu", train=False, preprocess=five)))
    assert len(views) == 5 and all(v.shape == (6, 3, 16, 16) for v in views)
    # normalised with the model's mean / std: the centre view of the raw image, un-normalised, is in [0, 1]
    mean = torch.tensor(PRE.mean)[None, :, None, None]
    std = torch.tensor(PRE.std)[None, :, None, None]
    raw = views[4] * std + mean
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5
    plain = make_loader(data, "val", batch_size=6, device="cpu", train=False)  # no model: as before
    assert next(iter(plain))[0].shape == (6, 3, 8, 8)


def test_file_lists_decode_at_the_models_side_with_five_crops(tmp_path):
    root, lists = write_filelist_tree(tmp_path, {"train": [3, 2], "val": [2, 2], "test": [1, 1]})
    data = build_data("filelist", data_root=root, train_list=lists["train"], val_list=lists["val"],
                      test_list=lists["test"])
    five = Preprocess(24, PRE.mean, PRE.std, "bicubic", 1.0, eval_crops=5, expand=8)
    *views, y = next(iter(make_loader(data, "val", batch_size=4, device="cpu", train=False, preprocess=five,
                                      num_workers=0)))
    assert len(views) == 5 and views[0].shape == (4, 3, 24, 24)
    loader = make_loader(data, "train", batch_size=5, device="cpu", train=True, preprocess=PRE, num_workers=0)
    loader.set_epoch(0)
    x, _ = next(iter(loader))
    assert x.shape == (5, 3, 16, 16)


def test_class_names_files(tmp_path):
    plain = tmp_path / "names.txt"
    plain.write_text("great white shark\ntench\nsea_lion\n")
    assert read_class_names(plain, 3) == ["great white shark", "tench", "sea lion"]
    wordnet = tmp_path / "imagenet_lt.txt"  # LIFT's ImageNet-LT classnames.txt
    wordnet.write_text("n01440764 tench\nn01443537 goldfish\n")
    assert read_class_names(wordnet, 2) == ["tench", "goldfish"]
    places = tmp_path / "places.txt"  # LIFT's Places-LT classnames.txt
    places.write_text("airfield airfield\nairplane_cabin airplane_cabin\n")
    assert read_class_names(places, 2) == ["airfield", "airplane cabin"]
    inat = tmp_path / "categories.json"  # iNaturalist's, ordered by id
    inat.write_text(json.dumps([{"id": 1, "name": "Phragmatopoma californica"}, {"id": 0, "name": "Hermodice"}]))
    assert read_class_names(inat, 2) == ["Hermodice", "Phragmatopoma californica"]
    with pytest.raises(DataError, match="names 3 classes; the dataset has 4"):
        read_class_names(plain, 4)
    with pytest.raises(DataError, match="not found"):
        read_class_names(tmp_path / "none.txt", 3)


def test_a_file_list_takes_its_class_names(tmp_path):
    root, lists = write_filelist_tree(tmp_path, {"train": [2, 1], "val": [1, 1], "test": [1, 1]})
    names = tmp_path / "names.txt"
    names.write_text("cat\ndog\n")
    data = build_data("filelist", data_root=root, train_list=lists["train"], val_list=lists["val"],
                      test_list=lists["test"], class_names=str(names))
    assert data.class_names == ["cat", "dog"]


def _named_tree(root, dataset: str, classes: int, with_val: bool = True):
    """Lists under the reference's names, every class with one train / val / test image."""
    from support.data import write_jpeg

    images = root
    spec = NAMED_LISTS[dataset]
    for role, name in zip(("train", "val", "test"), spec.lists, strict=True):
        if name is None:
            continue
        lines = []
        for c in range(classes):
            rel = f"{role}/{c}.jpg"
            write_jpeg(images / rel, 8, 8, c % 255)
            lines.append(f"{rel} {c}")
        (root / name).write_text("\n".join(lines) + "\n")
    return images


def test_named_benchmarks_find_their_lists_and_check_their_class_count(tmp_path):
    root = _named_tree(tmp_path / "places", "places-lt", 365)
    data = build_data("places-lt", data_root=root)
    assert data.num_classes == 365 and data.name == "places-lt"
    small = _named_tree(tmp_path / "inet", "imagenet-lt", 10)
    with pytest.raises(DataError, match="ImageNet-LT has 1000 classes; its lists name 10"):
        build_data("imagenet-lt", data_root=small)
    inat = _named_tree(tmp_path / "inat", "inat2018", 3)
    with pytest.raises(DataError, match="iNaturalist 2018 has no val list") as info:
        build_data("inat2018", data_root=inat)
    assert "\n" not in str(info.value)
    with pytest.raises(DataError, match="Places-LT: train list .* not found"):
        build_data("places-lt", data_root=tmp_path / "inat")
