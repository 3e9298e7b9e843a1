"""The cluster path end to end on this machine: an autoscaling cluster built from cluster.yaml's node types
(Ray's fake multi-node provider launches worker nodes as local processes with logical GPUs), started with
zero workers; ``ltstudy tune --address`` with fractional GPUs and two-worker trials; the MLflow server and
the Optuna study on a real PostgreSQL server; ``best-config export`` after the cluster is gone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from ltstudy.testing.servers import fake_autoscaling_cluster, loopback_env, mlflow_server, postgres_server

from .conftest import REPO, TINY

pytestmark = pytest.mark.slow

#: cluster.yaml's g5.12xlarge (48 vCPUs, 4 GPUs) scaled down to fit a 2-core machine: 1 CPU and 1 logical GPU
SCALE = {"CPU": 1 / 48, "GPU": 1 / 4}
#: and its worker limit (4) halved: two worker nodes at most
WORKER_SCALE = 1 / 2


def scaled_node_types() -> tuple[dict[str, float], dict[str, dict], int]:
    """(head resources, worker node types, max_workers) of cluster.yaml, scaled down (see SCALE)."""
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    types = config["available_node_types"]
    head = dict(types[config["head_node_type"]]["resources"])
    instance = {"g5.12xlarge": {"CPU": 48, "GPU": 4}}
    workers = {}
    for name, spec in types.items():
        if name == config["head_node_type"]:
            continue
        full = {**instance[spec["node_config"]["InstanceType"]], **spec["resources"]}
        workers[name] = {"resources": {k: max(1, round(v * SCALE.get(k, 1))) for k, v in full.items()},
                         "min_workers": spec["min_workers"],
                         "max_workers": max(1, int(spec["max_workers"] * WORKER_SCALE))}
    return head, workers, max(1, int(config["max_workers"] * WORKER_SCALE))


def _nodes_and_actors(address: str) -> dict:
    """Nodes the cluster ever had and where each Tune trial / Train actor ran (Ray's state API)."""
    script = f"""
import json, ray
from ray.util.state import list_actors
ray.init(address="{address}", log_to_driver=False, logging_level="ERROR")
nodes = {{n["NodeID"]: sorted(k for k in n["Resources"] if k in ("GPU", "TRAIN_DRIVER")) for n in ray.nodes()}}
actors = [(a.class_name, a.node_id) for a in list_actors(limit=10000, detail=False)]
print(json.dumps({{"nodes": nodes, "actors": actors}}))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env=loopback_env())
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_tune_on_an_autoscaling_cluster(tmp_path):
    head, workers, max_workers = scaled_node_types()
    assert head.get("CPU") == 0 and head.get("TRAIN_DRIVER", 0) >= 1  # the head keeps its CPUs
    tiny = [f"{k}={v}" for k, v in TINY.items()]
    storage = tmp_path / "shared" / "ltstudy"
    with postgres_server() as pg, mlflow_server(tmp_path, backend=f"{pg}/mlflow") as uri:
        with fake_autoscaling_cluster(tmp_path, head, workers, max_workers) as address:
            env = loopback_env()
            before = _nodes_and_actors(address)
            assert len(before["nodes"]) == 1  # zero workers: the head alone
            tune = subprocess.run(
                [sys.executable, "-m", "ltstudy.cli", "tune", "--address", address, "--method", "ce",
                 "--num-trials", "2", "--workers", "2", "--cpus-per-worker", "0.5", "--gpus-per-worker", "0.5",
                 "--scheduler", "none", "--sampler", "random", "--retries", "0", "--storage", str(storage),
                 "--tracking-uri", uri, "--optuna-storage", f"{pg}/optuna", "--study-name", "autoscale",
                 *tiny, "epochs=2", "device=cpu"],
                cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
            assert tune.returncode == 0, tune.stdout[-4000:] + tune.stderr[-4000:]
            after = _nodes_and_actors(address)
        # cluster stopped (every process by pid): what is left is MLflow and PostgreSQL
        workers_launched = [n for n, res in after["nodes"].items() if "GPU" in res]
        assert len(workers_launched) == 2, after["nodes"]
        gpu_nodes = set(workers_launched)
        drivers = [node for cls, node in after["actors"] if cls == "ImplicitFunc"]
        controllers = [node for cls, node in after["actors"] if "Controller" in cls]
        assert len(drivers) == 2 and controllers, after["actors"]
        assert not gpu_nodes & set(drivers + controllers), "a Train driver ran on a GPU node"

        mlc = MlflowClient(uri)
        exp = mlc.get_experiment_by_name("autoscale")
        runs = mlc.search_runs([exp.experiment_id], "tags.`ltstudy.role` = 'trial'")
        assert sorted(r.data.tags["ltstudy.status"] for r in runs) == ["completed", "completed"]
        assert len({r.data.tags["ltstudy.trial_id"] for r in runs}) == 2
        trial_nodes = {r.data.tags["node_id"] for r in runs}
        assert trial_nodes == gpu_nodes, (trial_nodes, gpu_nodes)  # one trial per worker node...
        first, second = sorted(runs, key=lambda r: r.info.start_time)
        assert second.info.start_time < first.info.end_time  # ...at the same time
        parent = mlc.search_runs([exp.experiment_id], "tags.`ltstudy.role` = 'study'")[0]
        assert parent.data.tags["ltstudy.max_concurrent"] == "2"  # the autoscaler's maximum, not 0 workers'

        ot = optuna.load_study(study_name="autoscale", storage=f"{pg}/optuna")
        assert len(ot.trials) == 2 and all(t.state.name == "COMPLETE" for t in ot.trials)

        best = tmp_path / "best.yaml"
        export = subprocess.run([sys.executable, "-m", "ltstudy.cli", "best-config", "export", "--study",
                                 "autoscale", "--tracking-uri", uri, "-o", str(best)],
                                cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert export.returncode == 0, export.stderr[-3000:]
        assert yaml.safe_load(best.read_text())["provenance"]["study"] == "autoscale"
        assert (Path(storage) / "autoscale").is_dir()
