"""Pre-flight checks against a cluster where one node does not see the shared storage: that node runs in its
own mount namespace with an empty tmpfs over the storage folder (a node whose EFS mount is missing).
``ltstudy cluster check`` prints one line naming the node and exits 2; ``ltstudy tune`` stops the same way
before any trial and records nothing."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from support.configs import TINY
from support.servers import loopback_env, ray_cluster

pytestmark = pytest.mark.slow


def test_a_node_without_the_storage_is_one_line_exit_2(tmp_path):
    storage = tmp_path / "shared"
    storage.mkdir()
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    hide = ["unshare", "-m", "--propagation", "private", *([] if os.geteuid() == 0 else ["-r"]), "sh", "-c",
            f'mount -t tmpfs none "{storage}" && exec "$0" "$@"']
    with ray_cluster(tmp_path, {"CPU": 1}, [({"CPU": 1}, hide)]) as address:
        env = loopback_env()
        check = subprocess.run([sys.executable, "-m", "ltstudy.cli", "cluster", "check", "--address", address,
                                "--storage", str(storage), "--tracking-uri", tracking],
                               capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
        assert check.returncode == 2, check.stdout[-2000:] + check.stderr[-2000:]
        lines = check.stderr.strip().splitlines()
        assert len(lines) == 1, check.stderr
        assert lines[0].startswith("error: node 127.0.0.1 (") and "cannot read the storage marker" in lines[0]
        assert not list((storage / ".ltstudy-check").iterdir())  # the driver removed its marker

        tiny = [f"{k}={v}" for k, v in TINY.items()]
        tune = subprocess.run([sys.executable, "-m", "ltstudy.cli", "tune", "--address", address, "--method", "ce",
                               "--num-trials", "2", "--storage", str(storage), "--tracking-uri", tracking,
                               "--study-name", "no-mount", *tiny, "epochs=1"],
                              capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
        assert tune.returncode == 2, tune.stdout[-2000:] + tune.stderr[-2000:]
        assert tune.stderr.strip().splitlines()[-1].split(")", 1)[1] == lines[0].split(")", 1)[1]
        assert not (tmp_path / "mlflow.db").exists()  # nothing recorded
        assert not (storage / "no-mount").exists()


_LATE_NODE = """
import json, sys, ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from ltstudy.study.cluster.nodes import node_problem_here, trial_node_check
ray.init(address=sys.argv[1], log_to_driver=False, logging_level="ERROR")
check = trial_node_check(None, [sys.argv[2]])
probe = ray.remote(num_cpus=0)(node_problem_here)
out = {n["NodeManagerAddress"] + "/" + n["NodeID"]: ray.get(probe.options(
           scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(check))
       for n in ray.nodes() if n["Alive"]}
print(json.dumps(out))
"""


def test_a_trial_checks_its_own_node_first(tmp_path):
    """What every trial runs first (on nodes the autoscaler adds after the pre-flight check too): a node
    that lacks the data is named in one line, the others pass."""
    data = tmp_path / "data"
    (data / "cifar").mkdir(parents=True)
    hide = ["unshare", "-m", "--propagation", "private", *([] if os.geteuid() == 0 else ["-r"]), "sh", "-c",
            f'mount -t tmpfs none "{data}" && exec "$0" "$@"']
    with ray_cluster(tmp_path, {"CPU": 1}, [({"CPU": 1}, hide)]) as address:
        run = subprocess.run([sys.executable, "-c", _LATE_NODE, address, str(data / "cifar")],
                             capture_output=True, text=True, timeout=300, env=loopback_env(), cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    import json

    results = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(results) == 2 and sorted(v is None for v in results.values()) == [False, True], results
    (bad,) = [v for v in results.values() if v]
    node = next(k for k, v in results.items() if v).split("/")[1]
    assert bad.startswith(f"node 127.0.0.1 ({node[:12]}): lacks the data path {data / 'cifar'}"), bad
