"""cluster.yaml is a real cluster-launcher file: Ray's own preparation and schema validation pass."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_cluster_yaml_validates_with_ray():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    config = prepare_config(raw)
    validate_config(config)
    gpu = config["available_node_types"]["gpu_worker"]
    assert gpu["min_workers"] == 0 and gpu["max_workers"] >= 1
    assert config["head_node_type"] == "head"
    text = (ROOT / "cluster.yaml").read_text()
    assert "mlflow server" in text and "pip install -e /home/ubuntu/ltstudy" in text
    assert "RAY_AUTH_MODE" in text
    for secret in ("aws_access_key_id", "aws_secret_access_key", "AKIA", "BEGIN RSA"):
        assert secret.lower() not in text.lower()
