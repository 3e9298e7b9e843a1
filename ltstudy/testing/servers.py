"""Servers and clusters the tests start on 127.0.0.1 and stop by pid."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_env() -> None:
    """Token auth off for the test clusters; Ray workers import ltstudy from this checkout."""
    os.environ["RAY_AUTH_MODE"] = "disabled"
    path = os.environ.get("PYTHONPATH", "")
    if str(REPO) not in path.split(os.pathsep):
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), path) if p)


def wait_for_http(url: str, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    """Block until ``url`` answers, the process dies (RuntimeError with its log) or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    delay = 0.05
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"{url} did not come up: {log.read_text()[-2000:]}") from None
            time.sleep(delay)
            delay = min(delay * 2, 1.0)


@contextlib.contextmanager
def mlflow_server(root: Path, backend: str | None = None) -> Iterator[str]:
    """A real ``mlflow server`` on a free loopback port (one worker), stopped by pid on exit; yields its URI."""
    port = free_port()
    mlflow_bin = shutil.which("mlflow") or str(Path(sys.executable).with_name("mlflow"))
    log = root / "mlflow-server.log"
    proc = subprocess.Popen(
        [mlflow_bin, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", backend or f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts")],
        stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(uri + "/health", proc, 90, log)
        yield uri
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
