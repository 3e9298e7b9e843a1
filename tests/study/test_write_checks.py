"""Every place a study writes is checked before Ray starts: a read-only store is one line, and the check
itself leaves nothing behind."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

import pytest

from ltstudy.errors import ConfigError
from ltstudy.study.options import StudyOptions
from ltstudy.study.plan import plan_study
from ltstudy.study.storage import check_writable


@contextlib.contextmanager
def read_only_folder(path: Path):
    """``path`` with a file in it, made read-only: as root a read-only tmpfs mount (permission bits do not
    stop root), otherwise permission bits. Unmounted / restored on exit."""
    path.mkdir()
    (path / "existing.db").write_bytes(b"")
    if os.geteuid() == 0:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(path)], check=True)
        (path / "existing.db").write_bytes(b"")
        subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
        try:
            yield path
        finally:
            subprocess.run(["umount", str(path)], check=True)
    else:
        (path / "existing.db").chmod(0o444)
        path.chmod(0o555)
        try:
            yield path
        finally:
            path.chmod(0o755)


def test_read_only_places_are_refused_and_nothing_is_left(tmp_path):
    with read_only_folder(tmp_path / "ro") as ro:
        for target, is_file in ((ro / "storage", False), (ro / "existing.db", True), (ro / "new.db", True)):
            with pytest.raises(ConfigError, match=f"--x {target} is not writable"):
                check_writable(target, "--x", is_file=is_file)
        assert sorted(p.name for p in ro.iterdir()) == ["existing.db"]
    with pytest.raises(ConfigError, match="is not writable"):
        check_writable("/proc/ltstudy-none/deeper", "--x")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        check_writable(tmp_path / "file" / "below", "--x")
    check_writable(tmp_path / "new" / "deeper", "--x")  # creatable
    check_writable(tmp_path / "file", "--x", is_file=True)  # an existing writable file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "ro"]


def test_plan_refuses_a_read_only_tracking_store_and_optuna_storage(tmp_path):
    ok = {"method": "ce", "fixed": {"dataset": "synthetic"}, "storage": str(tmp_path / "s"),
          "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"}
    with read_only_folder(tmp_path / "ro") as ro:
        for extra, flag in (({"tracking_uri": f"sqlite:///{ro}/existing.db"}, "--tracking-uri"),
                            ({"tracking_uri": f"sqlite:///{ro}/mlflow.db"}, "--tracking-uri"),
                            ({"optuna_storage": str(ro / "optuna.journal")}, "--optuna-storage"),
                            ({"optuna_storage": f"sqlite:///{ro}/existing.db"}, "--optuna-storage"),
                            ({"storage": str(ro / "storage")}, "--storage")):
            with pytest.raises(ConfigError, match=f"^{flag} .* is not writable"):
                plan_study(StudyOptions(**{**ok, **extra}))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ro"]  # nothing written by any plan
