"""``ltstudy cluster pull``: the study records copied home from the head before ``ray down``.

One ``ray rsync-down`` per record, through a copy of the cluster file without its ``rsync_exclude`` and
``rsync_filter``: Ray applies those to rsync-down too, and the file keeps ``mlflow.db`` out of what ``ray up``
uploads, so through the file itself the store would never arrive.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from ltstudy.errors import LtstudyError
from ltstudy.study.cluster.launcher import EFS_MOUNT, load_cluster_file

#: what ``cluster pull`` copies from the head's shared storage: the MLflow store, its artifacts, Optuna's journal
PULLED = ("mlflow.db", "mlartifacts/", "optuna.journal")


def pull_commands(cluster_file: str | Path, to: str | Path, root: str = f"{EFS_MOUNT}/ltstudy") -> list[list[str]]:
    """The ``ray rsync-down`` commands that copy the study records from the head to ``to``."""
    ray_bin = Path(sys.executable).with_name("ray")
    ray_cmd = str(ray_bin) if ray_bin.exists() else "ray"
    to = Path(to).expanduser().resolve()
    return [[ray_cmd, "rsync-down", str(cluster_file), f"{root}/{name}", f"{to}/{name}"] for name in PULLED]


def pull(cluster_file: str | Path, to: str | Path, run: Any = subprocess.run) -> list[str]:
    """Copy the records home (see :func:`pull_commands`); returns what arrived. A missing one (no study used
    the journal yet) is skipped; a failing ``ray rsync-down`` is one line."""
    config = load_cluster_file(cluster_file, needs="provider")  # any provider's: Ray's local one has no node types
    Path(to).expanduser().mkdir(parents=True, exist_ok=True)
    unfiltered = {k: v for k, v in config.items() if k not in ("rsync_exclude", "rsync_filter")}
    got = []
    with tempfile.TemporaryDirectory(prefix="ltstudy-pull-") as tmp:
        copy = Path(tmp) / Path(cluster_file).name  # same cluster name, so the same head
        copy.write_text(yaml.safe_dump(unfiltered, sort_keys=False))
        for cmd in pull_commands(copy, to):
            done = run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                tail = (done.stderr or done.stdout or "").strip().splitlines()[-1:] or ["no output"]
                if "No such file" in " ".join(tail) or "vanished" in " ".join(tail):
                    continue
                raise LtstudyError(f"ray rsync-down {cmd[3]} failed: {tail[0][:300]}")
            if Path(cmd[4]).exists():
                got.append(cmd[4])
    return got
