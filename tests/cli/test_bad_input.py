"""Bad input, command by command: one line naming the problem, exit code 2, no traceback, and the
tracking store and the storage folder exactly as they were (checked byte for byte after every case)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from ltstudy.cli import main

from support.servers import free_port

SPACE_OK = "method: ce\ntune:\n  lr: {type: float, low: 0.01, high: 0.5, log: true}\n"


@pytest.fixture(scope="module")
def world(tmp_path_factory, shared_data):
    """An existing tracking store (with a study-less experiment), a storage folder, and bad files."""
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("bad_input")
    store = root / "mlflow.db"
    MlflowClient(f"sqlite:///{store}").create_experiment("someone-else")
    storage = root / "storage"
    (storage / "other-study").mkdir(parents=True)
    (storage / "other-study" / "note.txt").write_text("kept as is\n")
    files = {
        "malformed": "method: ce\ntune: {lr: [unclosed\n",
        "undeclared": "method: ce\ntune:\n  momentum_typo: {type: float, low: 0.1, high: 0.9}\n",
        "low_gt_high": "method: ce\ntune:\n  lr: {type: float, low: 0.5, high: 0.01}\n",
        "log_nonpositive": "method: ce\ntune:\n  weight_decay: {type: float, low: 0.0, high: 0.001, log: true}\n",
        "empty": "",
        "a_list": "- 1\n- 2\n",
        "tunes_epochs": "method: ce\ntune:\n  epochs: {type: int, low: 100, high: 200}\n",
        "typo_fixed": "method: ce\nfixed: {dataset: cifar10lt}\n" + SPACE_OK.split("\n", 1)[1],
        "multi": "method: ce\nmetric: [val_top1, val_few]\nmode: max\n" + SPACE_OK.split("\n", 1)[1],
        "garbage.pt": "this is not a checkpoint\n",
    }
    for name, text in files.items():
        (root / (name if name.endswith(".pt") else f"{name}.yaml")).write_text(text)
    partial = root / "partial" / "cifar-10-batches-py"
    partial.mkdir(parents=True)
    shutil.copy(shared_data / "cifar-10-batches-py" / "data_batch_1", partial)
    corrupt = root / "corrupt" / "cifar-10-batches-py"
    shutil.copytree(shared_data / "cifar-10-batches-py", corrupt)
    (corrupt / "data_batch_2").write_bytes((corrupt / "data_batch_2").read_bytes()[:1000])
    (root / "empty_data").mkdir()
    (root / "a_file").write_text("x")
    return root


def _digest(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


R = "{root}"
TUNE = ["tune", "--tracking-uri", "sqlite:///{root}/mlflow.db", "--storage", "{root}/storage"]
CASES = {
    # train
    "train unknown method": (["train", "--method", "nope"], "unknown method 'nope'"),
    "train unknown dataset": (["train", "--dataset", "imagenet"], "unknown dataset 'imagenet'"),
    "train unknown key": (["train", "learning_rate=0.1"], "unknown key 'learning_rate'"),
    "train bad type": (["train", "epochs=many"], "bad value for 'epochs'"),
    "train imbalance < 1": (["train", "--imbalance", "0.5"], "bad value for 'imbalance'"),
    "train unknown flag": (["train", "--bogus-flag"], "No such option: --bogus-flag"),
    "train missing data folder": (["train", "--data-root", "/nonexistent/cifar"], "/nonexistent/cifar"),
    "train partial data folder": (["train", "--data-root", R + "/partial"], "missing CIFAR file"),
    "train corrupt pickle": (["train", "--data-root", R + "/corrupt"], "truncated or corrupt"),
    "train missing config": (["train", "--config", R + "/missing.yaml"], "config file not found"),
    "train malformed config": (["train", "--config", R + "/malformed.yaml"], "malformed YAML"),
    "train config not a mapping": (["train", "--config", R + "/a_list.yaml"], "must hold a mapping"),
    "train resume without folder": (["train", "--resume"], "--resume needs --checkpoint-dir"),
    "train unknown model": (["train", "model=resnet-32"], "unknown model 'resnet-32'"),
    "train file list without lists": (["train", "--dataset", "filelist", "--data-root", R],
                                      "needs a train list"),
    # tune: the space
    "tune malformed space": ([*TUNE, "--method", "ce", "--space", R + "/malformed.yaml"], "malformed YAML"),
    "tune undeclared name": ([*TUNE, "--method", "ce", "--space", R + "/undeclared.yaml"], "momentum_typo"),
    "tune low > high": ([*TUNE, "--method", "ce", "--space", R + "/low_gt_high.yaml"], "low (0.5) > high"),
    "tune log of zero": ([*TUNE, "--method", "ce", "--space", R + "/log_nonpositive.yaml"], "log scale needs"),
    "tune empty space": ([*TUNE, "--method", "ce", "--space", R + "/empty.yaml"], "tunes nothing"),
    "tune space a list": ([*TUNE, "--method", "ce", "--space", R + "/a_list.yaml"], "must hold a mapping"),
    "tune missing space": ([*TUNE, "--method", "ce", "--space", R + "/nope.yaml"], "search-space file not found"),
    "tune epochs tuned under asha": ([*TUNE, "--method", "ce", "--space", R + "/tunes_epochs.yaml"],
                                     "'epochs' is tuned"),
    "tune confirm multi-objective": ([*TUNE, "--method", "ce", "--space", R + "/multi.yaml", "--confirm", "2",
                                      "dataset=synthetic"], "--confirm ranks configurations by one objective"),
    # tune: method, settings, data
    "tune no method": ([*TUNE], "missing option '--method'"),
    "tune unknown method": ([*TUNE, "--method", "no_such_method"], "unknown method 'no_such_method'"),
    "tune unknown key": ([*TUNE, "--method", "ce", "not_a_key=1"], "not_a_key"),
    "tune unknown dataset": ([*TUNE, "--method", "ce", "--dataset", "imagenet"], "unknown dataset 'imagenet'"),
    "tune empty data folder": ([*TUNE, "--method", "ce", "--data-root", R + "/empty_data"], "not found"),
    "tune partial data folder": ([*TUNE, "--method", "ce", "--data-root", R + "/partial"], "missing CIFAR file"),
    "tune corrupt data": ([*TUNE, "--method", "ce", "--data-root", R + "/corrupt"], "truncated or corrupt"),
    "tune garbage backbone": ([*TUNE, "--method", "tailcalibx", "--backbone", R + "/garbage.pt"],
                              "is not a PyTorch checkpoint"),
    "tune missing backbone": ([*TUNE, "--method", "tailcalibx"], "pass --backbone"),
    # tune: options
    "tune zero trials": ([*TUNE, "--method", "ce", "--num-trials", "0"], "--num-trials must be at least 1"),
    "tune zero workers": ([*TUNE, "--method", "ce", "--workers", "0"], "--workers must be at least 1"),
    "tune odd gpu fraction": ([*TUNE, "--method", "ce", "--gpus-per-worker", "1.5"], "--gpus-per-worker"),
    "tune bad grace": ([*TUNE, "--method", "ce", "--grace-period", "soon"], "--grace-period"),
    "tune bad reduction": ([*TUNE, "--method", "ce", "--reduction-factor", "1"], "--reduction-factor"),
    "tune grace under halving": ([*TUNE, "--method", "ce", "--scheduler", "halving", "--grace-period", "3",
                                  "dataset=synthetic"], "--grace-period sets ASHA's rungs; --scheduler halving has"),
    "tune reduction without stopping": ([*TUNE, "--method", "ce", "--scheduler", "none", "--reduction-factor", "3",
                                         "dataset=synthetic"], "--reduction-factor sets ASHA's rungs"),
    "tune bad time budget": ([*TUNE, "--method", "ce", "--time-budget", "soon"], "--time-budget"),
    "tune unknown sampler": ([*TUNE, "--method", "ce", "--sampler", "bogus", "dataset=synthetic"],
                             "unknown sampler 'bogus'"),
    "tune unknown scheduler": ([*TUNE, "--method", "ce", "--scheduler", "bogus", "dataset=synthetic"],
                               "unknown scheduler 'bogus'"),
    "tune study name with /": ([*TUNE, "--method", "ce", "--study-name", "a/b", "dataset=synthetic"],
                               "--study-name 'a/b': use letters, digits"),
    "tune resume unknown study": ([*TUNE, "--resume", "--study-name", "ghost"], "no study 'ghost'"),
    "tune resume without name": ([*TUNE, "--resume", "--method", "ce"], "--resume needs --study-name"),
    "tune storage is a file": (["tune", "--method", "ce", "--storage", R + "/a_file", "--tracking-uri",
                                "sqlite:///{root}/mlflow.db", "dataset=synthetic"], "is a file"),
    # tune: every place it writes (a pseudo file system refuses files even to root, like a read-only mount)
    "tune storage not writable": (["tune", "--method", "ce", "--storage", "/proc/ltstudy-none/storage",
                                   "--tracking-uri", "sqlite:///{root}/mlflow.db", "dataset=synthetic"],
                                  "--storage /proc/ltstudy-none/storage is not writable"),
    "tune tracking store not writable": (["tune", "--method", "ce", "--storage", R + "/storage", "--tracking-uri",
                                          "sqlite:////proc/mlflow.db", "dataset=synthetic"],
                                         "--tracking-uri /proc/mlflow.db is not writable"),
    "tune optuna journal not writable": ([*TUNE, "--method", "ce", "--optuna-storage", "/proc/optuna.journal",
                                          "dataset=synthetic"], "--optuna-storage /proc/optuna.journal is not"),
    "tune optuna sqlite not writable": ([*TUNE, "--method", "ce", "--optuna-storage", "sqlite:////proc/o.db",
                                         "dataset=synthetic"], "--optuna-storage /proc/o.db is not writable"),
    "tune file store uri": (["tune", "--method", "ce", "--storage", R + "/storage", "--tracking-uri",
                             "file:///tmp/mlruns"], "use sqlite"),
    "tune unreachable tracking": (["tune", "--method", "ce", "--storage", R + "/storage", "--tracking-uri",
                                   "http://127.0.0.1:{port}", "dataset=synthetic"], "unreachable"),
    "tune unreachable cluster": ([*TUNE, "--method", "ce", "--address", "127.0.0.1:{port}", "dataset=synthetic"],
                                 "is unreachable"),
    # validate-space
    "validate missing file": (["validate-space", R + "/nope.yaml"], "config file not found"),
    "validate typo in fixed": (["validate-space", R + "/typo_fixed.yaml"], "unknown dataset 'cifar10lt'"),
    "validate empty": (["validate-space", R + "/empty.yaml"], "no 'method'"),
    # best-config export
    "export into a missing folder": (["best-config", "export", "--study", "s", "-o", R + "/no/such/best.yaml",
                                      "--tracking-uri", "sqlite:///{root}/mlflow.db"], "does not exist"),
    "export unknown study": (["best-config", "export", "--study", "ghost", "--tracking-uri",
                              "sqlite:///{root}/mlflow.db"], "no ltstudy study named 'ghost'"),
    "export from a missing store": (["best-config", "export", "--study", "s", "--tracking-uri",
                                     "sqlite:///{root}/pulled.db"], "pulled.db does not exist"),
    "export unreachable tracking": (["best-config", "export", "--study", "s", "--tracking-uri",
                                     "http://127.0.0.1:{port}"], "unreachable"),
    "export bad format": (["best-config", "export", "--study", "s", "--format", "xml"], "--format must be"),
    # features extract
    "extract missing checkpoint": (["features", "extract", "--checkpoint", R + "/none.pt", "--storage",
                                    R + "/storage"], "not found"),
    "extract garbage checkpoint": (["features", "extract", "--checkpoint", R + "/garbage.pt", "--storage",
                                    R + "/storage"], "is not a PyTorch checkpoint"),
    # studies, confirm
    "studies unreachable tracking": (["studies", "list", "--tracking-uri", "http://127.0.0.1:{port}"],
                                     "unreachable"),
    "studies missing store": (["studies", "list", "--tracking-uri", "sqlite:///{root}/elsewhere.db"],
                              "elsewhere.db does not exist (no study has recorded there)"),
    "studies file store uri": (["studies", "list", "--tracking-uri", "file:///tmp/mlruns"], "use sqlite"),
    "confirm unknown study": (["confirm", "ghost", "--tracking-uri", "sqlite:///{root}/mlflow.db"],
                              "no ltstudy study named 'ghost'"),
}


def test_the_table_is_broad():
    commands = {argv[0] for argv, _ in CASES.values()}
    assert len(CASES) >= 40 and {"train", "tune", "validate-space", "best-config", "features",
                                 "studies"} <= commands


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_and_changes_nothing(case, world, capsys):
    argv, message = CASES[case]
    port = str(free_port())
    argv = [a.replace("{root}", str(world)).replace("{port}", port) for a in argv]
    store, storage = _digest(world), None
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    out = capsys.readouterr()
    assert exit_info.value.code == 2, (out.out[-2000:], out.err[-2000:])
    err = out.err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert message in err, err
    assert "Traceback" not in out.out + out.err
    storage = _digest(world)
    assert storage == store, "the tracking store, the storage folder or the inputs changed"
    assert not (Path.cwd() / "mlflow.db").exists() and not (Path.cwd() / "ltstudy_results").exists()
