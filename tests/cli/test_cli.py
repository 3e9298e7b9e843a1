"""The CLI: happy paths print what a user needs (bad input: tests/test_bad_input.py)."""

import pytest

from ltstudy.cli import main


def run(capsys, *argv):
    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def test_methods_lists_hyperparameters(capsys):
    code, out, _ = run(capsys, "methods")
    assert code == 0
    for text in ("ce", "ldam_drw", "balanced_softmax", "max_m", "0.9999", "tau"):
        assert text in out


def test_datasets_show_prints_counts_head_to_tail(capsys, shared_data, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    code, out, _ = run(capsys, "datasets", "show", "--data-root", str(shared_data), "--imbalance", "100",
                       "--method", "metasaug")
    assert code == 0
    assert "many 4 classes" in out and "medium 3 classes" in out and "few 3 classes" in out
    rows = [line.split("│") for line in out.splitlines() if line.count("│") == 6]
    counts = [int(r[3]) for r in rows]
    assert counts[0] == 487 and counts == sorted(counts, reverse=True), counts  # head to tail
    assert rows[0][4].strip() == "517 (gave 30)" and [r[4].strip() for r in rows[1:]] == [str(n) for n in counts[1:]]
    assert "IF 97.4 as realised (487 / 5 training images), IF 100 requested" in out
    assert "held out per class (val 20, meta 10)" in out and "0 (517 -> 487, gave 30)" in out


def test_train_prints_progress_and_table(capsys, shared_data, tmp_path):
    code, out, _ = run(capsys, "train", "--method", "balanced_softmax", "--dataset", "cifar10-lt",
                       "--imbalance", "100", "--data-root", str(shared_data), "epochs=1",
                       "device=cpu", "--save-config", str(tmp_path / "c.yaml"))
    assert code == 0
    assert "epoch   1/1" in out and "val" in out and "test" in out and "top-1" in out
    assert "method: balanced_softmax" in (tmp_path / "c.yaml").read_text()


def test_readme_main_command_parses(monkeypatch, capsys):
    """The README's first command reaches the study with the flags it names (the study itself is mocked)."""
    import ltstudy.study.run as tune

    seen = {}
    monkeypatch.setattr(tune, "run_study", lambda opts, **kw: seen.setdefault("opts", opts) and 1 / 0)
    readme = (__import__("pathlib").Path(__file__).resolve().parents[2] / "README.md").read_text()
    line = next(x for x in readme.splitlines() if "pip install -e . &&" in x)
    argv = line.split("ltstudy ", 1)[1].split()
    with pytest.raises(ZeroDivisionError):
        main(argv)
    opts = seen["opts"]
    assert opts.method == "ce" and opts.fixed["imbalance"] == 100 and opts.fixed["epochs"] == 3


def test_features_extract_does_not_import_ray(tiny_backbone, tmp_path):
    """The feature cache works on a machine without a cluster: extraction never imports Ray."""
    import subprocess
    import sys

    code = ("import sys\nfrom ltstudy.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n"
            "    print('exit', e.code, 'ray' in sys.modules, 'mlflow' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code, "features", "extract", "--checkpoint", tiny_backbone,
                           "--storage", str(tmp_path), "--device", "cpu"], capture_output=True, text=True,
                          timeout=300)
    assert "feature cache" in proc.stdout, proc.stdout + proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "exit 0 False False"


def test_methods_shows_the_published_recipe_of_a_dataset_family(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")
    code, out, _ = run(capsys, "methods", "--dataset", "cifar100-lt", "-m", "fsgl")
    assert code == 0 and "recipe cifar100 (CIFAR-100-LT)" in out and "fcc=1.0" in out
    assert "recipe cifar10 " not in out and "source: ZY-IMU-CV/FSGL README, CIFAR-100-LT command" in out
    code, out, _ = run(capsys, "methods", "-m", "tailcalibx", "--dataset", "cifar100-lt", "--imbalance", "50")
    assert code == 0 and "tukey=0.9" in out and "alpha=0.2" in out and "momentum=0.0" in out
    code, out, _ = run(capsys, "methods", "-m", "metasaug")
    recipes = [line for line in out.splitlines() if line.strip().startswith("recipe ")]
    assert code == 0 and len(recipes) == 5 and "train_scope=classifier" in out  # cifar10/100, imagenet, places, inat
    assert "recipe places (Places-LT)" in out and "no Places-LT recipe in the reference; its ImageNet-LT one" in out
    assert "lr milestones follow the phase switch: (0.8, 0.9)" in out


def test_datasets_show_says_where_a_file_list_meta_set_comes_from(capsys, monkeypatch, tmp_path):
    from support.data import write_filelist_tree

    monkeypatch.setenv("COLUMNS", "200")
    root, lists = write_filelist_tree(tmp_path, {"train": [6, 3, 1], "val": [3, 3, 3], "test": [1, 1, 1]})
    code, out, _ = run(capsys, "datasets", "show", "--dataset", "filelist", "--data-root", str(root), "-m",
                       "metasaug", f"train_list={lists['train']}", f"val_list={lists['val']}",
                       f"test_list={lists['test']}", "num_meta=2", "train_scope=all", "--split", "val")
    assert code == 0, out
    assert "held out per class from the val list: meta 2; validation is the rest of the val list (3 images)" in out
    assert "IF 6 as realised (6 / 1 training images)" in out


def test_the_command_keeps_exit_codes_and_exit_handlers_and_no_torchvision(tmp_path):
    """``ltstudy`` (``run``) exits without Python's teardown, yet with main's exit code, its output flushed
    and the exit handlers run; a study's driver never imports torchvision (2 s of every start)."""
    import subprocess
    import sys

    code = ("import atexit, sys\nimport ltstudy.cli, ltstudy.study.run\n"
            "atexit.register(lambda: print('handlers ran', 'torchvision' in sys.modules))\n"
            "ltstudy.cli.run()\n")
    ok = subprocess.run([sys.executable, "-c", code, "methods"], capture_output=True, text=True, timeout=300,
                        cwd=tmp_path)
    assert ok.returncode == 0 and "fsgl" in ok.stdout, ok.stderr
    assert ok.stdout.strip().splitlines()[-1] == "handlers ran False"
    bad = subprocess.run([sys.executable, "-c", code, "tune", "--no-such-flag"], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert bad.returncode == 2 and "--no-such-flag" in bad.stderr and "handlers ran" in bad.stdout
