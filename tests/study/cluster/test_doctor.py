"""``cluster doctor`` and a rendered file against a moto server (AWS's APIs on 127.0.0.1): the docs' network
steps done with boto3, Ray's own ``bootstrap_aws`` on the rendered file, and one planted mistake at a time,
each named by the doctor in one line. Moto has no EC2 quotas, so the G/VT vCPU quota comes through the
doctor's ``g_quota`` seam."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from ltstudy.study import _compat
from ltstudy.study.cluster.aws import AMI_PARAMETER, RAY_HEAD_ROLE, pass_role_policy, resolve_ami
from ltstudy.study.cluster.doctor import G_QUOTA_CODES, Doctor, DoctorError
from ltstudy.study.cluster.launcher import RenderOptions, render, validate

from support.servers import REPO, free_port, stop_session

REGION = "us-west-2"
CIDR = "203.0.113.7/32"


@pytest.fixture(scope="module")
def moto(tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    proc = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p",
                             str(port)], stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                stop_session(proc)
                raise RuntimeError(log.read_text()[-2000:]) from None
            time.sleep(0.3)
    yield url
    stop_session(proc)


@pytest.fixture
def aws(moto, monkeypatch, tmp_path):
    for key, value in {"AWS_ENDPOINT_URL": moto, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY":
                       "testing", "AWS_DEFAULT_REGION": REGION, "HOME": str(tmp_path)}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    urllib.request.urlopen(urllib.request.Request(moto + "/moto-api/reset", method="POST"), timeout=10)
    token = tmp_path / "auth_token"
    token.write_text("0" * 64)
    token.chmod(0o600)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token))
    return _network()


def _network() -> dict:
    """The network steps of docs/cluster.md ('Network'), with boto3: a VPC with a subnet in two zones, the
    nodes' group (all traffic within it, SSH from one address), the EFS with a mount target per subnet, the
    worker role and profile, and the head role allowed to pass it."""
    import boto3

    ec2, efs, iam = (boto3.client(s, region_name=REGION) for s in ("ec2", "efs", "iam"))
    vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    subnets = [ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.0.{i}.0/24", AvailabilityZone=f"{REGION}{z}")
               ["Subnet"]["SubnetId"] for i, z in ((1, "a"), (2, "b"))]
    for subnet in subnets:  # Ray's nodes are reached by their public address unless use_internal_ips
        ec2.modify_subnet_attribute(SubnetId=subnet, MapPublicIpOnLaunch={"Value": True})
    sg = ec2.create_security_group(GroupName="ltstudy-test-nodes", Description="nodes", VpcId=vpc)["GroupId"]
    ec2.authorize_security_group_ingress(GroupId=sg, IpPermissions=[
        {"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": sg}]},
        {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": CIDR}]}])
    fs = efs.create_file_system(CreationToken="ltstudy")["FileSystemId"]
    targets = [efs.create_mount_target(FileSystemId=fs, SubnetId=s, SecurityGroups=[sg])["MountTargetId"]
               for s in subnets]
    trust = '{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":{"Service":"ec2.amazonaws.com"},' \
            '"Action":"sts:AssumeRole"}]}'
    for role in ("ltstudy-worker", RAY_HEAD_ROLE):
        iam.create_role(RoleName=role, AssumeRolePolicyDocument=trust)
        iam.create_instance_profile(InstanceProfileName=role)
        iam.add_role_to_instance_profile(InstanceProfileName=role, RoleName=role)
    import json

    iam.put_role_policy(RoleName=RAY_HEAD_ROLE, PolicyName="pass", PolicyDocument=json.dumps(
        pass_role_policy("ltstudy-worker")))
    ami = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    return {"vpc": vpc, "subnets": subnets, "sg": sg, "fs": fs, "targets": targets, "ami": ami}


def _options(net: dict, **extra) -> RenderOptions:
    values = dict(efs_id=net["fs"], region=REGION, image_id=net["ami"], subnets=tuple(net["subnets"]),
                  security_group=net["sg"], ssh_cidr=CIDR, worker_instance_profile="ltstudy-worker",
                  name="ltstudy-test")
    return RenderOptions(**{**values, **extra})


def _raw() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def _doctor(config: dict, quota: float = 1000, spot_quota: float = 1000) -> list[str]:
    quotas = {G_QUOTA_CODES["on-demand"]: quota, G_QUOTA_CODES["spot"]: spot_quota}
    try:
        Doctor(config, ssh_cidr=CIDR, g_quota=quotas.__getitem__).run()
    except DoctorError as err:
        return err.problems
    return []


@pytest.mark.slow
def test_the_documented_network_passes_the_doctor_and_rays_bootstrap(aws):
    config = render(_raw(), _options(aws))
    validate(config)
    assert _doctor(config) == []
    # Ray's own bootstrap on the rendered file with the group left to Ray: Ray creates the cluster's group
    # in the pinned subnets' VPC, with its rules (all traffic within the group, SSH)
    import boto3

    unpinned = render(_raw(), _options(aws, security_group=None))
    booted = _compat.bootstrap_aws(_compat.prepare_and_validate_cluster_config(unpinned))
    ec2 = boto3.client("ec2", region_name=REGION)
    for spec in booted["available_node_types"].values():
        assert spec["node_config"]["SubnetIds"] == aws["subnets"]
        (gid,) = spec["node_config"]["SecurityGroupIds"]
        group = ec2.describe_security_groups(GroupIds=[gid])["SecurityGroups"][0]
        assert group["VpcId"] == aws["vpc"]
        assert group["GroupName"] == unpinned["provider"]["security_group"]["GroupName"] == "ltstudy-test-nodes"
        perms = group["IpPermissions"]
        assert any(p["IpProtocol"] == "-1" and p["UserIdGroupPairs"][0]["GroupId"] == gid for p in perms)
        assert any(p.get("FromPort") == 22 for p in perms)
    head = booted["head_node"]["IamInstanceProfile"]  # Ray applies it to the head only
    assert head["Arn"].endswith(f"/{RAY_HEAD_ROLE}")  # the head's role is the one allowed to pass the worker's


@pytest.mark.slow
def test_the_doctor_names_each_planted_mistake(aws, capsys):
    import boto3

    ec2, efs, iam = (boto3.client(s, region_name=REGION) for s in ("ec2", "efs", "iam"))
    other_vpc = ec2.create_vpc(CidrBlock="10.1.0.0/16")["Vpc"]["VpcId"]
    other_sg = ec2.create_security_group(GroupName="elsewhere", Description="x", VpcId=other_vpc)["GroupId"]
    eu = {i["ImageId"] for i in boto3.client("ec2", region_name="eu-west-1").describe_images(
        Owners=["amazon"])["Images"]}
    here = {i["ImageId"] for i in ec2.describe_images(Owners=["amazon"])["Images"]}
    foreign = sorted(eu - here)[0]
    table = {}
    table["group in another VPC"] = _doctor(render(_raw(), _options(aws, security_group=other_sg)))
    table["AMI of another region"] = _doctor(render(_raw(), _options(aws, image_id=foreign)))
    table["zero G vCPU quota"] = _doctor(render(_raw(), _options(aws)), quota=0)
    table["spot nodes, zero spot quota"] = _doctor(render(_raw(), _options(aws, spot=True)), spot_quota=0)
    table["spot nodes, zero on-demand quota"] = _doctor(render(_raw(), _options(aws, spot=True)), quota=0)
    efs.delete_mount_target(MountTargetId=aws["targets"][1])
    table["missing mount target"] = _doctor(render(_raw(), _options(aws)))
    efs.create_mount_target(FileSystemId=aws["fs"], SubnetId=aws["subnets"][1], SecurityGroups=[aws["sg"]])
    iam.delete_role_policy(RoleName=RAY_HEAD_ROLE, PolicyName="pass")
    table["no PassRole"] = _doctor(render(_raw(), _options(aws)))
    with capsys.disabled():
        for mistake, lines in table.items():
            print(f"\n{mistake}: {lines}")
    expect = {"group in another VPC": f"security group {other_sg} is in {other_vpc}",
              "AMI of another region": f"AMI {foreign} does not exist in {REGION}",
              "zero G vCPU quota": "G/VT on-demand vCPU quota is 0",
              "spot nodes, zero spot quota": "G/VT spot vCPU quota is 0 in",
              "missing mount target": f"has no mount target in subnet {aws['subnets'][1]}",
              "no PassRole": f"the head role {RAY_HEAD_ROLE} may not pass"}
    assert table.pop("spot nodes, zero on-demand quota") == []  # spot GPU workers ask the spot quota only
    for mistake, lines in table.items():
        assert len(lines) == 1 and expect[mistake] in lines[0] and "\n" not in lines[0], (mistake, lines)


@pytest.mark.slow
def test_doctor_command_is_one_line_per_problem_exit_2(aws, tmp_path):
    import boto3

    boto3.client("iam", region_name=REGION).delete_role_policy(RoleName=RAY_HEAD_ROLE, PolicyName="pass")
    from ltstudy.study.cluster.launcher import render_file

    out = tmp_path / "my-cluster.yaml"
    render_file(REPO / "cluster.yaml", out, _options(aws, max_gpu_workers=0))  # no GPU quota needed
    run = subprocess.run([sys.executable, "-m", "ltstudy.cli", "cluster", "doctor", str(out), "--ssh-cidr", CIDR],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 2, run.stdout + run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: the head role"), run.stderr


def test_the_ami_of_a_region_comes_from_its_public_ssm_parameter():
    import boto3
    from botocore.stub import Stubber

    ssm = boto3.client("ssm", region_name="eu-west-1", aws_access_key_id="x", aws_secret_access_key="x")
    with Stubber(ssm) as stub:
        stub.add_response("get_parameter", {"Parameter": {"Name": AMI_PARAMETER, "Value": "ami-0eu0000000000001"}},
                          {"Name": AMI_PARAMETER})
        assert resolve_ami("eu-west-1", ssm) == "ami-0eu0000000000001"
    from ltstudy.errors import ConfigError

    with Stubber(ssm) as stub:
        stub.add_client_error("get_parameter", "ParameterNotFound", "not found")
        with pytest.raises(ConfigError, match="--region eu-west-1: cannot look up the AMI .* pass --image-id"):
            resolve_ami("eu-west-1", ssm)
