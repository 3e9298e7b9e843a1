"""Servers and clusters the tests start on 127.0.0.1 and stop by pid."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_env() -> None:
    """Token auth off for the test clusters; Ray workers import ltstudy from this checkout."""
    os.environ["RAY_AUTH_MODE"] = "disabled"
    path = os.environ.get("PYTHONPATH", "")
    if str(REPO) not in path.split(os.pathsep):
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), path) if p)


def wait_for_http(url: str, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    """Block until ``url`` answers, the process dies (RuntimeError with its log) or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    delay = 0.05
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"{url} did not come up: {log.read_text()[-2000:]}") from None
            time.sleep(delay)
            delay = min(delay * 2, 1.0)


@contextlib.contextmanager
def mlflow_server(root: Path, backend: str | None = None) -> Iterator[str]:
    """A real ``mlflow server`` on a free loopback port (one worker), stopped by pid on exit; yields its URI."""
    port = free_port()
    mlflow_bin = shutil.which("mlflow") or str(Path(sys.executable).with_name("mlflow"))
    log = root / "mlflow-server.log"
    proc = subprocess.Popen(
        [mlflow_bin, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", backend or f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts")],
        stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(uri + "/health", proc, 90, log)
        yield uri
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------------------- process sessions
def session_members(sid: int) -> list[int]:
    """Live (non-zombie) processes of session ``sid``: everything a ``start_new_session`` child started,
    Ray's raylets, workers and autoscaler-launched nodes included (Ray never calls setsid)."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            alive.append(int(stat.parent.name))
    return alive


def stop_session(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGTERM, then SIGKILL, every process of the session ``proc`` leads; wait until none is left."""
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, timeout)):
        for pid in session_members(proc.pid):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while session_members(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not session_members(proc.pid):
            break
    proc.poll()
    left = session_members(proc.pid)
    if left:
        raise RuntimeError(f"processes {left} of session {proc.pid} survived SIGKILL")


# ------------------------------------------------------------------------------------------- Ray
#: Ray binds to the node's address; with this it takes the loopback one (127.0.0.1) for every server.
#: It is read when Ray is imported, so only processes started with it (``ray start``, CLI subprocesses)
#: can talk to such a cluster.
RAY_LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}


def ray_bin() -> str:
    return shutil.which("ray") or str(Path(sys.executable).with_name("ray"))


def loopback_env(**extra: str) -> dict[str, str]:
    """The environment for processes that talk to a loopback Ray cluster (see :data:`RAY_LOOPBACK_ENV`)."""
    ray_env()
    return {**os.environ, **RAY_LOOPBACK_ENV, "PYTHONUNBUFFERED": "1", **extra}


def _ray_start(args: list[str], log: Path, env: dict[str, str], command: list[str] | None = None,
               timeout: float = 120.0) -> subprocess.Popen:
    """``ray start --block ARGS`` (or ``command``) in a new session; returns once the node is up."""
    cmd = command or [ray_bin(), "start", "--block", *args]
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    deadline = time.monotonic() + timeout
    while "Ray runtime started" not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_session(proc)
            raise RuntimeError(f"ray start did not come up: {log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.3)
    return proc


def _head_args(port: int, cpus: float, resources: dict[str, float]) -> list[str]:
    import json

    return ["--head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", str(int(cpus)),
            "--resources", json.dumps(resources), "--dashboard-port", str(free_port()),
            "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
            "--object-store-memory", str(100 * 2**20)]


@contextlib.contextmanager
def fake_autoscaling_cluster(root: Path, head: dict[str, float], workers: dict[str, dict],
                             max_workers: int, idle_timeout_minutes: float = 5.0) -> Iterator[str]:
    """An autoscaling cluster on this machine: Ray's fake multi-node provider launches worker nodes as
    local processes (with logical GPUs) when the autoscaler asks. Starts with the head alone; yields the
    GCS address; stops every process of the cluster by pid on exit.

    ``workers`` are autoscaler node types (``resources``, ``min_workers``, ``max_workers``).
    """
    import yaml

    port = free_port()
    config = {
        "cluster_name": "ltstudy-fake", "max_workers": max_workers, "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_timeout_minutes,
        "provider": {"type": "fake_multinode", "gcs_address": f"127.0.0.1:{port}", "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True},
        "auth": {"ssh_user": "ray"},
        "available_node_types": {
            "ray.head.default": {"resources": head, "node_config": {}, "max_workers": 0},
            **{name: {"node_config": {}, **spec} for name, spec in workers.items()}},
        "head_node_type": "ray.head.default",
        **{k: [] for k in ("cluster_synced_files", "rsync_exclude", "rsync_filter", "initialization_commands",
                           "setup_commands", "head_setup_commands", "worker_setup_commands",
                           "head_start_ray_commands", "worker_start_ray_commands")},
        "file_mounts": {}, "file_mounts_sync_continuously": False,
    }
    path = root / "fake-cluster.yaml"
    path.write_text(yaml.safe_dump(config))
    custom = {k: v for k, v in head.items() if k not in ("CPU", "GPU")}
    env = loopback_env(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
    proc = _ray_start([*_head_args(port, head.get("CPU", 0), custom), f"--autoscaling-config={path}"],
                      root / "ray-head.log", env)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        stop_session(proc)


#: a worker node as Ray's fake multi-node provider starts one (``ray start --address`` refuses to join
#: when Ray is held to the loopback address); prints the line ``_ray_start`` waits for, then blocks
_NODE_SCRIPT = """
import json, sys, time
import ray._private.node, ray._private.parameter
address, resources = sys.argv[1], json.loads(sys.argv[2])
params = ray._private.parameter.RayParams(
    gcs_address=address, redis_address=address, node_ip_address="127.0.0.1", min_worker_port=0,
    max_worker_port=0, dashboard_agent_listen_port=0, num_cpus=resources.pop("CPU", 0),
    num_gpus=resources.pop("GPU", 0), object_store_memory=100 * 2**20, resources=resources)
ray._private.node.Node(params, head=False, shutdown_at_exit=True, spawn_reaper=False)
print("Ray runtime started", flush=True)
while True:
    time.sleep(3600)
"""


@contextlib.contextmanager
def ray_cluster(root: Path, head: dict[str, float], nodes: list[tuple[dict[str, float], list[str]]]
                ) -> Iterator[str]:
    """A fixed cluster on this machine: a head and one node per entry of ``nodes`` (``(resources, wrapper
    argv)``, e.g. ``unshare -m ...`` to give a node its own mounts). Yields the GCS address; stops every
    process by pid on exit."""
    import json

    port = free_port()
    env = loopback_env()
    custom = {k: v for k, v in head.items() if k not in ("CPU", "GPU")}
    procs = [_ray_start(_head_args(port, head.get("CPU", 0), custom), root / "ray-head.log", env)]
    try:
        for i, (resources, wrap) in enumerate(nodes):
            procs.append(_ray_start([], root / f"ray-node{i}.log", env, [
                *wrap, sys.executable, "-c", _NODE_SCRIPT, f"127.0.0.1:{port}", json.dumps(resources)]))
        yield f"127.0.0.1:{port}"
    finally:
        for proc in reversed(procs):
            stop_session(proc)


# ------------------------------------------------------------------------------------- PostgreSQL
def _postgres_bin(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"),
                        key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0)
    if not candidates:
        raise RuntimeError(f"PostgreSQL's {name} not found (Debian: apt-get install postgresql)")
    return str(candidates[-1])


@contextlib.contextmanager
def postgres_server(databases: tuple[str, ...] = ("mlflow", "optuna")) -> Iterator[str]:
    """A real PostgreSQL server in a temporary folder on a free loopback port, trust auth, with
    ``databases`` created; yields ``postgresql://ltstudy@127.0.0.1:PORT`` (append ``/DB``). As root the
    server runs as the ``postgres`` user (PostgreSQL refuses root). Stopped by pid, folder removed."""
    import tempfile

    import psycopg

    port = free_port()
    folder = Path(tempfile.mkdtemp(prefix="ltstudy-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        import pwd

        user = pwd.getpwnam("postgres")
        os.chown(folder, user.pw_uid, user.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data = folder / "data"
    log = folder / "postgres.log"
    proc = None
    try:
        subprocess.run([*as_user, _postgres_bin("initdb"), "-D", str(data), "-U", "ltstudy", "-A", "trust",
                        "--no-sync", "-E", "UTF8"], check=True, capture_output=True, timeout=120)
        proc = subprocess.Popen(
            [*as_user, _postgres_bin("postgres"), "-D", str(data), "-h", "127.0.0.1", "-p", str(port),
             "-k", str(folder), "-F", "-c", "max_connections=200"],
            stdout=subprocess.DEVNULL, stderr=open(log, "w"),
            start_new_session=True)
        base = f"postgresql://ltstudy@127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                conn = psycopg.connect(f"{base}/postgres", autocommit=True)
                break
            except psycopg.OperationalError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("PostgreSQL did not come up") from None
                time.sleep(0.2)
        with conn.cursor() as cur:
            for db in databases:
                cur.execute(f'CREATE DATABASE "{db}"')
        conn.close()
        yield base
    finally:
        if proc is not None:
            stop_session(proc)
        shutil.rmtree(folder, ignore_errors=True)
