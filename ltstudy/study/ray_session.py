"""The Ray a study runs on: ``--address`` checked before anything starts, then joined, or a local Ray
started for the study (and shut down after it)."""

from __future__ import annotations

import gc
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlparse

import ray

from ltstudy.errors import ConfigError
from ltstudy.study import _compat

T = TypeVar("T")

RAY_CURRENT_CLUSTER = Path("/tmp/ray/ray_current_cluster")


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


def ray_init(address: str | None, verbose: int = 0, dashboard: bool = True) -> bool:
    """Connect to ``address`` or start a new local Ray; returns whether this call started it.

    Without ``--address`` the study always starts its own Ray (``address="local"``): a plain
    ``ray.init()`` would join whatever cluster Ray's current-cluster file names, a dead one included. That
    Ray listens on 127.0.0.1 only and runs in token mode (``RAY_AUTH_MODE=token`` set here, Ray 2.60's own
    default for a new local Ray, without its warning; Ray writes ``~/.ray/auth_token`` when there is none). Joining a cluster by address, Ray never turns token auth on by itself; ltstudy
    does whenever a token is at hand (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``),
    unless the user set ``RAY_AUTH_MODE``.

    ``dashboard=False`` starts a local Ray without its dashboard (1-2 s of every study's start). Only
    studies of one-worker trials may: Ray Train's placement-group cleaner asks the dashboard's State API
    whether a stopped multi-worker trial's controller is gone, and without it the groups leak.
    """
    if ray.is_initialized():
        return False
    if address in (None, "local"):
        _compat.bind_to_loopback()
    if "RAY_AUTH_MODE" not in os.environ and (address in (None, "local") or _compat.has_auth_token()):
        # explicit token mode: what Ray 2.60 picks for a new local Ray anyway (and then warns about, with
        # the opt-out in the line), and Ray generates the token if there is none
        _compat.use_token_auth()
    ray.init(address=address or "local", log_to_driver=verbose > 0,
             logging_level="INFO" if verbose > 1 else "WARNING",
             **({} if dashboard or address is not None else {"include_dashboard": False}))
    return True


def stop_ray() -> None:
    """``ray.shutdown()``, without the second it waits for a local Ray's autoscaler monitor
    (:func:`~ltstudy.study._compat.stop_autoscaler_monitor`)."""
    _compat.stop_autoscaler_monitor()
    ray.shutdown()


def shutdown_during(work: Callable[[], T]) -> T:
    """``work()`` while Ray shuts down in another thread (its processes take a second or two to end), with
    no garbage collection meanwhile: Tune's objects that died in reference cycles hold object refs and
    actor handles, and freeing one while the core worker goes away makes Ray end the process on the spot
    ("The core worker has already been shutdown ... The process will exit", exit code 1, ``work`` cut
    short). Collected after the shutdown, they are harmless."""
    stopping = threading.Thread(target=stop_ray, name="ltstudy-ray-shutdown", daemon=True)
    collecting = gc.isenabled()
    gc.disable()
    stopping.start()
    try:
        return work()
    finally:
        stopping.join()
        if collecting:
            gc.enable()
