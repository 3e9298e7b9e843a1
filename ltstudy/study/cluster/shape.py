"""What a trial asks for and what the cluster can become: trial shapes, node types, how many trials fit.

* **Concurrency** comes from the largest cluster the autoscaler may build, not from the nodes that happen
  to be up when the study starts (with ``min_workers: 0`` that is the head alone, and a concurrency of 1
  frozen into the saved Tuner would keep the autoscaler from ever adding a second node). Ray Train sizes
  itself from the cluster config the autoscaler publishes in the GCS (autoscaler v2, KubeRay); the
  launcher's default autoscaler (v1) publishes none, so the config file its monitor process runs with is
  read on the head node instead. Without an autoscaler the live nodes are the cluster.
* A worker trains on one device: more than one GPU per worker is refused; fractional GPUs with several
  workers switch DDP from NCCL (which refuses two ranks on one GPU) to gloo.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import yaml
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ltstudy.errors import ConfigError
from ltstudy.study import _compat

logger = logging.getLogger("ltstudy")

#: head-only custom resource that Train drivers hold (cluster.yaml gives the head type some)
TRAIN_DRIVER = "TRAIN_DRIVER"
#: Ray's own resource that only the head node has
HEAD_RESOURCE = "node:__internal_head__"
#: seconds the head has to answer a question about its autoscaler (a new worker process takes a few)
HEAD_TIMEOUT_S = 180.0
_EPS = 1e-9


@dataclass(frozen=True)
class TrialShape:
    """What one trial asks for: ``workers`` ranks of ``cpus`` CPUs and ``gpus`` GPUs each."""

    workers: int = 1
    cpus: float = 1.0
    gpus: float = 0.0

    def worker_bundle(self) -> dict[str, float]:
        return {"CPU": self.cpus, **({"GPU": self.gpus} if self.gpus else {})}


def check_trial_shape(shape: TrialShape) -> None:
    """Refuse GPU requests a trial cannot use (before Ray starts)."""
    if shape.gpus > 1:
        ranks = f"--workers {shape.workers * int(shape.gpus)}" if float(shape.gpus).is_integer() else "more --workers"
        raise ConfigError(f"--gpus-per-worker {shape.gpus:g}: a worker trains on one GPU, so the other GPUs "
                          f"would sit idle; use {ranks} --gpus-per-worker 1 (DDP over the GPUs)")


def ddp_backend(shape: TrialShape) -> str:
    """NCCL for whole GPUs; gloo on the CPU and for fractional GPUs, where two ranks may share one GPU
    (NCCL refuses that: "duplicate GPU")."""
    if shape.gpus and float(shape.gpus).is_integer():
        return "nccl"
    if shape.gpus and shape.workers > 1:
        logger.warning("--gpus-per-worker %g with %d workers: ranks may share a GPU, which NCCL refuses; "
                       "DDP uses the gloo backend (slower all-reduce)", shape.gpus, shape.workers)
    return "gloo"


def driver_resources(has_train_driver: bool) -> dict[str, float]:
    """What a multi-worker trial's Train driver holds: one ``TRAIN_DRIVER`` (the head) when the cluster
    offers it, else a sliver of a CPU anywhere."""
    return {"cpu": 0, TRAIN_DRIVER: 1} if has_train_driver else {"cpu": 0.01}


@dataclass(frozen=True)
class NodeType:
    """A kind of node, its resources and how many of it the cluster can have at most."""

    name: str
    resources: dict[str, float]
    max_count: int


@dataclass
class ClusterShape:
    """The node types of the largest cluster this one can become, and where that was read from."""

    node_types: list[NodeType]
    source: str  # "autoscaler" | "live"
    alive_nodes: int = 1

    def max_resources(self) -> dict[str, float]:
        total: dict[str, float] = {}
        for t in self.node_types:
            for key, value in t.resources.items():
                total[key] = total.get(key, 0.0) + value * t.max_count
        return total

    @property
    def max_nodes(self) -> int:
        return sum(t.max_count for t in self.node_types)

    def has(self, resource: str) -> bool:
        return self.max_resources().get(resource, 0) > 0


def node_types_from_launcher_config(config: dict[str, Any]) -> list[NodeType]:
    """Node types of a cluster-launcher / autoscaler config: the head once, each worker type up to
    ``min(its max_workers, the global max_workers)``. The head's type may have workers too (Ray's ``local``
    provider has one type, ``local.cluster.node``, for the head and its workers): they count beside the head."""
    types = config.get("available_node_types") or {}
    head = config.get("head_node_type")
    cap = int(config.get("max_workers", sum(int(t.get("max_workers", 0)) for t in types.values())))
    out = []
    for name, spec in types.items():
        resources = {k: float(v) for k, v in (spec.get("resources") or {}).items()}
        count = (name == head) + min(int(spec.get("max_workers", 0)), cap)
        if count > 0:
            out.append(NodeType(name, resources, count))
    return out


def _gcs_node_types() -> list[NodeType] | None:
    """The cluster config the autoscaler (v2, KubeRay) publishes in the GCS; Ray Train reads the same."""
    try:
        config = _compat.gcs_cluster_config()
    except Exception:  # noqa: BLE001 - older GCS or no access: fall back to the other sources
        return None
    if config is None or not config.node_group_configs:
        return None
    out = []
    for group in config.node_group_configs:
        count = group.max_count if group.max_count >= 0 else 1_000_000
        if count:
            out.append(NodeType(group.name, {k: float(v) for k, v in group.resources.items()}, count))
    return out or None


def _read_monitor_config(monitor_pid: int) -> dict[str, Any] | None:
    """On the head node: the autoscaling config file the autoscaler monitor process was started with."""
    proc = Path(f"/proc/{monitor_pid}")
    try:
        args = (proc / "cmdline").read_bytes().decode().split("\0")
        cwd = os.readlink(proc / "cwd")
    except OSError:
        return None
    for arg in args:
        if arg.startswith("--autoscaling-config="):
            path = Path(os.path.expanduser(arg.split("=", 1)[1]))
            try:
                return yaml.safe_load((path if path.is_absolute() else Path(cwd) / path).read_text())
            except (OSError, yaml.YAMLError):
                return None
    return None


def _launcher_node_types() -> list[NodeType] | None:
    """The v1 autoscaler's config, read on the head (it does not publish it in the GCS)."""
    try:
        status = _compat.autoscaler_status()
        pid = int(json.loads(status)["monitor_pid"]) if status else None
    except (ValueError, KeyError, TypeError):
        pid = None
    head = [n["NodeID"] for n in ray.nodes() if n["Alive"] and HEAD_RESOURCE in n["Resources"]]
    if pid is None or not head:
        return None
    if ray.get_runtime_context().get_node_id() == head[0]:  # the driver runs on the head (ray job submit)
        return _known_node_types(_read_monitor_config(pid))
    task = ray.remote(num_cpus=0, max_retries=0)(_read_monitor_config).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(head[0], soft=False))
    try:
        config = ray.get(task.remote(pid), timeout=HEAD_TIMEOUT_S)
    except Exception:  # noqa: BLE001 - the head cannot run the task: use the live nodes
        return None
    return _known_node_types(config)


def _known_node_types(config: dict[str, Any] | None) -> list[NodeType] | None:
    """The config's node types, or None when a type the autoscaler starts workers of does not say what it
    has (``resources: {}``, left to the provider to detect, as Ray's ``local`` provider always does): then
    the live nodes are all that is known."""
    if not config:
        return None
    types = node_types_from_launcher_config(config)
    head = config.get("head_node_type")
    return None if any(not t.resources for t in types if t.name != head or t.max_count > 1) else types


def _live_node_types() -> list[NodeType]:
    return [NodeType(n["NodeID"], dict(n["Resources"]), 1) for n in ray.nodes() if n["Alive"]]


def cluster_shape() -> ClusterShape:
    """What the connected cluster can become: the autoscaler's node types and limits, else its nodes."""
    alive = sum(1 for n in ray.nodes() if n["Alive"])
    types = _gcs_node_types() or _launcher_node_types()
    if types:
        return ClusterShape(types, "autoscaler", alive)
    return ClusterShape(_live_node_types(), "live", alive)


def _per_node(node: dict[str, float], bundle: dict[str, float]) -> int:
    """How many ``bundle``s fit on one node."""
    fits = math.inf
    for key, need in bundle.items():
        if need > 0:
            fits = min(fits, math.floor(node.get(key, 0.0) / need + _EPS))
    return 0 if fits is math.inf else int(fits)


def trials_that_fit(shape: ClusterShape, trial: TrialShape) -> int:
    """Concurrent trials the largest cluster holds: worker slots packed per node type, and for multi-worker
    trials also the drivers (one ``TRAIN_DRIVER`` each, when the cluster has that resource)."""
    bundle = trial.worker_bundle()
    slots = sum(_per_node(t.resources, bundle) * t.max_count for t in shape.node_types)
    if trial.workers == 1:
        return slots
    trials = slots // trial.workers
    if shape.has(TRAIN_DRIVER):
        trials = min(trials, sum(_per_node(t.resources, {TRAIN_DRIVER: 1}) * t.max_count
                                 for t in shape.node_types))
    return trials


def max_concurrent(requested: int | None, shape: ClusterShape, trial: TrialShape) -> int:
    """``--max-concurrent`` if given, else what the largest cluster holds (at least 1)."""
    if requested:
        return requested
    fits = trials_that_fit(shape, trial)
    if fits < 1:
        need = ", ".join(f"{v:g} {k}" for k, v in trial.worker_bundle().items())
        raise ConfigError(f"no node of this cluster ({shape.source}: "
                          f"{', '.join(t.name for t in shape.node_types)}) can hold a trial worker "
                          f"({need}); change --cpus-per-worker / --gpus-per-worker or the node types")
    return fits
