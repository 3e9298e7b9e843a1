"""What a study checks on the driver before Ray starts: the data is there, the cluster answers.

Every failure is one :class:`~ltstudy.errors.LtstudyError` line; nothing is written anywhere.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from ltstudy.config import TrialConfig, load_data
from ltstudy.errors import ConfigError, DataError
from ltstudy.methods import ImageMethod, get_method

RAY_CURRENT_CLUSTER = Path("/tmp/ray/ray_current_cluster")


def check_data(cfg: TrialConfig) -> None:
    """Build the study's dataset once on the driver (with ``download``, this is the one download), and for
    file lists check that every listed image exists: a missing, partial or corrupt dataset is one line here
    instead of a traceback in every trial."""
    if not issubclass(get_method(cfg.method), ImageMethod):
        return  # feature-stage studies read the backbone's cache, checked when it is extracted
    data = load_data(cfg)
    if data.image_root is not None:
        root = Path(data.image_root)
        for split in (data.train, data.val, data.test):
            missing = next((p for p in split.paths if not (root / p).is_file()), None)
            if missing is not None:
                raise DataError(f"image {root / missing} listed in the file lists does not exist")


def ray_address(address: str) -> str:
    """``auto`` resolved the way Ray resolves it (``RAY_ADDRESS``, then the current-cluster file)."""
    if address != "auto":
        return address
    found = os.environ.get("RAY_ADDRESS") or (
        RAY_CURRENT_CLUSTER.read_text().strip() if RAY_CURRENT_CLUSTER.is_file() else "")
    if not found or found == "auto":
        raise ConfigError("--address auto: no Ray cluster is running on this machine (start one with "
                          "`ray start --head` or `ray up`, or drop --address to use a local Ray)")
    return found


def check_address(address: str | None, timeout: float = 5.0) -> None:
    """An unreachable ``--address`` is one line within seconds (``ray.init`` would retry for minutes)."""
    if address is None or address == "local":
        return
    resolved = ray_address(address)
    parsed = urlparse(resolved if "://" in resolved else f"ray://{resolved}")
    host, port = parsed.hostname, parsed.port or (10001 if resolved.startswith("ray://") else 6379)
    if not host:
        raise ConfigError(f"--address {address!r} is not host:port")
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        raise ConfigError(f"Ray cluster at {host}:{port} (--address {address}) is unreachable: "
                          f"{exc.strerror or exc}") from None
