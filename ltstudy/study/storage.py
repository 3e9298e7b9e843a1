"""Where a study's results live: ``--storage``, a local folder or a URI (``s3://…``), and the study's
folder under it (Tune's experiment, the saved options, the scheduler's state).

Like ``_compat``, this module imports nothing of the study (every sub-package may use it) and no Ray at
import time: the CLI reads the defaults of the study's options, which use it, before any command runs.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from ltstudy.errors import ConfigError

#: URI schemes of object stores and remote file systems (Tune and pyarrow read them; nothing else local)
REMOTE_SCHEMES = ("s3://", "gs://", "gcs://", "abfs://", "hdfs://")
#: ``--storage`` when none is given, relative to the working folder
DEFAULT_STORAGE = "ltstudy_results"
#: the file in a study's folder that names the study: ``studies delete`` removes only folders holding it
STUDY_MARKER = ".ltstudy-study"
#: what a study name may hold (it becomes a folder name, an MLflow experiment and an Optuna study)
STUDY_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


def check_study_name(name: str) -> str:
    """``name`` if it is a safe folder name (letters, digits, ``._-``, not starting with ``.``)."""
    if not STUDY_NAME.fullmatch(name or "") or len(name) > 200:
        raise ConfigError(f"--study-name {name!r}: use letters, digits, '.', '_' and '-' only, not starting "
                          "with '.' (at most 200 characters)")
    return name


def write_marker(experiment_path: str, study: str) -> None:
    """Mark ``experiment_path`` as study ``study``'s folder (see :data:`STUDY_MARKER`)."""
    fs, path = filesystem(f"{experiment_path.rstrip('/')}/{STUDY_MARKER}")
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as out:
        out.write(study.encode())


def has_marker(experiment_path: str, study: str) -> bool:
    """Whether ``experiment_path`` holds the marker naming ``study`` (and nothing else)."""
    try:
        fs, path = filesystem(f"{experiment_path.rstrip('/')}/{STUDY_MARKER}")
        with fs.open_input_stream(path) as src:
            return src.read(1024).decode(errors="replace") == study
    except (OSError, ValueError):
        return False


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


def public_url(url: str) -> str:
    """The URL as it is recorded and printed (MLflow tags, the saved options, headers, reports): without
    its password, which the database client then reads from a file only the user can read
    (``~/.pgpass`` for PostgreSQL, ``~/.my.cnf`` for MySQL)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", "@", 1)))


def redact_url(url: str) -> str:
    """The URL with its password shown as ``***`` (messages)."""
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


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
