"""``ltstudy cluster doctor FILE``: what ``ray up`` and the first worker launch would trip over, checked with
boto3 before anything starts, one line per problem.

Checks: credentials and region; every AMI exists in the region; every instance type is offered in the zones
the nodes may use; the G and VT vCPU quota (on demand, or spot requests for ``--spot`` nodes) covers the GPU
workers at their maximum; the EFS file system exists and has a mount target in every pinned subnet; a pinned
security group lives in the subnets' VPC and has the rules Ray needs (all traffic within the group, SSH from
``--ssh-cidr``) and lets NFS reach the mount targets; the head's role may pass the workers' instance profile
(``iam:PassRole``).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ltstudy.errors import LtstudyError
from ltstudy.study.cluster.aws import RAY_HEAD_ROLE, client

#: Service Quotas' vCPU quotas of G and VT instances: "Running On-Demand G and VT instances" and "All G and VT
#: Spot Instance Requests" (a spot node counts against the second only)
G_QUOTA_CODES = {"on-demand": "L-DB2E81BA", "spot": "L-3819A6DF"}


class DoctorError(LtstudyError):
    """Problems found: one line each (the CLI prints them and exits 2)."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\nerror: ".join(problems))
        self.problems = problems


@dataclass
class Doctor:
    config: dict[str, Any]
    ssh_cidr: str | None = None
    #: the G/VT vCPU quota of a quota code (:data:`G_QUOTA_CODES`); None: Service Quotas is asked (a seam:
    #: moto has no EC2 quotas)
    g_quota: Callable[[str], float] | None = None
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def region(self) -> str:
        return self.config["provider"]["region"]

    def _client(self, service: str) -> Any:
        return client(service, self.region)

    def _types(self) -> dict[str, dict[str, Any]]:
        return self.config["available_node_types"]

    def run(self) -> list[str]:
        """Every check; returns the notes (what was fine), raises :class:`DoctorError` on any problem."""
        try:
            ident = self._client("sts").get_caller_identity()
        except Exception as exc:  # noqa: BLE001 - no credentials / bad region: nothing else can run
            raise DoctorError([f"AWS credentials for region {self.region}: {_reason(exc)}"]) from None
        self.notes.append(f"account {ident.get('Account')} in {self.region}")
        ec2 = self._client("ec2")
        subnets = self._subnets(ec2)
        for check in (self._amis, self._offerings, self._quota):
            check(ec2, subnets)
        self._efs(subnets)
        self._group(ec2, subnets)
        self._pass_role()
        if self.problems:
            raise DoctorError(self.problems)
        return self.notes

    # ------------------------------------------------------------------------------------ EC2
    def _subnets(self, ec2: Any) -> dict[str, dict[str, Any]]:
        ids = sorted({s for spec in self._types().values() for s in spec["node_config"].get("SubnetIds", [])})
        if not ids:
            return {}
        try:
            found = {s["SubnetId"]: s for s in ec2.describe_subnets(SubnetIds=ids)["Subnets"]}
        except Exception as exc:  # noqa: BLE001
            self.problems.append(f"subnets {', '.join(ids)}: {_reason(exc)}")
            return {}
        return found

    def _amis(self, ec2: Any, subnets: dict) -> None:
        for ami in sorted({spec["node_config"].get("ImageId", "") for spec in self._types().values()}):
            try:
                images = ec2.describe_images(ImageIds=[ami])["Images"]
            except Exception:  # noqa: BLE001 - InvalidAMIID.NotFound / .Malformed
                images = []
            if not images:
                self.problems.append(f"AMI {ami} does not exist in {self.region} (an AMI of another region?): "
                                     "render with --image-id, or --region to look it up")

    def _zones(self, subnets: dict) -> list[str]:
        if subnets:
            return sorted({s["AvailabilityZone"] for s in subnets.values()})
        zone = self.config["provider"].get("availability_zone")
        return [z.strip() for z in zone.split(",")] if zone else []

    def _offerings(self, ec2: Any, subnets: dict) -> None:
        zones = self._zones(subnets)
        for itype in sorted({spec["node_config"]["InstanceType"] for spec in self._types().values()}):
            offered = {o["Location"] for o in ec2.describe_instance_type_offerings(
                LocationType="availability-zone",
                Filters=[{"Name": "instance-type", "Values": [itype]}])["InstanceTypeOfferings"]}
            missing = [z for z in zones if z not in offered]
            if missing:
                self.problems.append(f"instance type {itype} is not offered in {', '.join(missing)}: pin "
                                     "subnets in zones that offer it (--subnet)")

    def _quota(self, ec2: Any, subnets: dict) -> None:
        need = dict.fromkeys(G_QUOTA_CODES, 0)
        head = self.config["head_node_type"]
        for name, spec in self._types().items():
            itype = spec["node_config"]["InstanceType"]
            if not re.match(r"(g|vt)\d", itype):
                continue
            info = ec2.describe_instance_types(InstanceTypes=[itype])["InstanceTypes"][0]
            count = 1 if name == head else spec.get("max_workers", self.config.get("max_workers", 0))
            market = spec["node_config"].get("InstanceMarketOptions", {}).get("MarketType", "on-demand")
            need["spot" if market == "spot" else "on-demand"] += count * info["VCpuInfo"]["DefaultVCpus"]
        for market, vcpus in need.items():
            if vcpus:
                self._quota_covers(market, vcpus)

    def _quota_covers(self, market: str, need: int) -> None:
        code = G_QUOTA_CODES[market]
        try:
            have = self.g_quota(code) if self.g_quota else self._client("service-quotas").get_service_quota(
                ServiceCode="ec2", QuotaCode=code)["Quota"]["Value"]
        except Exception as exc:  # noqa: BLE001
            self.problems.append(f"G/VT {market} vCPU quota ({code}) unreadable: {_reason(exc)}")
            return
        if have < need:
            self.problems.append(f"G/VT {market} vCPU quota is {have:g} in {self.region}, the GPU workers at "
                                 f"their maximum need {need}: ask for more (Service Quotas {code}) "
                                 "or lower --max-gpu-workers")
        else:
            self.notes.append(f"G/VT {market} vCPU quota {have:g} >= {need}")

    # ------------------------------------------------------------------------------------ EFS
    def _efs_id(self) -> str | None:
        text = " ".join(self.config.get("initialization_commands", []))
        found = re.findall(r"\b(fs-[0-9a-f]{8,17})\.efs\.", text)
        return found[0] if found else None

    def _efs(self, subnets: dict) -> None:
        fs_id = self._efs_id()
        if fs_id is None:
            return
        efs = self._client("efs")
        try:
            efs.describe_file_systems(FileSystemId=fs_id)
        except Exception as exc:  # noqa: BLE001 - FileSystemNotFound
            self.problems.append(f"EFS {fs_id} not found in {self.region}: {_reason(exc)}")
            return
        targets = efs.describe_mount_targets(FileSystemId=fs_id)["MountTargets"]
        by_subnet = {t["SubnetId"]: t for t in targets}
        by_zone = {t.get("AvailabilityZoneName") for t in targets}
        for sid, subnet in sorted(subnets.items()):
            if sid not in by_subnet and subnet["AvailabilityZone"] not in by_zone:
                self.problems.append(f"EFS {fs_id} has no mount target in subnet {sid} "
                                     f"({subnet['AvailabilityZone']}): aws efs create-mount-target "
                                     f"--file-system-id {fs_id} --subnet-id {sid} --security-groups SG")
        self._mount_groups = [g for t in targets for g in efs.describe_mount_target_security_groups(
            MountTargetId=t["MountTargetId"])["SecurityGroups"]]

    # ------------------------------------------------------------------------------- security group
    def _group(self, ec2: Any, subnets: dict) -> None:
        groups = sorted({g for spec in self._types().values() for g in spec["node_config"].get("SecurityGroupIds", [])})
        if not groups:
            self.notes.append("security group not pinned: Ray creates "
                              f"{self.config['provider'].get('security_group', {}).get('GroupName')} with SSH "
                              "from 0.0.0.0/0 (pin one with --security-group)")
            return
        vpcs = {s["VpcId"] for s in subnets.values()}
        for group in ec2.describe_security_groups(GroupIds=groups)["SecurityGroups"]:
            gid = group["GroupId"]
            if vpcs and group["VpcId"] not in vpcs:
                self.problems.append(f"security group {gid} is in {group['VpcId']}, the subnets in "
                                     f"{', '.join(sorted(vpcs))}: create it in the subnets' VPC")
                continue
            self._rules(group)

    def _rules(self, group: dict[str, Any]) -> None:
        gid, perms = group["GroupId"], group.get("IpPermissions", [])
        if not any(p["IpProtocol"] == "-1" and any(u["GroupId"] == gid for u in p.get("UserIdGroupPairs", []))
                   for p in perms):
            self.problems.append(f"security group {gid} lacks all traffic within itself (Ray's nodes talk on "
                                 f"many ports): aws ec2 authorize-security-group-ingress --group-id {gid} "
                                 f"--protocol -1 --source-group {gid}")
        ssh = [r["CidrIp"] for p in perms if _covers(p, 22) for r in p.get("IpRanges", [])]
        if self.ssh_cidr and self.ssh_cidr not in ssh:
            self.problems.append(f"security group {gid} has no SSH (22) rule from {self.ssh_cidr}: aws ec2 "
                                 f"authorize-security-group-ingress --group-id {gid} --protocol tcp --port 22 "
                                 f"--cidr {self.ssh_cidr}")
        if self.ssh_cidr and "0.0.0.0/0" in ssh:
            self.problems.append(f"security group {gid} lets SSH in from 0.0.0.0/0, wider than --ssh-cidr "
                                 f"{self.ssh_cidr}")
        mount_groups = getattr(self, "_mount_groups", None)
        if mount_groups is not None and mount_groups and gid not in mount_groups:
            self.problems.append(f"the EFS mount targets' groups ({', '.join(sorted(set(mount_groups)))}) do "
                                 f"not include {gid}: NFS (2049) from the nodes may not reach them")

    # ------------------------------------------------------------------------------------ IAM
    def _pass_role(self) -> None:
        head_cfg = self._types()[self.config["head_node_type"]]["node_config"]
        workers = [spec["node_config"]["IamInstanceProfile"] for name, spec in self._types().items()
                   if name != self.config["head_node_type"] and "IamInstanceProfile" in spec["node_config"]]
        if not workers:
            return
        iam = self._client("iam")
        head_role = _profile_role(iam, head_cfg["IamInstanceProfile"]) if "IamInstanceProfile" in head_cfg \
            else RAY_HEAD_ROLE
        for profile in workers:
            try:
                worker_arn = iam.get_role(RoleName=_profile_role(iam, profile))["Role"]["Arn"]
            except Exception as exc:  # noqa: BLE001
                self.problems.append(f"worker instance profile {profile}: {_reason(exc)}")
                continue
            if head_role is None or not _may_pass(iam, head_role, worker_arn):
                self.problems.append(f"the head role {head_role} may not pass {worker_arn} (iam:PassRole): "
                                     "run the `aws iam put-role-policy` line render printed")


def _profile_role(iam: Any, profile: dict[str, str]) -> str | None:
    name = profile.get("Name") or profile.get("Arn", "").rsplit("/", 1)[-1]
    roles = iam.get_instance_profile(InstanceProfileName=name)["InstanceProfile"]["Roles"]
    return roles[0]["RoleName"] if roles else None


def _statements(iam: Any, role: str) -> list[dict[str, Any]]:
    docs = [iam.get_role_policy(RoleName=role, PolicyName=n)["PolicyDocument"]
            for n in iam.list_role_policies(RoleName=role)["PolicyNames"]]
    for attached in iam.list_attached_role_policies(RoleName=role)["AttachedPolicies"]:
        policy = iam.get_policy(PolicyArn=attached["PolicyArn"])["Policy"]
        docs.append(iam.get_policy_version(PolicyArn=attached["PolicyArn"],
                                           VersionId=policy["DefaultVersionId"])["PolicyVersion"]["Document"])
    out = []
    for doc in docs:
        if isinstance(doc, str):
            import json
            from urllib.parse import unquote

            doc = json.loads(unquote(doc))
        stmts = doc.get("Statement", [])
        out.extend(stmts if isinstance(stmts, list) else [stmts])
    return out


def _may_pass(iam: Any, role: str, target_arn: str) -> bool:
    """Whether ``role``'s own policies allow ``iam:PassRole`` on ``target_arn`` (no deny, no boundaries)."""
    try:
        statements = _statements(iam, role)
    except Exception:  # noqa: BLE001 - no such role
        return False
    for st in statements:
        actions = st.get("Action", [])
        resources = st.get("Resource", [])
        actions = [actions] if isinstance(actions, str) else actions
        resources = [resources] if isinstance(resources, str) else resources
        if st.get("Effect") == "Allow" and any(fnmatch.fnmatch("iam:PassRole", a) for a in actions) and \
                any(fnmatch.fnmatch(target_arn, r) for r in resources):
            return True
    return False


def _covers(perm: dict[str, Any], port: int) -> bool:
    if perm["IpProtocol"] == "-1":
        return True
    return perm["IpProtocol"] == "tcp" and perm.get("FromPort", 0) <= port <= perm.get("ToPort", -1)


def _reason(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
