"""The cluster-launcher file (``cluster.yaml``) and the head's MLflow server.

``render`` fills in what only the user knows (the EFS file system, region, AMI, an instance profile for
``s3://`` storage, the MLflow backend) and switches to Docker images, then validates the result with Ray's
own ``prepare_config`` + ``validate_config`` (what ``ray up`` runs) and refuses placeholders and shell
variables the node would not have. ``serve_mlflow`` is what the head's start commands run: it replaces the
server it started before, found by its pidfile (never by a pattern, which would also match the launcher's
own shell), and returns once the new server answers.
"""

from __future__ import annotations

import copy
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from ltstudy.errors import ConfigError, LtstudyError
from ltstudy.study import _compat
from ltstudy.study.storage import redact_url

#: the EFS id a template carries until ``render --efs-id`` replaces it
EFS_PLACEHOLDER = "fs-REPLACE_ME"
#: shell variables a start or setup command may use: the launcher exports them on every node
LAUNCHER_VARIABLES = ("RAY_HEAD_IP",)
RAY_VERSION = "2.60.0"
DOCKER_HEAD_IMAGE = f"rayproject/ray:{RAY_VERSION}-py311"
DOCKER_WORKER_IMAGE = f"rayproject/ray:{RAY_VERSION}-py311-gpu"
EFS_MOUNT = "/mnt/efs"
#: where the nodes get Ray's token file and the head the PostgreSQL password file (``file_mounts`` keys)
TOKEN_MOUNT = "~/.ray/auth_token"
PGPASS_MOUNT = "~/.pgpass"


# ------------------------------------------------------------------------------------------- render
@dataclass
class RenderOptions:
    efs_id: str | None = None
    region: str | None = None
    availability_zone: str | None = None
    image_id: str | None = None
    max_gpu_workers: int | None = None
    head_cpus: int | None = None
    docker: bool = False
    docker_image: str | None = None
    mlflow_backend: str | None = None
    worker_instance_profile: str | None = None
    token_path: str | None = None  # Ray's token file (default RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token)
    pgpass: str | None = None  # a PostgreSQL password file (mode 0600) for the head's ~/.pgpass
    name: str | None = None  # cluster name (and the security group's); default ltstudy-$USER
    subnets: tuple[str, ...] = ()  # pinned subnets (one per availability zone the nodes may use)
    security_group: str | None = None  # a pinned security group (sg-...) instead of the one Ray creates
    ssh_cidr: str | None = None  # where SSH may come from (the group's rule; checked by `cluster doctor`)
    spot: bool = False  # GPU workers on spot instances


def load_cluster_file(path: str | Path, needs: str = "available_node_types") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"cluster file not found: {path}")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"malformed YAML in {path}: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(config, dict) or needs not in config:
        raise ConfigError(f"{path} is not a Ray cluster-launcher file (no {needs})")
    return config


def _map_strings(value: Any, fn) -> Any:
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, list):
        return [_map_strings(v, fn) for v in value]
    if isinstance(value, dict):
        return {k: _map_strings(v, fn) for k, v in value.items()}
    return value


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    return []


def _worker_types(config: dict[str, Any]) -> list[dict[str, Any]]:
    head = config.get("head_node_type")
    return [spec for name, spec in config["available_node_types"].items() if name != head]


def render(config: dict[str, Any], o: RenderOptions) -> dict[str, Any]:
    """A copy of ``config`` with the user's values filled in (see the module docstring)."""
    out = copy.deepcopy(config)
    provider = out.setdefault("provider", {})
    old_region = provider.get("region")
    if o.efs_id is not None:
        if not re.fullmatch(r"fs-[0-9a-f]{8,17}", o.efs_id):
            raise ConfigError(f"--efs-id {o.efs_id!r} is not an EFS file-system id (fs- and 8 to 17 hex digits)")
        out = _map_strings(out, lambda s: s.replace(EFS_PLACEHOLDER, o.efs_id))
    if o.region and not re.fullmatch(r"[a-z]{2}(-[a-z]+)+-\d", o.region):
        raise ConfigError(f"--region {o.region!r} is not an AWS region such as us-west-2")
    if o.region:
        if old_region:
            out = _map_strings(out, lambda s: s.replace(f".efs.{old_region}.", f".efs.{o.region}."))
        out["provider"]["region"] = o.region
        if not o.availability_zone:
            out["provider"]["availability_zone"] = f"{o.region}a"
    if o.availability_zone:
        out["provider"]["availability_zone"] = o.availability_zone
    types = out["available_node_types"]
    if o.region and o.region != old_region and not o.image_id:  # the template's AMI is its region's
        from ltstudy.study.cluster.aws import resolve_ami

        o = replace(o, image_id=resolve_ami(o.region))
    if o.image_id:
        for spec in types.values():
            spec.setdefault("node_config", {})["ImageId"] = o.image_id
    if o.max_gpu_workers is not None:
        if o.max_gpu_workers < 0:
            raise ConfigError("--max-gpu-workers must be >= 0")
        for spec in _worker_types(out):
            spec["max_workers"] = o.max_gpu_workers
            spec["min_workers"] = min(spec.get("min_workers", 0), o.max_gpu_workers)
        out["max_workers"] = o.max_gpu_workers * len(_worker_types(out))
    if o.head_cpus is not None:
        if o.head_cpus < 0:
            raise ConfigError("--head-cpus must be >= 0")
        types[out["head_node_type"]].setdefault("resources", {})["CPU"] = o.head_cpus
    if o.worker_instance_profile:
        key = "Arn" if o.worker_instance_profile.startswith("arn:") else "Name"
        for spec in _worker_types(out):
            spec.setdefault("node_config", {})["IamInstanceProfile"] = {key: o.worker_instance_profile}
    out = _secrets(out, o)
    _network(out, o)
    if o.spot:
        for spec in _worker_types(out):
            spec.setdefault("node_config", {})["InstanceMarketOptions"] = {"MarketType": "spot"}
    if o.docker or o.docker_image:
        _use_docker(out, o.docker_image)
    return out


def _secrets(out: dict[str, Any], o: RenderOptions) -> dict[str, Any]:
    """The MLflow backend (quoted, without a password), Ray's token and the PostgreSQL password file as
    ``file_mounts``: the rendered file names secret files, never holds a secret."""
    if o.mlflow_backend:
        if urlsplit(o.mlflow_backend).password is not None:
            raise ConfigError(f"--mlflow-backend {redact_url(o.mlflow_backend)}: a password in the URL would "
                              "show in `ps` and in the rendered file; drop it and pass --pgpass FILE (a "
                              "~/.pgpass line, mode 0600) instead")
        quoted = shlex.quote(o.mlflow_backend)
        out = _map_strings(out, lambda s: re.sub(r"--backend-store-uri \S+",
                                                 lambda _: f"--backend-store-uri {quoted}", s))
    mounts = out.setdefault("file_mounts", {})
    if TOKEN_MOUNT in mounts:
        mounts[TOKEN_MOUNT] = str(_private_file(token_file(o.token_path), "Ray's token file",
                                                "run `ray get-auth-token --generate`"))
    if o.pgpass:
        mounts[PGPASS_MOUNT] = str(_private_file(Path(o.pgpass).expanduser(), "--pgpass",
                                                 "one line host:port:db:user:password"))
        out.setdefault("head_setup_commands", []).insert(0, f"chmod 600 {PGPASS_MOUNT}")
    return out


def default_name() -> str:
    """``ltstudy-$USER`` (letters, digits and ``-`` only): one cluster and group per user of an account."""
    user = re.sub(r"[^a-z0-9-]+", "-", (os.environ.get("USER") or os.environ.get("LOGNAME") or "user").lower())
    return f"ltstudy-{user.strip('-') or 'user'}"


def _network(out: dict[str, Any], o: RenderOptions) -> None:
    """The cluster's and group's names, pinned subnets and security group."""
    name = o.name or default_name()
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9-]{0,62}", name):
        raise ConfigError(f"--name {name!r}: letters, digits and '-' only (at most 63)")
    out["cluster_name"] = name
    out["provider"].setdefault("security_group", {})["GroupName"] = f"{name}-nodes"
    bad = [s for s in o.subnets if not re.fullmatch(r"subnet-[0-9a-f]{8,17}", s)]
    if bad:
        raise ConfigError(f"--subnet {bad[0]!r} is not a subnet id (subnet- and 8 to 17 hex digits)")
    if o.security_group and not re.fullmatch(r"sg-[0-9a-f]{8,17}", o.security_group):
        raise ConfigError(f"--security-group {o.security_group!r} is not a group id (sg- and 8 to 17 hex digits)")
    if o.ssh_cidr:
        import ipaddress

        try:
            ipaddress.ip_network(o.ssh_cidr)
        except ValueError:
            raise ConfigError(f"--ssh-cidr {o.ssh_cidr!r} is not a CIDR block such as 203.0.113.7/32") from None
    for spec in out["available_node_types"].values():
        node = spec.setdefault("node_config", {})
        if o.subnets:
            node["SubnetIds"] = list(o.subnets)
        if o.security_group:
            node["SecurityGroupIds"] = [o.security_group]
    if o.subnets and not o.availability_zone:  # the subnets say where; Ray would drop those of other zones
        out["provider"].pop("availability_zone", None)


def token_file(given: str | None = None) -> Path:
    """Ray's token file on this machine: ``given``, ``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``."""
    return Path(given or os.environ.get("RAY_AUTH_TOKEN_PATH") or "~/.ray/auth_token").expanduser().resolve()


def _private_file(path: Path, what: str, hint: str) -> Path:
    """``path`` if it is a file only its owner can read (it travels to the nodes with ``file_mounts``)."""
    if not path.is_file():
        raise ConfigError(f"{what} {path} not found ({hint})")
    if path.stat().st_mode & 0o077:
        raise ConfigError(f"{what} {path} is readable by others: chmod 600 {path}")
    return path


def _use_docker(config: dict[str, Any], image: str | None) -> None:
    """Run Ray in ``rayproject/ray`` at the pinned version (or ``image``); only ltstudy is pip-installed.

    The EFS mount stays on the host (``initialization_commands``) and is passed into the container.
    """
    config["docker"] = {
        "image": image or DOCKER_WORKER_IMAGE,
        "head_image": image or DOCKER_HEAD_IMAGE,
        "container_name": "ltstudy",
        "pull_before_run": True,
        "run_options": ["--ulimit nofile=65536:65536", f"--volume {EFS_MOUNT}:{EFS_MOUNT}"],
    }
    config["setup_commands"] = [c for c in config.get("setup_commands", [])
                                if not c.lstrip().startswith("pip install -U \"ray")]


def unexpanded(config: dict[str, Any]) -> list[str]:
    """Placeholders left in the file and shell variables a node would not have (only the launcher's own
    ``$RAY_HEAD_IP`` is exported there)."""
    found = []
    for s in _strings(config):
        if EFS_PLACEHOLDER in s and "*REPLACE_ME*" not in s:
            found.append(EFS_PLACEHOLDER)
        for name in re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", s):
            if name not in LAUNCHER_VARIABLES:
                found.append(f"${name}")
    return sorted(set(found))


def validate(config: dict[str, Any]) -> dict[str, Any]:
    """Ray's own checks, as ``ray up`` runs them: ``prepare_config`` then ``validate_config``."""
    try:
        prepared = _compat.prepare_and_validate_cluster_config(copy.deepcopy(config))
    except Exception as exc:  # noqa: BLE001 - jsonschema / ValueError: one line
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"Ray refuses the cluster file: {detail}") from None
    return prepared


def render_file(template: str | Path, output: str | Path, o: RenderOptions) -> dict[str, Any]:
    """Render ``template`` into ``output``: validated by Ray, with nothing left to fill in."""
    config = render(load_cluster_file(template), o)
    left = unexpanded(config)
    if left:
        hint = " (pass --efs-id)" if EFS_PLACEHOLDER in left else ""
        raise ConfigError(f"{template} still has {', '.join(left)} after rendering{hint}")
    validate(config)
    header = (f"# Rendered by `ltstudy cluster render` from {Path(template).name}; edit that file or re-render.\n"
              f"# ray up {Path(output).name} -y   /   ray down {Path(output).name} -y\n")
    Path(output).write_text(header + yaml.safe_dump(config, sort_keys=False, width=1 << 16))
    return config


# --------------------------------------------------------------------------------- MLflow on the head
def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z")


def _is_mlflow_server(pid: int) -> bool:
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return False
    return any(a.endswith("mlflow") for a in args) and "server" in args


def stop_pidfile(pidfile: Path, timeout: float = 30.0) -> int | None:
    """Stop the MLflow server recorded in ``pidfile`` (and its process group); returns its pid.

    A stale pidfile (no such process, or a pid reused by another program) is only removed.
    """
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None
    if not _alive(pid) or not _is_mlflow_server(pid):
        pidfile.unlink(missing_ok=True)
        return None
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)  # the server was started as a session leader: its workers go too
        except (ProcessLookupError, PermissionError):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not _alive(pid):
            break
    pidfile.unlink(missing_ok=True)
    return pid


def serve_mlflow(pidfile: str | Path, log: str | Path, host: str, port: int, backend_store_uri: str,
                 artifacts_destination: str, workers: int = 1, allowed_hosts: str | None = None,
                 timeout: float = 120.0) -> int:
    """(Re)start ``mlflow server`` in the background; returns its pid once ``/health`` answers.

    One worker (several race on one SQLite file); MLflow's job runner off (``MLFLOW_SERVER_ENABLE_JOB_EXECUTION``).
    """
    pidfile, log = Path(pidfile).expanduser(), Path(log).expanduser()
    stop_pidfile(pidfile)
    if backend_store_uri.startswith("sqlite:///"):
        Path(backend_store_uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    if "://" not in artifacts_destination:
        Path(artifacts_destination).mkdir(parents=True, exist_ok=True)
    mlflow_bin = str(Path(sys.executable).with_name("mlflow"))
    if not Path(mlflow_bin).exists():
        mlflow_bin = "mlflow"
    cmd = [mlflow_bin, "server", "--host", host, "--port", str(port), "--workers", str(workers),
           "--backend-store-uri", backend_store_uri, "--artifacts-destination", artifacts_destination]
    if allowed_hosts:
        cmd += ["--allowed-hosts", allowed_hosts]
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)  # outlives this command and the launcher's ssh
    pidfile.parent.mkdir(parents=True, exist_ok=True)
    pidfile.write_text(f"{proc.pid}\n")
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}/health"
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return proc.pid
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                stop_pidfile(pidfile)
                tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log.exists() else []
                raise LtstudyError(f"mlflow server did not come up on {host}:{port} (log {log}"
                                   f"{': ' + tail[0][:300] if tail else ''})") from None
            time.sleep(0.5)
