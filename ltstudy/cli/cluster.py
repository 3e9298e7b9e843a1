"""Cluster commands: ``cluster render`` (fill in cluster.yaml), ``cluster check`` (every node sees what a
study needs), ``cluster mlflow`` (the head's tracking server, restarted by pidfile)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from ltstudy.cli.common import TRACKING, cluster_app, console
from ltstudy.errors import LtstudyError


@cluster_app.command("render")
def render(
    template: Path = typer.Argument(Path("cluster.yaml"), help="cluster-launcher file to fill in"),
    output: Path = typer.Option(..., "--output", "-o", help="rendered file for `ray up`"),
    efs_id: str | None = typer.Option(None, help="EFS file system mounted at /mnt/efs on every node"),
    region: str | None = typer.Option(None, help="AWS region (also the EFS DNS name)"),
    availability_zone: str | None = typer.Option(None, help="default REGIONa"),
    image_id: str | None = typer.Option(None, help="AMI of every node (default: the file's)"),
    max_gpu_workers: int | None = typer.Option(None, help="GPU worker nodes the autoscaler may start"),
    head_cpus: int | None = typer.Option(None, help="logical CPUs the head offers to trials (default 0: "
                                                     "the head keeps them for the GCS, MLflow, drivers)"),
    docker: bool = typer.Option(False, "--docker", help="run Ray in rayproject/ray at the pinned version"),
    docker_image: str | None = typer.Option(None, help="another image (implies --docker)"),
    mlflow_backend: str | None = typer.Option(None, help="MLflow store (default SQLite on the EFS; "
                                                          "e.g. postgresql://user:pw@host/db)"),
    worker_instance_profile: str | None = typer.Option(
        None, help="IAM instance profile (name or ARN) of the worker nodes: needed for s3:// storage"),
    pgpass: Path | None = typer.Option(None, help="PostgreSQL password file (mode 0600) copied to the head's "
                                                   "~/.pgpass: the --mlflow-backend password"),
    name: str | None = typer.Option(None, help="cluster name, also of its security group (default "
                                               "ltstudy-$USER)"),
    subnet: list[str] | None = typer.Option(None, "--subnet", help="pin the nodes to this subnet (repeat: "
                                                                   "one per availability zone)"),
    security_group: str | None = typer.Option(None, help="pin this security group (sg-...) on every node"),
    ssh_cidr: str | None = typer.Option(None, help="where SSH may come from, e.g. 203.0.113.7/32 (the "
                                                   "group's rule; printed commands, cluster doctor)"),
    spot: bool = typer.Option(False, "--spot", help="GPU workers on spot instances (see docs/cluster.md)"),
    doctor: bool = typer.Option(True, "--doctor/--no-doctor", help="run `cluster doctor` on the result when "
                                                                   "AWS credentials are at hand"),
) -> None:
    """Write a copy of cluster.yaml with your values, validated by Ray as `ray up` would."""
    from ltstudy.study.cluster.launcher import RenderOptions, render_file

    options = RenderOptions(
        efs_id=efs_id, region=region, availability_zone=availability_zone, image_id=image_id,
        max_gpu_workers=max_gpu_workers, head_cpus=head_cpus, docker=docker, docker_image=docker_image,
        mlflow_backend=mlflow_backend, worker_instance_profile=worker_instance_profile,
        pgpass=str(pgpass) if pgpass else None, name=name, subnets=tuple(subnet or ()),
        security_group=security_group, ssh_cidr=ssh_cidr, spot=spot)
    config = render_file(template, output, options)
    docker_note = ", Docker" if "docker" in config else ""
    console.print(f"wrote {output} (cluster {config['cluster_name']}, region {config['provider']['region']}, "
                  f"up to {config['max_workers']} worker nodes{docker_note}); next: ray up {output} -y",
                  soft_wrap=True)
    _render_notes(config, options, output)
    if doctor:
        _doctor_after_render(output, ssh_cidr)


def _render_notes(config: dict, o, output: Path) -> None:
    """The IAM policy file and commands for a worker profile; the network commands when nothing is pinned."""
    from ltstudy.study.cluster.aws import iam_commands, pass_role_policy

    if o.worker_instance_profile and not o.worker_instance_profile.startswith("arn:"):
        policy = output.with_name(output.stem + "-iam-policy.json")
        import json

        policy.write_text(json.dumps(pass_role_policy(o.worker_instance_profile), indent=1) + "\n")
        console.print(f"wrote {policy}: the head may pass the worker profile; once, before workers start:")
        for line in iam_commands(o.worker_instance_profile, str(policy)):
            console.print(f"  {line}", soft_wrap=True, markup=False)
    if not o.security_group:
        console.print(f"note: Ray creates the group {config['provider']['security_group']['GroupName']} with SSH "
                      "open to 0.0.0.0/0; pin your own with --security-group and --ssh-cidr "
                      "(docs/cluster.md, 'Network')", soft_wrap=True)


def _doctor_after_render(output: Path, ssh_cidr: str | None) -> None:
    from ltstudy.study.cluster.aws import has_credentials

    if not has_credentials():
        console.print(f"no AWS credentials here: run `ltstudy cluster doctor {output}` where they are")
        return
    doctor(output, ssh_cidr=ssh_cidr)


@cluster_app.command("doctor")
def doctor(
    cluster_file: Path = typer.Argument(..., help="the rendered cluster file"),
    ssh_cidr: str | None = typer.Option(None, help="where SSH must be allowed from (the group's rule)"),
) -> None:
    """Check the AWS account for what `ray up` and the first workers need, one line each; exit 2 on any
    problem (credentials, AMI, instance offerings, G vCPU quota, EFS mount targets, security group, PassRole)."""
    from ltstudy.study.cluster.doctor import Doctor
    from ltstudy.study.cluster.launcher import load_cluster_file

    for line in Doctor(load_cluster_file(cluster_file), ssh_cidr=ssh_cidr).run():
        console.print(f"ok: {line}", soft_wrap=True, markup=False)


@cluster_app.command("pull")
def pull(
    cluster_file: Path = typer.Argument(..., help="the rendered cluster file of a running cluster"),
    to: Path = typer.Option(Path("ltstudy_records"), "--to", help="local folder for the records"),
) -> None:
    """Copy the MLflow store, its artifacts and the Optuna journal from the head (`ray rsync-down`), so the
    records open after `ray down` (run it once the studies ended)."""
    from ltstudy.study.cluster.pull import pull as pull_records

    got = pull_records(cluster_file, to)
    if not got:
        raise LtstudyError(f"nothing to pull: no study records under /mnt/efs/ltstudy on the head of {cluster_file}")
    for path in got:
        console.print(f"pulled {path}", soft_wrap=True)
    db = to.expanduser().resolve() / "mlflow.db"
    if db.is_file():
        console.print(f"next: ltstudy best-config export --study STUDY --tracking-uri sqlite:///{db} -o best.yaml",
                      soft_wrap=True, markup=False)


@cluster_app.command("check")
def check(
    address: str = typer.Option("auto", help="Ray cluster address"),
    storage: str = typer.Option(..., help="the --storage a study will use (shared folder or s3://…)"),
    tracking_uri: str | None = TRACKING,
    data_root: list[str] | None = typer.Option(None, "--data-root", help="data paths every node must see"),
) -> None:
    """Check every node: storage marker, data paths, tracking server, versions. Exit 2 on any problem."""
    from ltstudy.study.cluster.nodes import ClusterCheckError, check_nodes
    from ltstudy.study.ray_session import check_address, ray_init, stop_ray
    from ltstudy.study.tracking.store import check_reachable, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    check_reachable(uri)
    check_address(address)
    ray_init(address)  # token auth as a study joins the cluster
    try:
        report = check_nodes(storage, uri, [str(Path(p).resolve()) if "://" not in p else p
                                            for p in data_root or []])
    finally:
        stop_ray()
    if report.problems:
        raise ClusterCheckError(report.problems)
    table = Table(title=f"{len(report.nodes)} nodes see {storage}")
    for col in ("node", "ip", "ltstudy", "torch", "ray"):
        table.add_column(col)
    for n in report.nodes:
        v = n["versions"]
        table.add_row(n["node_id"][:12], n["ip"], v.get("ltstudy", "?"), v.get("torch", "?"), v.get("ray", "?"))
    console.print(table)


@cluster_app.command("mlflow")
def mlflow(
    backend_store_uri: str = typer.Option(..., help="sqlite:////mnt/efs/ltstudy/mlflow.db or postgresql://…"),
    artifacts_destination: str = typer.Option(..., help="folder or s3://… for run artifacts"),
    host: str = typer.Option("127.0.0.1"),
    port: int = typer.Option(5000),
    workers: int = typer.Option(1, help="server workers (keep 1 on SQLite)"),
    allowed_hosts: str | None = typer.Option(None, help="Host headers the server accepts"),
    pidfile: Path = typer.Option(Path("~/mlflow.pid"), help="the running server's pid (replaced on restart)"),
    log: Path = typer.Option(Path("~/mlflow.log")),
) -> None:
    """(Re)start `mlflow server` in the background; returns when it answers (head start commands)."""
    from ltstudy.study.cluster.launcher import serve_mlflow

    pid = serve_mlflow(pidfile, log, host, port, backend_store_uri, artifacts_destination, workers,
                       allowed_hosts)
    console.print(f"mlflow server pid {pid} on {host}:{port} (pidfile {pidfile}, log {log})")
