"""Where a study's results live: ``--storage``, a local folder or a URI (``s3://…``), and the study's
folder under it (Tune's experiment, the saved options, the scheduler's state).

Like ``_compat``, this module imports nothing of the study (every sub-package may use it) and no Ray at
import time: the CLI reads the defaults of the study's options, which use it, before any command runs.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from ltstudy.errors import ConfigError

#: URI schemes of object stores and remote file systems (Tune and pyarrow read them; nothing else local)
REMOTE_SCHEMES = ("s3://", "gs://", "gcs://", "abfs://", "hdfs://")
#: ``--storage`` when none is given, relative to the working folder
DEFAULT_STORAGE = "ltstudy_results"


def filesystem(uri: str) -> tuple[Any, str]:
    """The pyarrow filesystem and path of a local path or a URI (``s3://bucket/prefix``)."""
    import pyarrow.fs as pafs  # lazily: see the module docstring

    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), uri


def is_remote(uri: str) -> bool:
    return uri.startswith(REMOTE_SCHEMES)


def storage_root(given: str | None) -> str:
    """``--storage`` as an absolute local folder or a remote URI; a local file is one line."""
    storage = given or DEFAULT_STORAGE
    if is_remote(storage):
        return storage
    path = Path(storage).expanduser().resolve()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--storage {path} is a file, not a folder")
    return str(path)


def locate(root: str, study: str) -> tuple[str, bool]:
    """(the study's experiment path under ``root``, whether a Tune experiment exists there)."""
    if not is_remote(root):
        experiment_path = str(Path(root) / study)
        return experiment_path, (Path(experiment_path) / "tuner.pkl").is_file()
    from ray.tune import Tuner  # lazily: see the module docstring

    experiment_path = f"{root.rstrip('/')}/{study}"
    return experiment_path, Tuner.can_restore(experiment_path)


def check_writable(path: str | Path, what: str, is_file: bool = False) -> None:
    """One line (``ConfigError``) when ``what`` at local ``path`` could not be written: the folder (or, with
    ``is_file``, the file and its folder) is tried with a probe file in the nearest folder that exists,
    removed at once, so nothing stays behind. Catches read-only mounts and pseudo file systems (``/proc``),
    which permission bits do not show to root."""
    target = Path(path).expanduser().absolute()
    folder = target.parent if is_file else target
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{what} {target}: {existing} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".ltstudy-write-check-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(f"{what} {target} is not writable (creating a file in {existing}: "
                          f"{exc.strerror or exc})") from None
    if is_file and target.is_file():
        try:
            os.close(os.open(target, os.O_RDWR))  # a read-only file or mount refuses this, with nothing changed
        except OSError as exc:
            raise ConfigError(f"{what} {target} is not writable ({exc.strerror or exc})") from None
