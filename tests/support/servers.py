"""Servers and clusters only the tests start: a fixed multi-node Ray cluster, PostgreSQL. All bind to
127.0.0.1 and are stopped by pid; the others the benchmarks share live in ``ltstudy.experiments.local_cluster``."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from ltstudy.experiments.local_cluster import (  # noqa: F401 - the tests' one place to import them from
    REPO,
    fake_autoscaling_cluster,
    free_port,
    head_args,
    loopback_env,
    mlflow_server,
    ray_env,
    ray_start,
    session_members,
    stop_session,
)

#: a worker node as Ray's fake multi-node provider starts one (``ray start --address`` refuses to join
#: when Ray is held to the loopback address); prints the line ``ray_start`` waits for, then blocks
_NODE_SCRIPT = """
import json, sys, time
from ltstudy.study._compat import start_worker_node
start_worker_node(sys.argv[1], json.loads(sys.argv[2]), 100 * 2**20)
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
    procs = [ray_start(head_args(port, head.get("CPU", 0), custom), root / "ray-head.log", env)]
    try:
        for i, (resources, wrap) in enumerate(nodes):
            procs.append(ray_start([], root / f"ray-node{i}.log", env, [
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
