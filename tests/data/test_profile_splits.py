from __future__ import annotations

import math

import numpy as np
import pytest

from ltstudy.data import lt_counts, make_lt_splits
from ltstudy.data.cifar import load_cifar
from ltstudy.errors import ConfigError, DataError

SUBSET_COUNTS = [517, 524, 490, 493, 537, 475, 503, 516, 529, 501]


def test_cifar10_if100_reference_counts():
    counts = lt_counts(5000, 10, 100)
    assert counts == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert sum(counts) == 12406


@pytest.mark.parametrize(
    ("n_max", "c", "imb", "total", "tail"),
    [(5000, 10, 50, 13996, 100), (500, 100, 100, 10847, 5), (500, 100, 50, 12608, 10)],
)
def test_reference_totals(n_max, c, imb, total, tail):
    counts = lt_counts(n_max, c, imb)
    assert sum(counts) == total and counts[0] == n_max and counts[-1] == tail


def test_step_profile():
    assert lt_counts(500, 10, 100, "step") == [500] * 5 + [5] * 5
    assert lt_counts(500, 5, 10, "step") == [500, 500, 50, 50, 50]


@pytest.mark.parametrize("kwargs", [{"imbalance": 0.5}, {"imbalance": 10, "profile": "linear"}])
def test_bad_arguments(kwargs):
    with pytest.raises(ConfigError):
        lt_counts(100, 10, **kwargs)


@pytest.fixture(scope="module")
def subset_labels(shared_data):
    return load_cifar(shared_data, "cifar10")[1].numpy()


def test_subset_has_documented_counts(subset_labels):
    assert np.bincount(subset_labels).tolist() == SUBSET_COUNTS


@pytest.mark.parametrize("profile", ["exp", "step"])
def test_subset_split_keeps_the_standard_counts(subset_labels, profile):
    """n_i from the head class's own 517 images; a class gives training images to validation only when its
    leftovers cannot hold 20 (the head; on the step profile every head-half class but class 4)."""
    split = make_lt_splits(subset_labels, 10, 100, profile, val_per_class=20, seed=0)
    target = lt_counts(SUBSET_COUNTS[0], 10, 100, profile)
    assert split.n_max == 517 and split.target == target
    train = np.bincount(subset_labels[split.train], minlength=10).tolist()
    expected = [min(n, a - 20) for n, a in zip(target, SUBSET_COUNTS, strict=True)]
    assert train == expected
    capped = [c for c in range(10) if train[c] < target[c]]
    assert capped == ([0] if profile == "exp" else [0, 1, 2, 3])
    assert np.bincount(subset_labels[split.val], minlength=10).tolist() == [20] * 10
    assert np.intersect1d(split.train, split.val).size == 0 and split.carved == {}
    assert (np.diff(split.train) > 0).all() and (np.diff(split.val) > 0).all()


@pytest.mark.parametrize(("val", "head"), [(20, 4980), (10, 4990), (0, 5000)])
def test_official_cifar10_keeps_the_reference_counts_below_the_head(val, head):
    labels = np.repeat(np.arange(10), 5000)
    split = make_lt_splits(labels, 10, 100, "exp", val_per_class=val, seed=1)
    reference = lt_counts(5000, 10, 100)
    assert np.bincount(labels[split.train]).tolist() == [head, *reference[1:]]


def test_cifar100_lt_if100_is_the_papers_split_but_the_head():
    labels = np.repeat(np.arange(100), 500)
    split = make_lt_splits(labels, 100, 100, "exp", val_per_class=20, seed=0)
    counts = np.bincount(labels[split.train], minlength=100).tolist()
    assert counts == [480, *lt_counts(500, 100, 100)[1:]] and sum(counts) == 10827 and counts[-1] == 5
    meta = make_lt_splits(labels, 100, 100, "exp", val_per_class=20, seed=0, carved={"meta": 10})
    with_meta = np.bincount(labels[meta.train], minlength=100).tolist()
    # 30 held out: class 1 (476 of 500) can spare 24, so it gives 6 training images too; class 2 can spare 45
    assert with_meta[:3] == [470, 470, counts[2]] and with_meta[2:] == counts[2:]
    assert np.array_equal(meta.val, split.val), "carving never changes the validation split"
    kept = np.isin(split.train, meta.train)
    assert set(labels[split.train[~kept]].tolist()) == {0, 1}, "classes that can spare keep their images"


def test_split_seeded(subset_labels):
    a = make_lt_splits(subset_labels, 10, 100, "exp", 20, seed=3)
    b = make_lt_splits(subset_labels, 10, 100, "exp", 20, seed=3)
    c = make_lt_splits(subset_labels, 10, 100, "exp", 20, seed=4)
    assert np.array_equal(a.train, b.train) and np.array_equal(a.val, b.val)
    assert not np.array_equal(a.train, c.train) and not np.array_equal(a.val, c.val)


def test_too_small_class_names_it():
    labels = np.array([0] * 30 + [1] * 20)
    with pytest.raises(DataError, match="class 1"):
        make_lt_splits(labels, 2, 10, "exp", val_per_class=20, seed=0)
    with pytest.raises(ConfigError, match="no training image"):
        make_lt_splits(np.repeat(np.arange(3), 30), 3, 100, "exp", val_per_class=5, seed=0)


def test_exact_floor_is_not_lost():
    # 500 * 100**(-1) must give 5, not 4, despite float error
    assert lt_counts(500, 2, 100) == [500, 5]
    assert all(isinstance(n, int) for n in lt_counts(7, 3, 3.5))
    assert lt_counts(7, 3, 3.5)[1] == math.floor(7 * 3.5**-0.5)


def test_carved_sets_come_from_the_leftovers_and_leave_val_alone(subset_labels):
    split = make_lt_splits(subset_labels, 10, 100, "exp", val_per_class=20, seed=0, carved={"meta": 10})
    plain = make_lt_splits(subset_labels, 10, 100, "exp", val_per_class=20, seed=0)
    meta = split.carved["meta"]
    assert np.array_equal(split.val, plain.val), "carving never changes the validation split"
    assert np.bincount(subset_labels[meta], minlength=10).tolist() == [10] * 10
    assert np.intersect1d(meta, split.train).size == 0 and np.intersect1d(meta, split.val).size == 0
    assert split.held == {"val": 20, "meta": 10}
    counts = np.bincount(subset_labels[split.train], minlength=10).tolist()
    assert counts == [SUBSET_COUNTS[0] - 30, *np.bincount(subset_labels[plain.train], minlength=10)[1:].tolist()]
    with pytest.raises(DataError, match="20 for validation \\+ 500 meta"):
        make_lt_splits(subset_labels, 10, 100, "exp", val_per_class=20, seed=0, carved={"meta": 500})
