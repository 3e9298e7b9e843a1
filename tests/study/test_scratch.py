"""A trial's local checkpoint folders: private, named after their process, and swept away once that process
is gone (a SIGKILLed trial cannot remove its own)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

from ltstudy.study.trainable import scratch_dir


def test_folders_of_dead_processes_are_swept_and_live_ones_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)  # re-read TMPDIR
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    root = tmp_path / f"ltstudy-scratch-{os.getuid()}"
    root.mkdir(mode=0o700)
    killed = root / f"{dead.stdout.strip()}-ckpt-abc"
    killed.mkdir()
    (killed / "checkpoint.pt").write_bytes(b"x" * 1000)
    alive = root / "1-ckpt-init"  # pid 1 is always alive
    alive.mkdir()
    other = root / "notes"  # not ours: left alone
    other.mkdir()

    made = Path(scratch_dir("ckpt"))

    assert made.parent == root and made.name.startswith(f"{os.getpid()}-ckpt-")
    assert not killed.exists() and alive.exists() and other.exists()
    assert stat.S_IMODE(root.stat().st_mode) == 0o700 and stat.S_IMODE(made.stat().st_mode) == 0o700
    assert Path(scratch_dir("ckpt")).exists() and made.exists()  # this process's own folders stay
