"""The security table: untrusted files parsed safely (a crafted CIFAR pickle runs nothing, file-list paths
stay under the image root), study names that cannot leave the storage folder, ``studies delete`` refusing a
folder that is not provably the study's, a local Ray on loopback with token auth, and a password given in
``--optuna-storage`` found nowhere a study records or prints anything."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from ltstudy.data.cifar import _unpickle
from ltstudy.data.filelist import read_filelist
from ltstudy.errors import ConfigError, DataError
from ltstudy.study.storage import check_study_name, public_url, redact_url

from support.configs import TINY
from support.servers import loopback_env, postgres_server

SENTINEL = "Sentinel-pw-7f3a9c"


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_crafted_cifar_pickle_runs_nothing(tmp_path):
    marker = tmp_path / "owned"
    for payload in (_Payload(marker), {"data": _Payload(marker), "labels": [0]}):
        path = tmp_path / "data_batch_1"
        path.write_bytes(pickle.dumps(payload, protocol=2))
        with pytest.raises(DataError, match=r"refused global (posix|os)\.system"):
            _unpickle(path)
        assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_an_official_style_batch_still_loads(tmp_path, protocol):
    batch = {"batch_label": "training batch 1 of 5", "labels": [3, 1], "filenames": [b"a.png", "b.png"],
             "data": np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072), "n": np.int64(2)}
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps(batch, protocol=protocol))
    got = _unpickle(path)
    assert got["labels"] == [3, 1] and np.array_equal(got["data"], batch["data"]) and got["n"] == 2


@pytest.mark.parametrize("line", ["../../etc/passwd 0", "/etc/hostname 1", "a/../../b.jpg 2"])
def test_file_list_paths_that_leave_the_image_root_are_refused(tmp_path, line):
    path = tmp_path / "train.txt"
    path.write_text(f"ok/img.jpg 0\n{line}\n")
    with pytest.raises(DataError) as err:
        read_filelist(path)
    assert "line 2" in str(err.value) and "leaves the image root" in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["..", ".", ".hidden", "a/b", "a\\b", "", "x y", "../x", "é"])
def test_bad_study_names_are_refused(name):
    with pytest.raises(ConfigError, match="--study-name"):
        check_study_name(name)


def test_good_study_names_pass():
    for name in ("ce-cifar10-lt-20261202-101010", "fsgl_c100", "a.b-1"):
        assert check_study_name(name) == name


def test_study_name_dotdot_is_one_line_exit_2_before_ray(tmp_path):
    run = subprocess.run([sys.executable, "-m", "ltstudy.cli", "tune", "--method", "ce", "--study-name", "..",
                          "--storage", str(tmp_path / "s"), "--tracking-uri", f"sqlite:///{tmp_path}/m.db",
                          *[f"{k}={v}" for k, v in TINY.items()]],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert "--study-name '..'" in run.stderr and not (tmp_path / "s").exists()


def test_url_redaction():
    url = f"postgresql://ltstudy:{SENTINEL}@db.internal:5432/optuna"
    assert public_url(url) == "postgresql://ltstudy@db.internal:5432/optuna"
    assert redact_url(url) == "postgresql://ltstudy:***@db.internal:5432/optuna"
    assert public_url("/mnt/efs/optuna.journal") == "/mnt/efs/optuna.journal"


_PROBE = """
import json, os, psutil, ray
from ltstudy.study.ray_session import ray_init
assert ray_init(None)
me = psutil.Process()
listen = sorted({(p.name(), c.laddr.ip, c.laddr.port) for p in [me, *me.children(recursive=True)]
                 for c in p.net_connections(kind="inet") if c.status == "LISTEN"})
print(json.dumps({"listen": listen, "mode": os.environ.get("RAY_AUTH_MODE"),
                  "gcs": ray.get_runtime_context().gcs_address}), flush=True)
input()  # keep Ray up while the parent tries to join it with a wrong token
ray.shutdown()
"""

_JOIN = "import ray; ray.init(address='{gcs}', logging_level='ERROR'); print('joined')"


@pytest.mark.slow
def test_a_local_study_ray_listens_on_loopback_with_token_auth(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["HOME"] = str(tmp_path)  # Ray writes the new local cluster's token to ~/.ray/auth_token
    env["PYTHONPATH"] = loopback_env()["PYTHONPATH"]
    probe = subprocess.Popen([sys.executable, "-c", _PROBE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True, env=env, cwd=tmp_path,
                             start_new_session=True)
    try:
        report = json.loads(probe.stdout.readline())
        names = {name for name, _, _ in report["listen"]}
        assert {"gcs_server", "raylet"} <= names, report
        outside = [entry for entry in report["listen"] if entry[1] not in ("127.0.0.1", "::ffff:127.0.0.1")]
        assert not outside, f"listening beyond loopback: {outside}"
        assert report["mode"] == "token"
        token = tmp_path / ".ray" / "auth_token"
        assert token.is_file()
        join = [sys.executable, "-c", _JOIN.format(gcs=report["gcs"])]
        env = {**env, "RAY_AUTH_MODE": "token", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
        right = subprocess.run(join, capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
        assert right.returncode == 0 and "joined" in right.stdout, right.stderr[-2000:]
        try:  # a wrong token is refused: Ray gives up with an error, or keeps retrying
            wrong = subprocess.run(join, capture_output=True, text=True, timeout=30, cwd=tmp_path,
                                   env={**env, "RAY_AUTH_TOKEN": "f" * 64}, start_new_session=True)
            assert wrong.returncode != 0 and "joined" not in wrong.stdout
        except subprocess.TimeoutExpired as exc:
            assert "joined" not in (exc.stdout or b"").decode()
    finally:
        from support.servers import stop_session

        probe.stdin.close()
        stop_session(probe)


def _files_with(root: Path, needle: bytes) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                if needle in path.read_bytes():
                    hits.append(str(path))
            except OSError:
                pass
    return hits


@pytest.mark.slow
def test_a_password_in_the_optuna_url_is_recorded_and_printed_nowhere(tmp_path):
    """A small study with a sentinel password in --optuna-storage (the server trusts loopback, so the study
    runs): no MLflow tag or param, printed line, saved option, report, Tune file, log or rendered cluster file
    holds it. The same study's tag then planted to point elsewhere: ``studies delete`` deletes nothing."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="lt-sec-", dir="/tmp"))  # short: Ray's socket paths
    env = loopback_env(RAY_TMPDIR=str(ray_tmp))
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cli = [sys.executable, "-m", "ltstudy.cli"]
    try:
        with postgres_server(("optuna",)) as pg:
            optuna_url = pg.replace("ltstudy@", f"ltstudy:{SENTINEL}@") + "/optuna"
            out = []
            tune = subprocess.run([*cli, "tune", "--method", "ce", "--num-trials", "2", "--study-name", "sec",
                                   "--storage", str(tmp_path / "storage"), "--tracking-uri", tracking,
                                   "--optuna-storage", optuna_url, "-v", *[f"{k}={v}" for k, v in TINY.items()],
                                   "epochs=1"], capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
            out.append(tune.stdout + tune.stderr)
            assert tune.returncode == 0, out[-1][-3000:]
            assert "Optuna: optuna-dashboard postgresql://ltstudy@127.0.0.1" in tune.stdout
            report = subprocess.run([*cli, "report", "sec", "-o", str(tmp_path / "report.html"),
                                     "--tracking-uri", tracking], capture_output=True, text=True, timeout=300,
                                    env=env, cwd=tmp_path)
            out.append(report.stdout + report.stderr)
            assert report.returncode == 0, out[-1][-3000:]
            show = subprocess.run([*cli, "studies", "show", "sec", "--tracking-uri", tracking],
                                  capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
            out.append(show.stdout + show.stderr)
            pgpass = tmp_path / "pgpass"
            pgpass.write_text(f"db:5432:mlflow:ltstudy:{SENTINEL}\n")
            pgpass.chmod(0o600)
            token = tmp_path / "auth_token"
            token.write_text("0" * 64)
            token.chmod(0o600)
            render = subprocess.run([*cli, "cluster", "render", "--efs-id", "fs-0123456789abcdef0", "-o",
                                     str(tmp_path / "my-cluster.yaml"), "--mlflow-backend",
                                     "postgresql://ltstudy@db:5432/mlflow", "--pgpass", str(pgpass)],
                                    capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[2],
                                    env={**env, "RAY_AUTH_TOKEN_PATH": str(token)})
            out.append(render.stdout + render.stderr)
            assert render.returncode == 0, out[-1][-2000:]
            assert not [o for o in out if SENTINEL in o], "the password was printed"
            leaks = [p for p in _files_with(tmp_path, SENTINEL.encode()) if p != str(pgpass)]
            leaks += _files_with(ray_tmp, SENTINEL.encode())
            assert not leaks, f"the password is in {leaks}"
            from ltstudy.study.tracking.records import find_study

            mlc, exp, parent = find_study(tracking, "sec")
            runs = mlc.search_runs([exp.experiment_id])
            assert len(runs) >= 3
            for run in runs:
                assert SENTINEL not in json.dumps([run.data.tags, run.data.params])
            assert parent.data.tags["ltstudy.optuna_storage"].startswith("postgresql://ltstudy@127.0.0.1")
            _planted_delete_is_refused(cli, tracking, tmp_path, env)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _planted_delete_is_refused(cli: list[str], tracking: str, tmp_path: Path, env: dict[str, str]) -> None:
    from ltstudy.study.tracking.records import find_study

    victim = tmp_path / "victim"
    (victim / "keep").mkdir(parents=True)
    mlc, _, parent = find_study(tracking, "sec")
    real = parent.data.tags["ltstudy.storage"]
    assert (Path(real) / ".ltstudy-study").read_text() == "sec"
    mlc.set_tag(parent.info.run_id, "ltstudy.storage", str(victim))
    planted = subprocess.run([*cli, "studies", "delete", "sec", "-y", "--tracking-uri", tracking],
                             capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert planted.returncode == 2, planted.stdout + planted.stderr
    assert len(planted.stderr.strip().splitlines()) == 1 and "nothing is deleted" in planted.stderr
    assert (victim / "keep").is_dir()
    (victim / ".ltstudy-study").write_text("another-study")  # a marker naming another study: refused too
    again = subprocess.run([*cli, "studies", "delete", "sec", "-y", "--tracking-uri", tracking],
                           capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert again.returncode == 2 and (victim / "keep").is_dir()
    mlc.set_tag(parent.info.run_id, "ltstudy.storage", real)
    ok = subprocess.run([*cli, "studies", "delete", "sec", "-y", "--tracking-uri", tracking],
                        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert not Path(real).exists() and (victim / "keep").is_dir()


def test_the_optuna_storage_pickles_without_its_password(tmp_path):
    from ltstudy.study.search.optuna_storage import open_optuna_storage

    storage = open_optuna_storage(f"sqlite:///{tmp_path / 'o.db'}")
    storage.url = f"postgresql://u:{SENTINEL}@db/optuna"  # what a PostgreSQL URL leaves in the state
    state = storage.__getstate__()
    assert state["url"] == "postgresql://u@db/optuna" and SENTINEL not in pickle.dumps(state).decode("latin1")
