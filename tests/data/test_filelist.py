from __future__ import annotations

import pytest
import torch

from ltstudy.data import build_data, make_loader, read_filelist
from ltstudy.errors import DataError

from support.data import write_filelist_tree


@pytest.fixture
def tree(tmp_path):
    return write_filelist_tree(tmp_path, {"train": [6, 3, 1], "val": [2, 2, 2], "test": [2, 2, 2]})


def test_read_filelist(tree):
    _, lists = tree
    paths, labels = read_filelist(lists["train"])
    assert len(paths) == 10 and paths[0] == "train/c0/img 0.jpg" and labels.tolist()[-1] == 2


def test_malformed_line_names_line(tmp_path):
    bad = tmp_path / "list.txt"
    bad.write_text("a.jpg 0\nb.jpg x\n")
    with pytest.raises(DataError, match=r"list\.txt, line 2"):
        read_filelist(bad)


def _build(tree, image_size):
    root, lists = tree
    return build_data("filelist", data_root=root, train_list=lists["train"], val_list=lists["val"],
                      test_list=lists["test"], image_size=image_size)


def test_filelist_loads_and_decodes(tree):
    data = _build(tree, image_size=32)
    assert data.num_classes == 3 and data.class_counts.tolist() == [6, 3, 1]
    for split, train in (("train", True), ("test", False)):
        loader = make_loader(data, split, batch_size=4, device="cpu", train=train, num_workers=0)
        loader.set_epoch(0)
        batches = list(loader)
        assert len(batches) == len(loader)
        x, y = batches[0]
        assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    # eval images are uniform grey levels: decoding must recover them
    x, y = next(iter(make_loader(data, "val", batch_size=6, device="cpu", train=False, num_workers=0)))
    pixel = (x[:, 0, 16, 16] * data.std[0] + data.mean[0]) * 255
    assert torch.allclose(pixel, 30.0 * y.float(), atol=3)


def test_filelist_epoch_reproducible_across_workers(tree):
    data = _build(tree, image_size=24)
    out = []
    for workers in (0, 2):
        loader = make_loader(
            data, "train", batch_size=5, device="cpu", train=True, seed=1, num_workers=workers
        )
        loader.set_epoch(2)
        out.append(torch.cat([x for x, _ in loader]))
    assert torch.equal(out[0], out[1])


def test_missing_val_list_and_missing_image(tree):
    root, lists = tree
    with pytest.raises(DataError, match="val"):
        build_data("filelist", data_root=root, train_list=lists["train"], test_list=lists["test"])
    (root / "test/c1/img 0.jpg").unlink()
    data = _build(tree, image_size=32)
    loader = make_loader(data, "test", batch_size=6, device="cpu", train=False, num_workers=0)
    with pytest.raises(DataError, match=r"c1/img 0\.jpg"):
        list(loader)


def test_carved_sets_come_from_the_val_list(tree):
    root, lists = tree
    kw = dict(data_root=root, train_list=lists["train"], val_list=lists["val"], test_list=lists["test"])
    plain = build_data("filelist", **kw)
    data = build_data("filelist", **kw, carved={"meta": 1}, seed=3)
    meta = data.carved["meta"]
    assert torch.bincount(meta.labels).tolist() == [1, 1, 1] and torch.bincount(data.val.labels).tolist() == [1, 1, 1]
    assert sorted(meta.paths + data.val.paths) == sorted(plain.val.paths)
    assert set(meta.indices.tolist()).isdisjoint(data.val.indices.tolist())
    assert data.train.paths == plain.train.paths and data.held == {"meta": 1} and data.target_counts is None
    again = build_data("filelist", **kw, carved={"meta": 1}, seed=3)
    assert again.carved["meta"].paths == meta.paths, "seeded"
    with pytest.raises(DataError, match="class 0 has 2 images in the validation list; need at least 3"):
        build_data("filelist", **kw, carved={"meta": 2})
