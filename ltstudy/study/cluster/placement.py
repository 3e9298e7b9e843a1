"""Where a study's trials go on the connected cluster, how many run at once, and freeing what they held.

The Train driver of a multi-worker trial holds one unit of the head-only ``TRAIN_DRIVER`` resource when the
cluster has it (Train's controller follows its driver), so GPU nodes run only Train workers and scale down
when idle. On a multi-node (or autoscaling) cluster every node is checked first (:mod:`.nodes`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import ray
import ray.tune

from ltstudy.errors import ConfigError
from ltstudy.study import _compat
from ltstudy.study.cluster.nodes import ClusterCheckError, check_nodes, data_paths, trial_node_check
from ltstudy.study.cluster.shape import (
    TRAIN_DRIVER,
    ClusterShape,
    TrialShape,
    cluster_shape,
    ddp_backend,
    driver_resources,
    max_concurrent,
)

logger = logging.getLogger("ltstudy")

#: rank 0 of a multi-worker trial reports its workers' placement group under this key
PLACEMENT_GROUP_KEY = "train_placement_group"


@dataclass(kw_only=True)
class Placement:
    """Where a study's trials go on the connected cluster and how many run at once."""

    shape: ClusterShape
    max_concurrent: int
    driver: dict[str, float]  # a multi-worker trial's Train driver
    backend: str  # DDP backend of multi-worker trials
    gpu_tasks: bool  # the cluster has (or can get) a GPU: feature extraction runs as a GPU task
    node_check: dict[str, Any] | None = None  # what each trial checks on its node (nodes.trial_node_check)

    def describe(self) -> str:
        """One line for the study's records, e.g. ``autoscaler: up to 3 nodes (2.0 GPU, ...)``."""
        res = self.shape.max_resources()
        keys = [k for k in ("CPU", "GPU", TRAIN_DRIVER) if res.get(k)]
        return (f"{self.shape.source}: up to {self.shape.max_nodes} nodes ("
                + ", ".join(f"{res[k]:g} {k}" for k in keys) + f"), {self.max_concurrent} trials at once")


def place_study(requested: int | None, trial: TrialShape, storage: str, tracking_uri: str | None,
                values: dict[str, Any], storage_given: bool = True) -> Placement:
    """Size and place a study on the connected cluster; on a multi-node (or autoscaling) cluster, first
    check every node (:func:`~.nodes.check_nodes`) and stop with one line per problem."""
    shape = cluster_shape()
    if shape.alive_nodes > 1 or shape.max_nodes > 1:
        if not storage_given:
            raise ConfigError(f"this cluster can have {shape.max_nodes} nodes: pass --storage, a folder every "
                              f"node sees or s3://… (the default {storage} is on this node only)")
        report = check_nodes(storage, tracking_uri, data_paths(values))
        if report.problems:
            raise ClusterCheckError(report.problems)
        node_check = trial_node_check(tracking_uri, data_paths(values))
    else:
        node_check = None
    concurrency = max_concurrent(requested, shape, trial)
    logger.info("cluster (%s): up to %d nodes, %d trials at once", shape.source, shape.max_nodes, concurrency)
    return Placement(shape=shape, max_concurrent=concurrency, driver=driver_resources(shape.has(TRAIN_DRIVER)),
                     backend=ddp_backend(trial), gpu_tasks=shape.has("GPU"), node_check=node_check)


class PlacementGroupReaper(ray.tune.Callback):
    """Removes a multi-worker trial's Train placement group when the trial ends.

    Tune ends a trial by killing its actor (ASHA stops, ``max_t``); Ray Train V2's own
    ``PlacementGroupCleaner`` then misses the orphaned workers' group often enough (seen here with
    Ray 2.60: a 2-worker study on a 2-CPU box deadlocked with the group still CREATED), so the study
    frees it itself. Rank 0 reports the group's id with every result (:data:`PLACEMENT_GROUP_KEY`).
    """

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._remove(trial)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._remove(trial)

    @staticmethod
    def _remove(trial: Any) -> None:
        group = (trial.last_result or {}).get(PLACEMENT_GROUP_KEY)
        if not group:
            return
        try:
            ray.util.remove_placement_group(_compat.placement_group(group))
        except Exception:  # noqa: BLE001 - already removed by Ray's cleaner: nothing to do
            pass
