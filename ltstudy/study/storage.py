"""Where a study's results live: ``--storage``, a local folder or a URI (``s3://…``), and the study's
folder under it (Tune's experiment, the saved options, the scheduler's state).

Like ``_compat``, this module imports nothing of the study (every sub-package may use it) and no Ray at
import time: the CLI reads the defaults of the study's options, which use it, before any command runs.
"""

from __future__ import annotations

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
