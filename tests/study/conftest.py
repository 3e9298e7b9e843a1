"""Fixtures for the study tests: one Ray cluster per module, a real ``mlflow server``, tiny trials."""

from __future__ import annotations

import pytest

from support.servers import mlflow_server, ray_env


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray_env()
    ray.init(address="local", num_cpus=4, log_to_driver=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module", name="mlflow_server")
def mlflow_server_fixture(tmp_path_factory):
    """A real ``mlflow server`` on a free loopback port, killed in teardown."""
    with mlflow_server(tmp_path_factory.mktemp("mlflow")) as uri:
        yield uri
