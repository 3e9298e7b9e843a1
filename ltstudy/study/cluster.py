"""A study on a multi-node (autoscaling) Ray cluster: what the cluster can become, where each part of a
trial runs, pre-flight checks on every node, and the data staged once by the driver.

* **Concurrency** comes from the largest cluster the autoscaler may build, not from the nodes that happen
  to be up when the study starts (with ``min_workers: 0`` that is the head alone, and a concurrency of 1
  frozen into the saved Tuner would keep the autoscaler from ever adding a second node). Ray Train sizes
  itself from the cluster config the autoscaler publishes in the GCS (autoscaler v2, KubeRay); the
  launcher's default autoscaler (v1) publishes none, so the config file its monitor process runs with is
  read on the head node instead. Without an autoscaler the live nodes are the cluster.
* **Placement**: the Train driver of a multi-worker trial holds one unit of the head-only ``TRAIN_DRIVER``
  resource when the cluster has it (Train's controller follows its driver), so GPU nodes run only Train
  workers and scale down when idle. A worker trains on one device: more than one GPU per worker is
  refused; fractional GPUs with several workers switch DDP from NCCL (which refuses two ranks on one GPU)
  to gloo.
* **Pre-flight checks** run as a task on every node: the storage marker the driver wrote, the data paths,
  the tracking server and the ltstudy / torch / ray / Python versions. Each failure is one line naming the
  node and what it lacks.
* **Data once**: the driver downloads a missing dataset once (into a folder every node sees) and validates
  the dataset before any trial; trials never download.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import platform
import posixpath
import socket
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ray.tune.search import ConcurrencyLimiter

from ltstudy.errors import ConfigError, LtstudyError

logger = logging.getLogger("ltstudy")

#: head-only custom resource that Train drivers hold (cluster.yaml gives the head type some)
TRAIN_DRIVER = "TRAIN_DRIVER"
#: Ray's own resource that only the head node has
HEAD_RESOURCE = "node:__internal_head__"
#: where a check writes its marker, under the storage root
CHECK_DIR = ".ltstudy-check"
#: seconds a node has to answer the pre-flight check (a new worker process on a busy node takes a few)
CHECK_TIMEOUT_S = 180.0
_EPS = 1e-9


class ClusterCheckError(LtstudyError):
    """Some nodes lack what the study needs; one line per problem, each naming the node."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\nerror: ".join(problems))
        self.problems = problems


# --------------------------------------------------------------------------------- trial shape
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


# ---------------------------------------------------------------------- what the cluster can become
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
    ``min(its max_workers, the global max_workers)``."""
    types = config.get("available_node_types") or {}
    head = config.get("head_node_type")
    cap = int(config.get("max_workers", sum(int(t.get("max_workers", 0)) for t in types.values())))
    out = []
    for name, spec in types.items():
        resources = {k: float(v) for k, v in (spec.get("resources") or {}).items()}
        count = 1 if name == head else min(int(spec.get("max_workers", 0)), cap)
        if count > 0:
            out.append(NodeType(name, resources, count))
    return out


def _gcs_node_types() -> list[NodeType] | None:
    """The cluster config the autoscaler (v2, KubeRay) publishes in the GCS; Ray Train reads the same."""
    from ray._private import state

    try:
        config = state.state.get_cluster_config()
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
    import yaml

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
    import json

    import ray
    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    try:
        status = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
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
        config = ray.get(task.remote(pid), timeout=CHECK_TIMEOUT_S)
    except Exception:  # noqa: BLE001 - the head cannot run the task: use the live nodes
        return None
    return _known_node_types(config)


def _known_node_types(config: dict[str, Any] | None) -> list[NodeType] | None:
    """The config's node types, or None when a worker type does not say what it has (``resources: {}``,
    left to the provider to detect): then the live nodes are all that is known."""
    if not config:
        return None
    types = node_types_from_launcher_config(config)
    head = config.get("head_node_type")
    return None if any(not t.resources for t in types if t.name != head) else types


def _live_node_types() -> list[NodeType]:
    import ray

    return [NodeType(n["NodeID"], dict(n["Resources"]), 1) for n in ray.nodes() if n["Alive"]]


def cluster_shape() -> ClusterShape:
    """What the connected cluster can become: the autoscaler's node types and limits, else its nodes."""
    import ray

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


class StudyConcurrency(ConcurrencyLimiter):
    """Tune's concurrency limiter whose limit is this run's, also after ``--resume``.

    Tune restores a limiter's whole state, ``max_concurrent`` included, from the experiment's searcher
    state; this one keeps the limit it was given (see ``set_max``), so a resumed study runs as wide as
    the command that resumed it asked for or the cluster allows.
    """

    def set_state(self, state: dict) -> None:
        keep = self.max_concurrent
        super().set_state(state)
        self.max_concurrent = keep

    def set_max(self, value: int) -> None:
        self.max_concurrent = value


# ------------------------------------------------------------------------------ pre-flight checks
def _storage_root(storage: str):
    """(pyarrow filesystem, root path) of a storage URI or local folder."""
    from ltstudy.features.store import open_storage

    s = open_storage(storage)
    return s.fs, posixpath.dirname(s.base)


def _package_digest() -> str:
    """A digest of the ltstudy sources, so two nodes with the same version string but different code differ."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


def local_versions() -> dict[str, str]:
    """The versions every node must share with the driver."""
    import ray
    import torch

    import ltstudy

    return {"ltstudy": f"{ltstudy.__version__} (sources {_package_digest()})", "torch": torch.__version__,
            "ray": ray.__version__, "python": ".".join(platform.python_version_tuple()[:2])}


def _is_loopback(uri: str) -> bool:
    host = urlparse(uri).hostname or ""
    if host == "localhost":
        return True
    try:
        return socket.gethostbyname(host).startswith("127.")
    except OSError:
        return False


def node_probe(storage: str | None, marker: str | None, token: str, paths: list[str],
               tracking_uri: str | None) -> dict[str, Any]:
    """Runs on one node: what it sees of the storage, the data, the tracking server, and its versions."""
    import ray

    out: dict[str, Any] = {"node_id": ray.get_runtime_context().get_node_id(),
                           "ip": ray.util.get_node_ip_address(), "problems": []}
    try:
        out["versions"] = local_versions()
    except Exception as exc:  # noqa: BLE001 - reported as what the node lacks
        out["versions"] = {}
        out["problems"].append(f"cannot import ltstudy/torch ({type(exc).__name__}: {exc})")
    if storage and marker:
        try:
            fs, root = _storage_root(storage)
            with fs.open_input_stream(posixpath.join(root, marker)) as src:
                if src.read().decode() != token:
                    out["problems"].append(f"sees another storage at {storage} (the marker differs)")
        except Exception as exc:  # noqa: BLE001 - any failure to read is the finding
            why = "no such file" if isinstance(exc, FileNotFoundError) else f"{type(exc).__name__}: {exc}"
            out["problems"].append(f"cannot read the storage marker under {storage} ({why}): mount the "
                                   "shared storage on every node")
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        out["problems"].append(f"lacks the data path{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
    if tracking_uri:
        import urllib.request

        try:
            with urllib.request.urlopen(tracking_uri.rstrip("/") + "/health", timeout=10):
                pass
        except OSError as exc:
            out["problems"].append(f"cannot reach the tracking server {tracking_uri} "
                                   f"({getattr(exc, 'reason', exc)})")
    return out


def data_paths(values: dict[str, Any]) -> list[str]:
    """The local paths a trial reads (data folder, file lists, backbone), from resolved settings."""
    from ltstudy.config import PATH_KEYS

    return [str(values[k]) for k in PATH_KEYS if isinstance(values.get(k), str) and "://" not in values[k]]


@dataclass
class CheckReport:
    nodes: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def check_nodes(storage: str | None, tracking_uri: str | None, paths: list[str] | None = None,
                timeout: float = CHECK_TIMEOUT_S) -> CheckReport:
    """Run :func:`node_probe` on every alive node; compare each node's versions with the driver's.

    The driver writes a marker with a random token under ``storage`` first (and removes it after), so a
    node that sees a different folder at the same path is caught as well as one that sees none.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    token = uuid.uuid4().hex
    rel = None
    if storage:
        fs, root = _storage_root(storage)
        rel = posixpath.join(CHECK_DIR, token)
        try:
            fs.create_dir(posixpath.join(root, CHECK_DIR), recursive=True)
            with fs.open_output_stream(posixpath.join(root, rel)) as out:
                out.write(token.encode())
        except Exception as exc:  # noqa: BLE001 - the driver itself cannot write: one line
            raise ClusterCheckError([f"driver cannot write to --storage {storage} ({type(exc).__name__}: "
                                     f"{exc})"]) from None
    remote_uri = tracking_uri if tracking_uri and tracking_uri.startswith(("http://", "https://")) \
        and not _is_loopback(tracking_uri) else None
    probe = ray.remote(num_cpus=0, max_retries=0)(node_probe)
    nodes = [n for n in ray.nodes() if n["Alive"]]
    refs = {n["NodeID"]: probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
            .remote(storage, rel, token, list(paths or []), remote_uri) for n in nodes}
    report, expected = CheckReport(), local_versions()
    try:
        for node in nodes:
            name = f"node {node['NodeManagerAddress']} ({node['NodeID'][:12]})"
            try:
                result = ray.get(refs[node["NodeID"]], timeout=timeout)
            except ray.exceptions.GetTimeoutError:
                report.problems.append(f"{name}: did not answer the check within {timeout:.0f} s")
                continue
            except Exception as exc:  # noqa: BLE001 - e.g. ltstudy not importable there
                cause = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
                report.problems.append(f"{name}: cannot run the ltstudy check ({cause[:300]})")
                continue
            report.nodes.append(result)
            problems = list(result["problems"])
            for key, want in expected.items():
                got = result["versions"].get(key)
                if result["versions"] and got != want:
                    problems.append(f"runs {key} {got} (driver: {want})")
            report.problems += [f"{name}: {p}" for p in problems]
    finally:
        if storage and rel:
            try:
                fs.delete_file(posixpath.join(root, rel))
            except Exception:  # noqa: BLE001 - a leftover marker is harmless
                pass
    return report


# --------------------------------------------------------------------------------- the study
@dataclass
class Placement:
    """Where a study's trials go on the connected cluster and how many run at once."""

    shape: ClusterShape
    max_concurrent: int
    driver: dict[str, float]  # a multi-worker trial's Train driver
    backend: str  # DDP backend of multi-worker trials
    gpu_tasks: bool  # the cluster has (or can get) a GPU: feature extraction runs as a GPU task

    def describe(self) -> str:
        """One line for the study's records, e.g. ``autoscaler: up to 3 nodes (2.0 GPU, ...)``."""
        res = self.shape.max_resources()
        keys = [k for k in ("CPU", "GPU", TRAIN_DRIVER) if res.get(k)]
        return (f"{self.shape.source}: up to {self.shape.max_nodes} nodes ("
                + ", ".join(f"{res[k]:g} {k}" for k in keys) + f"), {self.max_concurrent} trials at once")


def place_study(requested: int | None, trial: TrialShape, storage: str, tracking_uri: str | None,
                values: dict[str, Any], storage_given: bool = True) -> Placement:
    """Size and place a study on the connected cluster; on a multi-node (or autoscaling) cluster, first
    check every node (:func:`check_nodes`) and stop with one line per problem."""
    shape = cluster_shape()
    if shape.alive_nodes > 1 or shape.max_nodes > 1:
        if not storage_given:
            raise ConfigError(f"this cluster can have {shape.max_nodes} nodes: pass --storage, a folder every "
                              f"node sees or s3://… (the default {storage} is on this node only)")
        report = check_nodes(storage, tracking_uri, data_paths(values))
        if report.problems:
            raise ClusterCheckError(report.problems)
    concurrency = max_concurrent(requested, shape, trial)
    logger.info("cluster (%s): up to %d nodes, %d trials at once", shape.source, shape.max_nodes, concurrency)
    return Placement(shape, concurrency, driver_resources(shape.has(TRAIN_DRIVER)), ddp_backend(trial),
                     shape.has("GPU"))


def storage_problem_here() -> str | None:
    """In a Tune trial: why this node cannot use the study's storage, or None.

    Tune checks the storage marker it wrote only when the first checkpoint is uploaded, after an epoch
    (and then retries the trial); a node launched later without the shared mount is found here, at the
    start, and the trial ends as failed with this line instead.
    """
    import ray
    from ray.train._internal.session import get_session

    storage = getattr(get_session(), "storage", None)
    try:
        storage._check_validation_file()
    except AttributeError:  # not in a Tune trial, or another Ray version: nothing to say
        return None
    except Exception:  # noqa: BLE001 - Ray's RuntimeError: the marker is not visible from here
        where = getattr(storage, "storage_fs_path", "the study's storage")
        return (f"node {ray.util.get_node_ip_address()} ({ray.get_runtime_context().get_node_id()[:12]}) "
                f"does not see --storage {where}: mount the shared storage on every node")
    return None


# ------------------------------------------------------------------------- durable study records
def optuna_location(given: str | None, storage: str, remote_storage: bool) -> str:
    """Where every study's Optuna study lives: ``--optuna-storage`` (a journal file on a shared folder or an
    RDB URL), else the journal beside the results of a local ``--storage``. An object store cannot hold
    Optuna's journal, and the driver's home folder would not survive ``ray down``: ask."""
    from ltstudy.study.search import OPTUNA_JOURNAL

    if given:
        if "://" not in given:
            path = Path(given).expanduser().resolve()
            if path.is_dir():
                path = path / OPTUNA_JOURNAL
            if not path.parent.is_dir():
                raise ConfigError(f"--optuna-storage {given}: folder {path.parent} does not exist")
            return str(path)
        if not given.startswith(("sqlite:///", "postgresql", "mysql")):
            raise ConfigError(f"--optuna-storage {given!r}: use a journal file path or an RDB URL "
                              "(postgresql://…, mysql://…, sqlite:///…)")
        _check_rdb(given)
        return given
    if remote_storage:
        raise ConfigError(f"--storage {storage} is an object store, which cannot hold the Optuna study: pass "
                          "--optuna-storage (an RDB URL such as postgresql://… or a journal file on a "
                          "folder that outlives the cluster)")
    return str(Path(storage) / OPTUNA_JOURNAL)


def _check_rdb(url: str) -> None:
    """Connect once (no tables written) so a wrong host or password is one line before anything starts."""
    if url.startswith("sqlite:///"):
        folder = Path(url[len("sqlite:///"):]).expanduser().resolve().parent
        if not folder.is_dir():
            raise ConfigError(f"--optuna-storage {url}: folder {folder} does not exist")
        return
    import sqlalchemy

    try:
        engine = sqlalchemy.create_engine(url)
        with engine.connect():
            pass
        engine.dispose()
    except Exception as exc:  # noqa: BLE001 - driver missing, refused, bad password: one line
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"--optuna-storage: cannot connect to {_redact(url)}: {detail}") from None


def _redact(url: str) -> str:
    """The URL without its password."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


# ----------------------------------------------------------------------------------- data once
def stage_data(values: dict[str, Any], storage: str, remote_storage: bool) -> dict[str, Any]:
    """Fetch (``download``) once and validate the dataset on the driver; returns the pins for the trials.

    With ``download`` and no ``data_root``, the data goes to ``<storage>/data`` (a folder every node sees
    when the storage is shared). Trials then run with ``download=false`` and read that folder.
    """
    from ltstudy.config import load_data, resolve_config

    pins: dict[str, Any] = {}
    if values.get("download"):
        if not values.get("data_root"):
            if remote_storage:
                raise ConfigError("--download with an object-store --storage needs --data-root, a folder "
                                  "every node sees (e.g. on the shared file system)")
            pins["data_root"] = str(Path(storage) / "data")
        pins["download"] = False
    cfg = resolve_config({**values, **pins, "download": bool(values.get("download"))})
    load_data(cfg)  # downloads when asked, then reads and splits: a DataError is one line, exit 2
    return pins
