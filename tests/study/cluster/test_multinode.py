"""Two Ray nodes on one machine (head + a separately started worker node); a study whose trials run on
both, with storage in a folder both nodes see."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from ltstudy.study.run import StudyOptions, run_study

from support.configs import TINY
from support.servers import ray_env

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_nodes():
    import ray
    from ray.cluster_utils import Cluster

    ray_env()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    cluster.add_node(num_cpus=2)
    ray.init(address=cluster.address, log_to_driver=False, logging_level="WARNING")
    cluster.wait_for_nodes()
    yield ray
    ray.shutdown()
    cluster.shutdown()


def test_trials_land_on_both_nodes(two_nodes, tmp_path):
    assert len([n for n in two_nodes.nodes() if n["Alive"]]) == 2
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # each trial holds 2 CPUs = a whole node, and two run at once: one per node
    summary = run_study(StudyOptions(
        method="ce", num_trials=2, max_concurrent=2, cpus_per_worker=2, scheduler="none",
        sampler="random", storage=str(tmp_path / "shared"), tracking_uri=uri, study_name="two-nodes",
        retries=0, verbose=0, fixed={**TINY, "epochs": 2}))
    assert summary.counts == {"completed": 2}
    mlc = MlflowClient(uri)
    nodes = {mlc.get_run(t["run_id"]).data.tags["node_id"] for t in summary.trials}
    assert len(nodes) == 2, nodes
    table = two_nodes.util.placement_group_table()
    assert not [pg for pg in table.values() if pg["state"] == "CREATED"]
