from __future__ import annotations

import shutil

import pytest
import torch
import torchvision.datasets

from ltstudy.data import build_data, load_cifar
from ltstudy.errors import ConfigError, DataError

from support.data import write_cifar100


def test_shared_cifar10_loads(shared_data):
    train_x, train_y, test_x, test_y, names = load_cifar(shared_data, "cifar10")
    assert train_x.shape == (5085, 3, 32, 32) and train_x.dtype == torch.uint8
    assert train_y.dtype == torch.int64 and test_x.shape == (1017, 3, 32, 32) and len(test_y) == 1017
    assert names[0] == "airplane" and len(names) == 10


def test_cifar10_lt_splits_disjoint_and_balanced(shared_data):
    data = build_data("cifar10-lt", data_root=shared_data, imbalance=100, val_per_class=20, seed=0)
    assert set(data.train.indices.tolist()).isdisjoint(data.val.indices.tolist())
    assert torch.bincount(data.val.labels).tolist() == [20] * 10
    assert data.class_counts.tolist() == torch.bincount(data.train.labels).tolist()
    assert data.test.indices.tolist() == list(range(1017))
    full_y = load_cifar(shared_data, "cifar10")[1]
    assert torch.equal(full_y[data.train.indices], data.train.labels)
    assert data.mean == (0.4914, 0.4822, 0.4465) and data.image_size == 32


def test_cifar100_layout_loads(tmp_path):
    write_cifar100(tmp_path)
    train_x, train_y, test_x, _, names = load_cifar(tmp_path, "cifar100")
    assert train_x.shape == (2500, 3, 32, 32) and test_x.shape == (200, 3, 32, 32)
    assert names[-1] == "c99" and int(train_y.max()) == 99
    data = build_data("cifar100-lt", data_root=tmp_path, imbalance=5, val_per_class=5, seed=0)
    assert data.num_classes == 100 and data.class_counts[0] == 20 and data.class_counts[-1] == 5
    assert data.std == (0.2673, 0.2564, 0.2762)


def test_cifar100_lt_if100_has_the_papers_counts(tmp_path):
    """A CIFAR-100-shaped folder (500 images per class) at IF 100: 500 ... 5 as in every reference, except the
    head class, the only one whose leftovers cannot hold the 20 validation images (480; 10,827 in all)."""
    from ltstudy.data import lt_counts

    write_cifar100(tmp_path, per_class=500)
    data = build_data("cifar100-lt", data_root=tmp_path, imbalance=100, val_per_class=20, seed=0)
    standard = lt_counts(500, 100, 100)
    assert sum(standard) == 10847 and standard[0] == 500 and standard[-1] == 5
    assert data.class_counts.tolist() == [480, *standard[1:]]
    assert int(data.class_counts.sum()) == 10827 and int(data.class_counts[-1]) == 5
    assert data.gave_up() == {0: 20} and data.target_counts == standard
    assert data.realised_imbalance == 96.0
    assert torch.bincount(data.val.labels).tolist() == [20] * 100


def test_missing_folder_suggests_download(tmp_path):
    with pytest.raises(DataError, match=r"cifar-10-batches-py.*--download"):
        load_cifar(tmp_path, "cifar10")


def test_missing_batch_file_named(shared_data, tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    shutil.copytree(shared_data / "cifar-10-batches-py", folder)
    (folder / "data_batch_3").chmod(0o644)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3"):
        load_cifar(tmp_path, "cifar10")


def test_truncated_pickle_named(tmp_path):
    folder = write_cifar100(tmp_path, per_class=2, classes=3)
    raw = (folder / "train").read_bytes()
    (folder / "train").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match=r"cifar-100-python/train"):
        load_cifar(tmp_path, "cifar100")


def test_download_calls_torchvision(tmp_path, monkeypatch):
    calls = []

    class FakeCIFAR100:
        def __init__(self, root, train=True, download=False):
            calls.append((root, download))
            write_cifar100(tmp_path, per_class=2, classes=3)

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", FakeCIFAR100)
    _, train_y, *_ = load_cifar(tmp_path, "cifar100", download=True)
    assert calls == [(str(tmp_path), True)] and len(train_y) == 6


def test_unknown_dataset_lists_choices():
    with pytest.raises(ConfigError, match="cifar10-lt.*synthetic"):
        build_data("mnist-lt")
