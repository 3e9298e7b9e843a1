"""The AWS side of the cluster file: the AMI of a region, the IAM set-up the head needs to start workers
with their own instance profile, and the boto3 clients ``cluster doctor`` and ``render`` use.

boto3 is the ``aws`` extra (``pip install 'ltstudy[aws]'``); Ray's launcher needs it on the laptop too.
``AWS_ENDPOINT_URL`` (boto3's own setting) points every client at another endpoint, such as a moto server.
"""

from __future__ import annotations

import json
from typing import Any

from ltstudy.errors import ConfigError

#: the public SSM parameter naming the newest Deep Learning Base AMI (Ubuntu 22.04, NVIDIA driver, x86_64)
AMI_PARAMETER = "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id"
#: Ray's default head role (``ray.autoscaler._private.aws.config.DEFAULT_RAY_IAM_ROLE``)
RAY_HEAD_ROLE = "ray-autoscaler-v1"


def client(service: str, region: str) -> Any:
    """A boto3 client, or one line saying how to get boto3."""
    try:
        import boto3
    except ImportError:
        raise ConfigError("boto3 is not installed: pip install 'ltstudy[aws]' (Ray's AWS launcher needs it "
                          "too)") from None
    return boto3.client(service, region_name=region)


def has_credentials() -> bool:
    """Whether boto3 is installed and finds credentials (environment, ~/.aws, SSO)."""
    try:
        import boto3
    except ImportError:
        return False
    return boto3.Session().get_credentials() is not None


def resolve_ami(region: str, ssm: Any = None) -> str:
    """The Deep Learning Base AMI of ``region`` from its public SSM parameter (:data:`AMI_PARAMETER`)."""
    ssm = ssm or client("ssm", region)
    try:
        return ssm.get_parameter(Name=AMI_PARAMETER)["Parameter"]["Value"]
    except Exception as exc:  # noqa: BLE001 - no credentials, no such parameter, no network: one line
        raise ConfigError(f"--region {region}: cannot look up the AMI (SSM {AMI_PARAMETER}): "
                          f"{_reason(exc)}; pass --image-id") from None


def _reason(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def pass_role_policy(worker_role: str) -> dict[str, Any]:
    """The inline policy that lets the head start workers with ``worker_role``'s instance profile."""
    return {"Version": "2012-10-17", "Statement": [
        {"Sid": "LtstudyPassWorkerRole", "Effect": "Allow", "Action": "iam:PassRole",
         "Resource": f"arn:aws:iam::*:role/{worker_role}"}]}


def iam_commands(worker_profile: str, policy_file: str, head_role: str = RAY_HEAD_ROLE) -> list[str]:
    """The ``aws iam`` commands that create the worker role and profile (same name) and let the head pass it."""
    trust = json.dumps({"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}]})
    return [
        f"aws iam create-role --role-name {worker_profile} --assume-role-policy-document '{trust}'",
        f"aws iam create-instance-profile --instance-profile-name {worker_profile}",
        f"aws iam add-role-to-instance-profile --instance-profile-name {worker_profile} "
        f"--role-name {worker_profile}",
        f"aws iam put-role-policy --role-name {head_role} --policy-name ltstudy-pass-{worker_profile} "
        f"--policy-document file://{policy_file}",
    ]
