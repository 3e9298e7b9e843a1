"""cluster.yaml is a real cluster-launcher file: Ray's own preparation and schema validation pass (as is
and rendered), nothing is left for a node to expand, and its start commands run under the launcher's own
shell wrapper without killing it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from ltstudy.cli import main
from ltstudy.errors import ConfigError
from ltstudy.study.cluster.launcher import RenderOptions, render, unexpanded, validate

from support.servers import REPO, free_port, session_members

EFS = "fs-0123456789abcdef0"


@pytest.fixture(autouse=True)
def token_file(tmp_path, monkeypatch):
    """A private Ray token file that render mounts on the nodes (the user's comes from
    `ray get-auth-token --generate`)."""
    path = tmp_path / "auth_token"
    path.write_text("0" * 64)
    path.chmod(0o600)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(path))
    return path


def _raw() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def test_cluster_yaml_validates_with_ray():
    config = validate(_raw())
    gpu = config["available_node_types"]["gpu_worker"]
    assert gpu["min_workers"] == 0 and gpu["max_workers"] >= 1
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"]["CPU"] == 0 and head["resources"]["TRAIN_DRIVER"] >= 1
    assert config["provider"]["security_group"]["GroupName"]
    text = (REPO / "cluster.yaml").read_text()
    assert "pip install -e ~/ltstudy" in text
    # token auth on: the start lines say so, nothing turns it off; the token file travels to every node
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token ray start" in c for c in starts if "ray start" in c)
    assert "disabled" not in text and "0.0.0.0" not in text
    assert config["file_mounts"]["~/.ray/auth_token"]
    mlflow_line = next(c for c in config["head_start_ray_commands"] if "mlflow" in c)
    assert "--host 127.0.0.1" in mlflow_line
    commands = [c for key, value in config.items() if key.endswith("_commands") for c in value]
    assert commands and not [c for c in commands if "pkill" in c or "killall" in c]
    for secret in ("aws_access_key_id", "aws_secret_access_key", "AKIA", "BEGIN RSA"):
        assert secret.lower() not in text.lower()
    excluded = set(config["rsync_exclude"])
    assert {"**/.venv", "**/ltstudy_results", "**/mlflow.db", "**/.git"} <= excluded
    assert ".gitignore" in config["rsync_filter"]
    # the only placeholder is the EFS id, which render fills in; no shell variable but the launcher's
    assert unexpanded(_raw()) == ["fs-REPLACE_ME"]


@pytest.mark.parametrize("options", [
    RenderOptions(efs_id=EFS),
    RenderOptions(efs_id=EFS, docker=True, region="eu-west-1", image_id="ami-0123456789abcdef0",
                  worker_instance_profile="ltstudy-s3",
                  mlflow_backend="postgresql://mlflow@db.internal/mlflow", max_gpu_workers=8, head_cpus=2),
], ids=["plain", "docker-s3-postgres"])
def test_rendered_file_is_complete_and_valid(options):
    config = render(_raw(), options)
    assert unexpanded(config) == []
    validate(config)
    text = yaml.safe_dump(config)
    assert EFS in text and "REPLACE_ME)" not in text.replace("*REPLACE_ME*)", "")
    if options.docker:
        assert config["docker"]["image"].startswith("rayproject/ray:2.60.0")
        assert "--volume /mnt/efs:/mnt/efs" in config["docker"]["run_options"]
        assert not any("ray[default" in c for c in config["setup_commands"])
        assert f"{EFS}.efs.eu-west-1.amazonaws.com" in text and config["provider"]["region"] == "eu-west-1"
        assert config["available_node_types"]["gpu_worker"]["node_config"]["IamInstanceProfile"] == \
            {"Name": "ltstudy-s3"}
        assert "--backend-store-uri postgresql://mlflow@db.internal/mlflow" in text
        assert config["max_workers"] == 8 and config["available_node_types"]["head"]["resources"]["CPU"] == 2
    assert config["file_mounts"]["~/.ray/auth_token"] == str(os.environ["RAY_AUTH_TOKEN_PATH"])


def test_render_command(tmp_path, capsys):
    out = tmp_path / "my-cluster.yaml"
    with pytest.raises(SystemExit) as code:
        main(["cluster", "render", str(REPO / "cluster.yaml"), "-o", str(out)])
    assert code.value.code == 2 and "fs-REPLACE_ME" in capsys.readouterr().err and not out.exists()
    with pytest.raises(SystemExit) as code:
        main(["cluster", "render", str(REPO / "cluster.yaml"), "--efs-id", EFS, "-o", str(out)])
    assert code.value.code == 0
    validate(yaml.safe_load(out.read_text()))
    with pytest.raises(ConfigError, match="not an EFS"):
        render(_raw(), RenderOptions(efs_id="my-efs"))


def test_render_keeps_secrets_off_the_command_line(tmp_path, token_file):
    with pytest.raises(ConfigError, match=r"postgresql://u:\*\*\*@db/mlflow: a password") as err:
        render(_raw(), RenderOptions(efs_id=EFS, mlflow_backend="postgresql://u:s3cr3t@db/mlflow"))
    assert "s3cr3t" not in str(err.value)
    pgpass = tmp_path / "pgpass"
    pgpass.write_text("db:5432:mlflow:u:s3cr3t\n")
    pgpass.chmod(0o644)
    with pytest.raises(ConfigError, match="readable by others: chmod 600"):
        render(_raw(), RenderOptions(efs_id=EFS, pgpass=str(pgpass)))
    pgpass.chmod(0o600)
    token_file.chmod(0o644)  # as `ray get-auth-token --generate` leaves it
    with pytest.raises(ConfigError, match="Ray's token file .* readable by others"):
        render(_raw(), RenderOptions(efs_id=EFS))
    token_file.chmod(0o600)
    backend = "postgresql://u@db/mlflow?sslmode=require&x=1;touch /tmp/owned"
    config = render(_raw(), RenderOptions(efs_id=EFS, pgpass=str(pgpass), mlflow_backend=backend))
    text = yaml.safe_dump(config)
    assert "s3cr3t" not in text and config["file_mounts"]["~/.pgpass"] == str(pgpass)
    line = next(c for c in config["head_start_ray_commands"] if "mlflow" in c)
    import shlex

    argv = shlex.split(line)
    assert argv[argv.index("--backend-store-uri") + 1] == backend  # one word for the shell, as given


def _launcher_shell(cmd: str, env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess:
    """``cmd`` as the cluster launcher runs it on a node: exported variables, then Ray's own wrapper
    ``bash --login -c -i 'source ~/.bashrc; export ... && (cmd)'``, given to a shell as ssh would."""
    from ray.autoscaler._private.command_runner import _with_environment_variables, _with_interactive

    line = " ".join(_with_interactive(_with_environment_variables(cmd, env)))
    return subprocess.run(line, shell=True, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, start_new_session=True)


def test_guard_stops_an_unrendered_file_before_it_mounts():
    guard = next(c for c in _raw()["initialization_commands"] if "REPLACE_ME" in c)
    env = {"RAY_HEAD_IP": "10.0.0.1"}
    raw = _launcher_shell(guard, env, timeout=60)
    assert raw.returncode == 1 and "ltstudy cluster render --efs-id" in raw.stderr
    rendered = next(c for c in render(_raw(), RenderOptions(efs_id=EFS))["initialization_commands"]
                    if "REPLACE_ME" in c)
    assert _launcher_shell(rendered, env, timeout=60).returncode == 0


@pytest.mark.slow
def test_head_start_commands_restart_mlflow_without_killing_their_shell(tmp_path):
    """The MLflow line of head_start_ray_commands, run twice under the launcher's wrapper (as `ray up` and
    `ray up --restart-only` do): each wrapper shell exits 0, the second server replaced the first, which is
    gone. (`ray stop` / `ray start` are not run: they would stop every Ray process on this machine.)"""
    port = free_port()
    line = next(c for c in _raw()["head_start_ray_commands"] if "mlflow" in c)
    line = (line.replace("/mnt/efs", str(tmp_path / "efs")).replace("~/", f"{tmp_path}/home/")
            .replace("--port 5000", f"--port {port}"))
    # a login shell resets PATH: put this environment's bin folder (ltstudy, mlflow) first, as the node's is
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    line = f"export PATH={Path(sys.executable).parent}:$PATH PYTHONPATH={pythonpath}; {line}"
    env = {"RAY_HEAD_IP": "127.0.0.1"}
    pidfile = tmp_path / "home" / "mlflow.pid"
    pids = []
    try:
        for _ in range(2):
            run = _launcher_shell(line, env)
            assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
            pids.append(int(pidfile.read_text()))
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as resp:
                assert resp.status == 200
        assert pids[0] != pids[1]
        assert not session_members(pids[0]), "the first server was not stopped"
        assert (tmp_path / "efs" / "ltstudy" / "mlflow.db").is_file()  # the store lives on the shared disk
    finally:
        for pid in pids:
            for member in session_members(pid):
                os.kill(member, 9)
        deadline = time.monotonic() + 30
        while any(session_members(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
    assert Path(pidfile).exists()


def test_render_pins_the_network_names_per_user_and_spot(monkeypatch):
    monkeypatch.setenv("USER", "Ada.L")
    subnets = ("subnet-0aaaaaaaaaaaaaaaa", "subnet-0bbbbbbbbbbbbbbbb")
    config = render(_raw(), RenderOptions(efs_id=EFS, subnets=subnets, security_group="sg-0123456789abcdef0",
                                          ssh_cidr="203.0.113.7/32", spot=True))
    validate(config)
    assert config["cluster_name"] == "ltstudy-ada-l"
    assert config["provider"]["security_group"]["GroupName"] == "ltstudy-ada-l-nodes"
    assert "availability_zone" not in config["provider"]  # the subnets say where
    for name, spec in config["available_node_types"].items():
        assert spec["node_config"]["SubnetIds"] == list(subnets)
        assert spec["node_config"]["SecurityGroupIds"] == ["sg-0123456789abcdef0"]
        assert ("InstanceMarketOptions" in spec["node_config"]) == (name != config["head_node_type"])
    assert any("boto3" in c for c in config["head_setup_commands"])
    docker = render(_raw(), RenderOptions(efs_id=EFS, docker=True))
    assert any("boto3" in c for c in docker["head_setup_commands"])  # Ray's default list is replaced
    init = " ".join(config["initialization_commands"])
    assert "cloud-init status --wait" in init and "DPkg::Lock::Timeout" in init
    assert init.index("cloud-init") < init.index("apt-get")
    assert render(_raw(), RenderOptions(efs_id=EFS, name="team-a"))["cluster_name"] == "team-a"
    for bad, match in ((RenderOptions(efs_id=EFS, subnets=("sub-1",)), "--subnet"),
                       (RenderOptions(efs_id=EFS, security_group="default"), "--security-group"),
                       (RenderOptions(efs_id=EFS, ssh_cidr="everywhere"), "--ssh-cidr"),
                       (RenderOptions(efs_id=EFS, name="a b"), "--name"),
                       (RenderOptions(efs_id=EFS, region="Mars"), "--region")):
        with pytest.raises(ConfigError, match=match):
            render(_raw(), bad)


def test_render_writes_the_pass_role_policy_and_prints_the_iam_commands(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    out = tmp_path / "my-cluster.yaml"
    with pytest.raises(SystemExit) as code:
        main(["cluster", "render", str(REPO / "cluster.yaml"), "--efs-id", EFS, "--worker-instance-profile",
              "ltstudy-worker", "-o", str(out)])
    assert code.value.code == 0
    policy = json.loads((tmp_path / "my-cluster-iam-policy.json").read_text())
    assert policy["Statement"][0]["Action"] == "iam:PassRole"
    assert policy["Statement"][0]["Resource"].endswith(":role/ltstudy-worker")
    printed = capsys.readouterr().out
    assert "aws iam put-role-policy --role-name ray-autoscaler-v1" in printed
    assert "SSH open to 0.0.0.0/0" in printed and "cluster doctor" in printed


def test_pull_copies_the_records_home_with_ray_rsync_down(tmp_path):
    """`cluster pull` runs one `ray rsync-down FILE REMOTE LOCAL` per record; here the head's EFS is a local
    folder and the copy is done in place of the SSH rsync (the commands are what ray gets). Ray applies the
    file's rsync_exclude (which holds mlflow.db) to rsync-down too: the commands get a copy without it."""
    from ltstudy.study.cluster.pull import pull

    head = tmp_path / "efs" / "ltstudy"
    (head / "mlartifacts" / "1").mkdir(parents=True)
    (head / "mlflow.db").write_bytes(b"SQLite format 3\0")
    (head / "mlartifacts" / "1" / "a.json").write_text("{}")
    cluster = tmp_path / "my-cluster.yaml"
    cluster.write_text(yaml.safe_dump(render(_raw(), RenderOptions(efs_id=EFS))))
    seen = []

    def rsync_down(cmd, **kw):
        seen.append(cmd)
        assert cmd[1] == "rsync-down" and cmd[3].startswith("/mnt/efs/ltstudy/")
        given = yaml.safe_load(Path(cmd[2]).read_text())
        assert given["cluster_name"] == yaml.safe_load(cluster.read_text())["cluster_name"]
        assert "rsync_exclude" not in given and "rsync_filter" not in given
        src = head / cmd[3][len("/mnt/efs/ltstudy/"):]
        if not src.exists():
            return subprocess.CompletedProcess(cmd, 23, "", f"rsync: link_stat \"{src}\" failed: No such file")
        if src.is_dir():
            import shutil

            shutil.copytree(src, cmd[4], dirs_exist_ok=True)
        else:
            Path(cmd[4]).write_bytes(src.read_bytes())
        return subprocess.CompletedProcess(cmd, 0, "", "")

    got = pull(cluster, tmp_path / "home", run=rsync_down)
    assert [Path(c[3]).name for c in seen] == ["mlflow.db", "mlartifacts", "optuna.journal"]
    assert len(got) == 2 and (tmp_path / "home" / "mlflow.db").read_bytes().startswith(b"SQLite")
    assert (tmp_path / "home" / "mlartifacts" / "1" / "a.json").is_file()

    def refused(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 1, "", "Permission denied (publickey).")

    from ltstudy.errors import LtstudyError

    with pytest.raises(LtstudyError, match=r"ray rsync-down /mnt/efs/ltstudy/mlflow.db failed: Permission denied"):
        pull(cluster, tmp_path / "home2", run=refused)


def test_file_mounts_survive_the_rsync_excludes(tmp_path):
    """Ray applies `rsync_exclude` and `rsync_filter` to every file mount: the token and `--pgpass` files must
    still arrive, while a `.pgpass` inside the repository stays home (found by `ray up` on namespace nodes)."""
    from ray.autoscaler._private.command_runner import SSHCommandRunner

    if subprocess.run(["which", "rsync"], capture_output=True).returncode:
        pytest.fail("rsync is needed (Ray's file mounts use it)", pytrace=False)
    pgpass = tmp_path / "home" / ".pgpass"
    pgpass.parent.mkdir()
    pgpass.write_text("db:5432:mlflow:u:s3cr3t\n")
    pgpass.chmod(0o600)
    config = render(_raw(), RenderOptions(efs_id=EFS, pgpass=str(pgpass)))
    args = SSHCommandRunner._create_rsync_filter_args(None, config)
    repo = tmp_path / "repo"
    (repo / "ltstudy").mkdir(parents=True)
    (repo / "ltstudy" / "__init__.py").write_text("")
    (repo / ".gitignore").write_text((REPO / ".gitignore").read_text())
    (repo / ".pgpass").write_text("db:5432:mlflow:u:s3cr3t\n")
    node = tmp_path / "node"
    for remote, local in config["file_mounts"].items():
        source = str(repo) + "/" if local == "." else local
        dest = node / remote.removeprefix("~/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["rsync", "-az", *args, source, str(dest) + ("/" if local == "." else "")],
                       check=True, capture_output=True)
    assert (node / ".pgpass").read_text() == pgpass.read_text()
    assert (node / ".ray" / "auth_token").is_file()
    assert (node / "ltstudy" / "ltstudy" / "__init__.py").is_file()
    assert not (node / "ltstudy" / ".pgpass").exists()
