"""`ray up` through Ray's real node updaters, on this machine.

Three Linux network namespaces (``laptop``, ``head``, ``worker``, each with a veth on one bridge that lives
in a fourth, ``switch``, at addresses this test picks) stand for the user's laptop and two cloud instances.
Each also has its own PID, mount and UTS namespace (so ``ray stop`` on one node cannot touch another), its
own ``/tmp``, ``/dev/shm``, ``/run`` and ``/mnt`` (Ray's local provider keeps its state in
``/tmp/ray/cluster-NAME.state``), its own HOME (a copy of ``/etc/passwd`` bound over the node's, in which
root's home is a per-node folder), and, on the two nodes, its own ``sshd`` (Debian's openssh-server) with
its own config, host key and authorized key.

The cluster file is the one ``ltstudy cluster render`` writes from ``cluster.yaml``, with only what cannot
run here swapped (each swap is commented in :func:`_on_these_namespaces`): the AWS provider for Ray's
``local`` one, the EFS NFS mount for a bind mount of one shared folder (no NFS server here), the ``pip``
lines that need the internet for an offline virtualenv with the ltstudy wheel this test builds once, the
apt-get line dropped. The file's own token-auth lines, file mounts, ``ray start`` lines and MLflow server
line run as they are, over SSH. Then, from the laptop namespace: ``ray up``, ``ray dashboard`` and
``ray job submit`` (with the token) of a small study whose trials land on the worker node (the head offers
0 CPUs), ``best-config export`` through the documented MLflow tunnel (``ray attach -p 5000``), ``ray down``;
afterwards no Ray process is left on any node. No traffic leaves the namespaces the test made; it removes
them (and every process in them) however it ends.

Figures (printed, never asserted): seconds from ``ray up`` to the first trial's first epoch, and from
``ray down`` to no Ray process on any node.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from support.configs import TINY
from support.servers import REPO

pytestmark = pytest.mark.slow

EFS = "fs-0123456789abcdef0"
SUBNET = "10.213.19"  # a /24 only the test's namespaces route; .1 is the laptop, .2 the head, .3 the worker
TOOLS = ("ip", "unshare", "nsenter", "mount", "sshd", "ssh", "ssh-keygen", "rsync", "sudo")

#: a node's first process: its own /tmp, /dev/shm, /run and /mnt (tmpfs), the folders it must still see
#: (the test's folder, the Python environment) bound back at their own paths, its hostname, /etc/hosts and
#: an /etc/passwd whose root home is the node's own; then a reaper (PID 1 of the node) runs the node's
#: process (sshd, or a sleep on the laptop)
_INIT = r"""
set -eu
name=$1 root=$2 keep=$3; shift 3
hostname "lt-$name"
mount -t tmpfs -o mode=755 lt-mnt /mnt
i=0; for p in $keep; do mkdir -p /mnt/.keep$i; mount --bind "$p" /mnt/.keep$i; i=$((i+1)); done
mount -t tmpfs -o mode=1777 lt-tmp /tmp
i=0; for p in $keep; do mkdir -p "$p"; mount --bind /mnt/.keep$i "$p"; umount /mnt/.keep$i; rmdir /mnt/.keep$i; i=$((i+1)); done
mount -t tmpfs -o mode=1777 lt-shm /dev/shm
mount -t tmpfs -o mode=755 lt-run /run
mkdir -m 755 /run/sshd
mount --bind "$root/passwd" /etc/passwd
mount --bind "$root/hosts" /etc/hosts
touch "$root/ready"
exec "$@"
"""

_REAPER = """
import os, subprocess, sys
child = subprocess.Popen(sys.argv[1:])
while True:
    try:
        pid, _ = os.wait()
    except ChildProcessError:
        break
    if pid == child.pid:
        break
"""

_SSHD_CONFIG = """\
Port 22
ListenAddress {ip}
HostKey {root}/ssh_host_ed25519_key
PidFile {root}/sshd.pid
AuthorizedKeysFile {keys}
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
AllowTcpForwarding yes
X11Forwarding no
PrintMotd no
Subsystem sftp internal-sftp
"""


@dataclass
class Node:
    name: str
    ns: str
    ip: str
    root: Path
    proc: subprocess.Popen | None = None
    init_pid: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def home(self) -> Path:
        return self.root / "home"

    def pid_ns(self) -> str:
        return os.readlink(f"/proc/{self.init_pid}/ns/pid")

    def processes(self) -> list[tuple[int, str]]:
        """(host pid, command line) of every live process in the node's PID namespace."""
        want, out = self.pid_ns(), []
        for entry in Path("/proc").glob("[0-9]*"):
            try:
                if os.readlink(entry / "ns/pid") != want:
                    continue
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            except OSError:
                continue
            if state != "Z":
                out.append((int(entry.name), cmd))
        return out

    def enter(self, cwd: Path | None = None) -> list[str]:
        """The argv prefix that runs a command inside this node's namespaces."""
        return ["nsenter", f"--target={self.init_pid}", "--mount", "--uts", "--net", "--pid", "--",
                "sh", "-c", 'cd "$0" && exec "$@"', str(cwd or self.home)]


def _require_tools() -> None:
    missing = [t for t in TOOLS if not shutil.which(t) and not Path(f"/usr/sbin/{t}").exists()]
    if missing or os.geteuid() != 0:
        pytest.fail(f"this test needs root and {', '.join(TOOLS)} (missing: {', '.join(missing) or 'none'}; "
                    f"root: {os.geteuid() == 0}); Debian: apt-get install openssh-server iproute2 util-linux "
                    "procps sudo rsync (.ci/run does)", pytrace=False)


def _sh(*args: str, timeout: float = 30) -> str:
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if done.returncode:
        raise RuntimeError(f"{' '.join(args)}: {done.stderr.strip()[-2000:]}")
    return done.stdout


def _kept_paths(tmp_path: Path) -> list[str]:
    """What a node must still see under its own /tmp: the test's folder, the Python environment (CI's lives
    under /tmp), the checkout (the laptop's `ray up` syncs it); outermost paths only."""
    paths = {Path(p).resolve() for p in (tmp_path, sys.prefix, sys.base_prefix, REPO,
                                          sysconfig.get_paths()["purelib"])}
    under_tmp = sorted(p for p in paths if p.is_relative_to("/tmp"))
    outer = [p for p in under_tmp if not any(p != q and p.is_relative_to(q) for q in under_tmp)]
    assert all(" " not in str(p) for p in outer), outer
    return [str(p) for p in outer]


@contextlib.contextmanager
def _namespaces(tmp_path: Path) -> Iterator[dict[str, Node]]:
    """The laptop and two nodes (see the module docstring); every process in them is killed and every
    namespace deleted on exit."""
    _require_tools()
    prefix = f"lt{os.getpid()}"
    switch = f"{prefix}-switch"
    nodes = {name: Node(name, f"{prefix}-{name}", f"{SUBNET}.{i}", tmp_path / name)
             for i, name in enumerate(("laptop", "head", "worker"), start=1)}
    made: list[str] = []
    key = tmp_path / "id_ed25519"
    try:
        _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "ltstudy-test", "-f", str(key))
        (tmp_path / "authorized_keys").write_text(Path(f"{key}.pub").read_text())
        for ns in (switch, *(n.ns for n in nodes.values())):
            _sh("ip", "netns", "add", ns)
            made.append(ns)
        _sh("ip", "-n", switch, "link", "add", "br0", "type", "bridge")
        _sh("ip", "-n", switch, "link", "set", "br0", "up")
        for n in nodes.values():
            _sh("ip", "-n", switch, "link", "add", f"v-{n.name}", "type", "veth", "peer", "name", "eth0",
                "netns", n.ns)
            _sh("ip", "-n", switch, "link", "set", f"v-{n.name}", "master", "br0", "up")
            _sh("ip", "-n", n.ns, "addr", "add", f"{n.ip}/24", "dev", "eth0")
            _sh("ip", "-n", n.ns, "link", "set", "eth0", "up")
            _sh("ip", "-n", n.ns, "link", "set", "lo", "up")
            # Ray finds a node's address by the route to a public one: that route ends on the bridge
            _sh("ip", "-n", n.ns, "route", "add", "default", "dev", "eth0")

        passwd = Path("/etc/passwd").read_text()
        hosts = "127.0.0.1 localhost\n" + "".join(f"{m.ip} lt-{m.name}\n" for m in nodes.values())
        keep = " ".join(_kept_paths(tmp_path))
        for n in nodes.values():
            n.home.mkdir(parents=True)
            (n.home / ".bashrc").write_text("# a fresh node's ~/.bashrc\n")
            (n.root / "passwd").write_text(re.sub(r"^(root:[^:]*:0:0:[^:]*:)[^:]*:", rf"\g<1>{n.home}:",
                                                  passwd, count=1, flags=re.M))
            (n.root / "hosts").write_text(hosts)
            if n.name == "laptop":
                main = ["sleep", "infinity"]
            else:
                _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(n.root / "ssh_host_ed25519_key"))
                (n.root / "sshd_config").write_text(_SSHD_CONFIG.format(
                    ip=n.ip, root=n.root, keys=tmp_path / "authorized_keys"))
                sshd = shutil.which("sshd") or "/usr/sbin/sshd"
                main = [sshd, "-D", "-e", "-f", str(n.root / "sshd_config")]
            n.proc = subprocess.Popen(
                ["ip", "netns", "exec", n.ns, "unshare", "--pid", "--mount", "--uts", "--fork", "--mount-proc",
                 "--kill-child", "sh", "-c", _INIT, "init", n.name, str(n.root), keep,
                 sys.executable, "-I", "-c", _REAPER, *main],
                stdin=subprocess.DEVNULL, stdout=open(n.root / "node.log", "w"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        for n in nodes.values():
            while not ((n.root / "ready").exists() and (n.name == "laptop" or "Server listening"
                                                          in (n.root / "node.log").read_text())):
                if n.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"node {n.name} did not come up: {(n.root / 'node.log').read_text()}")
                time.sleep(0.1)
            children = Path(f"/proc/{n.proc.pid}/task/{n.proc.pid}/children").read_text().split()
            n.init_pid = int(children[0])
        nodes["laptop"].extra["key"] = key
        yield nodes
    finally:
        for n in nodes.values():  # unshare --kill-child: the node's PID 1 and so all of the node go
            if n.proc is not None and n.proc.poll() is None:
                n.proc.kill()
        for n in nodes.values():
            if n.proc is not None:
                n.proc.wait(timeout=30)
        for ns in reversed(made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


# ------------------------------------------------------------------------------------ the cluster file
def _resource_flags(resources: dict[str, float]) -> str:
    flags = []
    if "CPU" in resources:
        flags.append(f"--num-cpus={int(resources['CPU'])}")
    if "GPU" in resources:
        flags.append(f"--num-gpus={int(resources['GPU'])}")
    custom = {k: v for k, v in resources.items() if k not in ("CPU", "GPU")}
    if custom:
        flags.append("--resources=" + shlex.quote(json.dumps(custom, separators=(",", ":"))))
    return " ".join(flags)


def _replace(commands: list[str], pattern: str, new: str | None) -> list[str]:
    """``commands`` with the one matching ``pattern`` replaced by ``new`` (dropped for None)."""
    hits = [i for i, c in enumerate(commands) if re.search(pattern, c)]
    assert len(hits) == 1, f"cluster.yaml changed: {pattern!r} matches {len(hits)} of {commands}"
    out = list(commands)
    if new is None:
        del out[hits[0]]
    else:
        out[hits[0]] = new
    return out


def _on_these_namespaces(rendered: dict, nodes: dict[str, Node], key: Path, shared: Path, wheel: Path
                         ) -> dict:
    """The rendered AWS file with only what cannot run here swapped; everything else runs as rendered."""
    c = copy.deepcopy(rendered)
    head, worker = nodes["head"], nodes["worker"]
    # Ray's local provider refuses available_node_types ("not supported for on-premise clusters") and, unlike
    # the AWS one, passes no node type's resources to `ray start`: the head's resources ({"CPU": 0,
    # "TRAIN_DRIVER": 16}, kept) and the worker's (the GPU instance's {"CPU": 48, "GPU": 4} swapped for this
    # machine's 2 CPUs) go on the `ray start` lines instead; one worker, started by the autoscaler on the head.
    types = c.pop("available_node_types")
    head_resources = types[c.pop("head_node_type")]["resources"]
    assert head_resources == {"CPU": 0, "TRAIN_DRIVER": 16}, head_resources
    c["provider"] = {"type": "local", "head_ip": head.ip, "worker_ips": [worker.ip]}
    c["auth"] = {"ssh_user": "root", "ssh_private_key": str(key)}
    c["min_workers"] = c["max_workers"] = 1
    c["head_start_ray_commands"] = [f"{cmd} {_resource_flags(head_resources)}" if "ray start" in cmd else cmd
                                    for cmd in c["head_start_ray_commands"]]
    c["worker_start_ray_commands"] = [f"{cmd} {_resource_flags({'CPU': 2})}" if "ray start" in cmd else cmd
                                      for cmd in c["worker_start_ray_commands"]]
    init = c["initialization_commands"]
    # no internet on the nodes (nfs-common is only for the EFS mount, swapped below)
    init = _replace(init, r"apt-get .*install", None)
    # the EFS NFS mount: a bind mount of one folder every node sees (no NFS server in this machine's CI);
    # the rest of the line (mkdir, mountpoint check, chown) runs as rendered
    nfs = next(x for x in init if "mount -t nfs4" in x)
    assert f"{EFS}.efs." in nfs
    bind = re.sub(r"sudo mount -t nfs4 -o \S+ \S+ /mnt/efs", f"sudo mount --bind {shared} /mnt/efs", nfs)
    assert "nfs4" not in bind, nfs
    init = _replace(init, r"mount -t nfs4", bind)
    c["initialization_commands"] = init
    # `pip install -U "ray[...]"`: the nodes are offline; a virtualenv of this machine's Python whose
    # site-packages reach this test's environment (Ray, torch, MLflow; ray and mlflow scripts on its PATH)
    # stands in for the image's Python with Ray installed
    base = Path(getattr(sys, "_base_executable", sys.executable)).resolve()
    bindir = Path(sys.executable).parent
    venv = (f"{base} -m venv --without-pip ~/venv && "
            # (printf's \041 is "!": no history expansion in the launcher's interactive bash)
            f"for s in ray mlflow; do {{ printf '#\\041%s\\n' \"$HOME/venv/bin/python\"; tail -n +2 {bindir}/$s; }} "
            f"> ~/venv/bin/$s && chmod +x ~/venv/bin/$s; done && "
            f"(grep -q venv/bin ~/.bashrc || echo 'export PATH=$HOME/venv/bin:$PATH' >> ~/.bashrc)")
    # `pip install -e ~/ltstudy`: ltstudy from the wheel built once (into the virtualenv, before its
    # site-packages see this environment's editable ltstudy), and it is that one the node imports
    site = sysconfig.get_paths()["purelib"]
    install = (f"{sys.executable} -m pip -q --python ~/venv/bin/python install --no-deps --no-index {wheel} && "
               f"~/venv/bin/python -c \"import sys, sysconfig; "
               f"open(sysconfig.get_paths()['purelib'] + '/lt-base.pth', 'w').write('{site}\\n')\" && "
               f"~/venv/bin/python -c \"import ltstudy, sys; assert ltstudy.__file__.startswith(sys.prefix), "
               f"ltstudy.__file__\"")
    setup = _replace(c["setup_commands"], r"pip install -U \"ray\[", venv)
    c["setup_commands"] = _replace(setup, r"pip install -e ~/ltstudy", install)
    # boto3 is the AWS provider's (the local one needs nothing) and would come from the internet
    c["head_setup_commands"] = _replace(c["head_setup_commands"], r"pip install -U \"boto3", None)
    return c


# ------------------------------------------------------------------------------------------ the test
def _laptop_env(laptop: Node) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_", "MLFLOW_", "TMPDIR")) and k not in ("HOME", "USER")}
    return {**env, "HOME": str(laptop.home), "USER": "root", "PATH": f"{Path(sys.executable).parent}:{env['PATH']}",
            "PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0",
            # Autoscaler v2 (`ray up`'s default since Ray 2.50) sees the head as "cloud instance no longer
            # found" with the local provider: its state file on the head marks the head terminated (only v1's
            # StandardAutoscaler records the head there), so v2 never launches a worker. Specific to Ray's
            # local provider; the AWS file keeps v2.
            "RAY_UP_enable_autoscaler_v2": "0"}


def _run(node: Node, argv: list[str], env: dict[str, str], log: Path, timeout: float, cwd: Path | None = None,
         check: bool = True) -> subprocess.CompletedProcess:
    with open(log, "w") as out:
        done = subprocess.run([*node.enter(cwd), *argv], env=env, stdout=out, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, timeout=timeout)
    if check and done.returncode:
        raise AssertionError(f"{' '.join(argv[:4])} exited {done.returncode}:\n{log.read_text()[-6000:]}")
    return done


def _background(node: Node, argv: list[str], env: dict[str, str], log: Path, cwd: Path | None = None
                ) -> subprocess.Popen:
    return subprocess.Popen([*node.enter(cwd), *argv], env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            stdin=subprocess.PIPE, start_new_session=True)  # stdin held open: ray attach's shell


def _stop(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


_WAIT_HTTP = """
import sys, time, urllib.request, urllib.error
deadline = time.monotonic() + float(sys.argv[2])
while True:
    try:
        urllib.request.urlopen(sys.argv[1], timeout=2)
        break
    except urllib.error.HTTPError:
        break  # it answers (401 without the token)
    except OSError:
        if time.monotonic() > deadline:
            sys.exit(f"{sys.argv[1]} did not answer")
        time.sleep(0.3)
"""

#: the laptop's wait for the worker node (through the dashboard tunnel, with the token); prints the nodes
_WAIT_NODES = """
import json, sys, time
from ray.util.state import list_nodes
deadline = time.monotonic() + float(sys.argv[2])
while True:
    nodes = [dict(n) if isinstance(n, dict) else vars(n) for n in list_nodes(address=sys.argv[1])]
    nodes = [n for n in nodes if n["state"] == "ALIVE"]
    if len(nodes) >= 2 or time.monotonic() > deadline:
        print(json.dumps({n["node_id"]: n["node_ip"] for n in nodes}))
        break
    time.sleep(1)
"""

#: the laptop's look at the study's MLflow records (through the tunnel): per trial run, its node and the
#: time of its first epoch
_TRIAL_RUNS = """
import json, sys
from mlflow.tracking import MlflowClient
client = MlflowClient(tracking_uri=sys.argv[1])
exp = client.get_experiment_by_name(sys.argv[2])
out = []
for run in client.search_runs([exp.experiment_id]):
    if "ltstudy.trial_id" not in run.data.tags or not run.data.metrics:
        continue
    history = client.get_metric_history(run.info.run_id, sorted(run.data.metrics)[0])
    first = min(history, key=lambda m: (m.step, m.timestamp))
    out.append({"node_id": run.data.tags.get("node_id"), "status": run.info.status,
                "first_epoch_ms": first.timestamp, "epochs": max(m.step for m in history)})
print(json.dumps(out))
"""


def _build_wheel(tmp_path: Path) -> Path:
    """The ltstudy wheel, built once from a copy of the checkout (a build writes build/ and *.egg-info)."""
    source = tmp_path / "source"
    anywhere = shutil.ignore_patterns(".git", "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache")
    top = {".venv", "venv", "build", "dist", "site", "data", "ltstudy_results", "mlruns", "mlflow.db"}

    def ignore(folder: str, names: list[str]) -> set[str]:
        return set(anywhere(folder, names)) | (top & set(names) if Path(folder) == REPO else set())

    shutil.copytree(REPO, source, ignore=ignore)
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(dist), str(source)], check=True, capture_output=True, timeout=300)
    (wheel,) = dist.glob("ltstudy-*.whl")
    return wheel


def _ray_processes(nodes: dict[str, Node]) -> dict[str, list[str]]:
    pattern = re.compile(r"\bray\b|raylet|gcs_server|dashboard|ray::|default_worker|log_monitor|monitor\.py")
    return {n.name: [cmd for _, cmd in n.processes() if pattern.search(cmd)] for n in nodes.values()
            if n.name != "laptop"}


def _until_no_ray(nodes: dict[str, Node], names: tuple[str, ...], timeout: float) -> float:
    """The time when no Ray process is left on the nodes ``names`` (or ``timeout`` seconds passed)."""
    deadline = time.monotonic() + timeout
    while any(v for k, v in _ray_processes(nodes).items() if k in names) and time.monotonic() < deadline:
        time.sleep(0.2)
    return time.time()


def test_ray_up_runs_a_study_on_the_worker_and_ray_down_leaves_no_process(tmp_path):
    wheel = _build_wheel(tmp_path)
    shared = tmp_path / "efs"
    shared.mkdir()
    study = "rayup"
    with _namespaces(tmp_path) as nodes:
        laptop, head, worker = nodes["laptop"], nodes["head"], nodes["worker"]
        env = _laptop_env(laptop)
        ray = [str(Path(sys.executable).with_name("ray"))]
        ltstudy = [sys.executable, "-m", "ltstudy.cli"]
        logs = tmp_path / "logs"
        logs.mkdir()

        # the documented first steps, on the laptop: the token every node gets, then render
        _run(laptop, [*ray, "get-auth-token", "--generate"], env, logs / "token.log", 120)
        token_path = laptop.home / ".ray" / "auth_token"
        token_path.chmod(0o600)
        token = token_path.read_text().strip()
        rendered_file = laptop.home / "aws-cluster.yaml"
        _run(laptop, [*ltstudy, "cluster", "render", str(REPO / "cluster.yaml"), "--efs-id", EFS, "--name",
                      f"lt{os.getpid()}", "--no-doctor", "-o", str(rendered_file)], env, logs / "render.log", 120)
        rendered = yaml.safe_load(rendered_file.read_text())
        assert rendered["file_mounts"]["~/.ray/auth_token"] == str(token_path)
        cluster = laptop.home / "my-cluster.yaml"
        cluster.write_text(yaml.safe_dump(_on_these_namespaces(rendered, nodes, laptop.extra["key"], shared, wheel),
                                          sort_keys=False, width=1 << 16))

        tunnels: list[subprocess.Popen] = []
        try:
            t_up = time.time()
            _run(laptop, [*ray, "up", str(cluster), "-y"], env, logs / "ray-up.log", 300, cwd=REPO)
            up_s = time.time() - t_up
            tunnels.append(_background(laptop, [*ray, "dashboard", str(cluster)], env, logs / "dashboard.log"))
            _run(laptop, [sys.executable, "-c", _WAIT_HTTP, "http://127.0.0.1:8265", "120"], env,
                 logs / "wait-dashboard.log", 150)
            tokened = {**env, "RAY_AUTH_MODE": "token"}  # ray job submit then sends ~/.ray/auth_token
            _run(laptop, [sys.executable, "-c", _WAIT_NODES, "http://127.0.0.1:8265", "240"], tokened,
                 logs / "nodes.log", 300)
            node_ips = json.loads((logs / "nodes.log").read_text().strip().splitlines()[-1])
            assert sorted(node_ips.values()) == [head.ip, worker.ip], (logs / "nodes.log").read_text()
            t_worker = time.time()

            tiny = [f"{k}={v}" for k, v in TINY.items()]
            submit = _run(laptop, [*ray, "job", "submit", "--address", "http://127.0.0.1:8265", "--",
                                   "ltstudy", "tune", "--address", "auto", "--method", "ce", "--num-trials", "2",
                                   "--storage", "/mnt/efs/ltstudy", "--tracking-uri", "http://127.0.0.1:5000",
                                   "--study-name", study, *tiny, "epochs=1"],
                          tokened, logs / "job.log", 300, check=False)
            job_log = (logs / "job.log").read_text()
            assert submit.returncode == 0 and "succeeded" in job_log, job_log[-6000:]

            # the MLflow tunnel docs/cluster.md gives, then best-config export through it
            tunnels.append(_background(laptop, [*ray, "attach", str(cluster), "-p", "5000"], env,
                                       logs / "attach.log"))
            _run(laptop, [sys.executable, "-c", _WAIT_HTTP, "http://localhost:5000/health", "60"], env,
                 logs / "wait-mlflow.log", 90)
            best = laptop.home / "best.yaml"
            _run(laptop, [*ltstudy, "best-config", "export", "--study", study, "--tracking-uri",
                          "http://localhost:5000", "-o", str(best)], env, logs / "export.log", 120)
            exported = yaml.safe_load(best.read_text())
            assert exported["method"] == "ce", exported
            # the records home before `ray down` (`cluster pull`: Ray's rsync-down from the head over SSH)
            records = laptop.home / "records"
            _run(laptop, [*ltstudy, "cluster", "pull", str(cluster), "--to", str(records)], env, logs / "pull.log",
                 120)
            _run(laptop, [sys.executable, "-c", _TRIAL_RUNS, "http://localhost:5000", study], env,
                 logs / "trials.log", 120)
            trials = json.loads((logs / "trials.log").read_text().strip().splitlines()[-1])
            assert len(trials) == 2 and all(t["status"] == "FINISHED" for t in trials), trials
            on = {node_ips.get(t["node_id"]) for t in trials}
            assert on == {worker.ip}, f"trials ran on {on}, not only on the worker {worker.ip}"
            first_epoch = min(t["first_epoch_ms"] for t in trials) / 1000

            # the token is in files only: no command line on a node holds it
            holders = [(n.name, cmd) for n in (head, worker) for _, cmd in n.processes() if token in cmd]
            assert not holders, holders
        finally:
            for proc in tunnels:
                _stop(proc)
            t_down = time.time()
            try:
                down_rc = _run(laptop, [*ray, "down", str(cluster), "-y"], env, logs / "ray-down.log", 120,
                               check=False).returncode
            except subprocess.TimeoutExpired:
                down_rc = None
            head_s = _until_no_ray(nodes, ("head",), 60) - t_down
            left_by_down = _ray_processes(nodes)
            left_on_worker = left_by_down["worker"]
            # Ray's local provider: `ray down` runs `ray stop` on the head only; "terminating" a worker is a line
            # in the laptop's state file. The worker's raylet exits once the GCS is gone, its log monitor does
            # not. On AWS `ray down` terminates the instance; the stand-in here is `ray stop` on it over SSH.
            _run(laptop, ["ssh", "-i", str(laptop.extra["key"]), "-o", "StrictHostKeyChecking=no", "-o",
                          "UserKnownHostsFile=/dev/null", "-o", "IdentitiesOnly=yes", f"root@{worker.ip}",
                          "bash --login -c 'source ~/.bashrc; ray stop'"], env, logs / "worker-stop.log", 120,
                 check=False)
            down_s = _until_no_ray(nodes, ("head", "worker"), 60) - t_down
            left_ray = _ray_processes(nodes)
            (logs / "left-after-down.json").write_text(json.dumps(
                {n.name: n.processes() for n in (head, worker)}, indent=1))
            # `ray down` only runs `ray stop`: the MLflow server `ltstudy cluster mlflow` started on the head
            # lives on (on AWS the instance goes with it); stop it by its pidfile, as the start line does
            mlflow_left = [cmd for _, cmd in head.processes() if "mlflow" in cmd]
            subprocess.run([*head.enter(), str(head.home / "venv/bin/python"), "-c",
                            "from pathlib import Path; from ltstudy.study.cluster.launcher import stop_pidfile; "
                            "stop_pidfile(Path('~/mlflow.pid').expanduser())"],
                           capture_output=True, timeout=60, env={"HOME": str(head.home), "PATH": os.environ["PATH"]})
            others = {n.name: [cmd for pid, cmd in n.processes() if pid != n.init_pid and "sshd" not in cmd]
                      for n in (head, worker)}

        print(f"\nFIGURE ray up: {up_s:.1f} s (head set up, Ray and MLflow started); worker node joined "
              f"{t_worker - t_up:.1f} s after ray up began")
        print(f"FIGURE ray up -> first trial's first epoch: {first_epoch - t_up:.1f} s")
        print(f"FIGURE ray down -> no Ray process on the head: {head_s:.1f} s (ray down exit {down_rc})")
        print(f"FIGURE ray down -> no Ray process on any node: {down_s:.1f} s (the worker's left by ray down: "
              f"{len(left_on_worker)}, stopped by ray stop over SSH)")
        print(f"FIGURE MLflow processes left by ray down on the head (stopped by pidfile): {len(mlflow_left)}")
        assert down_rc == 0, (logs / "ray-down.log").read_text()[-4000:]
        assert not left_by_down["head"], f"Ray processes left on the head by ray down: {left_by_down['head']}"
        assert not any(left_ray.values()), f"Ray processes left after ray down: {left_ray}"
        assert not any(others.values()), f"processes left on the nodes: {others}"
        assert not [cmd for cmd in mlflow_left if "huey" in cmd], mlflow_left  # MLflow's job runner stays off
        # with no cluster left, the pulled records give the answer the tunnel gave
        again = laptop.home / "best-pulled.yaml"
        _run(laptop, [*ltstudy, "best-config", "export", "--study", study, "--tracking-uri",
                      f"sqlite:///{records / 'mlflow.db'}", "-o", str(again)], env, logs / "export-pulled.log", 120)
        assert yaml.safe_load(again.read_text())["provenance"]["run_id"] == exported["provenance"]["run_id"]
