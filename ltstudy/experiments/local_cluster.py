"""Servers and clusters on this machine, bound to 127.0.0.1 and stopped by pid: a real ``mlflow server``,
Ray's fake multi-node autoscaler, process sessions. ``ltstudy bench cluster`` runs a study on them; the
tests use them too."""

from __future__ import annotations

import atexit
import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import ltstudy
from ltstudy.study import _compat

#: the checkout (or site-packages folder) holding the ltstudy package: Ray workers import it from there
REPO = Path(ltstudy.__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_env() -> None:
    """Token auth on for the clusters this process starts or joins, and Ray workers import ltstudy from this
    checkout. Without a token source of the user's (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH``), a fresh
    token goes into a private file (mode 0600, removed at exit) that ``RAY_AUTH_TOKEN_PATH`` names for this
    process and the ones it starts; ``~/.ray/auth_token`` is left alone."""
    if not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
        folder = tempfile.mkdtemp(prefix="ltstudy-ray-auth-")  # mode 0700
        atexit.register(shutil.rmtree, folder, True)
        path = Path(folder) / "auth_token"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_hex(32))
        os.environ["RAY_AUTH_TOKEN_PATH"] = str(path)
    _compat.use_token_auth()
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
        stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})  # as `ltstudy cluster mlflow`
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
RAY_LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def ray_bin() -> str:
    return shutil.which("ray") or str(Path(sys.executable).with_name("ray"))


def loopback_env(**extra: str) -> dict[str, str]:
    """The environment for processes that talk to a loopback Ray cluster (see :data:`RAY_LOOPBACK_ENV`)."""
    ray_env()
    return {**os.environ, **RAY_LOOPBACK_ENV, "PYTHONUNBUFFERED": "1", **extra}


def ray_start(args: list[str], log: Path, env: dict[str, str], command: list[str] | None = None,
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


def head_args(port: int, cpus: float, resources: dict[str, float]) -> list[str]:
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
    proc = ray_start([*head_args(port, head.get("CPU", 0), custom), f"--autoscaling-config={path}"],
                      root / "ray-head.log", env)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        stop_session(proc)
