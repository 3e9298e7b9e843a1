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
def test_subset_split_follows_formula(subset_labels, profile):
    train, val, carved = make_lt_splits(subset_labels, 10, 100, profile, val_per_class=20, seed=0)
    n_max = min(SUBSET_COUNTS[:5]) - 20 if profile == "step" else SUBSET_COUNTS[0] - 20
    assert np.bincount(subset_labels[train], minlength=10).tolist() == lt_counts(n_max, 10, 100, profile)
    assert np.bincount(subset_labels[val], minlength=10).tolist() == [20] * 10
    assert np.intersect1d(train, val).size == 0 and carved == {}
    assert (np.diff(train) > 0).all() and (np.diff(val) > 0).all()


@pytest.mark.parametrize(("val", "n_max"), [(20, 4980), (10, 4990)])
def test_official_cifar10_n_max(val, n_max):
    labels = np.repeat(np.arange(10), 5000)
    train, _, _ = make_lt_splits(labels, 10, 100, "exp", val_per_class=val, seed=1)
    assert np.bincount(labels[train]).tolist() == lt_counts(n_max, 10, 100)


def test_split_seeded(subset_labels):
    a = make_lt_splits(subset_labels, 10, 100, "exp", 20, seed=3)
    b = make_lt_splits(subset_labels, 10, 100, "exp", 20, seed=3)
    c = make_lt_splits(subset_labels, 10, 100, "exp", 20, seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(a[:2], b[:2], strict=True))
    assert not np.array_equal(a[0], c[0]) and not np.array_equal(a[1], c[1])


def test_too_small_class_names_it():
    labels = np.array([0] * 30 + [1] * 20)
    with pytest.raises(DataError, match="class 1"):
        make_lt_splits(labels, 2, 10, "exp", val_per_class=20, seed=0)


def test_exact_floor_is_not_lost():
    # 500 * 100**(-1) must give 5, not 4, despite float error
    assert lt_counts(500, 2, 100) == [500, 5]
    assert all(isinstance(n, int) for n in lt_counts(7, 3, 3.5))
    assert lt_counts(7, 3, 3.5)[1] == math.floor(7 * 3.5**-0.5)


def test_carved_sets_come_from_the_pool_and_leave_val_alone(subset_labels):
    train, val, carved = make_lt_splits(subset_labels, 10, 100, "exp", val_per_class=20, seed=0,
                                        carved={"meta": 10})
    plain_train, plain_val, _ = make_lt_splits(subset_labels, 10, 100, "exp", val_per_class=20, seed=0)
    meta = carved["meta"]
    assert np.array_equal(val, plain_val), "carving never changes the validation split"
    assert np.bincount(subset_labels[meta], minlength=10).tolist() == [10] * 10
    assert np.intersect1d(meta, train).size == 0 and np.intersect1d(meta, val).size == 0
    n_max = SUBSET_COUNTS[0] - 30
    assert np.bincount(subset_labels[train], minlength=10).tolist() == lt_counts(n_max, 10, 100)
    with pytest.raises(DataError, match="20 for validation \\+ 500 meta"):
        make_lt_splits(subset_labels, 10, 100, "exp", val_per_class=20, seed=0, carved={"meta": 500})
