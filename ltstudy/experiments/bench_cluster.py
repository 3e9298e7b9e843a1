"""``ltstudy bench cluster``: cluster.yaml simulated on this machine (its node types scaled down for Ray's
fake multi-node provider), ``ltstudy tune`` against it, and what the cluster did (worker nodes launched,
where trials ran, the concurrency reached): the same study on the simulated autoscaling cluster and on a
cluster of one worker node. The tests of the autoscaling path use the same pieces.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from ltstudy.errors import ConfigError, StudyFailed
from ltstudy.experiments.local_cluster import fake_autoscaling_cluster, loopback_env, mlflow_server

#: cluster.yaml's g5.12xlarge (48 vCPUs, 4 GPUs) scaled down to fit a 2-core machine: 1 CPU and 1 logical GPU
SCALE = {"CPU": 1 / 48, "GPU": 1 / 4}
#: the benchmark's trial: a few seconds on 2 CPU cores (synthetic 8x8 images, 4 classes, ResNet-32)
TRIAL = {"dataset": "synthetic", "image_size": 8, "synthetic_classes": 4, "imbalance": 20, "val_per_class": 5,
         "batch_size": 64, "eval_batch_size": 256, "warmup_epochs": 0, "device": "cpu"}
#: two-worker trials on half a GPU each: one trial per scaled worker node, Train drivers on the head
STUDY_FLAGS = ["--workers", "2", "--cpus-per-worker", "0.5", "--gpus-per-worker", "0.5", "--scheduler", "none",
               "--sampler", "random", "--retries", "0"]


def scaled_node_types(cluster_file: Path, max_workers: int = 2) -> tuple[dict[str, float], dict[str, dict], int]:
    """(head resources, worker node types, max_workers) of a cluster file, scaled down (see SCALE), with at
    most ``max_workers`` worker nodes (cluster.yaml allows 4)."""
    if not cluster_file.is_file():
        raise ConfigError(f"cluster file not found: {cluster_file}")
    config = yaml.safe_load(cluster_file.read_text())
    types = config["available_node_types"]
    head = dict(types[config["head_node_type"]]["resources"])
    workers = {}
    for name, spec in types.items():
        if name == config["head_node_type"]:
            continue
        workers[name] = {"resources": {k: max(1, round(v * SCALE.get(k, 1))) for k, v in spec["resources"].items()},
                         "min_workers": spec["min_workers"],
                         "max_workers": min(int(spec["max_workers"]), max_workers)}
    return head, workers, min(int(config["max_workers"]), max_workers)


def cluster_state(address: str) -> dict[str, Any]:
    """Nodes the cluster ever had (with their GPU / TRAIN_DRIVER resources) and the node of every actor and
    task (Ray's state API), read by a process started for the loopback cluster."""
    script = f"""
import json, ray
from ray.util.state import list_actors, list_tasks
ray.init(address="{address}", log_to_driver=False, logging_level="ERROR")
nodes = {{n["NodeID"]: sorted(k for k in n["Resources"] if k in ("GPU", "TRAIN_DRIVER")) for n in ray.nodes()}}
actors = [(a.class_name, a.node_id) for a in list_actors(address="{address}", limit=10000, detail=False)]
tasks = [(t.name, t.node_id) for t in list_tasks(address="{address}", limit=10000, detail=False)]
print(json.dumps({{"nodes": nodes, "actors": actors, "tasks": tasks}}))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env=loopback_env())
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def tune(address: str, cwd: Path, *args: str, timeout: float = 1200) -> subprocess.CompletedProcess:
    """``ltstudy tune --address ADDRESS ARGS`` as a process that can talk to the loopback cluster."""
    return subprocess.run([sys.executable, "-m", "ltstudy.cli", "tune", "--address", address, *args],
                          cwd=cwd, env=loopback_env(), capture_output=True, text=True, timeout=timeout)


def trial_settings(epochs: int = 2) -> list[str]:
    """The benchmark's trial as ``KEY=VALUE`` settings."""
    return [*(f"{k}={v}" for k, v in TRIAL.items()), f"epochs={epochs}"]


def max_overlap(intervals: list[tuple[int, int]]) -> int:
    """The largest number of [start, end] intervals that cover one instant."""
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    best = now = 0
    for _, step in events:
        now += step
        best = max(best, now)
    return best


def _study(root: Path, cluster_file: Path, max_workers: int, trials: int, epochs: int) -> dict[str, Any]:
    from mlflow.tracking import MlflowClient

    head, workers, cap = scaled_node_types(cluster_file, max_workers)
    with mlflow_server(root) as uri, fake_autoscaling_cluster(root, head, workers, cap) as address:
        tic = time.monotonic()
        run = tune(address, root, "--method", "ce", "--num-trials", str(trials), *STUDY_FLAGS,
                   "--storage", str(root / "shared"), "--tracking-uri", uri, "--study-name", "figure",
                   *trial_settings(epochs))
        wall = time.monotonic() - tic
        if run.returncode != 0:
            tail = (run.stderr.strip() or run.stdout.strip()).splitlines()[-1:] or ["no output"]
            raise StudyFailed(f"bench cluster: `ltstudy tune` exited {run.returncode}: {tail[0]}")
        state = cluster_state(address)
        mlc = MlflowClient(uri)
        exp = mlc.get_experiment_by_name("figure")
        runs = mlc.search_runs([exp.experiment_id], "tags.`ltstudy.role` = 'trial'")
        parent = mlc.search_runs([exp.experiment_id], "tags.`ltstudy.role` = 'study'")[0]
    per_node: dict[str, int] = {}
    for r in runs:
        per_node[r.data.tags["node_id"][-5:]] = per_node.get(r.data.tags["node_id"][-5:], 0) + 1
    return {"worker_nodes_launched": sum("GPU" in res for res in state["nodes"].values()),
            "trials_per_node": per_node, "concurrency_max": int(parent.data.tags["ltstudy.max_concurrent"]),
            "concurrency_reached": max_overlap([(r.info.start_time, r.info.end_time) for r in runs]),
            "study_wall_s": round(wall, 1), "trials": len(runs)}


def bench_cluster(cluster_file: Path, trials: int = 4, epochs: int = 2) -> dict[str, dict[str, Any]]:
    """The same study on the simulated autoscaling cluster (up to 2 worker nodes) and on a cluster of one
    worker node; one row of figures each."""
    rows = {}
    for name, max_workers in (("autoscaling, up to 2 worker nodes", 2), ("one worker node", 1)):
        with tempfile.TemporaryDirectory(prefix="ltstudy-bench-cluster-") as tmp:
            rows[name] = _study(Path(tmp), cluster_file, max_workers, trials, epochs)
    return rows
