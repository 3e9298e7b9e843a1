"""Every node checked before it runs a trial: the storage marker the driver wrote, the data paths, the
tracking server and the ltstudy / torch / ray / Python versions. Each failure is one line naming the node
and what it lacks.
"""

from __future__ import annotations

import hashlib
import os
import platform
import posixpath
import socket
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

import ltstudy
from ltstudy.config import PATH_KEYS
from ltstudy.errors import LtstudyError
from ltstudy.features.store import open_storage
from ltstudy.study import _compat

#: where a check writes its marker, under the storage root
CHECK_DIR = ".ltstudy-check"
#: seconds a node has to answer the pre-flight check (a new worker process on a busy node takes a few)
CHECK_TIMEOUT_S = 180.0


class ClusterCheckError(LtstudyError):
    """Some nodes lack what the study needs; one line per problem, each naming the node."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\nerror: ".join(problems))
        self.problems = problems


def _storage_root(storage: str):
    """(pyarrow filesystem, root path) of a storage URI or local folder."""
    s = open_storage(storage)
    return s.fs, posixpath.dirname(s.base)


def _package_digest() -> str:
    """A digest of the ltstudy sources, so two nodes with the same version string but different code differ."""
    root = Path(ltstudy.__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


def local_versions() -> dict[str, str]:
    """The versions every node must share with the driver."""
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
        try:
            with urllib.request.urlopen(tracking_uri.rstrip("/") + "/health", timeout=10):
                pass
        except OSError as exc:
            out["problems"].append(f"cannot reach the tracking server {tracking_uri} "
                                   f"({getattr(exc, 'reason', exc)})")
    return out


def data_paths(values: dict[str, Any]) -> list[str]:
    """The local paths a trial reads (data folder, file lists, backbone), from resolved settings."""
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


def storage_problem_here() -> str | None:
    """In a Tune trial: why this node cannot use the study's storage, or None.

    Tune checks the storage marker it wrote only when the first checkpoint is uploaded, after an epoch
    (and then retries the trial); a node launched later without the shared mount is found here, at the
    start, and the trial ends as failed with this line instead.
    """
    where = _compat.check_trial_storage()
    if where is None:
        return None
    return (f"node {ray.util.get_node_ip_address()} ({ray.get_runtime_context().get_node_id()[:12]}) "
            f"does not see --storage {where}: mount the shared storage on every node")


#: node id -> what is wrong with it for this study ("" when nothing): each node is checked once per process
_CHECKED: dict[str, str] = {}


def trial_node_check(tracking_uri: str | None, paths: list[str]) -> dict[str, Any]:
    """What every trial checks on its node (:func:`node_problem_here`): the driver's versions, the data
    paths and the tracking server (unless it is on the driver's loopback)."""
    remote = tracking_uri if tracking_uri and tracking_uri.startswith(("http://", "https://")) \
        and not _is_loopback(tracking_uri) else None
    return {"versions": local_versions(), "paths": list(paths), "tracking_uri": remote}


def node_problem_here(check: dict[str, Any] | None) -> str | None:
    """In a trial: why this node cannot run the study's trials, or None. The pre-flight check sees only the
    nodes alive when the study starts (with ``min_workers: 0``, the head); a node the autoscaler adds later is
    checked here, by its first trial (once per node and process), so its trials fail at the start with the
    node named instead of after an epoch or with wrong results."""
    problem = storage_problem_here()
    if problem or not check:
        return problem
    node = ray.get_runtime_context().get_node_id()
    if node not in _CHECKED:
        result = node_probe(None, None, "", check["paths"], check["tracking_uri"])
        problems = list(result["problems"])
        problems += [f"runs {k} {result['versions'].get(k)} (driver: {v})" for k, v in check["versions"].items()
                     if result["versions"] and result["versions"].get(k) != v]
        _CHECKED[node] = "; ".join(problems)
    if not _CHECKED[node]:
        return None
    return f"node {ray.util.get_node_ip_address()} ({node[:12]}): {_CHECKED[node]}"

