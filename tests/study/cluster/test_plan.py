"""Sizing and placing a study on a cluster (no Ray started): the autoscaler's maximum, trials that fit,
GPU-shape rules, the concurrency limit kept across --resume, the Optuna location, data staged once."""

from __future__ import annotations

import pytest
import yaml

from ltstudy.errors import ConfigError
from ltstudy.study.cluster.shape import (
    TRAIN_DRIVER,
    ClusterShape,
    NodeType,
    TrialShape,
    check_trial_shape,
    ddp_backend,
    driver_resources,
    max_concurrent,
    node_types_from_launcher_config,
    trials_that_fit,
)
from ltstudy.study.data import stage_data
from ltstudy.study.search.concurrency import StudyConcurrency
from ltstudy.study.search.optuna_storage import optuna_location

from support.configs import TINY
from support.servers import REPO


def launcher_shape() -> ClusterShape:
    """cluster.yaml as the autoscaler sees it."""
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    return ClusterShape(node_types_from_launcher_config(config), "autoscaler", alive_nodes=1)


def test_autoscaler_maximum_not_the_nodes_up_now():
    shape = launcher_shape()
    assert shape.max_nodes == 5
    assert shape.max_resources()["GPU"] == 16 and shape.max_resources()["CPU"] == 4 * 48  # head: CPU 0
    # the README command: one-worker trials on half a GPU -> 32 at once, although only the head is up
    assert max_concurrent(None, shape, TrialShape(1, 1.0, 0.5)) == 32
    # two-worker trials, one GPU each: 8 by GPUs; the head's 16 TRAIN_DRIVER allow that many drivers
    assert trials_that_fit(shape, TrialShape(2, 4.0, 1.0)) == 8
    # 0.25 GPU per worker: 32 two-worker trials by GPUs, capped at 16 drivers
    assert trials_that_fit(shape, TrialShape(2, 1.0, 0.25)) == 16
    assert max_concurrent(3, shape, TrialShape(1, 1.0, 0.5)) == 3  # --max-concurrent wins


def test_global_worker_cap_and_packing_per_node():
    config = {"max_workers": 1, "head_node_type": "h",
              "available_node_types": {"h": {"resources": {"CPU": 2}},
                                       "w": {"resources": {"CPU": 3, "GPU": 1}, "max_workers": 5}}}
    shape = ClusterShape(node_types_from_launcher_config(config), "autoscaler")
    assert [(t.name, t.max_count) for t in shape.node_types] == [("h", 1), ("w", 1)]
    # 2-CPU workers: one per node (not 5 CPUs // 2): the head holds 1, the worker 1
    assert trials_that_fit(shape, TrialShape(1, 2.0)) == 2
    with pytest.raises(ConfigError, match="no node of this cluster"):
        max_concurrent(None, shape, TrialShape(1, 1.0, 2.0))


def test_live_single_node_matches_the_old_rule():
    shape = ClusterShape([NodeType("local", {"CPU": 4.0}, 1)], "live")
    assert max_concurrent(None, shape, TrialShape(1, 1.0)) == 4
    assert max_concurrent(None, shape, TrialShape(2, 0.99)) == 2


def test_placement_rules():
    assert driver_resources(True) == {"cpu": 0, TRAIN_DRIVER: 1}
    assert driver_resources(False) == {"cpu": 0.01}
    assert ddp_backend(TrialShape(2, 1.0, 1.0)) == "nccl"
    assert ddp_backend(TrialShape(2, 1.0, 0.0)) == "gloo"
    assert ddp_backend(TrialShape(2, 1.0, 0.5)) == "gloo"  # two ranks may share a GPU: NCCL would refuse
    for shape in (TrialShape(1, 1.0, 2.0), TrialShape(2, 1.0, 2.0)):
        with pytest.raises(ConfigError, match="a worker trains on one GPU"):
            check_trial_shape(shape)
    check_trial_shape(TrialShape(1, 1.0, 0.5))
    check_trial_shape(TrialShape(4, 1.0, 1.0))


def test_concurrency_limit_survives_the_restored_state():
    from ray.tune.search.basic_variant import BasicVariantGenerator  # noqa: F401  (Tune imports)
    from ray.tune.search.searcher import Searcher

    class Inner(Searcher):
        def suggest(self, trial_id):
            return {}

    limiter = StudyConcurrency(Inner(), max_concurrent=1)
    saved = limiter.get_state()
    limiter.set_max(6)  # this run's --max-concurrent (or what the cluster holds)
    limiter.set_state(saved)  # what Tune does on restore
    assert limiter.max_concurrent == 6


def test_optuna_location(tmp_path):
    assert optuna_location(None, str(tmp_path), False) == str(tmp_path / "optuna.journal")
    with pytest.raises(ConfigError, match="object store"):
        optuna_location(None, "s3://bucket/ltstudy", True)
    assert optuna_location(str(tmp_path), "s3://b/x", True) == str(tmp_path / "optuna.journal")
    assert optuna_location(f"sqlite:///{tmp_path}/o.db", "s3://b/x", True).endswith("o.db")
    with pytest.raises(ConfigError, match="does not exist"):
        optuna_location(str(tmp_path / "no" / "j.journal"), str(tmp_path), False)
    with pytest.raises(ConfigError, match="cannot connect to postgresql://u:\\*\\*\\*@127.0.0.1:1/x"):
        optuna_location("postgresql://u:secret@127.0.0.1:1/x", str(tmp_path), False)


def test_stage_data_downloads_once_into_the_storage(tmp_path, monkeypatch):
    import ltstudy.data.cifar as cifar

    calls = []

    def fake_download(root, name):  # the real one needs the internet; write a small CIFAR-100 instead
        calls.append((root, name))
        from support.data import write_cifar100

        write_cifar100(root, per_class=8, test_per_class=1)

    monkeypatch.setattr(cifar, "_download", fake_download)
    pins = stage_data({"method": "ce", "dataset": "cifar100-lt", "download": True, "imbalance": 5,
                       "val_per_class": 2}, str(tmp_path / "storage"), remote_storage=False)
    assert pins == {"data_root": str(tmp_path / "storage" / "data"), "download": False}
    assert calls == [(tmp_path / "storage" / "data", "cifar100")]
    with pytest.raises(ConfigError, match="needs --data-root"):
        stage_data({"method": "ce", "dataset": "cifar10-lt", "download": True}, "s3://b/x", remote_storage=True)
    assert stage_data({"method": "ce", **TINY}, str(tmp_path), False) == {}


def test_node_types_without_resources_are_not_a_maximum():
    from ltstudy.study.cluster.shape import _known_node_types

    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    assert [t.name for t in _known_node_types(config)] == ["head", "gpu_worker"]
    config["available_node_types"]["gpu_worker"]["resources"] = {}  # left to the provider to detect
    assert _known_node_types(config) is None  # then the live nodes are all that is known


def test_the_local_providers_one_node_type_is_the_head_and_its_workers():
    """Ray's `local` provider (on-premise nodes) gives the autoscaler one type for the head and the workers,
    with no resources (Ray detects them): the live nodes are what is known, not "no node holds a trial"."""
    from ltstudy.study.cluster.shape import _known_node_types

    config = {"max_workers": 2, "head_node_type": "local.cluster.node",
              "available_node_types": {"local.cluster.node": {"resources": {}, "min_workers": 2, "max_workers": 2}}}
    assert [(t.name, t.max_count) for t in node_types_from_launcher_config(config)] == [("local.cluster.node", 3)]
    assert _known_node_types(config) is None
    config["available_node_types"]["local.cluster.node"]["resources"] = {"CPU": 2}
    assert [(t.name, t.max_count) for t in _known_node_types(config)] == [("local.cluster.node", 3)]
