"""The cluster path end to end on this machine: an autoscaling cluster built from cluster.yaml's node types
(Ray's fake multi-node provider launches worker nodes as local processes with logical GPUs), started with
zero workers; ``ltstudy tune --address`` with fractional GPUs and two-worker trials; the MLflow server and
the Optuna study on a real PostgreSQL server; feature extraction as a GPU task; ``best-config export`` after
the cluster is gone."""

from __future__ import annotations

import subprocess
import sys

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from ltstudy.experiments.bench_cluster import (
    STUDY_FLAGS,
    cluster_state,
    scaled_node_types,
    trial_settings,
    tune,
)

from support.servers import REPO, fake_autoscaling_cluster, loopback_env, mlflow_server, postgres_server

pytestmark = pytest.mark.slow


def test_tune_on_an_autoscaling_cluster(tmp_path):
    head, workers, max_workers = scaled_node_types(REPO / "cluster.yaml")
    assert head.get("CPU") == 0 and head.get("TRAIN_DRIVER", 0) >= 1  # the head keeps its CPUs
    storage = tmp_path / "shared" / "ltstudy"
    with postgres_server() as pg, mlflow_server(tmp_path, backend=f"{pg}/mlflow") as uri:
        with fake_autoscaling_cluster(tmp_path, head, workers, max_workers) as address:
            assert len(cluster_state(address)["nodes"]) == 1  # zero workers: the head alone
            study = tune(address, tmp_path, "--method", "ce", "--num-trials", "2", *STUDY_FLAGS,
                         "--storage", str(storage), "--tracking-uri", uri, "--optuna-storage", f"{pg}/optuna",
                         "--study-name", "autoscale", *trial_settings())
            assert study.returncode == 0, study.stdout[-4000:] + study.stderr[-4000:]
            mlc = MlflowClient(uri)
            exp = mlc.get_experiment_by_name("autoscale")
            runs = mlc.search_runs([exp.experiment_id], "tags.`ltstudy.role` = 'trial'")
            # a feature-stage study on the first study's backbone: extraction is a task on a GPU node
            features = tune(address, tmp_path, "--method", "ce_classifier", "--num-trials", "1",
                            "--gpus-per-worker", "0.5", "--scheduler", "none", "--retries", "0",
                            "--backbone", runs[0].info.run_id, "--storage", str(storage), "--tracking-uri", uri,
                            "--optuna-storage", f"{pg}/optuna", "--study-name", "autoscale-features", "epochs=1")
            assert features.returncode == 0, features.stdout[-4000:] + features.stderr[-4000:]
            state = cluster_state(address)
        # the cluster is stopped (every process by pid): MLflow and PostgreSQL remain
        gpu_nodes = {n for n, res in state["nodes"].items() if "GPU" in res}
        assert len(gpu_nodes) == 2, state["nodes"]  # the autoscaler launched both worker nodes
        # Tune trial actors: the two Train drivers (on the head, holding TRAIN_DRIVER) and the feature
        # study's one-worker trial (on a GPU node); Train's controllers follow their drivers
        trials = [node in gpu_nodes for cls, node in state["actors"] if cls == "ImplicitFunc"]
        assert sorted(trials) == [False, False, True], state["actors"]
        controllers = [node for cls, node in state["actors"] if "Controller" in cls]
        assert controllers and not gpu_nodes & set(controllers), "a Train driver ran on a GPU node"
        ranks = [node for cls, node in state["actors"] if cls == "RayTrainWorker"]
        assert len(ranks) == 4 and set(ranks) <= gpu_nodes, state["actors"]
        extraction = [node for name, node in state["tasks"] if name == "_feature_cache"]
        assert len(extraction) == 1 and extraction[0] in gpu_nodes, state["tasks"]

        assert sorted(r.data.tags["ltstudy.status"] for r in runs) == ["completed", "completed"]
        assert len({r.data.tags["ltstudy.trial_id"] for r in runs}) == 2
        assert {r.data.tags["node_id"] for r in runs} == gpu_nodes  # one trial per worker node...
        first, second = sorted(runs, key=lambda r: r.info.start_time)
        assert second.info.start_time < first.info.end_time  # ...at the same time
        parent = mlc.search_runs([exp.experiment_id], "tags.`ltstudy.role` = 'study'")[0]
        assert parent.data.tags["ltstudy.max_concurrent"] == "2"  # the autoscaler's maximum, not 0 workers'

        studies = optuna.get_all_study_names(f"{pg}/optuna")  # every study in one storage
        assert sorted(studies) == ["autoscale", "autoscale-features"]
        ot = optuna.load_study(study_name="autoscale", storage=f"{pg}/optuna")
        assert len(ot.trials) == 2 and all(t.state.name == "COMPLETE" for t in ot.trials)

        best = tmp_path / "best.yaml"
        export = subprocess.run([sys.executable, "-m", "ltstudy.cli", "best-config", "export", "--study",
                                 "autoscale", "--tracking-uri", uri, "-o", str(best)],
                                cwd=tmp_path, env=loopback_env(), capture_output=True, text=True, timeout=300)
        assert export.returncode == 0, export.stderr[-3000:]
        assert yaml.safe_load(best.read_text())["provenance"]["study"] == "autoscale"
